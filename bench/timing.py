"""Interleaved timing shared by the benchmarks: every case runs once per round, in turn, so a slow
phase of the machine touches all cases alike; each case's figure is its median over the rounds."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved_medians(cases: dict[str, Callable[[], object]], *, device: torch.device, rounds: int,
                        warmup: int = 1, calls: int = 1) -> tuple[dict[str, float], dict[str, list[float]]]:
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
