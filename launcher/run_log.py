"""What a run writes while it trains: ``metrics.jsonl``, TensorBoard and the progress bar.

The step loop hands every optimizer step's loss (a device tensor), learning rate and images to
``RunLog.step``; the log keeps them on the device and reads them only at log steps (every
``train.log_every`` steps and the last one), so nothing here syncs the host with the device in
between. ``metrics.jsonl`` gets, on rank 0, one JSON object per line:

- ``{"event": "start", "step": S, "time": T, "world_size": W}`` when a segment starts (a fresh
  run or a resume at step S): a run's wall-clock is the sum of its segments;
- one record per log window: ``step`` (the window's last 0-based step), ``steps`` (how many
  steps it covers), ``loss`` (their mean on rank 0), ``lr`` (at the last step), ``time``,
  ``img_per_s``, ``epoch``, ``flops`` (theoretical training FLOPs of the window, all ranks, from
  the plug-in stack's cost model), ``tflops_per_device`` (those FLOPs per second and rank), ``mfu``
  (that against the device's dense peak, ``launcher.perf.PEAK_TFLOPS``; known GPUs only),
  ``compile/graphs`` and ``compile/seconds`` (cumulative, when the model is compiled), the
  plug-ins' metrics and ``data/...`` counters, and ``nonfinite/loss_steps`` (steps of the window, all
  ranks, whose loss was NaN or inf: ``launcher.guard``; the window's ``loss`` is then ``null``);
- ``{"step": s, "time": T, "eval/...": ...}`` per evaluation.

Every rank calls ``step`` (the window's counters and FLOPs are all-reduced at log steps). The file is
strict JSON: a non-finite number is written as ``null``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .guard import DivergedError, NonFiniteGuard, finite_or_none

__all__ = ["RunLog", "due"]

log = logging.getLogger(__name__)

DATA_COUNTERS = (
    "corrupt_image",
    "missing_label",
    "bad_label",
    "missing_image",
    "unreadable_sample",
    "unreadable_shard",
    "refilled",
    "missing_boxes",
    "bad_boxes",
    "missing_token_label",
    "bad_token_label",
    # remote shards (data/remote.py): retried failures, shards lost after every retry, the node cache
    "remote_retry",
    "lost_shard",
    "cache_hit",
    "cache_fetch",
    "cache_bypass",
)


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (eval, checkpoint) falls after ``step`` steps: every ``every``
    steps, never at the end (the run's end does it anyway), never when ``every`` is 0."""
    return bool(every) and step % every == 0 and step < total


class RunLog:
    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        world: int,
        total_steps: int,
        log_every: int,
        device: torch.device,
        counters: Callable[[], dict],
        epoch: Callable[[], int],
        guard: "NonFiniteGuard",
        peak_tflops: Optional[float] = None,
        progress_keys: tuple[str, ...] = (),
    ) -> None:
        self.guard = guard
        self.progress_keys = progress_keys  # the methods' metrics in the progress bar (their declarations)
        self.rank, self.world, self.total_steps, self.log_every = rank, world, total_steps, log_every
        self.peak_tflops = peak_tflops
        self._graphs = 0
        self.device, self._counters, self._epoch = device, counters, epoch
        self.file = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
        self.writer = self._tensorboard(run_dir) if rank == 0 else None
        self.progress = None
        self._reset()

    def _reset(self) -> None:
        self._loss = torch.zeros((), device=self.device)
        self._steps = self._images = 0
        self._flops = 0.0
        self._window_start = time.perf_counter()

    def start(self, step: int) -> None:
        self._write({"event": "start", "step": step, "time": time.time(), "world_size": self.world})
        if self.rank == 0:
            from tqdm import tqdm

            self.progress = tqdm(
                total=self.total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=2.0
            )
        self._reset()

    def step(
        self, step: int, loss: torch.Tensor, *, lr: float, images: int, flops: float, metrics: Callable[[], dict[str, float]]
    ) -> None:
        """Step ``step`` (0-based) is done. ``metrics`` is called at log steps only (the plug-ins'
        window metrics); ``flops`` is this rank's theoretical training FLOPs of the step."""
        self._loss += loss.detach().float()
        self.guard.observe(step, loss)
        self._steps += 1
        self._images += images
        self._flops += flops
        if self.progress is not None:
            self.progress.update(1)
        if (step + 1) % self.log_every and step + 1 != self.total_steps:
            return
        totals = torch.tensor(
            [float(self._images), self._flops] + [float(self._counters().get(n, 0)) for n in DATA_COUNTERS],
            device=self.device,
        )
        totals = torch.cat([totals, self.guard.window_count().to(totals.dtype).reshape(1)])
        dist.all_reduce(totals)  # every rank is here: the window's images, FLOPs and data counters of all ranks
        images_all, flops_all, *counts, nonfinite = totals.tolist()
        elapsed = time.perf_counter() - self._window_start
        tflops = flops_all / elapsed / self.world / 1e12
        record = {
            "step": step,
            "steps": self._steps,
            "loss": self._loss.item() / self._steps,
            "lr": lr,
            "time": time.time(),
            "img_per_s": images_all / elapsed,
            "epoch": self._epoch(),
            "flops": flops_all,
            "tflops_per_device": tflops,
            **self._perf(step, tflops),
            **metrics(),
            **{f"data/{n}": c for n, c in zip(DATA_COUNTERS, counts)},
            "nonfinite/loss_steps": int(nonfinite),
        }
        self._write(record, tensorboard_step=step + 1)
        try:  # after the record is out: a diverged run's log shows the window
            self.guard.take(int(nonfinite), step)
        except DivergedError as err:
            self.diverged(step, err)
            raise
        if self.progress is not None:
            shown = {key: f"{record[key]:g}" for key in self.progress_keys if isinstance(record.get(key), (int, float))}
            self.progress.set_postfix(
                loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{record['img_per_s']:.0f}", **shown
            )
        self._reset()

    def _perf(self, step: int, tflops: float) -> dict[str, float]:
        """MFU where the peak is known; the compiled graphs so far (a log line when there are new ones)."""
        from .perf import compile_stats

        perf = {} if self.peak_tflops is None else {"mfu": tflops / self.peak_tflops}
        graphs, seconds = compile_stats()
        if graphs:
            perf.update({"compile/graphs": graphs, "compile/seconds": seconds})
            if graphs != self._graphs and self.rank == 0:
                log.info(
                    "compiled %d new graph(s) by step %d (%d in all, %.1f s compiling so far)",
                    graphs - self._graphs,
                    step,
                    graphs,
                    seconds,
                )
            self._graphs = graphs
        return perf

    def diverged(self, step: int, err: BaseException) -> None:
        """The guard stopped the run: the verdict goes into the log (``launcher.report`` shows it)."""
        self._write({"event": "diverged", "step": step, "time": time.time(), "error": str(err)})

    def evaluation(self, step: int, results: dict[str, Any]) -> None:
        self._write(
            {"step": step, "time": time.time(), **{f"eval/{k}": v for k, v in results.items()}}, tensorboard_step=step
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()

    def _write(self, record: dict, tensorboard_step: Optional[int] = None) -> None:
        if self.file is None:
            return
        record = {key: finite_or_none(value) for key, value in record.items()}
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        if self.writer is not None and tensorboard_step is not None:
            for key, value in record.items():
                if key not in ("step", "steps", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, tensorboard_step)

    @staticmethod
    def _tensorboard(run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(run_dir / "tensorboard"))
