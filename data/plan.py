"""Which sample every rank and worker reads, in which order: pure functions of the configuration.

An epoch's *items* are ``(position, repeat)`` pairs: shards in an order shuffled from
``(seed, epoch)`` (before any rank split), their samples concatenated, optionally restricted to a
subset, optionally repeated. The items are cut into ``world * workers`` contiguous *slots* of
equal length, rank-major (split by rank, then by DataLoader worker), so every rank and every
worker yields the same number of batches:

- training: each slot gets ``L = floor(items / slots / batch) * batch`` items; the last
  ``items - slots * L`` (fewer than ``slots * batch``) are dropped for this epoch (a different
  set each epoch, since the shard order changes);
- evaluation: no shuffle, slots of ``ceil(items / slots)`` items padded with ``-1`` to whole
  batches, so every sample is seen exactly once and padding is marked.

Each slot emits its items in the order of a seeded buffer shuffle (``buffer_order``), a
permutation in which output ``j`` is always among the first ``j + buffer`` items: the reader
needs at most ``buffer`` samples in memory.

Repeated augmentation (``repeats > 1``, DeiT's ``RASampler``) places the copies of a sample in
the same global step on different ranks instead: the items are cut into one contiguous *chunk*
per DataLoader worker (all ranks' slots of that worker), the chunk's samples (runs of copies)
are buffer-shuffled with a generator shared by all ranks, and the shuffled copies are dealt
round-robin over the ranks, so emission ``j`` of every rank comes from the same few samples.
With ``world % repeats == 0`` each sample's copies go to ``repeats`` different ranks in one step;
on one rank they are consecutive in one batch (when ``batch % repeats == 0``). The copies are
augmented differently: their ``repeat`` index seeds the augmentation. A *cursor* counts a slot's emitted items; a stream
state is the cursors of every slot, so the consumed part of an epoch is known exactly, and an
epoch resumed with another world size (a new *phase*) re-splits exactly the items not consumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .shards import SplitIndex

__all__ = ["Phase", "epoch_items", "split_slots", "train_layout", "buffer_order", "remaining_items", "rng_for"]


def rng_for(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def epoch_items(
    split: SplitIndex, seed: int, epoch: int, *, shuffle: bool, repeats: int = 1, subset: Optional[np.ndarray] = None
) -> np.ndarray:
    """``[M, 2]`` int64 ``(position, repeat)`` items of an epoch, in reading order.

    ``subset``: boolean mask over positions (a plug-in's example subset); ``repeats``: each
    sample appears ``repeats`` times in a row (repeated augmentation) and the epoch keeps its
    length by taking the first ``1 / repeats`` of the samples.
    """
    order = rng_for(seed, epoch, 0x5EED).permutation(len(split.counts)) if shuffle else np.arange(len(split.counts))
    positions = np.concatenate([split.starts[s] + np.arange(split.counts[s]) for s in order]).astype(np.int64)
    if subset is not None:
        if subset.shape != (split.total,):
            raise ValueError(f"subset mask has shape {subset.shape}, the split has {split.total} samples")
        positions = positions[subset[positions]]
    if repeats > 1:
        positions = np.repeat(positions[: len(positions) // repeats], repeats)
        repeat_index = np.tile(np.arange(repeats), len(positions) // repeats)
    else:
        repeat_index = np.zeros(len(positions), np.int64)
    return np.stack([positions, repeat_index], axis=1)


def split_slots(items: np.ndarray, world: int, workers: int, batch: int, *, pad: bool) -> tuple[list[np.ndarray], int]:
    """Cut items into ``world * workers`` slots (index ``rank * workers + worker``); returns the
    slots and the number of items dropped (training) or padded (evaluation)."""
    slots = world * workers
    if pad:
        length = -(-len(items) // slots)
        length = -(-length // batch) * batch
        padded = np.full((slots * length, 2), -1, np.int64)
        # spread the real items as evenly as possible: slot s gets items[s::...] contiguous runs
        base, extra = divmod(len(items), slots)
        cut = np.cumsum([0] + [base + (s < extra) for s in range(slots)])
        out = []
        for s in range(slots):
            chunk = padded[s * length : (s + 1) * length]
            chunk[: cut[s + 1] - cut[s]] = items[cut[s] : cut[s + 1]]
            out.append(chunk)
        return out, slots * length - len(items)
    length = (len(items) // slots // batch) * batch
    return [items[s * length : (s + 1) * length] for s in range(slots)], len(items) - slots * length


def buffer_order(length: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer of ``buffer`` items over ``length`` items read in order."""
    if buffer <= 1 or length <= 1:
        return np.arange(length)
    order = np.empty(length, np.int64)
    pool = list(range(min(buffer, length)))
    next_item = len(pool)
    picks = rng.random(length)
    for j in range(length):
        chosen = int(picks[j] * len(pool))
        order[j] = pool[chosen]
        if next_item < length:
            pool[chosen] = next_item
            next_item += 1
        else:
            pool[chosen] = pool[-1]
            pool.pop()
    return order


@dataclass
class Phase:
    """A stretch of an epoch run with one (world, workers, batch); cursors/batches per [rank][worker]."""

    world: int
    workers: int
    batch: int
    cursors: list[list[int]] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cursors:
            self.cursors = [[0] * self.workers for _ in range(self.world)]
        if not self.batches:
            self.batches = [[0] * self.workers for _ in range(self.world)]

    def to_dict(self) -> dict:
        """A snapshot: later progress does not change it, and changing it does not touch the phase."""
        return {
            "world": self.world,
            "workers": self.workers,
            "batch": self.batch,
            "cursors": [list(row) for row in self.cursors],
            "batches": [list(row) for row in self.batches],
        }


def slot_rng(seed: int, epoch: int, phase: int, rank: int, worker: int) -> np.random.Generator:
    return rng_for(seed, epoch, phase, rank, worker, 0xB0FF)


def chunk_rng(seed: int, epoch: int, phase: int, worker: int) -> np.random.Generator:
    """The generator of a worker's chunk under repeated augmentation: the same on every rank."""
    return rng_for(seed, epoch, phase, worker, 0xC4A2)


def train_layout(
    items: np.ndarray,
    world: int,
    workers: int,
    batch: int,
    *,
    seed: int,
    epoch: int,
    phase: int,
    buffer: int,
    repeats: int = 1,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Every training slot (index ``rank * workers + worker``) as ``(indices, order)``: the indices
    into ``items`` it reads, ascending (the reading order), and its emission order (a permutation of
    them); plus the number of items dropped this epoch. Slots hold ``L = floor(items / slots /
    batch) * batch`` items each. ``repeats == 1``: contiguous rank-major slots, each with its own
    buffer shuffle. ``repeats > 1``: per-worker chunks dealt over the ranks (module docstring)."""
    slots = world * workers
    length = (len(items) // slots // batch) * batch
    dropped = len(items) - slots * length
    if repeats == 1:
        return [
            (
                np.arange(s * length, (s + 1) * length),
                buffer_order(length, buffer, slot_rng(seed, epoch, phase, s // workers, s % workers)),
            )
            for s in range(slots)
        ], dropped
    layout: list = [None] * slots
    for worker in range(workers):
        start = worker * world * length
        positions = items[start : start + world * length, 0]
        run_starts = np.flatnonzero(np.r_[True, positions[1:] != positions[:-1]]) if len(positions) else positions
        run_lengths = np.diff(np.r_[run_starts, len(positions)])
        shuffled = buffer_order(len(run_starts), buffer, chunk_rng(seed, epoch, phase, worker))
        taken = run_lengths[shuffled]  # the runs (copies of one sample) in shuffled order, laid end to end
        dealt = start + np.arange(len(positions)) + np.repeat(run_starts[shuffled] - (np.cumsum(taken) - taken), taken)
        for rank in range(world):
            emitted = dealt[rank::world]  # row j of the dealt sequence is emission j of every rank
            indices = np.sort(emitted)
            layout[rank * workers + worker] = (indices, np.searchsorted(indices, emitted))
    return layout, dropped


def remaining_items(
    items: np.ndarray, phases: list[Phase], seed: int, epoch: int, buffer: int, repeats: int = 1
) -> np.ndarray:
    """Items of the epoch not consumed by ``phases`` (all but the last being complete or
    interrupted), in the epoch's reading order."""
    for index, phase in enumerate(phases):
        layout, _ = train_layout(
            items,
            phase.world,
            phase.workers,
            phase.batch,
            seed=seed,
            epoch=epoch,
            phase=index,
            buffer=buffer,
            repeats=repeats,
        )
        consumed = np.zeros(len(items), bool)
        for slot, (indices, order) in enumerate(layout):
            consumed[indices[order[: phase.cursors[slot // phase.workers][slot % phase.workers]]]] = True
        items = items[~consumed]
    return items


def train_batches_per_rank(examples: int, *, world: int, workers: int, batch: int, repeats: int = 1) -> int:
    """Micro-batches each rank's training stream yields in an epoch over ``examples`` samples (a subset's
    count where a method chose one): what ``ShardStream.__len__`` counts from ``epoch_items`` and
    ``split_slots``, without building an epoch (``launcher.run_plan`` for a plan without a stream)."""
    items = (examples // repeats) * repeats if repeats > 1 else examples
    slots_per_rank = max(1, workers)
    return slots_per_rank * ((items // (world * slots_per_rank)) // batch)
