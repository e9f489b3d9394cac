"""Decoded + augmented samples/s of the shard stream vs torchvision ImageFolder, same images, same transform.

    python bench/data_throughput.py [--images 768] [--workers 1 2] [--size 224]

Makes an ImageNet-like folder of JPEGs (about 400 x 350 px, drawn from the synthetic shapes),
writes it to shards with ``data.write_shards imagefolder``, then times one epoch of each
loader with the DeiT training transform (timm, RandAugment, 224 px) per worker count. Prints a
table and writes JSON (default ``bench/results/data_throughput.json``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import write_shards  # noqa: E402
from data.stream import build_train_stream  # noqa: E402
from data.synthetic import draw_sample  # noqa: E402
from data.transforms import build_transform  # noqa: E402


def make_folder(root: Path, count: int, classes: int = 8) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        sample = draw_sample(i, seed=0, size=64)
        width, height = int(rng.integers(320, 480)), int(rng.integers(280, 420))
        image = Image.fromarray(sample.image).resize((width, height), Image.BICUBIC)
        folder = root / f"class_{sample.label % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img_{i:05d}.jpg", quality=90)


def time_epoch(batches) -> tuple[int, float]:
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += len(batch["image"] if isinstance(batch, dict) else batch[0])
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default="bench/results/data_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        make_folder(folder, args.images)
        write_shards.main(["imagefolder", str(folder), str(shards), "--shard-size", "128", "--no-progress"])
        transform = build_transform(True, args.size)
        for workers in args.workers:
            stream = build_train_stream(str(shards), batch_size=args.batch, num_workers=workers, image_size=args.size,
                                        buffer_size=256)
            ours, ours_s = time_epoch(stream)
            loader = DataLoader(ImageFolder(str(folder), transform=transform), batch_size=args.batch, shuffle=True,
                                num_workers=workers, drop_last=True)
            base, base_s = time_epoch(loader)
            rows.append(dict(workers=workers, stream_samples=ours, stream_per_s=ours / ours_s,
                             stream_per_worker_s=ours / ours_s / workers, imagefolder_samples=base,
                             imagefolder_per_s=base / base_s, imagefolder_per_worker_s=base / base_s / workers,
                             ratio=(ours / ours_s) / (base / base_s)))

    print(f"DeiT train transform at {args.size} px, {args.images} JPEGs (~400x350), batch {args.batch}, "
          f"one epoch each (first epoch: cold workers included)")
    print(f"{'workers':>7} {'stream/s':>9} {'per worker':>10} {'ImageFolder/s':>13} {'per worker':>10} {'ratio':>6}")
    for row in rows:
        print(f"{row['workers']:>7} {row['stream_per_s']:>9.1f} {row['stream_per_worker_s']:>10.1f} "
              f"{row['imagefolder_per_s']:>13.1f} {row['imagefolder_per_worker_s']:>10.1f} {row['ratio']:>6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"images": args.images, "size": args.size, "batch": args.batch, "rows": rows,
                               "torch": torch.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
