"""Batches on every rank from WebDataset shards: equal batch counts, counted skips, exact resume.

``build_train_stream`` / ``build_eval_stream`` return a ``ShardStream``: iterate it for one
epoch's batches (dicts with ``image``, ``label``, ``sample_id``, ``valid``), call
``state_dict()`` after any batch and ``load_state_dict()`` in a new process to continue with
exactly the batches the uninterrupted run would have produced.

Guarantees (``data/plan.py`` has the arithmetic):

- Ordering: shard order shuffled from ``(seed, epoch)`` before the rank split, then split by
  rank and DataLoader worker; each worker's shuffle buffer is seeded from
  ``(seed, epoch, phase, rank, worker)``; augmentation randomness is seeded per sample from
  ``(seed, epoch, position, repeat, pass)``. Same seed, same batches, run after run.
- Equal batches: every rank yields ``len(stream)`` batches per epoch. Training drops the
  remainder (fewer than ``world * workers * batch`` samples, a different set each epoch);
  evaluation pads the last batches and marks the padding ``valid = False``.
- Bad samples (undecodable image, missing or bad ``.cls``, unreadable or truncated shard) are
  skipped, counted (``stream.counters``) and logged once with their key; a training worker that
  runs short refills from the start of its own slot (counted as ``refilled``), so no rank ever
  yields fewer batches than the others. Remote shards (``data/remote.py``) retry transient failures
  first; a shard lost after every retry is skipped the same way, up to ``max_lost_share``.
- Exact resume with the same world size and worker count; with another world size or worker
  count, the epoch continues over exactly the samples not yet consumed (re-split equally; the
  new split's remainder is dropped as above). Skipped samples are never decoded: their bytes
  are not even read from local shards.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import os
import random
import signal
import sys
import weakref
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from .plan import Phase, epoch_items, remaining_items, split_slots, train_layout
from .remote import RemoteOptions, check_lost_share
from .samples import IMAGE_EXTS, SkipSample, check_decodable, decode_image, read_label  # noqa: F401 (re-exported)
from .shards import ShardIndex, ShardLostError, ShardReadError, SplitIndex

__all__ = ["ShardStream", "ClassificationCodec", "SkipSample", "build_train_stream", "build_eval_stream"]

log = logging.getLogger(__name__)
REPEAT_LAYOUT = 2  # repeated augmentation: copies dealt over the ranks (data/plan.py train_layout)


class ClassificationCodec:
    """Raw sample -> (image tensor, label); a batch of those -> dict of tensors."""

    def __init__(self, transform: Callable, num_classes: Optional[int] = None) -> None:
        self.transform = transform
        self.num_classes = num_classes

    def decode(self, sample: dict[str, bytes]) -> tuple[torch.Tensor, int]:
        label = read_label(sample, self.num_classes)  # before the decode: a bad label costs no decode
        return self.transform(decode_image(sample)), label

    def collate(self, decoded: list, ids: list[int], valid: list[bool]) -> dict[str, torch.Tensor]:
        filler = next((d for d in decoded if d is not None), None)
        if filler is None:
            raise RuntimeError("a batch without a single readable sample")
        # default_collate stacks straight into shared memory in a DataLoader worker; a plain torch.stack
        # would allocate the batch and then copy it again into shared memory to send it
        images = default_collate([(d or filler)[0] for d in decoded])
        labels = torch.tensor([d[1] if d is not None else -1 for d in decoded], dtype=torch.long)
        return {
            "image": images,
            "label": labels,
            "sample_id": torch.tensor(ids, dtype=torch.long),
            "valid": torch.tensor(valid, dtype=torch.bool),
        }


# A tensor sent from a DataLoader worker travels as shared memory: one file descriptor each, which the
# main process fetches over a fresh authenticated socket connection to the worker (torch's
# file_descriptor strategy, multiprocessing's resource sharer), ~0.5 ms of CPU for even a 32-element
# label vector. Below this size a tensor goes inside the batch's pickle instead (bytes through the pipe).
INLINE_BYTES = 1 << 18


class _Inline:
    """A small CPU tensor that pickles by value and unpickles as the tensor again."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __reduce__(self):
        return _tensor_from_array, (self.array,)


