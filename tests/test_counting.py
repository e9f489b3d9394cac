"""ToE's kept counts as the paper counts them (Sec. 3.3.2, Eq. 1 and 6, Algorithm 1), against a reference
written from those equations, over many (N, r0, r1, Ng, k); and the earlier rule behind ``counting="rates"``."""

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from methods.toe import ToEConfig
from toe import ToESchedule, apply_token_expansion, expand_tokens
from toe.token_expansion import repeat_sizes


def paper_counts(num_patches: int, r0: Fraction, r1: Fraction, num_stages: int, stage: int) -> list[int]:
    """Sec. 3.3.2: floor(r0 N) seeds (step 1); stage m adds floor(mu_m N) tokens, mu_1 = r1 - r0 and
    mu_m = (1 - r1) / (Ng - 1) after (Eq. 1, Algorithm 1 lines 8-13); the last stage trains on all N
    tokens (r_Ng = 1: the official code skips the op there)."""
    counts = [math.floor(r0 * num_patches)]
    for m in range(1, stage + 1):
        if m == num_stages:
            counts.append(num_patches)
            break
        mu = r1 - r0 if m == 1 else (1 - r1) / (num_stages - 1)
        counts.append(counts[-1] + math.floor(mu * num_patches))
    return counts


def paper_repeats(mu_n: int, k: int) -> list[int]:
    """Eq. 6: each of the k parallel expansions adds floor(mu N / k) tokens; the paper is silent on the
    remainder, the official code gives it to the last repeat."""
    share = mu_n // k
    return [share] * (k - 1) + [mu_n - (k - 1) * share]


def random_cases(count: int, seed: int = 0):
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        num_patches = rng.choice([rng.randint(4, 80), 49, 64, 144, 196, 197, 576, 577, 784])
        if rng.random() < 0.7:
            r1 = Fraction(rng.randint(1, 99), 100)
        else:
            r1 = Fraction(rng.randint(1, 12), rng.randint(12, 30))
        r0 = r1 / 2 if rng.random() < 0.5 else r1 * Fraction(rng.randint(1, 10), 10)
        if math.floor(r0 * num_patches) < 1:
            continue
        cases.append((num_patches, r0, r1, rng.randint(2, 6), rng.randint(1, 4)))
    return cases


@pytest.mark.parametrize("chunk", range(4))
def test_paper_counts_over_many_configurations(chunk):
    for num_patches, r0, r1, num_stages, k in random_cases(2000, seed=chunk):
        schedule = ToESchedule(r1=float(r1), r0=float(r0), num_stages=num_stages, k=k, total_steps=10)
        assert schedule.r0 == r0 and schedule.r1 == r1  # the rationals the floats stand for
        for stage in range(1, num_stages + 1):
            counts = schedule.kept_counts(num_patches, stage)
            assert counts == paper_counts(num_patches, r0, r1, num_stages, stage), (num_patches, r0, r1, num_stages)
            assert all(b >= a for a, b in zip(counts, counts[1:])) and counts[-1] <= num_patches
            for added in (b - a for a, b in zip(counts, counts[1:-1] if stage == num_stages else counts[1:])):
                # each repeat: floor(mu N / k) == floor(floor(mu N) / k); the last one takes the rest
                assert repeat_sizes(added, k) == paper_repeats(added, k)
        assert schedule.kept_tokens(num_patches, num_stages) == num_patches


