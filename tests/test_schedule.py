"""ToESchedule: stages keyed off the global step, exact kept counts, validation, the table."""

import math
from fractions import Fraction

import pytest

from models.cost import ViTShape
from toe import ToESchedule


@pytest.mark.parametrize("total_steps", [1, 2, 3, 7, 10, 100, 300, 1001, 12_345])
@pytest.mark.parametrize("num_stages", [2, 3, 4, 5])
def test_even_split_matches_algorithm_1(total_steps, num_stages):
    schedule = ToESchedule(r1=0.5, num_stages=num_stages, total_steps=total_steps)
    for step in range(total_steps + 3):
        assert schedule.stage(step) == min(num_stages, num_stages * step // total_steps + 1)


@pytest.mark.parametrize("total_steps,num_stages", [(300, 3), (100, 3), (10, 4), (1000, 2)])
def test_stage_boundaries_exact_at_split_points(total_steps, num_stages):
    schedule = ToESchedule(num_stages=num_stages, total_steps=total_steps)
    for stage in range(2, num_stages + 1):
        first = math.ceil((stage - 1) * total_steps / num_stages)
        assert schedule.stage(first - 1) == stage - 1
        assert schedule.stage(first) == stage
        assert schedule.stage_range(stage)[0] == first
    assert schedule.stage_range(1) == (0, schedule.starts[1])
    assert schedule.stage_range(num_stages)[1] == total_steps


def test_300_steps_split_100_100_100():
    schedule = ToESchedule(total_steps=300)
    assert [schedule.stage(t) for t in (0, 99, 100, 199, 200, 299, 300, 10**9)] == [1, 1, 2, 2, 3, 3, 3, 3]


def test_custom_boundaries_in_steps_and_fractions():
    # appendix 1.2: epochs [0-130, 131-260, 261-300], here one step per epoch
    steps = ToESchedule(total_steps=300, boundaries=[131, 261])
    assert [steps.stage(t) for t in (130, 131, 260, 261)] == [1, 2, 2, 3]
    fractions = ToESchedule(total_steps=300, boundaries=[131 / 300, 261 / 300])
    assert fractions.starts == steps.starts == [0, 131, 261]
    # fractions round up to a step, so [1/3, 2/3] equals the even split
    for total in (7, 100, 301):
        assert ToESchedule(total_steps=total, boundaries=[1 / 3, 2 / 3]).starts == ToESchedule(total_steps=total).starts


def test_full_token_warmup_is_stage_zero():
    schedule = ToESchedule(total_steps=110, warmup_steps=20)
    assert [schedule.stage(t) for t in (0, 19, 20, 49, 50, 79, 80, 109)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert schedule.kept_tokens(196, 0) == 196
    assert schedule.rate(0) == 1
    with pytest.raises(ValueError, match="warm-up"):
        schedule.kept_counts(196, 0)


def test_robust_floors_r1_04():
    # the paper's increments (Sec. 3.3.2): 39 seeds, + floor(0.2 * 196) = 39, + floor(0.3 * 196) = 58, then all
    schedule = ToESchedule(r1=0.4, total_steps=3)
    assert schedule.kept_counts(196, 3) == [39, 78, 136, 196]
    assert [schedule.kept_tokens(196, s) for s in (1, 2, 3)] == [78, 136, 196]
    assert schedule.seed_stride == 5  # 1 // 0.2 == 4.0 in Python floats
    rates = ToESchedule(r1=0.4, total_steps=3, counting="rates")  # the earlier rule: floor(0.7 * 196)
    assert rates.kept_counts(196, 3) == [39, 78, 137, 196] and rates.remainder == "first"


def test_floors_are_exact_where_floats_are_not():
    """With counting="rates", kept counts equal floors of the decimal rates the user wrote, computed with
    exact rationals (the paper's counting is checked against its own reference in test_counting.py)."""
    float_floor_differs = 0
    for r1 in (0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7):
        for num_stages in (2, 3, 4, 5, 6):
            schedule = ToESchedule(r1=r1, num_stages=num_stages, total_steps=10, counting="rates")
            exact_r1 = Fraction(str(r1))
            for num_patches in range(1, 400):
                if math.floor(exact_r1 / 2 * num_patches) < 1:
                    continue
                counts = schedule.kept_counts(num_patches, num_stages)
                for stage in range(1, num_stages + 1):
                    exact = exact_r1 + (stage - 1) * (1 - exact_r1) / (num_stages - 1)
                    assert counts[stage] == math.floor(exact * num_patches)
                    naive = r1 + (stage - 1) * (1 - r1) / (num_stages - 1)
                    float_floor_differs += math.floor(naive * num_patches) != counts[stage]
                assert counts[0] == math.floor(exact_r1 / 2 * num_patches)
    assert float_floor_differs > 0, "the sweep must contain cases where plain float floors go wrong"


def test_seed_stride_needs_r0_not_n0():
    schedule = ToESchedule(r1=0.6, r0=0.3, total_steps=3)
    assert schedule.kept_counts(16, 1)[0] == 4
    assert schedule.seed_stride == 3  # not 16 // 4


def test_no_state_to_checkpoint():
    schedule = ToESchedule(total_steps=30)
    assert not hasattr(schedule, "state_dict"), "the stage is a pure function of the step"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(total_steps=None), "total_steps"),
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=10, r1=0.0), "r1 must lie in"),
        (dict(total_steps=10, r1=1.5), "r1 must lie in"),
        (dict(total_steps=10, r1=0.4, r0=0.5), "must not exceed"),
        (dict(total_steps=10, num_stages=1), "num_stages"),
        (dict(total_steps=10, k=0), "k \\(repeats"),
        (dict(total_steps=10, block=-1), "block"),
        (dict(total_steps=10, warmup_steps=10), "warmup_steps"),
        (dict(total_steps=10, boundaries=[5]), "2 values"),
        (dict(total_steps=10, boundaries=[6, 4]), "strictly after"),
        (dict(total_steps=10, boundaries=[3, 10]), "before total_steps"),
        (dict(total_steps=10, boundaries=[0.3, 7]), "all ints"),
        (dict(total_steps=10, warmup_steps=5, boundaries=[4, 8]), "strictly after"),
    ],
)
def test_bad_configuration_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ToESchedule(**kwargs)


