"""Tri-Level E-ViT's example level (seed 002, "Peeling the Onion", AAAI 2023): train on a subset of
the data that keeps the informative examples, refreshed during training.

The contract is ``../shared/TRILEVEL_SPEC.md`` ("Level 1: examples"); the official code is
github ZLKong/Tri-Level-ViT (``main.py``: the 80% subset, ``compute_forgetting_statistics``,
``sort_examples_by_forgetting`` and the swap block; ``engine.py``: the per-sample statistics). The
token and attention-connection levels are the ``trilevel_tokens`` plug-in; a recipe lists both for
the whole method. This level composes with ToE (it changes which examples, not the model).

- The run starts on a uniformly random ``N - floor(drop * N)`` of the ``N`` training samples (the
  config's ``initial_subset`` hook, before the step count: an epoch is a pass over the subset, the
  run's epochs and LR schedule count such passes, as the official 300 epochs of its 80% dataset do).
- Each training forward's ``argmax`` is compared with the sample's own label (the ordinary forward:
  sparse tokens, Mixup/CutMix images, as the official statistics; no extra forward). Every rank's
  ``(sample_id, correct)`` pairs of an optimizer step are all-gathered once, in ``after_step``, and
  every rank updates the same replicated statistics on the device (no host read per step). Copies of
  one sample in one step (repeated augmentation) are one presentation, correct iff at least half are.
- The score of a presented sample, over its first ``window`` presentations since the last swap: its
  forgetting events (correct -> wrong between consecutive presentations); never correct: ``window``.
- At the start of epochs ``period, 2 period, .., swaps x period`` (``on_epoch``, before the stream
  plans the pass): the presented members of the subset with the lowest scores (the least
  forgettable: ``--keep-lowest-n 0``), ``floor(swap * N)`` of them, leave; as many samples drawn
  uniformly from the held-out pool come in; statistics restart. Ties in the score are broken by a
  key drawn from ``(seed, swap)`` per sample id (the official ``np.argsort`` order is arbitrary).
  Everything is a function of the seed and the observed correctness, so every rank decides the same
  and a run resumed on another world size decides as the uninterrupted one.
- Checkpoint state: the subset, the swaps made, the statistics of the current window.

Deviations from the official code (spec "Where the official code differs"): one global subset
(official: each rank draws its own with ``seed + rank``) and gathered statistics (official: per
rank); state in the checkpoint (official: lost on resume, so a run resumed past epoch 30 never swaps
again); restore exactly as many as removed (official: ``remove_n`` even with fewer candidates);
fractions instead of the hard-coded ImageNet counts; a seeded tie-break. Not built: the spec's
``margin`` / ``cls_var`` tie-breaks and the ``dominant_label`` correctness switch.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .base import Declaration, MethodContext, TrainingPlugin
from .registry import register

__all__ = [
    "TriLevelExamplesConfig",
    "TriLevelExamples",
    "initial_mask",
    "forgetting_scores",
    "swap_subset",
    "ForgettingStats",
    "swap_epochs",
]

log = logging.getLogger(__name__)

UNSEEN = -1  # ForgettingStats.last before a sample's first presentation since the last swap
_SUBSET_STREAM, _TIE_STREAM, _RESTORE_STREAM = 0x5B5E7, 0x71E5, 0x4E57  # rng stream tags


# -- pure core -----------------------------------------------------------------------------------


def initial_mask(num_samples: int, drop: float, seed: int) -> np.ndarray:
    """The run's first subset: a uniformly random ``num_samples - floor(drop * num_samples)`` samples
    (official ``main.py``: 1,281,167 - 256,233 of ImageNet's train split at 0.2)."""
    keep = num_samples - math.floor(drop * num_samples)
    if keep < 1:
        raise ValueError(f"drop={drop} leaves no sample of {num_samples}")
    mask = np.zeros(num_samples, bool)
    mask[np.random.default_rng([seed, _SUBSET_STREAM]).permutation(num_samples)[:keep]] = True
    return mask


def swap_epochs(period: int, swaps: int) -> list[int]:
    """Epochs (0-based, passes over the subset) at whose start a swap is made: ``P, 2P, .., K P``
    (official ``main.py``: ``epoch == 30 * (putback_batch + 1)`` while ``putback_batch <= 4``)."""
    return [period * (i + 1) for i in range(swaps)]


def forgetting_scores(forgets: np.ndarray, ever_correct: np.ndarray, window: int) -> np.ndarray:
    """Toneva et al.'s forgetting score per sample: its correct -> wrong transitions, or ``window``
    for a sample never correct in the window (most forgettable; official ``sort_examples_by_forgetting``)."""
    return np.where(ever_correct, forgets, window).astype(np.int64)


def swap_subset(
    subset: np.ndarray, presented: np.ndarray, scores: np.ndarray, count: int, *, seed: int, swap: int, restore: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """One swap: the new subset and what happened (``removed``, ``restored`` sample ids, counts).

    Candidates are the subset's presented members; the ``min(count, #candidates)`` with the lowest
    score leave, ties broken by a key drawn from ``(seed, swap)`` per sample id; with ``restore`` as
    many samples drawn uniformly from the held-out pool (the complement of ``subset``) come in, so
    the removed ones cannot come back in the same swap."""
    subset = np.asarray(subset, bool)
    candidates = np.flatnonzero(subset & presented)
    ties = np.random.default_rng([seed, swap, _TIE_STREAM]).random(len(subset))
    order = candidates[np.lexsort((ties[candidates], scores[candidates]))]
    removed = np.sort(order[: min(count, len(order))])
    pool = np.flatnonzero(~subset)
    restored = np.zeros(0, np.int64)
    if restore:
        if len(pool) < len(removed):
            raise ValueError(f"swap {swap}: {len(removed)} samples leave but the held-out pool has {len(pool)}")
        restored = np.sort(np.random.default_rng([seed, swap, _RESTORE_STREAM]).choice(pool, len(removed), replace=False))
    new = subset.copy()
    new[removed] = False
    new[restored] = True
    info = {
        "candidates": len(candidates),
        "zero_score": int((scores[candidates] == 0).sum()),
        "removed": removed,
        "restored": restored,
    }
    return new, info


class ForgettingStats:
    """Per-sample statistics of the current window, replicated on every rank, on the device.

    ``update(ids, correct)`` takes one optimizer step's presentations from every rank (``ids`` may
    repeat: copies of a sample; ``-1`` marks a sample to ignore, e.g. a padded one)."""

    def __init__(self, num_samples: int, window: int, device: torch.device) -> None:
        self.num_samples, self.window, self.device = num_samples, window, device
        self.reset()

    def reset(self) -> None:
        n, device = self.num_samples + 1, self.device  # the last slot takes the ignored ids
        self.last = torch.full((n,), UNSEEN, dtype=torch.int8, device=device)
        self.forgets = torch.zeros(n, dtype=torch.int16, device=device)
        self.ever = torch.zeros(n, dtype=torch.bool, device=device)
        self.count = torch.zeros(n, dtype=torch.int16, device=device)

    def update(self, ids: torch.Tensor, correct: torch.Tensor) -> None:
        ids = torch.where(ids < 0, self.num_samples, ids).long()
        hits = torch.zeros(self.num_samples + 1, dtype=torch.int32, device=self.device)
        copies = torch.zeros_like(hits)
        hits.index_add_(0, ids, correct.to(torch.int32))
        copies.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        now = 2 * hits >= copies  # at least half of a sample's copies in this step are correct
        counted = (copies > 0) & (self.count < self.window)
        counted[self.num_samples] = False
        self.forgets += (counted & (self.last == 1) & ~now).to(torch.int16)
        self.last = torch.where(counted, now.to(torch.int8), self.last)
        self.ever |= counted & now
        self.count += counted.to(torch.int16)

    def host(self) -> dict[str, np.ndarray]:
        n = self.num_samples
        return {
            "presented": (self.count[:n] > 0).cpu().numpy(),
            "forgets": self.forgets[:n].cpu().numpy(),
            "ever": self.ever[:n].cpu().numpy(),
            "count": self.count[:n].cpu().numpy(),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        n = self.num_samples
        return {
            "last": self.last[:n].cpu(),
            "forgets": self.forgets[:n].cpu(),
            "ever": self.ever[:n].cpu(),
            "count": self.count[:n].cpu(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("last", "forgets", "ever", "count"):
            value = state[key]
            if value.shape != (self.num_samples,):
                raise ValueError(
                    f"trilevel_examples state {key!r} covers {value.shape[0]} samples, the training "
                    f"split has {self.num_samples}: resuming needs the same data"
                )
            getattr(self, key)[: self.num_samples] = value.to(self.device)


# -- the plug-in ---------------------------------------------------------------------------------


@dataclass
class TriLevelExamplesConfig:
    """``methods.trilevel_examples`` (TRILEVEL_SPEC "Level 1: examples" and "Defaults")."""

    drop: float = 0.2  # rho0: the share held out at the start (official main.py: 256,233 of 1,281,167)
    swap: float = 0.05  # rho_s: swapped at each swap, of the full data (README --remove-n 64058 = 0.05 N)
    period: int = 30  # P: epochs between swaps (main.py: epoch == 30 * (putback_batch + 1))
    swaps: int = 5  # K: swaps in the run (main.py: putback_batch <= 4), at epochs 30..150 of 300
    window: int = 30  # presentations a score counts (main.py: npresentations = 30)
    restore: bool = True  # bring back as many as removed (Fig. 2 caption); false: pure pruning (ablation)

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {self.drop}")
        if not 0.0 <= self.swap < 1.0:
            raise ValueError(f"swap must be in [0, 1), got {self.swap}")
        if self.restore and self.swap > self.drop:
            raise ValueError(f"swap={self.swap} is more than the held-out pool drop={self.drop} can restore")
        for key in ("period", "swaps", "window"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "swaps" else 1):
                raise ValueError(f"{key} must be an int >= {0 if key == 'swaps' else 1}, got {value!r}")
        if self.window > 2**15 - 1:
            raise ValueError(f"window must be < 32768 (int16 counters), got {self.window}")

    def declare(self) -> Declaration:
        """The run starts on a seeded random ``1 - drop`` of the examples (epochs are passes over it)."""
        return Declaration(initial_subset=self.initial_subset)

    def initial_subset(self, num_samples: int, seed: int) -> np.ndarray:
        return initial_mask(num_samples, self.drop, seed)


class TriLevelExamples(TrainingPlugin):
    name = "trilevel_examples"

    def __init__(self, config: TriLevelExamplesConfig, context: MethodContext) -> None:
        if context.task != "classification":
            raise ValueError(f"trilevel_examples scores classification forwards; task is {context.task!r}")
        self.config, self.seed, self.world = config, context.seed, context.world_size
        self.stream = None
        self.stats: Optional[ForgettingStats] = None
        self.subset: Optional[np.ndarray] = None
        self.swaps_done = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._last_swap: dict[str, float] = {}

    # -- set-up --

    def on_engine(self, engine: Any, ema: Any = None, stream: Any = None) -> None:
        if stream is None:
            raise ValueError("trilevel_examples swaps the training stream's examples: on_engine needs it")
        total = stream.split.total
        expected = initial_mask(total, self.config.drop, self.seed)
        if stream.subset is None or not np.array_equal(stream.subset, expected):
            raise RuntimeError(
                "trilevel_examples: the training stream does not hold the initial subset (the "
                "engine applies methods.registry.initial_subset before the step count)"
            )
        self.stream, self.subset = stream, expected
        self.swap_count = math.floor(self.config.swap * total)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.stats = ForgettingStats(total, self.config.window, device)

    def describe(self) -> Optional[str]:
        c = self.config
        epochs = swap_epochs(c.period, c.swaps)
        return (
            f"Tri-Level examples: a random {1 - c.drop:.0%} of the data, swapping floor({c.swap} N) of the "
            f"lowest forgetting scores (window {c.window}) for held-out samples at the start of epochs "
            f"{epochs or 'none'}"
        )

    # -- the run --

    def on_epoch(self, epoch: int, stream: Any) -> None:
        c = self.config
        due = [i + 1 for i, start in enumerate(swap_epochs(c.period, c.swaps)) if start <= epoch]
        if due and due[-1] > self.swaps_done:  # applied once: a resumed run hears this epoch again
            self._swap(due[-1], epoch)
        stream.set_subset(self.subset)

    def _swap(self, index: int, epoch: int) -> None:
        self._flush()
        found = self.stats.host()
        scores = forgetting_scores(found["forgets"], found["ever"], self.config.window)
        self.subset, info = swap_subset(
            self.subset, found["presented"], scores, self.swap_count, seed=self.seed, swap=index, restore=self.config.restore
        )
        self.swaps_done = index
        self.stats.reset()
        self._check_agreement(index)
        self._last_swap = {
            "trilevel/swap_candidates": float(info["candidates"]),
            "trilevel/swap_zero_score": float(info["zero_score"]),
            "trilevel/swap_removed": float(len(info["removed"])),
            "trilevel/swap_restored": float(len(info["restored"])),
        }
        log.info(
            "trilevel examples: swap %d at epoch %d: %d candidates (%d with score 0), %d removed, %d restored, subset %d",
            index,
            epoch,
            info["candidates"],
            info["zero_score"],
            len(info["removed"]),
            len(info["restored"]),
            int(self.subset.sum()),
        )

    def _check_agreement(self, index: int) -> None:
        """Every rank must have made the same swap (same statistics, same seed): a CRC-32 of the new subset,
        compared across ranks once per swap (one all-reduce of two integers and a host read)."""
        if self.world == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        crc = zlib.crc32(np.packbits(self.subset).tobytes())
        bounds = torch.tensor([crc, -crc], dtype=torch.int64, device=self.stats.device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)  # [max crc, -min crc]: one collective
        high, low = bounds.tolist()
        if high != -low:
            raise RuntimeError(
                f"trilevel_examples: the ranks made different subsets at swap {index} (their "
                f"statistics differ): a bug, not a data problem"
            )

    def on_step(self, step: int) -> dict[str, float]:
        metrics = {"trilevel/subset_size": float(self.subset.sum()), "trilevel/swaps": float(self.swaps_done)}
        metrics.update(self._last_swap)
        return metrics

    def after_forward(self, step: int, batch: dict, outputs: Any) -> None:
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        ids = batch["sample_id"].to(logits.device)
        if "valid" in batch:
            ids = torch.where(batch["valid"].to(ids.device), ids, torch.full_like(ids, -1))
        correct = logits.detach().argmax(dim=-1) == batch["label"].to(logits.device)
        self._pending.append((ids, correct))

    def after_step(self, step: int) -> None:
        self._flush()

    def _flush(self) -> None:
        """The presentations of the step just taken, from every rank, into the statistics."""
        if not self._pending:
            return
        ids = torch.cat([i for i, _ in self._pending]).long()
        correct = torch.cat([c for _, c in self._pending]).long()
        self._pending = []
        pairs = torch.stack([ids, correct])
        if self.world > 1:
            gathered = [torch.empty_like(pairs) for _ in range(self.world)]
            dist.all_gather(gathered, pairs)  # equal batches on every rank (data/stream.py)
            pairs = torch.cat(gathered, dim=1)
        self.stats.update(pairs[0].to(self.stats.device), pairs[1].to(self.stats.device).bool())

    # -- state --

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {
            "subset": torch.from_numpy(np.packbits(self.subset)),
            "samples": int(len(self.subset)),
            "swaps_done": self.swaps_done,
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            raise ValueError("the checkpoint holds no trilevel_examples state (was the run started without it?)")
        total = len(self.subset)
        if int(state["samples"]) != total:
            raise ValueError(
                f"trilevel_examples state covers {state['samples']} samples, the training split has "
                f"{total}: resuming needs the same data"
            )
        self.subset = np.unpackbits(state["subset"].numpy(), count=total).astype(bool)
        self.swaps_done = int(state["swaps_done"])
        self.stats.load_state_dict(state["stats"])
        self.stream.set_subset(self.subset)


def build_trilevel_examples(config: TriLevelExamplesConfig, context: MethodContext) -> TriLevelExamples:
    return TriLevelExamples(config, context)


register("trilevel_examples", TriLevelExamplesConfig, build_trilevel_examples)
