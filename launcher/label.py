"""The labelling job: dense token labels for a shard set, from a trained run of this engine or, for the
embedded synthetic shapes, exact ("oracle") maps.

    python -m launcher.label --teacher runs/deit_tiny_cpu --shards data/shards/synthetic --out DIR [--k 5]
    python -m launcher.label --oracle --shards data/shards/synthetic --out DIR [--grid 16] [--k 5]

It writes a new shard set in ``DIR``: the same shards, keys and member order, each sample with two
more members, ``KEY.tlv.npy`` (float16 ``[k, h, w]`` top-k logits) and ``KEY.tli.npy`` (uint16 class
ids), and ``shards.json`` with a ``token_labels`` block (``data/token_labels.py``). Byte-reproducible
like ``data.write_shards`` (fixed member order, times and owners).

Teacher (LVVIT_SPEC "Making maps at small scale"): the run's newest checkpoint that verifies (or a
``step-N`` folder), exported as ``launcher.export`` does, in eval mode. Each image, warped whole to
the teacher's square input (so map cells are image cells; the official ``generate_label.py`` centre-
crops instead), goes through the model; the classifier head is applied to every final-norm patch token
(LV-ViT teachers: their dense ``aux_head``), giving a ``grid x grid`` logit map of which the top-k are
kept. The log reports the teacher's map accuracy: argmax of the map's mean logits against the label.
Oracle: ``data.synthetic.oracle_token_maps`` from the shard index's ``synthetic`` block (seed, size).
Exit codes: 0 done, 2 refused (bad arguments, missing checkpoint or shards, an existing output).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

log = logging.getLogger("launcher.label")


def load_teacher(source: str) -> tuple[torch.nn.Module, dict]:
    """The trained model of a run folder or checkpoint folder, in eval mode, and its run's config. The
    checkpoint is chosen, verified and read under the readers' lock (a run still training meanwhile
    does not rotate it away), as ``launcher.export`` reads it."""
    import yaml

    from .checkpoint import checkpoint_state_dict
    from .export import plain_model

    try:
        state, point = checkpoint_state_dict(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--teacher {source}: {err}") from err
    run_dir = point.folder.parent.parent
    model = plain_model(run_dir / "config.yaml")
    model.load_state_dict(state, strict=True)
    return model.eval(), yaml.safe_load((run_dir / "config.yaml").read_text())


class TeacherMaps:
    """Images -> top-k logit maps of a trained ViT (``[B, K, gh, gw]`` before the top-k)."""

    def __init__(self, model: torch.nn.Module, config: dict, k: int) -> None:
        from torchvision import transforms as T

        self.model, self.k = model, int(k)
        size = int(config["model"]["img_size"])
        data = config.get("data", {})
        mean, std = data.get("mean", (0.485, 0.456, 0.406)), data.get("std", (0.229, 0.224, 0.225))
        interpolation = T.InterpolationMode(data.get("interpolation", "bicubic"))
        # the whole image warped to the teacher's square input: map coordinates are image coordinates
        self.prepare = T.Compose(
            [T.Resize((size, size), interpolation=interpolation), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
        )
        self.size = size
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
        self.dense_head = model.aux_head if isinstance(getattr(model, "aux_head", None), torch.nn.Linear) else model.head
        if k > int(model.num_classes):
            raise ValueError(f"--k {k} is more than the teacher's {model.num_classes} classes")

    @torch.no_grad()
    def __call__(self, images: list) -> torch.Tensor:
        x = torch.stack([self.prepare(image) for image in images])
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens :]
        tokens = tokens[:, : self.grid[0] * self.grid[1]]
        logits = self.dense_head(tokens)  # [B, N, K]
        return logits.transpose(1, 2).reshape(len(images), -1, *self.grid)


def _samples(url: str, count: int) -> Iterator[dict]:
    from data.shards import read_samples

    for _, sample in read_samples(url, list(range(count))):
        yield sample


def _write(path: Path, samples: list[dict]) -> None:
    from webdataset import TarWriter

    with TarWriter(str(path), encoder=False, mtime=0, user="toe", group="toe") as writer:
        for sample in samples:
            writer.write(sample)


def label_shards(
    shards: str,
    out: str,
    maps: Callable[[list[dict]], list[tuple[np.ndarray, np.ndarray]]],
    block: dict,
    splits: Optional[list[str]] = None,
    overwrite: bool = False,
) -> dict:
    """Write ``out``: ``shards``' samples with ``maps(samples) -> [(logits, ids)]`` added to each of the
    given splits (default all; the others are copied as they are). Returns the new index."""
    from data.samples import SkipSample, read_label
    from data.shards import INDEX_NAME, ShardIndex
    from data.token_labels import encode_maps
    from data.write_shards import sample_offsets

    index = ShardIndex.load(shards)
    chosen = index.splits if splits is None else splits
    unknown = sorted(set(chosen) - set(index.splits))
    if unknown:
        raise ValueError(f"--splits {unknown}: {shards} has {index.splits}")
    target = Path(out)
    if (target / INDEX_NAME).exists() and not overwrite:
        raise FileExistsError(f"{target} already holds shards; choose an empty directory or pass --overwrite")
    target.mkdir(parents=True, exist_ok=True)
    hits, counted = 0, 0
    meta = json.loads(json.dumps(index.meta))  # a deep copy: the labelled shards' entries change below
    for split in index.splits:
        entries = meta["splits"][split]["shards"]
        for entry, url in zip(entries, index.split(split).urls):
            if split not in chosen:
                shutil.copyfile(url, target / entry["name"])
                continue
            samples = list(_samples(url, entry["samples"]))
            results = []
            for start in range(0, len(samples), 64):
                results += maps(samples[start : start + 64])
            labelled = []
            for sample, (logits, ids) in zip(samples, results):
                labelled.append({**sample, **encode_maps(logits, ids)})
                try:
                    label = read_label(sample)
                except SkipSample:
                    continue
                hits += int(_map_class(logits, ids) == label)
                counted += 1
            _write(target / entry["name"], labelled)
            if "offsets" in entry:  # the samples grew by their maps: record where each one now starts
                entry["offsets"], entry["bytes"] = sample_offsets(str(target / entry["name"]))
        log.info("%s: %s", split, "labelled" if split in chosen else "copied unlabelled")
    for name in [index.meta.get("classes", "classes.json")] + [p.name for p in Path(index.root).glob("*_coco.json")]:
        if (Path(index.root) / name).is_file():
            shutil.copyfile(Path(index.root) / name, target / name)
    accuracy = hits / counted if counted else None
    meta["token_labels"] = {**block, "splits": list(chosen), "map_top1": accuracy}
    (target / INDEX_NAME).write_text(json.dumps(meta, indent=1))
    if accuracy is not None:
        log.info("map accuracy (argmax of the map's mean logits vs the label) over %d samples: %.4f", counted, accuracy)
    return meta


def _map_class(logits: np.ndarray, ids: np.ndarray) -> int:
    """The class of the map pooled to 1 x 1: the top-k entries scattered into dense cells, averaged."""
    classes = int(ids.max()) + 1
    dense = np.zeros((classes,) + logits.shape[1:], np.float64)
    np.put_along_axis(dense, ids.astype(np.int64), logits.astype(np.float64), axis=0)
    return int(dense.mean(axis=(1, 2)).argmax())


def teacher_maps(source: str, k: int) -> tuple[Callable, dict]:
    from data.samples import SkipSample, decode_image
    from data.token_labels import index_block, topk_maps

    model, config = load_teacher(source)
    teacher = TeacherMaps(model, config, k)

    def maps(samples: list[dict]) -> list:
        images = []
        for sample in samples:
            try:
                images.append(decode_image(sample))
            except SkipSample as skip:
                raise ValueError(f"sample {sample.get('__key__')}: {skip}: the teacher cannot label it") from None
        return [topk_maps(grid, k) for grid in teacher(images)]

    return maps, index_block(f"teacher:{source}", teacher.size, k, *teacher.grid)


def oracle(shards: str, grid: int, k: int) -> tuple[Callable, dict]:
    from data.shards import ShardIndex
    from data.synthetic import oracle_token_maps
    from data.token_labels import index_block

    synthetic = ShardIndex.load(shards).meta.get("synthetic")
    if not synthetic or synthetic.get("objects") != 1:
        raise ValueError(
            f"--oracle needs the embedded synthetic classification shards (an index with a "
            f"'synthetic' block, objects 1); {shards} has {synthetic!r}"
        )
    seed, size = int(synthetic["seed"]), int(synthetic["size"])
    if size % grid:
        raise ValueError(f"--grid {grid} must divide the image size {size}")

    def maps(samples: list[dict]) -> list:
        out = []
        for sample in samples:
            index = int(sample["__key__"].rsplit("_", 1)[1])  # data.write_shards: f"{split}_{index:08d}"
            out.append(oracle_token_maps(index, seed, size, grid, k))
        return out

    return maps, index_block("oracle", size, k, grid, grid)


def teacher_top1(source: str) -> Optional[float]:
    """The teacher run's final top-1 (its ``final.json``), None when it has none."""
    from .checkpoint import find_resume_point

    point = find_resume_point(Path(source))
    final = point.folder.parent.parent / "final.json" if point is not None else None
    if final is None or not final.is_file():
        return None
    top1 = json.loads(final.read_text()).get("top1")
    return float(top1) if isinstance(top1, (int, float)) else None


