"""Tri-Level E-ViT's example level (methods/trilevel_examples.py, TRILEVEL_SPEC "Level 1: examples"):
forgetting scores, swaps, the subset through the stream, and exact resume in the real engine."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from data.stream import build_train_stream
from methods import MethodContext
from methods.registry import initial_subset
from methods.trilevel_examples import (
    ForgettingStats,
    TriLevelExamples,
    TriLevelExamplesConfig,
    forgetting_scores,
    initial_mask,
    swap_epochs,
    swap_subset,
)


def run_sequence(rows, window=30, samples=1):
    """Feed per-step correctness rows (None: not presented) for ``samples`` samples; the statistics."""
    stats = ForgettingStats(samples, window, torch.device("cpu"))
    for row in rows:
        ids = [i for i, value in enumerate(row) if value is not None]
        stats.update(torch.tensor(ids, dtype=torch.long), torch.tensor([bool(row[i]) for i in ids]))
    return stats.host()


def score_of(sequence, window=30):
    found = run_sequence([[v] for v in sequence], window)
    return int(forgetting_scores(found["forgets"], found["ever"], window)[0]), bool(found["presented"][0])


def test_forgetting_scores_of_the_spec_sequences():
    assert score_of([1, 0, 1, 0]) == (2, True)  # two correct -> wrong transitions
    assert score_of([0, 0, 0]) == (30, True)  # never correct: the window, most forgettable
    assert score_of([0, 1, 1]) == (0, True)  # learnt once and kept
    assert score_of([]) == (30, False)  # unseen: not presented, so not a candidate
    assert score_of([1, 0, 1, 0, 1, 0], window=3) == (1, True)  # only the first `window` presentations count


def test_copies_in_one_step_are_one_presentation_correct_if_half_are():
    stats = ForgettingStats(3, 30, torch.device("cpu"))
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, -1])  # three copies of 0, two of 1, three of 2, one ignored
    correct = torch.tensor([True, False, False, True, False, True, True, False, True])
    stats.update(ids, correct)
    found = stats.host()
    assert found["count"].tolist() == [1, 1, 1], "copies collapse into one presentation"
    assert found["ever"].tolist() == [False, True, True], "1/3 is wrong, 1/2 and 2/3 are right"
    stats.update(torch.tensor([1, 2]), torch.tensor([False, False]))
    assert stats.host()["forgets"].tolist() == [0, 1, 1]


def test_initial_subset_is_a_seeded_random_share_of_the_split():
    mask = initial_mask(1000, 0.2, seed=3)
    assert mask.sum() == 800 and np.array_equal(mask, initial_mask(1000, 0.2, seed=3))
    assert not np.array_equal(mask, initial_mask(1000, 0.2, seed=4))
    assert initial_mask(1_281_167, 0.2, 0).sum() == 1_024_934  # official main.py's count
    config = TriLevelExamplesConfig()
    assert np.array_equal(initial_subset({"trilevel_examples": config}, 1000, 3), mask)
    assert initial_subset({}, 1000, 3) is None
    assert swap_epochs(30, 5) == [30, 60, 90, 120, 150]


def test_swap_removes_the_lowest_scores_and_restores_as_many_from_the_pool():
    rng = np.random.default_rng(0)
    subset = initial_mask(400, 0.2, seed=1)
    presented = subset & (rng.random(400) < 0.9)
    scores = rng.integers(0, 5, 400)
    new, info = swap_subset(subset, presented, scores, 20, seed=1, swap=1)
    removed, restored = info["removed"], info["restored"]
    assert new.sum() == subset.sum() == 320, "the subset keeps its size"
    assert len(removed) == len(restored) == 20 and not set(removed) & set(restored)
    assert subset[removed].all() and presented[removed].all() and not subset[restored].any(), "R -> S, S -> R"
    candidates = np.flatnonzero(subset & presented)
    assert scores[removed].max() <= np.sort(scores[candidates])[20], "the lowest scores leave"
    assert not new[removed].any() and new[restored].all()
    again, _ = swap_subset(subset, presented, scores, 20, seed=1, swap=1)
    other, _ = swap_subset(subset, presented, scores, 20, seed=1, swap=2)
    assert np.array_equal(new, again) and not np.array_equal(new, other), "a function of (seed, swap)"
    few = subset & (np.arange(400) < 30)
    short, info = swap_subset(subset, few, scores, 100, seed=1, swap=1)
    assert len(info["removed"]) == len(info["restored"]) == few.sum() and short.sum() == 320, (
        "fewer candidates than the swap size: restore as many as removed (official restores remove_n)"
    )
    pruned, info = swap_subset(subset, presented, scores, 20, seed=1, swap=1, restore=False)
    assert pruned.sum() == 300 and len(info["restored"]) == 0


@pytest.mark.parametrize(
    "options, match",
    [({"drop": 1.0}, "drop"), ({"swap": 0.3}, "held-out pool"), ({"period": 0}, "period"), ({"window": 2.5}, "window")],
)
def test_bad_options_name_the_key(options, match):
    with pytest.raises(ValueError, match=match):
        TriLevelExamplesConfig(**options)


# -- the plug-in over a real stream (no engine) -------------------------------------------------------


def fake_logits(ids: torch.Tensor, labels: torch.Tensor, epoch: int, classes: int = 32) -> torch.Tensor:
    """Logits that are right or wrong by a hash of (sample, epoch): samples forget at different rates."""
    right = (ids * 7919 + epoch * 104729) % 5 < (ids % 4)
    predicted = torch.where(right, labels, (labels + 1) % classes)
    return torch.nn.functional.one_hot(predicted, classes).float()


def drive(stream, plugin, epochs: int, start_epoch: int = 0) -> dict[int, set]:
    """Epochs of the stream through the plug-in's events as the engine runs them; ids read per epoch."""
    read: dict[int, set] = {}
    for _ in range(start_epoch, epochs):
        epoch = stream.epoch
        plugin.on_epoch(epoch, stream)
        read[epoch] = set()
        for step, batch in enumerate(stream):
            plugin.on_step(step)
            read[epoch] |= set(batch["sample_id"].tolist())
            plugin.after_forward(step, batch, fake_logits(batch["sample_id"], batch["label"], epoch))
            plugin.after_step(step)
        read[epoch] = (read[epoch], plugin.subset.copy())
    return read


