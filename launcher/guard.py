"""The non-finite guard: a NaN or inf never trains on silently and never reaches a checkpoint.

What it does (and why this behaviour; compare Megatron-LM's ``check_for_nan_in_loss_and_grad``,
which raises on the first non-finite loss or gradient norm, and composer's ``NaNMonitor``, which
raises on a NaN loss; torchtitan has no guard of its own):

- Every optimizer step's loss is checked **on the device**: a count of non-finite losses and the
  first step that had one are kept as device tensors, so no step adds a host sync. The run log
  reads them at log steps (where it reads the loss anyway), and the checkpointer before every save.
- Before every checkpoint the weights (and the EMA's) are checked too: a non-finite gradient turns
  AdamW's update, and so the weights, non-finite at once, so this also catches a gradient that
  blew up after the last log step. A checkpoint is therefore never written from non-finite
  weights, ``latest`` never moves to one, and rotation only ever deletes older, finite ones.
- bf16 / fp32: the run stops with ``DivergedError`` naming the first bad step; the job exits with
  ``EXIT_DIVERGED`` (3), which ``slurm/train.sbatch`` does not requeue (a requeue would resume from
  the last finite checkpoint and diverge again). Lower the LR, add ``optim.clip_grad``, or resume
  from an earlier checkpoint with ``--resume RUN/checkpoints/step-N``.
- fp16: DeepSpeed's dynamic loss scaler already skips the steps whose gradients overflow, so a
  non-finite loss there is counted (``nonfinite/loss_steps`` in the log) and the run goes on; the
  weight check before every checkpoint still applies.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist

__all__ = ["NonFiniteGuard", "DivergedError", "EXIT_DIVERGED", "first_nonfinite", "finite_or_none"]

EXIT_DIVERGED = 3  # the loss or the weights went non-finite: not requeued (it would diverge again)
_NONE = 2**62  # "no bad step yet" for the device-side first-bad-step tensor


class DivergedError(RuntimeError):
    """The run's loss or weights are not finite. Every rank reaches the same verdict (the flags are
    all-reduced), so rank 0 alone reports it."""

    collective = True


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first floating tensor holding a NaN or inf, else None (one host read)."""
    named = [(name, t) for name, t in tensors if t.is_floating_point() and t.numel()]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
    bad = (~flags).nonzero()
    return named[int(bad[0])][0] if len(bad) else None


def finite_or_none(value):
    """A JSON-safe number: NaN and inf become None (strict JSON has neither)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class NonFiniteGuard:
    def __init__(self, device: torch.device, *, loss_scaling: bool) -> None:
        self.device = device
        self.loss_scaling = loss_scaling  # fp16: the loss scaler skips overflowing steps itself
        self._count = torch.zeros((), dtype=torch.int64, device=device)  # non-finite losses since the last read
        self._first = torch.full((), _NONE, dtype=torch.int64, device=device)

    def observe(self, step: int, loss: torch.Tensor) -> None:
        """After optimizer step ``step``: no host sync."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._count += bad
        self._first = torch.where(bad & (self._first == _NONE), step, self._first)  # a scalar: no copy

    def window_count(self) -> torch.Tensor:
        """The device count of non-finite losses since the last ``take`` (for the run log's all-reduce)."""
        return self._count

    def take(self, count_all_ranks: int, step: int) -> int:
        """At a log step, with the count summed over ranks: stop (collectively) unless the loss
        scaler skips such steps; returns the count and resets it."""
        if count_all_ranks and not self.loss_scaling:
            self._raise(step)
        self._count.zero_()
        return count_all_ranks

    def check(self, step: int, models: dict[str, torch.nn.Module]) -> None:
        """Before a checkpoint (collective): the losses since the last log step and every weight of
        ``models`` (this rank's part under ZeRO-3) finite on every rank, else ``DivergedError``."""
        bad_loss = 0 if self.loss_scaling else int(self._count.item())
        weights = None
        for label, module in models.items():
            name = first_nonfinite((n, _local(p)) for n, p in module.named_parameters())
            if name is not None:
                weights = f"{label}{name}"
                break
        flags = torch.tensor([bad_loss, weights is not None], dtype=torch.int64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            self._raise(step)
        if flags[1]:
            where = f" ({weights} on this rank)" if weights else " (on another rank)"
            raise DivergedError(
                f"the weights are not finite after step {step - 1}{where}: not writing a checkpoint; {_ADVICE}"
            )

    def _raise(self, step: int) -> None:
        first = self._first.clone()
        if dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first_step = int(first.item())
        when = f"at step {first_step}" if first_step != _NONE else f"by step {step}"
        raise DivergedError(f"the loss is not finite {when} (NaN or inf); stopped without checkpointing it. {_ADVICE}")


_ADVICE = (
    "The newest checkpoint (if any) holds the last finite weights: lower optim.lr, set optim.clip_grad, "
    "or resume from an earlier one with --resume RUN/checkpoints/step-N"
)


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter: its ZeRO-3 partition when it is partitioned."""
    return getattr(param, "ds_tensor", None) if getattr(param, "ds_tensor", None) is not None else param