def _tensor_from_array(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


def inline_small_tensors(value: Any) -> Any:
    """``value`` (a batch: tensors in dicts, lists, tuples) with every CPU tensor under ``INLINE_BYTES``
    wrapped to travel by value; the receiving process gets plain tensors, equal to the sent ones."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.nbytes >= INLINE_BYTES or value.requires_grad:
            return value
        try:
            return _Inline(value.contiguous().numpy())
        except TypeError:  # a dtype numpy has not (bfloat16): shared memory as before
            return value
    if isinstance(value, dict):
        return {k: inline_small_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(inline_small_tensors(v) for v in value)
    return value


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _worker_init(parent: int, worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGUSR1 to the training process, which checkpoints and then
    ends them; a job-wide signal (scancel, a preemption) would otherwise kill a worker mid-batch and
    take the rank down before it can save.

    And they die with their parent (Linux): a rank killed by SIGKILL (the OOM killer, a launcher's
    escalation, a failed peer under ``torch.distributed`` elastic) cannot end its workers, and torch's
    worker, on noticing its parent gone, exits by joining its queue's feeder thread, which waits
    forever on a pipe nobody reads: the worker would hold its memory until someone kills it. The
    kernel sends the signal when the thread that forked the worker ends, so streams are iterated on
    the main thread only; ``parent`` closes the race of a parent that died before the request."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("workers will not end with a killed rank: prctl failed (errno %d)", ctypes.get_errno())
        if os.getppid() != parent:
            os._exit(1)


_LIVE_LOADERS: "weakref.WeakSet" = weakref.WeakSet()  # DataLoader iterators with workers, not yet finished


def _end_live_workers() -> None:
    """At interpreter exit, kill the workers of any stream left suspended (an exception in the
    training loop keeps its generator alive). They ignore SIGTERM, and multiprocessing's own exit
    handler ends daemonic children with SIGTERM and then joins them: without this, forever. atexit
    runs handlers last-registered first, and this is registered after multiprocessing's."""
    for iterator in list(_LIVE_LOADERS):
        for worker in getattr(iterator, "_workers", ()):
            if worker.is_alive():
                worker.kill()


def _sample_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1, np.uint32)[0])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # transforms run on the CPU; torch.manual_seed also walks CUDA


def _decode_seeded(codec, sample, seed: int):
    """Decode with every RNG a transform may use seeded per sample. In the main process (no DataLoader
    workers) the caller's RNGs are restored afterwards; a worker's global RNGs serve nobody but the
    next sample, which seeds them again, so saving and restoring them there (~3% of a worker's CPU
    time, bench/data_throughput.py) buys nothing."""
    if get_worker_info() is not None:
        _seed_all(seed)
        return codec.decode(sample)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        _seed_all(seed)
        try:
            return codec.decode(sample)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _SlotReader:
    """Raw samples of one slot in emission order, starting after ``cursor`` emitted items."""

    def __init__(self, split: SplitIndex, slot: np.ndarray, order: np.ndarray, failed_shards: set[int]) -> None:
        self.split, self.slot, self.order = split, slot, order
        self.failed_shards = failed_shards  # shared by a worker's readers: each bad shard is read and reported once
        real = slot[slot[:, 0] >= 0, 0]
        self.shard_count = max(1, len(np.unique(split.locate(real)[0]))) if len(real) else 1

    def emit(self, start: int, counters: Counter) -> Iterator[Optional[dict]]:
        """Yield one raw sample (``None`` if unreadable) per emitted item from ``start`` on."""
        needed = self.order[start:]
        want = np.zeros(len(self.slot), bool)
        want[needed] = True
        want &= self.slot[:, 0] >= 0  # evaluation padding reads nothing
        held: dict[int, Optional[dict]] = {}
        source = self._read(np.flatnonzero(want), counters)
        for item in needed:
            if not want[item]:
                yield None
                continue
            while item not in held:
                index, sample = next(source)
                held[index] = sample
            yield held.pop(item)

    def _read(self, indices: np.ndarray, counters: Counter) -> Iterator[tuple[int, Optional[dict]]]:
        """``(slot index, raw sample or None)`` for the given slot indices (ascending), in reading order."""
        shards, offsets = self.split.locate(self.slot[indices, 0])
        boundaries = np.flatnonzero(np.diff(shards)) + 1
        for group in np.split(np.arange(len(indices)), boundaries):
            shard = int(shards[group[0]])
            pending = iter(group)  # offsets ascend inside a group; repeats share an offset
            g = next(pending, None)
            if shard not in self.failed_shards:
                unique, given = sorted({int(offsets[i]) for i in group}), 0
                try:
                    for offset, sample in self.split.read(shard, unique, counters):
                        given += 1
                        while g is not None and offsets[g] == offset:
                            yield int(indices[g]), sample
                            g = next(pending, None)
                except ShardReadError as err:
                    self.failed_shards.add(shard)
                    counters["unreadable_shard"] += 1
                    if isinstance(err, ShardLostError):
                        counters["lost_shard"] += 1
                        check_lost_share(err, counters["lost_shard"], self.shard_count, self.split.max_lost_share)
                    # one line per shard: its samples are counted (unreadable_sample), not logged one by one
                    log.warning(
                        "skipping the rest of a shard: %d of the %d samples wanted from it here are "
                        "unreadable (counted as unreadable_sample): %s",
                        len(unique) - given,
                        len(unique),
                        err,
                    )
            while g is not None:  # what the shard could not give
                yield int(indices[g]), None
                g = next(pending, None)


