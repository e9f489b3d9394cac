"""Remote shards against local disk (issue 26): img/s and MB/s per DataLoader worker from an S3 store
(SeaweedFS on 127.0.0.1) and an HTTP server, with and without the node cache, and what a mid-epoch
resume costs, as ratios measured in one run.

    python bench/remote_throughput.py [--images 256] [--rounds 2] [--size 224] [--batch 32]

Makes ImageNet-like JPEGs (``bench/data_throughput.py``'s, ~90 KB each), writes shards of 64 and
uploads them with ``data.write_shards --upload``; starts the servers of ``tests/object_store.py``
(real servers on loopback: the network here is the loopback device, so these figures bound the
client's overhead (requests, retries layer, copies), not a cluster's bandwidth). Each case reads
one epoch through ``build_train_stream`` with one DataLoader worker, in two modes:

- ``raw``: the stream's reads only (an identity transform on the undecoded bytes is not possible,
  so ``raw`` reads every sample of every shard through ``SplitIndex.read`` in the worker's order):
  MB/s of shard bytes;
- ``decoded``: the full DeiT training transform (as ``bench/data_throughput.py``): img/s.

Cases interleaved round by round, median kept. Resume: a stream stopped after half of its first
slot's batches is resumed in a new process-like stream; the cost is the time to the first resumed
batch and the shard bytes requested, with ranged reads (offsets recorded at write time) and
against a server that ignores ranges (sequential skip). Prints a table and writes JSON (default
``bench/results/remote_throughput.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from data import write_shards
from data.remote import RemoteOptions
from data.shards import ShardIndex
from data.stream import build_train_stream

from data_throughput import make_folder


def _object_store():
    """``tests/object_store.py``, the tests' real servers on loopback: loaded from its file (tests/ is not a
    package, and this script adds nothing to ``sys.path``)."""
    spec = importlib.util.spec_from_file_location(
        "object_store", Path(__file__).resolve().parents[1] / "tests" / "object_store.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["object_store"] = module
    spec.loader.exec_module(module)
    return module


_servers = _object_store()
HttpServer, SeaweedS3 = _servers.HttpServer, _servers.SeaweedS3


def raw_read(url: str, remote: RemoteOptions) -> dict:
    """Every sample of every shard through ``SplitIndex.read`` (what a worker does), in one process."""
    split = ShardIndex.load(url, remote=remote).split("train")
    start, count, size = time.perf_counter(), 0, 0
    for shard in range(len(split.counts)):
        for _, sample in split.read(shard, list(range(int(split.counts[shard])))):
            count += 1
            size += sum(len(v) for k, v in sample.items() if k != "__key__")
    wall = time.perf_counter() - start
    return {"samples": count, "mb": size / 1e6, "wall_s": wall, "per_s": count / wall, "mb_per_s": size / 1e6 / wall}


def decoded_epoch(url: str, remote: RemoteOptions, args) -> dict:
    stream = build_train_stream(
        url, batch_size=args.batch, num_workers=1, image_size=args.size, buffer_size=64, remote=remote
    )
    start, count = time.perf_counter(), 0
    for batch in stream:
        count += len(batch["image"])
    wall = time.perf_counter() - start
    return {"images": count, "wall_s": wall, "per_s": count / wall}


def resume_cost(url: str, args, take: int, resume_url: str = None) -> dict:
    """Time to the first batch of a fresh stream, and of one resumed after ``take`` batches (from
    ``resume_url``, default ``url``: another server, so that its log holds the resumed reads only),
    and the resumed stream's whole rest of the epoch."""
    common = dict(batch_size=args.batch, num_workers=1, image_size=args.size, buffer_size=64)
    fresh = build_train_stream(url, **common)
    start = time.perf_counter()
    iterator = iter(fresh)
    next(iterator)
    fresh_s = time.perf_counter() - start
    for _ in range(take - 1):
        next(iterator)
    iterator.close()
    state = fresh.state_dict()
    resumed = build_train_stream(resume_url or url, **common)
    resumed.load_state_dict(state)
    start = time.perf_counter()
    iterator = iter(resumed)
    next(iterator)
    resumed_s = time.perf_counter() - start
    rest = sum(1 for _ in iterator)
    return {"first_batch_s": fresh_s, "resumed_first_batch_s": resumed_s, "resumed_batches": 1 + rest}