def make_plugin(shards, config, seed=0):
    stream = build_train_stream(str(shards), batch_size=8, num_workers=0, seed=seed, image_size=32, buffer_size=16)
    stream.set_subset(initial_subset({"trilevel_examples": config}, stream.split.total, seed))
    plugin = TriLevelExamples(config, MethodContext(total_steps=100, steps_per_epoch=25, seed=seed))
    plugin.on_engine(None, None, stream)
    return stream, plugin


def test_every_epoch_reads_its_subset_only_and_swaps_land_on_epoch_starts(tiny_shards):
    config = TriLevelExamplesConfig(period=1, swaps=2, swap=0.05, drop=0.2)
    stream, plugin = make_plugin(tiny_shards, config)
    assert len(stream) == (256 - 51) // 8, "an epoch is a pass over the 80% subset"
    read = drive(stream, plugin, 4)
    subsets = [read[e][1] for e in range(4)]
    for epoch, (ids, subset) in read.items():
        assert ids <= set(np.flatnonzero(subset)), f"epoch {epoch} read a sample outside its subset"
        assert subset.sum() == 205
    assert not np.array_equal(subsets[0], subsets[1]) and not np.array_equal(subsets[1], subsets[2])
    assert np.array_equal(subsets[2], subsets[3]), "two swaps only (epochs 1 and 2)"
    assert plugin.swaps_done == 2 and (subsets[0] & ~subsets[1]).sum() == 12  # floor(0.05 * 256)


def test_state_round_trip_resumes_the_same_decisions(tiny_shards):
    config = TriLevelExamplesConfig(period=1, swaps=3, swap=0.05, drop=0.2)
    stream, plugin = make_plugin(tiny_shards, config)
    straight = drive(stream, plugin, 4)
    stream2, plugin2 = make_plugin(tiny_shards, config)
    drive(stream2, plugin2, 2)
    state, stream_state = plugin2.state_dict(), stream2.state_dict()
    stream3, plugin3 = make_plugin(tiny_shards, config)
    stream3.load_state_dict(stream_state)
    plugin3.load_state_dict(state)
    plugin3.on_epoch(stream3.epoch, stream3)  # a resumed epoch start is heard again: applied once
    assert plugin3.swaps_done == 2
    resumed = drive(stream3, plugin3, 4, start_epoch=2)
    for epoch in (2, 3):
        assert resumed[epoch][0] == straight[epoch][0] and np.array_equal(resumed[epoch][1], straight[epoch][1])
    with pytest.raises(ValueError, match="samples"):
        stream4, plugin4 = make_plugin(tiny_shards, config)
        bad = dict(state, samples=10)
        plugin4.load_state_dict(bad)


def test_the_stream_refuses_a_subset_change_inside_a_pass(tiny_shards):
    stream = build_train_stream(str(tiny_shards), batch_size=8, num_workers=0, seed=0, image_size=32)
    batches = iter(stream)
    next(batches)
    with pytest.raises(RuntimeError, match="between passes"):
        stream.set_subset(np.ones(256, bool))
    with pytest.raises(ValueError, match="shape"):
        stream.set_subset(np.ones(10, bool))
    batches.close()