class _PhaseDataset(IterableDataset):
    """One rank's slots of the current phase; DataLoader worker ``p`` plays slot ``(p + rotation) % workers``.

    A training worker whose slot runs short of readable samples refills from the phase's items,
    starting where its own slot starts and wrapping around (other slots' samples, differently
    augmented); one that reads a whole slot and a whole pass over the phase without a single
    readable sample raises instead of spinning.
    """

    def __init__(
        self,
        stream: "ShardStream",
        items: np.ndarray,
        slots: list[np.ndarray],
        slot_starts: list[int],
        orders: list[np.ndarray],
        cursors: list[int],
        batches: list[int],
        rotation: int,
        per_worker_batches: int,
        first_batch: int = 0,
    ) -> None:
        self.stream, self.items, self.slots, self.slot_starts = stream, items, slots, slot_starts
        self.orders, self.cursors, self.batches = orders, cursors, batches
        self.rotation, self.per_worker_batches = rotation, per_worker_batches
        self.first_batch = first_batch  # the rank's run-wide index of the phase's first batch

    def __iter__(self):
        info = get_worker_info()
        workers = len(self.slots)
        if info is None and workers > 1:
            raise RuntimeError("a multi-slot phase needs DataLoader workers")
        return self._batches(((info.id if info else 0) + self.rotation) % workers)

    def _batches(self, worker: int) -> Iterator[dict[str, Any]]:
        s = self.stream
        counters: Counter = Counter()
        cursor, produced = self.cursors[worker], self.batches[worker]
        emitted = self._emission(worker, cursor, counters)
        in_worker = get_worker_info() is not None  # the batch goes through a pickle to the main process
        failures, give_up = 0, len(self.slots[worker]) + len(self.items)
        while produced < self.per_worker_batches:
            augment_step = None
            if s.step_transform is not None:
                # slot w's j-th batch of the phase is the phase's (j * W + w)-th: the DataLoader takes its
                # workers round-robin, and the resume rotation keeps that, so no worker needs to be told
                augment_step = (self.first_batch + produced * len(self.slots) + worker) // s.batches_per_step
                s.step_transform.set_step(augment_step)
            entries: list[tuple[Any, int, bool]] = []  # (decoded sample or None, position, valid)
            skips: list[tuple[str, int, str]] = []  # logged by the rank's main process, once per sample
            while len(entries) < s.batch_size:
                item_pass, (position, repeat), raw = next(emitted)
                cursor += 1
                if position < 0:  # evaluation padding
                    entries.append((None, -1, False))
                    continue
                try:
                    if raw is None:
                        raise SkipSample("unreadable_sample")
                    seed = _sample_seed(s.seed, s.epoch, position, repeat, item_pass)
                    entries.append((_decode_seeded(s.codec, raw, seed), position, True))
                    counters["refilled"] += item_pass > 0
                    failures = 0
                except SkipSample as skip:
                    failures += 1
                    if self._first_meeting(position, repeat, item_pass):  # each bad sample once per epoch
                        counters[str(skip)] += 1
                        if raw is not None:  # an unreadable shard's samples: one line for the shard (_SlotReader)
                            skips.append((raw.get("__key__", "?"), position, str(skip)))
                    if s.pad:  # evaluation: keep the slot aligned, mark the hole
                        entries.append((None, position, False))
                    elif failures > give_up:
                        raise RuntimeError(
                            f"{s.split_name}: no readable sample in a whole pass over the epoch "
                            f"({dict(counters)}); check the shards"
                        )
            produced += 1
            decoded, ids, valid = (list(column) for column in zip(*entries))
            batch = s.codec.collate(decoded, ids, valid)
            batch.update(_worker=worker, _cursor=cursor, _counters=dict(counters), _skips=skips)
            if augment_step is not None:
                batch["augment_step"] = augment_step  # the step the worker augmented for (a consumer may check it)
            yield inline_small_tensors(batch) if in_worker else batch

    def _first_meeting(self, position: int, repeat: int, item_pass: int) -> bool:
        """Whether a bad sample met now goes to the counters (and the log): each bad sample once per
        epoch over all ranks and workers. The slot that holds its first copy (``repeat == 0``) counts it
        in its main pass; the refill passes, which re-read other slots' items, count only the items no
        slot holds (the epoch's dropped remainder, the last ``dropped`` items), once per worker."""
        if repeat != 0:
            return False
        if item_pass == 0:
            return True
        if not hasattr(self, "_spare"):
            s = self.stream
            tail = self.items[len(self.items) - s.dropped :] if s.dropped and not s.pad else self.items[:0]
            self._spare, self._counted = {int(p) for p, r in tail if r == 0}, set()
        if position in self._spare and position not in self._counted:
            self._counted.add(position)
            return True
        return False

    def _emission(self, worker: int, cursor: int, counters: Counter):
        """``(pass, (position, repeat), raw)`` from ``cursor`` on: the slot in its shuffled order,
        then (training) refill passes over the phase's items from the slot's start, wrapping."""
        slot, order = self.slots[worker], self.orders[worker]
        length, failed_shards = len(slot), set()
        if cursor < length:
            reader = _SlotReader(self.stream.split, slot, order, failed_shards)
            for index, raw in zip(order[cursor:], reader.emit(cursor, counters)):
                yield 0, slot[index], raw
        if self.stream.pad:
            raise RuntimeError("evaluation slot exhausted before its batches were complete")
        refill = np.roll(self.items, -self.slot_starts[worker], axis=0)
        reader = _SlotReader(self.stream.split, refill, np.arange(len(refill)), failed_shards)
        done = max(0, cursor - length)
        while True:
            start = done % len(refill)
            for index, raw in zip(range(start, len(refill)), reader.emit(start, counters)):
                yield 1 + done // len(refill), refill[index], raw
                done += 1


