"""End to end: the real ``launcher.train`` on real JPEG shards, data pipeline included, ToE against no ToE.

    python bench/step_throughput.py --end-to-end                 # CPU: DeiT-Ti 224 px, 48 steps of 32
    python bench/step_throughput.py --end-to-end --model deit_small_patch16_224 --steps 600   # a GPU

Writes ImageNet-sized JPEGs (``bench/data_throughput.py``'s textured ~500 x 375 px, quality 90) into
WebDataset shards (``data.write_shards imagefolder``), then trains the DeiT recipe twice for the same
steps, with ``methods.toe`` (r1 = ``--r1``: 3 stages over the run) and without (``methods.toe=null``),
alternating runs (``--repeats`` pairs). A run's time is its training segment in ``metrics.jsonl``
(the first window's start to the last record: start-up and the final evaluation left out); the
theoretical speed-up is the ratio of the runs' logged training FLOPs (the plug-in stack's cost
model). Where the data pipeline cannot keep up, the measured speed-up falls below the theoretical
one: that gap is what this benchmark is for.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def write_jpeg_shards(root: Path, images: int) -> Path:
    from data import write_shards

    from data_throughput import make_folder

    folder, shards = root / "jpegs", root / "shards"
    kb = make_folder(folder, images)
    print(f"{images} JPEGs, {kb:.0f} KB on average")
    write_shards.main(
        ["imagefolder", str(folder), str(shards), "--val-fraction", "0.05", "--shard-size", "256", "--no-progress"]
    )
    return shards


def segment(metrics: Path) -> tuple[float, float, int]:
    """Seconds of the training segment, its training FLOPs and steps, from a run's metrics.jsonl."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    start = next(r["time"] for r in records if r.get("event") == "start")
    windows = [r for r in records if "loss" in r]
    return windows[-1]["time"] - start, sum(r["flops"] for r in windows), sum(r["steps"] for r in windows)


def data_share(metrics: Path) -> Optional[float]:
    """The share of the run's step time spent waiting for data (``time/data`` over ``time/window``,
    ``launcher.step_timer``), or None for a log without them."""
    windows = [json.loads(line) for line in metrics.read_text().splitlines() if '"time/window"' in line]
    whole = sum(r["time/window"] for r in windows)
    return sum(r.get("time/data", 0.0) for r in windows) / whole if whole else None


def run(args, shards: Path, out: Path, name: str, toe: bool, on_gpu: bool) -> tuple[float, float, int]:
    overrides = [
        f"out_dir={out}",
        f"name={name}",
        f"data.path={shards}",
        f"model.name={args.model}",
        "model.num_classes=8",
        f"train.steps={args.steps}",
        f"train.global_batch={args.batch}",
        f"train.log_every={max(1, args.steps // 8)}",
        "train.eval_every=0",
        "checkpoint.every=0",
        "checkpoint.keep=1",
        "data.repeats=1",
        f"data.workers={args.workers}",
        f"train.precision={args.precision or ('bf16' if on_gpu else 'fp32')}",
        f"methods.toe={{r1: {args.r1}}}" if toe else "methods.toe=null",
    ]
    command = [
        sys.executable,
        "-m",
        "launcher.train",
        "--config",
        str(ROOT / "configs/deit_tiny_toe_r05.yaml"),
        "--no-resume",
        *overrides,
    ]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return segment(out / name / "metrics.jsonl")


def end_to_end(args, on_gpu: bool) -> dict:
    args.model = args.model or ("deit_small_patch16_224" if on_gpu else "deit_tiny_patch16_224")
    args.batch = args.batch or (256 if on_gpu else 32)
    args.steps = args.steps or (600 if on_gpu else 48)
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        root = Path(tmp)
        shards = write_jpeg_shards(root, args.images or max(512, args.batch * 4))
        times: dict[str, list[float]] = {"dense": [], "toe": []}
        flops: dict[str, float] = {}
        shares: dict[str, list] = {"dense": [], "toe": []}
        for repeat in range(args.repeats):
            for label in ("dense", "toe"):
                seconds, total, steps = run(args, shards, root / "runs", f"{label}_{repeat}", label == "toe", on_gpu)
                times[label].append(seconds)
                shares[label].append(data_share(root / "runs" / f"{label}_{repeat}" / "metrics.jsonl"))
                flops[label] = total
                print(f"{label:>5} #{repeat}: {steps} steps in {seconds:.1f} s ({steps * args.batch / seconds:.1f} img/s)")
    measured = statistics.median(times["dense"]) / statistics.median(times["toe"])
    theory = flops["dense"] / flops["toe"]
    result = {
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "r1": args.r1,
        "workers": args.workers,
        "seconds": times,
        "flops": flops,
        "data_share": {label: statistics.median(v) if None not in v else None for label, v in shares.items()},
        "measured_speedup": measured,
        "theoretical_speedup": theory,
        "measured_over_theoretical": measured / theory,
    }
    print(
        f"whole run, data included: ToE r1={args.r1} {measured:.3f}x measured vs {theory:.3f}x theoretical "
        f"= {measured / theory:.3f}"
    )
    return result
