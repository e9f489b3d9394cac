"""Where each log window's time and memory go: data wait, forward + backward, optimizer step, what
runs between steps (the plug-ins' step end, the EMA, the run log), evaluation and checkpoints,
without a host sync between log steps.

The step loop calls ``mark(phase)`` at the end of each phase: the time since the previous mark
goes to ``phase``. ``window()`` (called by the run log at a log step) returns the window's
``time/<phase>`` seconds for every phase of ``PHASES`` (0 when it did not run), ``time/window``
(their sum), ``time/data_share`` (the share spent waiting for data) and ``memory/peak_gib``, then
starts the next window.

- CPU: host timers (``time.perf_counter``); a CPU step is synchronous, so host time is the work.
- CUDA: one CUDA event per mark on the current stream, read at the log step only (the run log's
  reads there already wait for the device). A phase's time is the device timeline between its
  events, so ``time/data`` is how long the device sat idle while the host waited for the batch
  (0 when the host had queued enough work to hide the wait), not the host's own wait.
- Memory: CUDA ``max_memory_allocated`` over the window (reset at each read); CPU the process's
  peak resident set since it started (``getrusage``: Linux has no reset).
"""

from __future__ import annotations

import resource
import sys
import time

import torch

__all__ = ["StepTimer", "PHASES", "peak_memory_gib"]

# the phases the training loop marks, in loop order; the report stacks them in this order. Evaluation
# and checkpoints are phases of their own so that a run's training time (``launcher.report``) can leave
# them out: their cost is the recipe's choice of how often, not the method's.
PHASES = ("data", "forward_backward", "optimizer", "between_steps", "evaluation", "checkpoint")


def peak_memory_gib(device: torch.device, reset: bool = True) -> float:
    """Peak memory: allocated on the CUDA device since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


class StepTimer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._totals: dict[str, float] = {}
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: (phase, start, end)
        self._spare: list = []  # CUDA events read and free for reuse
        self._last = self._stamp()

    def _stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, phase: str) -> None:
        """The phase ``phase`` ends now (the time since the previous mark is its)."""
        now = self._stamp()
        if self.cuda:
            self._pending.append((phase, self._last, now))
        else:
            self._totals[phase] = self._totals.get(phase, 0.0) + (now - self._last)
        self._last = now

    def window(self) -> dict[str, float]:
        """The window's ``time/...`` seconds per phase, ``time/window``, ``time/data_share`` and
        ``memory/peak_gib``; the next window starts."""
        if self._pending:
            self._pending[-1][2].synchronize()  # the last mark's event; the earlier ones are done before it
            seen = set()
            for phase, start, end in self._pending:
                self._totals[phase] = self._totals.get(phase, 0.0) + start.elapsed_time(end) / 1e3
                for event in (start, end):
                    if event is not self._last and id(event) not in seen:
                        seen.add(id(event))
                        self._spare.append(event)
            self._pending = []
        totals = {phase: 0.0 for phase in PHASES}
        totals.update(self._totals)
        self._totals = {}
        whole = sum(totals.values())
        record = {f"time/{phase}": seconds for phase, seconds in totals.items()}
        record["time/window"] = whole
        if whole > 0:
            record["time/data_share"] = totals.get("data", 0.0) / whole
        record["memory/peak_gib"] = peak_memory_gib(self.device)
        return record
