"""CPU per batch handed from a DataLoader worker to the training process: a batch of 32 images
(3 x 224 x 224 float32, stacked into shared memory by ``default_collate`` as the stream's codecs do)
plus N small tensors, sent as torch sends them (shared memory: one file descriptor per tensor, fetched
by the main process over a socket connection to the worker) against inlined by
``data.stream.inline_small_tensors`` (small tensors inside the batch's pickle).

    python bench/batch_transfer.py [--batches 200] [--rounds 3] [--small 3 160]

N = 3 is a classification batch's ``label`` / ``sample_id`` / ``valid``; N = 160 what a detection batch
of 32 images carries in its target dicts (five tensors per image). CPU time is this process's and its
finished workers' (``os.times``), the cases interleaved round by round and the median kept. Prints a
table and writes JSON (default ``bench/results/batch_transfer.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from data.stream import inline_small_tensors

from timing import cpu_seconds


class _Batches(IterableDataset):
    def __init__(self, small: int, inline: bool, batches: int, size: int) -> None:
        self.small, self.inline, self.batches, self.size = small, inline, batches, size

    def __iter__(self):
        image = torch.zeros(3, self.size, self.size)
        for i in range(self.batches):
            batch = {
                "image": default_collate([image] * 32),
                "small": [torch.tensor([i, 1, 2, 3]) for _ in range(self.small)],
            }
            yield inline_small_tensors(batch) if self.inline else batch


def _ms_per_batch(small: int, inline: bool, batches: int, size: int) -> float:
    start = cpu_seconds()
    for _ in DataLoader(_Batches(small, inline, batches, size), batch_size=None, num_workers=1):
        pass
    return 1e3 * (cpu_seconds() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--small", type=int, nargs="+", default=[3, 160])
    parser.add_argument("--out", default="bench/results/batch_transfer.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for small in args.small:
        rounds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for inline in (False, True):
                rounds[inline].append(_ms_per_batch(small, inline, args.batches, args.size))
        shared, inlined = statistics.median(rounds[False]), statistics.median(rounds[True])
        rows.append({"small_tensors": small, "shared_ms": shared, "inlined_ms": inlined, "rounds": rounds})
    print(f"CPU ms per batch of 32 x 3 x {args.size}^2 float32 + N small tensors, 1 worker, median of {args.rounds}")
    print(f"{'N':>5} {'shared memory':>14} {'inlined':>8} {'saved':>7}")
    for row in rows:
        print(
            f"{row['small_tensors']:>5} {row['shared_ms']:>14.2f} {row['inlined_ms']:>8.2f} "
            f"{row['shared_ms'] - row['inlined_ms']:>7.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batches": args.batches, "size": args.size, "rows": rows}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
