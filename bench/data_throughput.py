"""Decoded + augmented images/s: the shard stream with timm's transform (PIL), torchvision ImageFolder with
the same transform, and the same shard stream through DALI (``data.backend: dali``), same JPEGs.

    python bench/data_throughput.py [--images 384] [--workers 1] [--rounds 2] [--device cpu|gpu]
                                    [--dali-threads 1] [--size 224] [--batch 32]

Makes an ImageNet-like folder of JPEGs (450-550 x 340-410 px, mean ~500 x 375, quality 90, textured so
that a file is ~90 KB, near ImageNet's ~110 KB; drawn from the synthetic shapes), writes it to
shards with ``data.write_shards imagefolder``, then times one epoch of each loader with the full
DeiT training transform (random resized crop, flip, RandAugment rand-m9-mstd0.5-inc1, normalise,
random erasing 0.25; 224 px), and the JPEGs decoded alone (PIL, no transform: the floor), the loaders interleaved
round by round (``bench/timing.py``'s
reasoning: a slow phase of the machine touches all alike), the median round kept. Each row gives
wall-clock img/s and img per CPU-second (CPU time of this process, all its threads, and of its
DataLoader workers: "per core" whatever the thread count). ``--device gpu`` runs the DALI pipeline
with GPU decoding (``mixed``) and GPU operators; its figure is then GPU img/s (CPU per image also
shown). Prints a table and writes JSON (default ``bench/results/data_throughput.json``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from data import write_shards
from data.shards import ShardIndex, read_samples
from data.stream import build_train_stream
from data.synthetic import draw_sample
from data.transforms import build_transform

from timing import cpu_seconds

# what a DeiT-S needs at 40% MFU on one H100 (issue 14's estimate: ~4.6 GFLOPs forward x 3 per image)
DEIT_S_NEEDS = 14_000


def make_folder(root: Path, count: int, classes: int = 8) -> float:
    """``count`` JPEGs in ``classes`` folders; returns their mean size in KB."""
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(count):
        sample = draw_sample(i, seed=0, size=64)
        width, height = int(rng.integers(450, 551)), int(rng.integers(340, 411))
        image = np.asarray(Image.fromarray(sample.image).resize((width, height), Image.BICUBIC), np.float32)
        coarse = rng.normal(0, 40, (height // 4, width // 4, 3)) + 128  # photo-like texture at two scales
        texture = np.asarray(
            Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC), np.float32
        )
        pixels = (image + texture - 128 + rng.normal(0, 10, image.shape)).clip(0, 255).astype(np.uint8)
        folder = root / f"class_{sample.label % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        (folder / f"img_{i:05d}.jpg").write_bytes(buffer.getvalue())
        sizes.append(len(buffer.getvalue()))
    return float(np.mean(sizes)) / 1024


def time_epoch(make_batches, sync=None) -> dict:
    start, cpu, count = time.perf_counter(), cpu_seconds(), 0
    batches = make_batches()
    for batch in batches:
        count += len(batch["image"] if isinstance(batch, dict) else batch[0])
    if sync is not None:
        sync()
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    wall, used = time.perf_counter() - start, cpu_seconds() - cpu
    return {"images": count, "wall_s": wall, "cpu_s": used, "per_s": count / wall, "per_cpu_s": count / used}


def decode_only(encoded: list[bytes], batch: int):
    """The floor of any PIL loader: the JPEGs decoded to RGB in this process, no transform, no workers."""
    for start in range(0, len(encoded) - batch + 1, batch):
        images = []
        for data in encoded[start : start + batch]:
            with Image.open(io.BytesIO(data)) as image:
                images.append(image.convert("RGB"))
        yield {"image": images}


def read_costs(folder: Path, shards: Path, rounds: int) -> dict[str, float]:
    """CPU microseconds per sample of reading the raw bytes alone, no decode: every sample of every
    shard, and every 8th (what one of 8 ranks reads of a shard under repeated augmentation or a subset),
    through ``tarfile`` (``read_samples``) and through the byte offsets the index recorded (``read_indexed``,
    what the stream uses); and every JPEG of the folder opened and read (what ImageFolder's loader does
    before decoding). Interleaved, median of ``rounds``."""
    split = ShardIndex.load(str(shards)).split("train")
    shard_list = list(enumerate(zip(split.urls, split.counts)))
    files = sorted(folder.rglob("*.jpg"))

    def reader(indexed: bool, step: int):
        def read() -> int:
            count = 0
            for shard, (url, samples) in shard_list:
                offsets = list(range(0, int(samples), step))
                for _ in split.read(shard, offsets) if indexed else read_samples(url, offsets):
                    count += 1
            return count

        return read

    def by_files() -> int:
        for path in files:
            with open(path, "rb") as f:
                f.read()
        return len(files)

    cases = {
        "tarfile, all": reader(False, 1),
        "indexed, all": reader(True, 1),
        "tarfile, 1 in 8": reader(False, 8),
        "indexed, 1 in 8": reader(True, 8),
        "JPEG files (ImageFolder)": by_files,
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds + 1):  # the first round warms the page cache
        for name, read in cases.items():
            start = time.process_time()
            count = read()
            times[name].append((time.process_time() - start) / count * 1e6)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of every loader")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where the DALI pipeline runs")
    parser.add_argument("--dali-threads", type=int, default=None, help="DALI CPU threads (default: 1 cpu, 4 gpu)")
    parser.add_argument("--no-imagefolder", action="store_true", help="skip the torchvision ImageFolder baseline")
    parser.add_argument("--no-dali", action="store_true", help="skip the DALI row")
    parser.add_argument("--out", default="bench/results/data_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    threads = args.dali_threads or (4 if args.device == "gpu" else 1)

    samples: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        mean_kb = make_folder(folder, args.images)
        write_shards.main(["imagefolder", str(folder), str(shards), "--shard-size", "128", "--no-progress"])
        transform = build_transform(True, args.size)  # DeiT's: rand-m9-mstd0.5-inc1, re_prob 0.25, bicubic
        common = dict(batch_size=args.batch, num_workers=args.workers, image_size=args.size, buffer_size=256)
        cases = {"PIL stream": (lambda: build_train_stream(str(shards), **common), None)}
        encoded = [path.read_bytes() for path in sorted(folder.rglob("*.jpg"))]
        cases["decode only"] = (lambda: decode_only(encoded, args.batch), None)
        if not args.no_imagefolder:
            cases["ImageFolder"] = (
                lambda: DataLoader(
                    ImageFolder(str(folder), transform=transform),
                    batch_size=args.batch,
                    shuffle=True,
                    num_workers=args.workers,
                    drop_last=True,
                ),
                None,
            )
        try:
            from data import dali

            available = dali.dali_available() and not args.no_dali
        except ImportError:
            available = False
        if available:
            stream = dali.build_train_stream(str(shards), device=args.device, num_threads=threads, **common)
            build = time.perf_counter()
            stream.pipeline.build()  # once, outside the timing (a training run pays it once at start-up)
            build_s = time.perf_counter() - build
            sync = torch.cuda.synchronize if args.device == "gpu" else None
            cases[f"DALI {args.device.upper()}"] = (lambda: stream, sync)
        else:
            build_s = None
            print(
                "DALI row left out: "
                + ("--no-dali" if args.no_dali else "DALI is not installed (pip install -r requirements-dali.txt)")
            )
        for name, (make, sync) in cases.items():  # warm-up round: first-epoch costs (page cache, worker start)
            time_epoch(make, sync)
        for _ in range(args.rounds):
            for name, (make, sync) in cases.items():
                samples.setdefault(name, []).append(time_epoch(make, sync))

        reads = read_costs(folder, shards, max(3, args.rounds))

    rows = []
    for name, runs in samples.items():
        rows.append(
            {
                "loader": name,
                "per_s": statistics.median(r["per_s"] for r in runs),
                "per_cpu_s": statistics.median(r["per_cpu_s"] for r in runs),
                "images_per_epoch": runs[0]["images"],
                "rounds": runs,
            }
        )
    pil = next(r for r in rows if r["loader"] == "PIL stream")
    for row in rows:
        row["per_cpu_s_vs_pil"] = row["per_cpu_s"] / pil["per_cpu_s"]
        row["per_s_vs_pil"] = row["per_s"] / pil["per_s"]
        # the same ratio round by round (each round runs every loader once, back to back), then the median:
        # steadier than the ratio of medians on a machine whose load swings between rounds
        row["per_cpu_s_vs_pil_paired"] = statistics.median(
            r["per_cpu_s"] / p["per_cpu_s"] for r, p in zip(row["rounds"], pil["rounds"])
        )

    print(
        f"DeiT train transform (RandAugment m9, random erasing) at {args.size} px; {args.images} JPEGs "
        f"(~500x375, q90, mean {mean_kb:.0f} KB), batch {args.batch}, {args.workers} DataLoader worker(s), "
        f"DALI {threads} thread(s) on {args.device}; median of {args.rounds} interleaved epochs; "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'loader':>12} {'img/s':>8} {'img/CPU-s':>10} {'vs PIL (per CPU-s)':>19} {'paired by round':>16}")
    for row in rows:
        print(
            f"{row['loader']:>12} {row['per_s']:>8.1f} {row['per_cpu_s']:>10.1f} {row['per_cpu_s_vs_pil']:>19.2f} "
            f"{row['per_cpu_s_vs_pil_paired']:>16.2f}"
        )
    print("raw bytes only, CPU us per sample: " + ", ".join(f"{name} {us:.1f}" for name, us in reads.items()))
    dali_row = next((r for r in rows if r["loader"].startswith("DALI")), None)
    if dali_row is not None:
        print(
            f"DALI pipeline build: {build_s:.1f} s (once per run); DeiT-S on one H100 needs ~{DEIT_S_NEEDS} img/s: "
            f"{dali_row['per_s'] / DEIT_S_NEEDS:.2f} of it here"
            + ("" if args.device == "gpu" else f", i.e. ~{DEIT_S_NEEDS / dali_row['per_cpu_s']:.0f} such CPU cores")
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "images": args.images,
                "mean_jpeg_kb": mean_kb,
                "size": args.size,
                "batch": args.batch,
                "workers": args.workers,
                "dali_device": args.device,
                "dali_threads": threads,
                "dali_build_s": build_s,
                "deit_s_needs_per_s": DEIT_S_NEEDS,
                "rows": rows,
                "read_us_per_sample": reads,
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "torch": torch.__version__,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