def test_bad_queries_raise():
    schedule = ToESchedule(total_steps=10)
    with pytest.raises(ValueError, match="0-based"):
        schedule.stage(-1)
    with pytest.raises(ValueError, match="stage must be"):
        schedule.kept_counts(196, 4)
    with pytest.raises(ValueError, match="keeps no seed token"):
        ToESchedule(r1=0.1, total_steps=10).kept_counts(9, 1)


def test_describe_table_and_paper_speedups():
    schedule = ToESchedule(r1=0.5, total_steps=300)
    table = schedule.describe(196)
    assert "[0, 100)" in table and "98/196" in table and "147/196" in table and "196/196" in table
    # paper Table 2 theoretical speed-ups: DeiT-S 1.30x, DeiT-B 1.30x, DeiT-B r1=0.4 1.37x
    for width, r1, paper in ((384, 0.5, 1.30), (768, 0.5, 1.30), (768, 0.4, 1.37)):
        speedup = 1 / ToESchedule(r1=r1, total_steps=300).mean_flops_share(ViTShape(196, width, 12))
        assert abs(speedup - paper) < 0.02, (width, r1, speedup)


def test_seed_stride_reproduces_the_authors_code_when_set():
    """The paper floors 1 / r0 (5 at r0 = 0.2); the authors' int(1 // 0.2) is 4 in floating point."""
    assert ToESchedule(r1=0.4, total_steps=3).seed_stride == 5
    assert ToESchedule(r1=0.4, total_steps=3, seed_stride=int(1 // 0.2)).seed_stride == 4
    assert ToESchedule(r1=0.5, total_steps=3).seed_stride == int(1 // 0.25) == 4  # r1 = 0.5 / 0.6: the rules agree
    assert ToESchedule(r1=0.6, total_steps=3).seed_stride == int(1 // 0.3) == 3
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="seed_stride"):
            ToESchedule(r1=0.4, total_steps=3, seed_stride=bad)