def sent_bytes(server) -> int:
    return sum(int(row[4]) for row in server.requests(r"\.tar$"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default="bench/results/remote_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mean_kb = make_folder(tmp / "folder", args.images)
        store = SeaweedS3(tmp / "seaweed").start()
        os.environ.update(store.env)
        http = plain = None
        try:
            shards = tmp / "shards"
            assert (
                write_shards.main(
                    [
                        "imagefolder",
                        str(tmp / "folder"),
                        str(shards),
                        "--shard-size",
                        "64",
                        "--no-progress",
                        "--upload",
                        "s3://bench-shards/jpeg",
                    ]
                )
                == 0
            )
            http = HttpServer(shards, tmp / "http.log").start()
            plain = HttpServer(shards, tmp / "plain.log", ranges=False).start()
            none = RemoteOptions()
            cases = {
                "local disk": (str(shards), lambda: none),
                "S3": ("s3://bench-shards/jpeg", lambda: none),
                "S3 + cache (cold)": ("s3://bench-shards/jpeg", lambda: RemoteOptions(cache_dir=tempfile.mkdtemp(dir=tmp))),
                "S3 + cache (warm)": ("s3://bench-shards/jpeg", lambda: RemoteOptions(cache_dir=str(tmp / "warm"))),
                "HTTP": (http.url, lambda: none),
            }
            raw_read("s3://bench-shards/jpeg", RemoteOptions(cache_dir=str(tmp / "warm")))  # fills the warm cache
            samples: dict = {}
            for name, (url, options) in cases.items():  # warm-up: page cache, connections
                raw_read(url, options())
            for _ in range(args.rounds):
                for name, (url, options) in cases.items():
                    samples.setdefault(name, {}).setdefault("raw", []).append(raw_read(url, options()))
                for name, (url, options) in cases.items():
                    samples[name].setdefault("decoded", []).append(decoded_epoch(url, options(), args))
            take = max(1, args.images // args.batch // 2)
            resume = {"local disk": resume_cost(str(shards), args, take)}
            ranged = HttpServer(shards, tmp / "ranged-resume.log").start()
            sequential = HttpServer(shards, tmp / "plain-resume.log", ranges=False).start()
            try:
                resume["HTTP, ranged reads"] = resume_cost(http.url, args, take, ranged.url)
                resume["HTTP, no ranges (sequential skip)"] = resume_cost(plain.url, args, take, sequential.url)
                ranged_bytes, plain_bytes = sent_bytes(ranged), sent_bytes(sequential)
            finally:
                ranged.stop()
                sequential.stop()
            resume["S3, ranged reads"] = resume_cost("s3://bench-shards/jpeg", args, take)
            shard_bytes = sum(p.stat().st_size for p in shards.glob("train-*.tar"))
        finally:
            for server in (http, plain):
                if server is not None:
                    server.stop()
            store.stop()

    rows = []
    for name, runs in samples.items():
        rows.append(
            {
                "case": name,
                "mb_per_s": statistics.median(r["mb_per_s"] for r in runs["raw"]),
                "raw_samples_per_s": statistics.median(r["per_s"] for r in runs["raw"]),
                "img_per_s": statistics.median(r["per_s"] for r in runs["decoded"]),
                "runs": runs,
            }
        )
    local = rows[0]
    for row in rows:
        row["mb_per_s_vs_local"] = row["mb_per_s"] / local["mb_per_s"]
        row["img_per_s_vs_local"] = row["img_per_s"] / local["img_per_s"]
    print(
        f"{args.images} JPEGs (mean {mean_kb:.0f} KB) in shards of 64; 1 DataLoader worker; DeiT train transform "
        f"at {args.size} px for img/s; servers on 127.0.0.1; median of {args.rounds} interleaved rounds; "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'case':>20} {'MB/s raw':>9} {'vs local':>9} {'img/s':>7} {'vs local':>9}")
    for row in rows:
        print(
            f"{row['case']:>20} {row['mb_per_s']:>9.1f} {row['mb_per_s_vs_local']:>9.2f} {row['img_per_s']:>7.1f} "
            f"{row['img_per_s_vs_local']:>9.2f}"
        )
    print(f"mid-epoch resume after {take} batches (time to the first batch, fresh -> resumed):")
    for name, cost in resume.items():
        cost["ratio"] = cost["resumed_first_batch_s"] / cost["first_batch_s"]
        print(f"{name:>36}: {cost['first_batch_s']:.2f} s -> {cost['resumed_first_batch_s']:.2f} s ({cost['ratio']:.2f}x)")
    print(
        f"shard bytes sent for the resumed rest of the epoch: ranged {ranged_bytes / 1e6:.1f} MB, no ranges "
        f"{plain_bytes / 1e6:.1f} MB ({ranged_bytes / max(1, plain_bytes):.2f}x); the whole split is "
        f"{shard_bytes / 1e6:.1f} MB"
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
                "rows": rows,
                "resume": resume,
                "resume_take_batches": take,
                "resume_bytes": {"ranged": ranged_bytes, "no_ranges": plain_bytes, "split": shard_bytes},
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "torch": torch.__version__,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