class ShardStream:
    """An epoch-aware, resumable stream of batches for one rank."""

    def __init__(
        self,
        split: SplitIndex,
        codec,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        shuffle: bool,
        pad: bool,
        buffer_size: int = 1000,
        repeats: int = 1,
        pin_memory: bool = False,
        split_name: str = "train",
        prefetch_factor: int = 2,
    ) -> None:
        if batch_size < 1 or num_workers < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad stream geometry: batch_size={batch_size} num_workers={num_workers} rank={rank} world_size={world_size}"
            )
        if repeats < 1 or buffer_size < 0:
            raise ValueError(f"repeats must be >= 1 and buffer_size >= 0, got {repeats} and {buffer_size}")
        self.split, self.codec, self.split_name = split, codec, split_name
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.slots_per_rank = num_workers, max(1, num_workers)
        self.seed, self.shuffle, self.pad = seed, shuffle, pad
        self.buffer_size = buffer_size if shuffle else 0
        self.repeats, self.pin_memory, self.prefetch_factor = repeats, pin_memory, prefetch_factor
        self.subset: Optional[np.ndarray] = None
        self.epoch = 0
        self.phases: list[Phase] = []
        self.counters: Counter = Counter()
        self.dropped = 0
        self.batches_yielded = 0  # by this rank over the whole run (equal on every rank); saved in the state
        self._pass_total: Optional[int] = None  # batches of the pass being read (this rank), once planned
        self.transform_options: Optional[dict[str, Any]] = None  # build_train_stream's, for step-aware transforms
        self.step_transform = None  # data.transforms.ScheduledTransform, or None
        self.batches_per_step = 1
        self._check_enough_samples()

    # -- planning ----------------------------------------------------------------------------

    def _check_enough_samples(self) -> None:
        slots = self.world_size * self.slots_per_rank
        if not self.pad and self.split.total // self.repeats < slots * self.batch_size:
            raise ValueError(
                f"{self.split_name} has {self.split.total} samples: fewer than world_size x workers x batch "
                f"= {self.world_size} x {self.slots_per_rank} x {self.batch_size}; lower one of them"
            )

    def set_subset(self, mask: Optional[np.ndarray]) -> None:
        """Restrict the stream to a subset of sample positions (``sample_id``, the split's index space; e.g. a
        Tri-Level example subset) from the next pass it plans: the next epoch, or a resumed one, whose plan
        must then get the subset it was first planned with. Refused while a pass is being read (its workers
        hold its plan) and for a mask of the wrong shape or an empty one."""
        if mask is not None:
            mask = np.asarray(mask, bool)
            if mask.shape != (self.split.total,):
                raise ValueError(
                    f"subset mask has shape {mask.shape}, the {self.split_name} split has {self.split.total} samples"
                )
            if not mask.any():
                raise ValueError(f"an empty subset of the {self.split_name} split")
        if self._pass_total is not None and not self._pass_done():
            raise RuntimeError(
                f"set_subset during epoch {self.epoch} of {self.split_name}: a subset changes only "
                f"between passes (call it from on_epoch, before the pass is planned)"
            )
        self.subset = mask

    def set_augmentation_schedule(self, schedule: Callable[[int, dict], dict], batches_per_step: int = 1) -> None:
        """Training augmentation that follows the global optimizer step: ``schedule(step, options)``
        gives the ``data.transforms.build_transform`` options of the batches of step ``step`` from the
        stream's own (a picklable pure function; ``data.transforms.ScheduledTransform``). The step of a
        batch is this rank's run-wide batch index (kept in the stream state) ``// batches_per_step``
        (gradient accumulation): each DataLoader worker computes it for the batch it is producing, so
        nothing is communicated and a resumed run augments every batch as the uninterrupted run did.
        Set it before the first pass (the workers take a copy when a pass starts)."""
        from .transforms import ScheduledTransform

        if self.pad or self.transform_options is None:
            raise ValueError(
                f"the {self.split_name} stream has no step-aware augmentation: it needs a training "
                f"stream built by build_train_stream with its own timm transform (no custom transform)"
            )
        if not isinstance(batches_per_step, int) or batches_per_step < 1:
            raise ValueError(f"batches_per_step must be an int >= 1 (gradient accumulation), got {batches_per_step!r}")
        options = dict(self.transform_options)
        self.step_transform = ScheduledTransform(options.pop("image_size"), options, schedule)
        self.step_transform.transform_at(0)  # a bad option fails here, at start-up, not in a worker
        self.codec.transform = self.step_transform
        self.batches_per_step = batches_per_step

    def _current_phase(self) -> Phase:
        geometry = (self.world_size, self.slots_per_rank, self.batch_size)
        if not self.phases or (self.phases[-1].world, self.phases[-1].workers, self.phases[-1].batch) != geometry:
            self.phases.append(Phase(*geometry))
        return self.phases[-1]

    def _plan(self):
        """The phase's items; this rank's slots, where they start among the items, their emission
        orders; batches per worker."""
        phase = self._current_phase()
        items = epoch_items(
            self.split, self.seed, self.epoch, shuffle=self.shuffle, repeats=self.repeats, subset=self.subset
        )
        items = remaining_items(items, self.phases[:-1], self.seed, self.epoch, self.buffer_size, self.repeats)
        first = self.rank * phase.workers
        if self.pad:  # evaluation: contiguous padded slots, read in order
            slots, self.dropped = split_slots(items, phase.world, phase.workers, phase.batch, pad=True)
            mine = slots[first : first + phase.workers]
            orders = [np.arange(len(slot)) for slot in mine]
        else:
            layout, self.dropped = train_layout(
                items,
                phase.world,
                phase.workers,
                phase.batch,
                seed=self.seed,
                epoch=self.epoch,
                phase=len(self.phases) - 1,
                buffer=self.buffer_size,
                repeats=self.repeats,
            )
            mine = [items[indices] for indices, _ in layout[first : first + phase.workers]]
            orders = [order for _, order in layout[first : first + phase.workers]]
        length = len(mine[0]) if mine else 0
        per_worker = length // self.batch_size
        if per_worker == 0:
            raise ValueError(
                f"{len(items)} samples left in epoch {self.epoch} cannot give every one of "
                f"{phase.world * phase.workers} workers a batch of {self.batch_size}"
            )
        starts = [(first + w) * length for w in range(phase.workers)]  # where a slot's refill pass starts
        return items, mine, starts, orders, per_worker

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch (the same on every rank)."""
        items = epoch_items(
            self.split, self.seed, self.epoch, shuffle=self.shuffle, repeats=self.repeats, subset=self.subset
        )
        slots, _ = split_slots(items, self.world_size, self.slots_per_rank, self.batch_size, pad=self.pad)
        return self.slots_per_rank * (len(slots[0]) // self.batch_size)

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the current epoch; the next ``iter()`` starts the following epoch."""
        items, slots, starts, orders, per_worker = self._plan()
        phase = self.phases[-1]
        cursors, batches = phase.cursors[self.rank], phase.batches[self.rank]
        done = sum(batches)
        total = per_worker * phase.workers
        if done >= total:
            self._next_epoch()
            yield from self.__iter__()
            return
        if self.dropped and done == 0 and len(self.phases) == 1:
            log.info(
                "epoch %d of %s: %d samples left over after equal %s-sample batches on %d ranks x %d workers (%s)",
                self.epoch,
                self.split_name,
                self.dropped,
                self.batch_size,
                phase.world,
                phase.workers,
                "padded" if self.pad else "dropped this epoch",
            )
        self._pass_total = total
        dataset = _PhaseDataset(
            self,
            items,
            slots,
            starts,
            orders,
            list(cursors),
            list(batches),
            done % phase.workers,
            per_worker,
            first_batch=self.batches_yielded - done,
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            persistent_workers=False,
            worker_init_fn=functools.partial(_worker_init, os.getpid()),
            generator=torch.Generator(),
        )  # leave the global RNG alone
        batches_iter = iter(loader)
        if self.num_workers:
            atexit.unregister(_end_live_workers)
            atexit.register(_end_live_workers)  # after multiprocessing.util's handler, so it runs first
            _LIVE_LOADERS.add(batches_iter)
        try:
            yield from self._drain(batches_iter, cursors, batches)
        finally:  # an error in a worker, or the consumer closed the generator: end the workers now
            _LIVE_LOADERS.discard(batches_iter)
            shutdown = getattr(batches_iter, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if sum(batches) != total:
            raise RuntimeError(f"rank {self.rank} got {sum(batches)} of {total} batches in epoch {self.epoch}")
        self._next_epoch()

    def _drain(self, batches_iter, cursors: list, batches: list) -> Iterator[dict[str, torch.Tensor]]:
        worker_counters: dict[int, dict] = {}
        base = Counter(self.counters)
        for batch in batches_iter:
            worker = batch.pop("_worker")
            cursors[worker] = batch.pop("_cursor")
            batches[worker] += 1
            self.batches_yielded += 1
            worker_counters[worker] = batch.pop("_counters")
            for key, position, reason in batch.pop("_skips"):
                log.warning(
                    "%s epoch %d: skipped sample %s (position %d): %s", self.split_name, self.epoch, key, position, reason
                )
            self.counters = base + sum((Counter(c) for c in worker_counters.values()), Counter())
            yield batch

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.phases = []
        self._pass_total = None

    def _pass_done(self) -> bool:
        """Every batch of the pass being read was yielded (the consumer holds the last one; the pass's
        generator has not yet moved to the next epoch)."""
        return (
            self._pass_total is not None
            and bool(self.phases)
            and sum(self.phases[-1].batches[self.rank]) >= self._pass_total
        )

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position of every rank in the epoch (gathered from all ranks when distributed).

        A pass whose last batch has been yielded is saved as the start of the next epoch (the same on
        every rank: ranks yield equal batches), so ``epoch`` is always the epoch of the next pass and a
        resumed run hears ``on_epoch`` once for it, before it is planned."""
        epoch, phases = self.epoch, [p.to_dict() for p in self.phases]
        if self._pass_done():
            epoch, phases = epoch + 1, []
        if phases and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.rank, phases[-1]["cursors"][self.rank], phases[-1]["batches"][self.rank]))
            for rank, cursors, batches in gathered:
                phases[-1]["cursors"][rank], phases[-1]["batches"][rank] = cursors, batches
        return {
            "epoch": epoch,
            "phases": phases,
            "seed": self.seed,
            "split": self.split_name,
            "total": self.split.total,
            "repeats": self.repeats,
            "buffer_size": self.buffer_size,
            "shuffle": self.shuffle,
            "repeat_layout": REPEAT_LAYOUT,
            "batches_yielded": self.batches_yielded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {
            "seed": self.seed,
            "split": self.split_name,
            "total": self.split.total,
            "repeats": self.repeats,
            "buffer_size": self.buffer_size,
            "shuffle": self.shuffle,
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"stream state has {key}={state.get(key)!r} but this stream has {value!r}: "
                    f"resuming needs the same data, seed and stream options"
                )
        if self.repeats > 1 and state.get("repeat_layout") != REPEAT_LAYOUT:
            raise ValueError(
                "stream state was saved with the earlier placement of repeated augmentation (copies "
                "on one rank); resuming it here would repeat or skip samples: finish that run with "
                "the version that started it, or start the epoch afresh"
            )
        self.epoch = int(state["epoch"])
        self.phases = [Phase(**p) for p in state["phases"]]
        self._pass_total = None
        # states saved before the count existed: whole epochs of this geometry, then the current phase's
        consumed = sum(self.phases[-1].batches[self.rank]) if self.phases else 0
        self.batches_yielded = int(state.get("batches_yielded", self.epoch * len(self) + consumed))
        self.counters = Counter()


def build_train_stream(
    path: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    image_size: int = 224,
    split: str = "train",
    transform: Optional[Callable] = None,
    buffer_size: int = 1000,
    repeats: int = 1,
    base: Optional[str] = None,
    pin_memory: bool = False,
    token_labels: bool = False,
    remote: Optional[RemoteOptions] = None,
    **transform_options,
) -> ShardStream:
    """Training stream: shuffled, augmented (DeiT recipe through timm unless ``transform`` is given).
    ``token_labels``: the samples' dense token labels too, flipped and cropped with the image
    (``data.token_labels.TokenLabelCodec``; the index's ``token_labels`` block is checked here).
    ``remote``: retries, cache and endpoint for shards on object storage / HTTP (``data.remote``)."""
    from .transforms import build_transform

    index = ShardIndex.load(path, base, remote)
    index.warn_if_unshuffled(split, buffer_size=buffer_size, readers=world_size * max(1, num_workers), rank=rank)
    classes = index.classes()
    if token_labels:
        from .token_labels import TokenLabelCodec, check_index

        if transform is not None:
            raise ValueError("token_labels=True builds its own paired image / map transform: pass no transform")
        block = check_index(index.meta, f"{index.root}/shards.json", len(classes) or None)
        codec = TokenLabelCodec(image_size, block, num_classes=len(classes) or None, **transform_options)
    else:
        codec = ClassificationCodec(
            transform or build_transform(True, image_size, **transform_options), num_classes=len(classes) or None
        )
    stream = ShardStream(
        index.split(split),
        codec,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        shuffle=True,
        pad=False,
        buffer_size=buffer_size,
        repeats=repeats,
        pin_memory=pin_memory,
        split_name=split,
    )
    if transform is None and not token_labels:  # the stream's own transform: a step-aware schedule may rebuild it
        stream.transform_options = {"image_size": image_size, **transform_options}
    return stream


def build_eval_stream(
    path: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    image_size: int = 224,
    split: str = "val",
    transform: Optional[Callable] = None,
    base: Optional[str] = None,
    pin_memory: bool = False,
    remote: Optional[RemoteOptions] = None,
    **transform_options,
) -> ShardStream:
    """Evaluation stream: every sample exactly once across ranks, padding marked ``valid = False``."""
    from .transforms import build_transform

    index = ShardIndex.load(path, base, remote)
    classes = index.classes()
    codec = ClassificationCodec(
        transform or build_transform(False, image_size, **transform_options), num_classes=len(classes) or None
    )
    return ShardStream(
        index.split(split),
        codec,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=0,
        shuffle=False,
        pad=True,
        buffer_size=0,
        pin_memory=pin_memory,
        split_name=split,
    )