# -- the real engine: SIGKILL + resume, and 2 -> 1 ranks ----------------------------------------------

EXAMPLES = [
    "methods.trilevel_examples={period: 1, swaps: 3, swap: 0.05}",
    "train.epochs=4",
    "train.zero_stage=1",
    "train.precision=fp32",
    "checkpoint.every=4",
    "checkpoint.keep=20",
    "train.eval_every=0",
]


def client_state(run: Path, step: int) -> dict:
    return torch.load(
        run / "checkpoints" / f"step-{step}" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["plugins"]["trilevel_examples"]


def subset_of(state: dict) -> np.ndarray:
    return np.unpackbits(state["subset"].numpy(), count=state["samples"]).astype(bool)


@pytest.mark.slow
def test_statistics_survive_sigkill_and_resume_exactly_and_a_two_to_one_resume(tmp_path, tiny_shards):
    from helpers import kill_tree, module_state, records, start, train, wait_for_step

    straight = tmp_path / "straight"
    train(straight, tiny_shards, *EXAMPLES, ranks=2)  # with ToE (deit_tiny_toe_cpu.yaml): they compose
    steps = records(straight)
    assert sorted(steps) == list(range(48))
    assert [steps[t]["trilevel/swaps"] for t in (11, 12, 24, 36, 47)] == [0, 1, 2, 3, 3], "swaps at epoch starts"
    assert {steps[t]["trilevel/subset_size"] for t in steps} == {205}
    subsets = {step: subset_of(client_state(straight, step)) for step in (4, 16, 28, 40)}
    assert len({s.tobytes() for s in subsets.values()}) == 4, "a new subset in every epoch after a swap"

    victim = tmp_path / "killed"
    process = start(victim, tiny_shards, *EXAMPLES, ranks=2)
    wait_for_step(victim, 30, process)
    kill_tree(process.pid, signal.SIGKILL)
    process.wait()
    latest = int((victim / "checkpoints" / "latest").read_text().split("-")[1])
    assert latest >= 28, "killed after the second swap"
    out = train(victim, tiny_shards, *EXAMPLES, ranks=2)
    assert f"resumed at step {latest}" in out
    resumed = records(victim)
    assert [resumed[t]["loss"] for t in range(48)] == [steps[t]["loss"] for t in range(48)], "bit-identical losses"
    a, b = client_state(straight, 48), client_state(victim, 48)
    assert torch.equal(a["subset"], b["subset"]) and a["swaps_done"] == b["swaps_done"] == 3
    assert all(torch.equal(a["stats"][k], b["stats"][k]) for k in a["stats"]), "identical statistics"
    wa, wb = module_state(straight, 48), module_state(victim, 48)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    one = tmp_path / "one-rank"  # 2 -> 1 ranks from inside epoch 2 (after the second swap)
    out = train(one, tiny_shards, *EXAMPLES, ranks=1, extra=["--resume", str(straight / "checkpoints" / "step-28")])
    assert "resumed at step 28" in out, out[-2000:]
    first = client_state(one, 32)
    assert np.array_equal(subset_of(first), subsets[28]), "the same subset on another world size"
    assert first["swaps_done"] == 2 and client_state(one, 40)["swaps_done"] == 3
    assert subset_of(client_state(one, 40)).sum() == 205
    assert json.loads((one / "final.json").read_text())["step"] == 48


@pytest.mark.slow
def test_all_three_levels_train_on_a_subset_and_evaluate_sparse_and_dense(tmp_path, tiny_shards):
    """The whole method (configs/deit_tiny_trilevel_cpu.yaml's levels) in the real engine, with the EMA."""
    from helpers import records, train

    run = tmp_path / "trilevel"
    train(
        run,
        tiny_shards,
        "methods.toe=null",
        "methods.trilevel_examples={period: 1, swaps: 1}",
        "methods.trilevel_tokens={keep_ratio: 0.7, attn_ratio: 0.3, locations: [1, 3, 4]}",
        "model.kwargs={patch_size: 8, depth: 6, embed_dim: 48, num_heads: 2}",
        "train.epochs=2",
        "train.ema=true",
        "train.eval_every=12",
        "train.precision=fp32",
    )
    steps = records(run)
    assert sorted(steps) == list(range(24)), "2 epochs of the 80% subset: 12 steps each"
    assert steps[23]["trilevel/swaps"] == 1 and steps[0]["trilevel/keep_ratio"] == 1.0
    assert steps[23]["trilevel/keep_ratio"] == pytest.approx(0.7) and steps[23]["cost/flops_share"] < 1
    final = json.loads((run / "final.json").read_text())
    for key in ("top1", "dense_top1", "ema_top1", "dense_ema_top1"):
        assert key in final, f"{key} missing from {sorted(final)}"
