"""Per checkpoint of the Tri-Level swap runs and their random-80% controls: the subset's class mix (held out;
removed and restored since the previous checkpoint) and, at EVAL_STEPS, each class's test accuracy.

The runs were started with ``checkpoint.every=148 checkpoint.keep=12`` so that every checkpoint stays: a
checkpoint at step 148 k is written just before swap k (at the start of epoch 4 k), so the difference of
the subsets at 148 (k + 1) and 148 k is swap k. The training split's labels are read from the shards in
sample-id order (the shards' order in shards.json, the samples' order in each tar).

    PYTHONPATH=. python docs/evidence/fmnist3k_trilevel/swap_classes.py RUNS_DIR swap_classes.json
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from launcher.config import load_config
from launcher.export import plain_model
from launcher.tasks import make_task

EVAL_STEPS = (296, 444, 592)  # ~20 s of 2 cores each: the steps around the first swaps


def train_labels(shards: Path) -> np.ndarray:
    index = json.loads((shards / "shards.json").read_text())
    labels = []
    for shard in index["splits"]["train"]["shards"]:
        with tarfile.open(shards / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    labels.append(int(tar.extractfile(member).read()))
    return np.array(labels)


def eval_set(stream) -> tuple[torch.Tensor, np.ndarray]:
    images, labels = [], []
    for batch in stream:
        valid = batch["valid"]
        images.append(batch["image"][valid])
        labels.append(batch["label"][valid].numpy())
    return torch.cat(images), np.concatenate(labels)


@torch.no_grad()
def per_class_accuracy(model, images: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    pred = torch.cat([model(chunk).argmax(-1) for chunk in images.split(1000)]).numpy()
    return np.bincount(labels, weights=pred == labels, minlength=10) / np.bincount(labels, minlength=10)


def main(runs: str, out: str) -> None:
    torch.set_num_threads(2)
    results, classes = {}, None
    labels = test = None
    for run in sorted(Path(runs).iterdir()):
        cfg = load_config(str(run / "config.yaml"))
        if labels is None:
            labels = train_labels(Path(cfg.data.path))
            classes = json.loads((Path(cfg.data.path) / "classes.json").read_text())["names"]
        if test is None:
            _, stream = make_task(cfg).build_streams(micro=500, rank=0, world=1, pin_memory=False)
            test = eval_set(stream)
        model = plain_model(run / "config.yaml").eval()
        rows, previous = [], None
        steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
        for step in steps:
            state = torch.load(run / "checkpoints" / f"step-{step}" / "mp_rank_00_model_states.pt", weights_only=False)
            plug = state["plugins"]["trilevel_examples"]
            subset = np.unpackbits(plug["subset"].numpy(), count=int(plug["samples"])).astype(bool)
            row = {
                "step": step,
                "swaps_done": int(plug["swaps_done"]),
                "held_out": np.bincount(labels[~subset], minlength=10).tolist(),
            }
            if step in EVAL_STEPS:
                model.load_state_dict(state["module"], strict=True)
                row["accuracy"] = per_class_accuracy(model, *test).round(4).tolist()
            if previous is not None:
                row["removed"] = np.bincount(labels[previous & ~subset], minlength=10).tolist()
                row["restored"] = np.bincount(labels[~previous & subset], minlength=10).tolist()
            rows.append(row)
            previous = subset
            print(run.name, step, row["swaps_done"], row.get("removed"), row.get("accuracy"), flush=True)
        results[run.name] = rows
    Path(out).write_text(json.dumps({"classes": classes, "runs": results}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