def map_warning(map_top1: Optional[float], top1: Optional[float], tolerance: float = 0.05) -> Optional[str]:
    """A warning when the maps' pooled class (what a student's class target becomes) is right clearly less
    often than the teacher itself: the student learns the maps, not the teacher's prediction."""
    if map_top1 is None or top1 is None or map_top1 >= top1 - tolerance:
        return None
    return (
        f"the maps' pooled class names the label for {map_top1:.1%} of the images, the teacher itself is right on "
        f"{top1:.1%} (its final top-1): token labelling's class target is the pooled map, so a student learns the "
        f"{map_top1:.1%}. The mean of a ViT's per-token head outputs is its prediction only if it was trained on "
        f"that mean (global average pooling) or on dense labels; an LV-ViT trained without token labelling learns "
        f"its aux head only through the max over tokens (docs/methods/lvvit.md, 'Teachers')"
    )


def label_maps(shards: str, grid: int, k: int) -> tuple[Callable, dict]:
    """Maps made of each sample's own class label: every cell's top class is the label at ``ORACLE_LOGIT``
    (``data.token_labels.oracle_maps`` with the object covering the whole image), the rest flat. A
    teacher that is always right and says nothing about where the object is: the control that tells
    token labelling's own cost (MixToken, the dense loss) from what a real teacher's maps give or take."""
    from data.samples import SkipSample, read_label
    from data.shards import ShardIndex
    from data.token_labels import index_block, oracle_maps

    classes = len(ShardIndex.load(shards).classes())
    if not classes:
        raise ValueError(f"--labels needs the class names of {shards} (classes.json): the maps have one class per entry")
    if k > classes:
        raise ValueError(f"--k {k} is more than the {classes} classes of {shards}")
    whole = np.ones((grid, grid), bool)

    def maps(samples: list[dict]) -> list:
        out = []
        for sample in samples:
            try:
                out.append(oracle_maps(whole, read_label(sample, classes), classes, grid, k))
            except SkipSample as skip:
                raise ValueError(f"sample {sample.get('__key__')}: {skip}: it has no class to label it with") from None
        return out

    return maps, index_block("labels", grid, k, grid, grid)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m launcher.label", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", help="a run folder or checkpoint folder of this engine")
    source.add_argument("--oracle", action="store_true", help="exact maps for the embedded synthetic shapes")
    source.add_argument("--labels", action="store_true", help="maps of each sample's own class label (a control)")
    parser.add_argument("--shards", required=True, help="the shard directory to label")
    parser.add_argument("--out", required=True, help="the new shard directory")
    parser.add_argument("--k", type=int, default=5, help="classes kept per map cell (generate_label.py: 5)")
    parser.add_argument("--grid", type=int, default=16, help="--oracle / --labels: map cells per side")
    parser.add_argument("--splits", nargs="*", help="splits to label (default all; the others are copied)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.k < 1 or args.grid < 1:
        parser.error("--k and --grid must be >= 1")
    try:
        if args.oracle:
            maps, block = oracle(args.shards, args.grid, args.k)
        elif args.labels:
            maps, block = label_maps(args.shards, args.grid, args.k)
        else:
            maps, block = teacher_maps(args.teacher, args.k)
        meta = label_shards(args.shards, args.out, maps, block, splits=args.splits, overwrite=args.overwrite)
        warning = map_warning(meta["token_labels"]["map_top1"], teacher_top1(args.teacher)) if args.teacher else None
        if warning:
            log.warning("%s", warning)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        log.error("%s", err)
        return 2
    log.info("wrote %s", Path(args.out) / "shards.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
