"""Interleaved timing shared by the benchmarks: every case runs once per round, in turn, so a slow
phase of the machine touches all cases alike; each case's figure is its median over the rounds. Also the
benchmarks' common options: device, autocast dtype and rounds, defaulting by device."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its finished children (DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype``, ``--rounds``, ``--warmup`` (read back with ``device_options``)."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--dtype", default=None, choices=list(DTYPES), help="autocast dtype; default fp32 on CPU, bf16 on GPU"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 on CPU, 30 on GPU)")
    parser.add_argument("--warmup", type=int, default=2)


def device_options(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, int]:
    """The device (``auto``: CUDA when there is one), the autocast dtype and the rounds, by device."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    return device, DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")], args.rounds or (30 if on_gpu else 5)


def interleaved_medians(
    cases: dict[str, Callable[[], object]], *, device: torch.device, rounds: int, warmup: int = 1, calls: int = 1
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds per call of each case, and every round's figure; a round times ``calls``
    back-to-back calls per case."""

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / calls

    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}, samples
