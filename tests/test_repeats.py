"""Repeated augmentation as DeiT's RASampler places it: a sample's copies in one global step on different ranks."""

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from data import write_shards
from data.plan import Phase, epoch_items, remaining_items, train_layout
from data.shards import ShardIndex
from data.stream import build_train_stream

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "stream_job.py"
JOB_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # stream_job.py imports this checkout's packages


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repeats") / "shards"  # 150 samples in 15 shards
    assert (
        write_shards.main(["synthetic", str(out), "--train", "150", "--val", "8", "--shard-size", "10", "--no-progress"])
        == 0
    )
    return out


def placements(layout, items, world, workers, batch):
    """{position: [(global micro-step, rank, repeat)]} for a fresh epoch of ``train_layout``'s slots,
    with the DataLoader's round-robin over workers (worker w gives a rank's batches w, w + workers, ...)."""
    where = defaultdict(list)
    for slot, (indices, order) in enumerate(layout):
        rank, worker = divmod(slot, workers)
        for j, (position, repeat) in enumerate(items[indices[order]]):
            where[int(position)].append(((j // batch) * workers + worker, rank, int(repeat)))
    return where


@pytest.mark.parametrize(
    "world,workers,batch,repeats", [(3, 2, 4, 3), (6, 1, 2, 3), (4, 3, 5, 2), (2, 2, 4, 3), (1, 2, 6, 3), (5, 1, 3, 3)]
)
def test_layout_partitions_the_epoch_and_deals_copies_over_ranks(shards, world, workers, batch, repeats):
    split = ShardIndex.load(str(shards)).split("train")
    items = epoch_items(split, 3, 0, shuffle=True, repeats=repeats)
    layout, dropped = train_layout(items, world, workers, batch, seed=3, epoch=0, phase=0, buffer=8, repeats=repeats)
    used = np.concatenate([indices for indices, _ in layout])
    assert sorted(used.tolist()) == list(range(len(items) - dropped)), "each kept item read by exactly one slot"
    assert all(len(i) == len(layout[0][0]) and len(i) % batch == 0 for i, _ in layout), "equal whole batches"
    assert all(np.array_equal(np.sort(o), np.arange(len(o))) and np.all(np.diff(i) > 0) for i, o in layout)
    where = placements(layout, items, world, workers, batch)
    complete = [p for p in where.values() if len(p) == repeats]
    assert len(complete) >= 0.75 * len(where)
    if world % repeats == 0:  # every sample's copies: one global step, `repeats` different ranks
        assert all(len({s for s, _, _ in p}) == 1 and len({r for _, r, _ in p}) == repeats for p in complete)
    elif world == 1 and batch % repeats == 0:  # one rank: the copies in one batch
        assert all(len({s for s, _, _ in p}) == 1 for p in complete)
    else:  # RASampler-like: at most two neighbouring steps, never all copies on one rank
        assert all(max(s for s, _, _ in p) - min(s for s, _, _ in p) <= workers for p in complete)
        assert all(len({r for _, r, _ in p}) == min(world, repeats) for p in complete)
        together = np.mean([len({s for s, _, _ in p}) == 1 for p in complete])
        assert together >= 0.5, together
    assert all(sorted(r for _, _, r in p) == list(range(repeats)) for p in complete), "copies keep their repeat index"


def test_repeats_one_keeps_the_contiguous_layout(shards):
    split = ShardIndex.load(str(shards)).split("train")
    items = epoch_items(split, 0, 0, shuffle=True)
    layout, dropped = train_layout(items, 2, 3, 4, seed=0, epoch=0, phase=0, buffer=16)
    length = len(layout[0][0])
    assert dropped == len(items) - 6 * length
    assert all(np.array_equal(indices, np.arange(s * length, (s + 1) * length)) for s, (indices, _) in enumerate(layout))


def test_three_ranks_see_the_copies_in_the_same_step_with_different_augmentation(shards):
    streams = [
        build_train_stream(
            str(shards), batch_size=4, rank=r, world_size=3, num_workers=2, seed=1, image_size=32, buffer_size=8, repeats=3
        )
        for r in range(3)
    ]
    plain = build_train_stream(
        str(shards), batch_size=4, rank=0, world_size=3, num_workers=2, seed=1, image_size=32, buffer_size=8
    )
    assert len(streams[0]) == len(plain), "an epoch keeps its length in iterations"
    steps = list(zip(*(list(s) for s in streams)))
    assert len(steps) == len(plain)
    for batches in steps:
        ids = [b["sample_id"].tolist() for b in batches]
        assert ids[0] == ids[1] == ids[2], "row j of every rank is the same sample"
        for b in (1, 2):
            assert not torch.equal(batches[0]["image"], batches[b]["image"]), "each copy augmented on its own"
    seen = [i for batches in steps for i in batches[0]["sample_id"].tolist()]
    assert len(seen) == len(set(seen)), "a sample's copies do not come back in another step"


def run_job(*args, timeout=180):
    result = subprocess.run(
        [sys.executable, str(JOB), *map(str, args)], env=JOB_ENV, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]


def load(path):
    return torch.load(path, weights_only=False)


@pytest.mark.slow
def test_repeats_resume_exactly_and_across_a_world_size_change(shards, tmp_path):
    common = ["--workers", "2", "--batch", "6", "--repeats", "3", "--buffer", "8"]
    run_job(shards, tmp_path / "straight.pt", *common, "--take", "10")
    straight = load(tmp_path / "straight.pt")["batches"]
    run_job(shards, tmp_path / "head.pt", *common, "--take", "3", "--save-state", tmp_path / "state.pt")
    run_job(shards, tmp_path / "tail.pt", *common, "--state", tmp_path / "state.pt", "--take", "7")
    for expected, got in zip(straight, load(tmp_path / "head.pt")["batches"] + load(tmp_path / "tail.pt")["batches"]):
        assert torch.equal(expected["sample_id"], got["sample_id"]) and torch.equal(expected["image"], got["image"])
    # 3 ranks for 2 steps, then 2 ranks finish the epoch: no copy of a sample is shown more than 3 times
    port = free_port()
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                str(JOB),
                str(shards),
                str(tmp_path / f"r{r}.pt"),
                "--rank",
                str(r),
                "--world",
                "3",
                *common[:4],
                "--repeats",
                "3",
                "--take",
                "2",
                "--dist-port",
                str(port),
                "--save-state",
                str(tmp_path / "three.pt"),
            ],
            env=JOB_ENV,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(3)
    ]
    for job in jobs:
        assert job.wait(timeout=180) == 0, job.stderr.read()[-3000:]
    port = free_port()
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                str(JOB),
                str(shards),
                str(tmp_path / f"s{r}.pt"),
                "--rank",
                str(r),
                "--world",
                "2",
                *common[:4],
                "--repeats",
                "3",
                "--state",
                str(tmp_path / "three.pt"),
                "--dist-port",
                str(port),
            ],
            env=JOB_ENV,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for job in jobs:
        assert job.wait(timeout=180) == 0, job.stderr.read()[-3000:]
    before = [i for r in range(3) for b in load(tmp_path / f"r{r}.pt")["batches"] for i in b["sample_id"].tolist()]
    after = [i for r in range(2) for b in load(tmp_path / f"s{r}.pt")["batches"] for i in b["sample_id"].tolist()]
    counts = np.bincount(before + after)
    assert len(before) == 3 * 2 * 6 and counts.max() <= 3, "no copy shown twice across the change"
    assert 150 - len(before + after) < 2 * 2 * 6, "only the new split's remainder (< slots x batch) is left out"


def test_remaining_items_after_a_phase_are_exactly_the_unconsumed_copies(shards):
    split = ShardIndex.load(str(shards)).split("train")
    items = epoch_items(split, 5, 1, shuffle=True, repeats=3)
    phase = Phase(world=3, workers=2, batch=4, cursors=[[8, 4], [8, 4], [8, 4]])
    left = remaining_items(items, [phase], 5, 1, 8, repeats=3)
    layout, _ = train_layout(items, 3, 2, 4, seed=5, epoch=1, phase=0, buffer=8, repeats=3)
    taken = {tuple(items[i]) for s, (indices, order) in enumerate(layout) for i in indices[order[: [8, 4][s % 2]]]}
    assert len(taken) == 3 * (8 + 4) and {tuple(x) for x in left} == {tuple(x) for x in items} - taken