@pytest.mark.parametrize("chunk", range(2))
def test_rates_counting_keeps_the_earlier_floors(chunk):
    for num_patches, r0, r1, num_stages, k in random_cases(1000, seed=10 + chunk):
        schedule = ToESchedule(r1=float(r1), r0=float(r0), num_stages=num_stages, k=k, total_steps=10, counting="rates")
        for stage in range(1, num_stages + 1):
            rates = [r0] + [r1 + (d - 1) * (1 - r1) / (num_stages - 1) for d in range(1, stage + 1)]
            assert schedule.kept_counts(num_patches, stage) == [math.floor(r * num_patches) for r in rates]
        added = schedule.kept_counts(num_patches, 1)[1] - schedule.kept_counts(num_patches, 1)[0]
        assert repeat_sizes(added, k, "first") == [added // k + (1 if j < added % k else 0) for j in range(k)]


def test_the_issues_examples_and_where_the_two_rules_part():
    """N = 196: r1 = 0.4 keeps 136 in stage 2 (the paper and the code; 137 by floor(0.7 N)); r1 = 0.6 keeps
    116 in stage 1 (117); at r1 = 0.5 (49 per stage) the counts agree and only the remainder differs."""
    paper = {r1: ToESchedule(r1=r1, total_steps=3) for r1 in (0.4, 0.5, 0.6)}
    rates = {r1: ToESchedule(r1=r1, total_steps=3, counting="rates") for r1 in (0.4, 0.5, 0.6)}
    assert paper[0.4].kept_counts(196, 3) == [39, 78, 136, 196] and rates[0.4].kept_counts(196, 3)[2] == 137
    assert paper[0.6].kept_counts(196, 1) == [58, 116] and rates[0.6].kept_counts(196, 1) == [58, 117]
    assert paper[0.5].kept_counts(196, 3) == rates[0.5].kept_counts(196, 3) == [49, 98, 147, 196]
    assert repeat_sizes(49, 2) == [24, 25] and repeat_sizes(49, 2, "first") == [25, 24]
    assert "136/196" in paper[0.4].describe(196) and "counting=paper" in paper[0.4].describe(196)


@pytest.mark.parametrize("counting", ["paper", "rates"])
def test_the_ops_int_constants_follow_the_counting(counting):
    """The forward's own int arithmetic (traced by torch.compile) gives the schedule's counts, in both modes."""
    import timm

    for num_patches, r0, r1, num_stages, k in random_cases(60, seed=20):
        schedule = ToESchedule(
            r1=float(r1), r0=float(r0), num_stages=num_stages, k=k, total_steps=num_stages * 10, counting=counting
        )
        model = timm.create_model(
            "deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=16, num_heads=2, num_classes=4
        )
        module = apply_token_expansion(model, schedule)
        for step in range(0, num_stages * 10, 10):
            module.set_step(step)
            assert module.kept_counts(num_patches) == schedule.kept_counts(num_patches, schedule.stage(step))


@pytest.mark.parametrize("remainder", ["last", "first"])
@pytest.mark.parametrize("num_patches,r1,k", [(196, 0.5, 2), (49, 0.4, 3), (64, 0.6, 2), (37, 0.5, 4)])
def test_the_op_puts_the_remainder_where_told(remainder, num_patches, r1, k):
    """Against the per-sample reference loop of Eq. 2-7 (test_token_expansion), with either remainder rule."""
    from helpers import reference_toe

    counting = "paper" if remainder == "last" else "rates"
    schedule = ToESchedule(r1=r1, total_steps=3, k=k, counting=counting)
    x = torch.randn(2, 1 + num_patches, 6, generator=torch.Generator().manual_seed(num_patches), dtype=torch.float64)
    for stage in (1, 2):
        counts = schedule.kept_counts(num_patches, stage)
        out, keep_index = expand_tokens(x, counts, k=k, seed_stride=schedule.seed_stride, remainder=remainder)
        for b in range(2):
            anchors, merged = reference_toe(x[b, 1:].numpy(), counts, k, schedule.seed_stride, remainder=remainder)
            assert keep_index[b].tolist() == anchors
            np.testing.assert_allclose(out[b, 1:].numpy(), merged, rtol=0, atol=1e-9)


def test_the_remainder_rule_changes_the_anchors():
    """The paper's default (N = 196, r1 = 0.5: 49 tokens per stage, k = 2) is a case where the rules part:
    the reference comparison above could not tell them apart otherwise."""
    x = torch.randn(16, 1 + 196, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    last = expand_tokens(x, [49, 98], k=2, seed_stride=4)[1]
    first = expand_tokens(x, [49, 98], k=2, seed_stride=4, remainder="first")[1]
    assert sum(not torch.equal(a, b) for a, b in zip(last, first)) >= 8


def test_counting_option_is_validated():
    with pytest.raises(ValueError, match="counting must be one of"):
        ToESchedule(total_steps=3, counting="floor")
    with pytest.raises(ValueError, match="counting must be one of"):
        ToEConfig(counting="floors")
    with pytest.raises(ValueError, match="remainder must be one of"):
        expand_tokens(torch.randn(1, 17, 4), [4, 8], seed_stride=4, remainder="middle")
    assert ToEConfig(counting="rates").schedule(30, 10).counting == "rates"
    assert ToEConfig().schedule(30, 10).counting == "paper"


def test_boundary_epochs_give_the_hyper_schedule():
    """Appendix Sec. 1.2: stages at epochs [0-130, 131-260, 261-300] of 300 instead of the even split."""
    schedule = ToEConfig(r1=0.5, boundary_epochs=[130, 260]).schedule(300 * 7, steps_per_epoch=7)
    assert schedule.starts == [0, 130 * 7, 260 * 7]
    assert [schedule.stage(t) for t in (130 * 7 - 1, 130 * 7, 260 * 7 - 1, 260 * 7)] == [1, 2, 2, 3]
    for bad in ([130], [260, 130], [0, 100], ["a", 2], [130, True]):
        with pytest.raises(ValueError, match="boundary_epochs must give"):
            ToEConfig(boundary_epochs=bad)
    with pytest.raises(ValueError, match="exclude each other"):
        ToEConfig(boundary_epochs=[130, 260], boundaries=[0.4, 0.8])
    with pytest.raises(ValueError, match="before total_steps"):
        ToEConfig(boundary_epochs=[130, 260]).schedule(200, steps_per_epoch=1)
