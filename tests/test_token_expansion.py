"""expand_tokens against a per-sample float64 loop of Eq. 2-7, plus its properties and errors."""

import itertools
import math

import numpy as np
import pytest
import torch

from toe import ToESchedule, expand_tokens

from helpers import reference_toe

SHAPES = [  # batch, prefix, patches, suffix, channels
    (2, 1, 16, 0, 8),
    (3, 2, 49, 0, 16),
    (2, 1, 36, 3, 12),
    (1, 0, 30, 2, 5),
]


def stage_cases():
    for shape, k, r1, num_stages in itertools.product(SHAPES, (1, 2, 3), (0.4, 0.5, 0.6), (2, 3, 4)):
        for stage in range(1, num_stages + 1):
            yield shape, k, r1, num_stages, stage


@pytest.mark.parametrize("shape,k,r1,num_stages,stage", list(stage_cases()))
def test_matches_reference_loop(shape, k, r1, num_stages, stage):
    batch, prefix, num_patches, suffix, channels = shape
    schedule = ToESchedule(r1=r1, num_stages=num_stages, total_steps=100, k=k)
    counts = schedule.kept_counts(num_patches, stage)
    gen = torch.Generator().manual_seed(hash((shape, k, r1, num_stages, stage)) % 2**31)
    x = torch.randn(batch, prefix + num_patches + suffix, channels, generator=gen, dtype=torch.float64)

    out, keep_index = expand_tokens(x, counts, num_prefix=prefix, num_suffix=suffix, k=k, seed_stride=schedule.seed_stride)

    assert out.shape == (batch, prefix + counts[-1] + suffix, channels)
    for b in range(batch):
        anchors, merged = reference_toe(x[b, prefix : prefix + num_patches].numpy(), counts, k, schedule.seed_stride)
        assert keep_index[b].tolist() == anchors
        np.testing.assert_allclose(out[b, prefix : prefix + counts[-1]].numpy(), merged, rtol=0, atol=1e-6)


@pytest.mark.parametrize("distance", ["euclidean", "manhattan"])
@pytest.mark.parametrize("k", [1, 2])
def test_other_distances_match_reference(distance, k):
    schedule = ToESchedule(r1=0.5, num_stages=3, total_steps=9, k=k)
    x = torch.randn(3, 1 + 36, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for stage in (1, 2):
        counts = schedule.kept_counts(36, stage)
        out, keep_index = expand_tokens(x, counts, k=k, distance=distance, seed_stride=schedule.seed_stride)
        for b in range(3):
            anchors, merged = reference_toe(x[b, 1:].numpy(), counts, k, schedule.seed_stride, distance)
            assert keep_index[b].tolist() == anchors
            np.testing.assert_allclose(out[b, 1:].numpy(), merged, rtol=0, atol=1e-6)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_ties_match_reference(distance, k):
    """Zero vectors and repeated exact tokens make exact distance ties: the lowest patch index wins."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 1 + 49, 6, generator=gen, dtype=torch.float64)
    x[0, 1:] = 0.0  # every distance ties
    x[1, 10:30] = 0.0
    # power-of-two multiples of basis vectors: normalising is exact, so every distance is exact
    x[2, 1:] = torch.stack([2.0 ** (i % 3) * torch.eye(6, dtype=torch.float64)[i % 6] for i in range(49)])
    schedule = ToESchedule(r1=0.5, total_steps=3, k=k)
    for stage in (1, 2):
        counts = schedule.kept_counts(49, stage)
        out, keep_index = expand_tokens(x, counts, k=k, distance=distance, seed_stride=schedule.seed_stride)
        for b in range(3):
            anchors, merged = reference_toe(x[b, 1:].numpy(), counts, k, schedule.seed_stride, distance)
            assert keep_index[b].tolist() == anchors, (b, stage)
            np.testing.assert_allclose(out[b, 1:].numpy(), merged, rtol=0, atol=1e-6)


# -- properties ----------------------------------------------------------------------------------


def merge_weights(x, out, prefix, kept):
    """``W[b, j, i]``: weight of input patch i in output token j, read off the op by backprop.

    The merge is linear in the patches once the selection is made, so the gradient of output
    token j (summed over channels) w.r.t. the patches is row j of the merge matrix: the same as
    merging a one-hot identity.
    """
    rows = []
    for j in range(kept):
        (grad,) = torch.autograd.grad(out[:, prefix + j, 0].sum(), x, retain_graph=True)
        rows.append(grad[:, :, 0])
    weights = torch.stack(rows, dim=1)  # [B, n, tokens]
    return weights


@pytest.mark.parametrize("r1,num_patches", [(0.4, 196), (0.5, 49), (0.6, 64), (0.5, 37)])
def test_every_patch_merged_into_exactly_one_anchor(r1, num_patches):
    prefix, suffix = 2, 1
    schedule = ToESchedule(r1=r1, total_steps=3)
    x = torch.randn(
        2,
        prefix + num_patches + suffix,
        4,
        requires_grad=True,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    for stage in (1, 2):
        counts = schedule.kept_counts(num_patches, stage)
        out, keep_index = expand_tokens(x, counts, num_prefix=prefix, num_suffix=suffix, seed_stride=schedule.seed_stride)
        weights = merge_weights(x, out, prefix, counts[-1])
        patch_weights = weights[:, :, prefix : prefix + num_patches]
        assert torch.all(weights[:, :, :prefix] == 0) and torch.all(weights[:, :, prefix + num_patches :] == 0)
        members = patch_weights > 0
        assert torch.all(members.sum(dim=1) == 1), "each patch must feed exactly one output token"
        for b in range(2):
            for j, anchor in enumerate(keep_index[b].tolist()):
                assert members[b, j, anchor], "an anchor merges into its own output token"
                size = int(members[b, j].sum())
                torch.testing.assert_close(
                    patch_weights[b, j][members[b, j]], torch.full((size,), 1.0 / size, dtype=torch.float64)
                )


@pytest.mark.parametrize("r1,num_stages,num_patches", [(0.4, 3, 196), (0.5, 3, 196), (0.6, 4, 49), (0.5, 2, 17)])
def test_kept_count_anchors_sorted_unique_prefix_suffix_untouched(r1, num_stages, num_patches):
    prefix, suffix, channels = 1, 5, 8
    schedule = ToESchedule(r1=r1, num_stages=num_stages, total_steps=10)
    x = torch.randn(4, prefix + num_patches + suffix, channels)
    for stage in range(1, num_stages + 1):
        counts = schedule.kept_counts(num_patches, stage)
        paper = (
            num_patches
            if stage == num_stages
            else math.floor(schedule.r0 * num_patches)
            + sum(math.floor(schedule.increment(m) * num_patches) for m in range(1, stage + 1))
        )  # Sec. 3.3.2
        assert counts[-1] == paper
        out, keep_index = expand_tokens(x, counts, num_prefix=prefix, num_suffix=suffix, seed_stride=schedule.seed_stride)
        assert keep_index.shape == (4, counts[-1]) and keep_index.dtype == torch.long
        assert torch.all(keep_index[:, 1:] > keep_index[:, :-1]), "anchors unique and ascending"
        assert torch.all((keep_index >= 0) & (keep_index < num_patches))
        assert torch.equal(out[:, :prefix], x[:, :prefix])
        assert torch.equal(out[:, prefix + counts[-1] :], x[:, prefix + num_patches :])


def test_seeds_are_spatial_and_always_kept():
    schedule = ToESchedule(r1=0.4, total_steps=3)  # r0 = 0.2, stride 5 (not 1 // 0.2 == 4)
    assert schedule.seed_stride == 5
    x = torch.randn(3, 1 + 196, 16)
    _, keep_index = expand_tokens(x, schedule.kept_counts(196, 1), seed_stride=5)
    seeds = set(range(0, 5 * 39, 5))
    for row in keep_index.tolist():
        assert seeds <= set(row)


def test_selection_is_per_sample():
    x = torch.randn(5, 1 + 64, 8)
    counts = [16, 32]
    out, keep_index = expand_tokens(x, counts, seed_stride=4)
    assert len({tuple(row) for row in keep_index.tolist()}) > 1, "different samples pick different anchors"
    for b in range(5):
        single_out, single_index = expand_tokens(x[b : b + 1], counts, seed_stride=4)
        assert torch.equal(single_index[0], keep_index[b])
        torch.testing.assert_close(single_out[0], out[b])


def test_gradient_reaches_every_patch_token():
    x = torch.randn(3, 2 + 49 + 2, 8, requires_grad=True)
    out, _ = expand_tokens(x, [12, 24], num_prefix=2, num_suffix=2, seed_stride=4)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.all(x.grad.abs().sum(dim=-1) > 0)


def test_full_count_is_identity_at_no_cost():
    x = torch.randn(2, 1 + 49, 8)
    out, keep_index = expand_tokens(x, [12, 24, 49], seed_stride=4)
    assert out is x
    assert torch.equal(keep_index, torch.arange(49).expand(2, 49))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_select_like_fp32(dtype):
    x = torch.randn(3, 1 + 64, 32).to(dtype)
    out, keep_index = expand_tokens(x, [16, 32, 48], seed_stride=4)
    ref_out, ref_index = expand_tokens(x.float(), [16, 32, 48], seed_stride=4)
    assert out.dtype == dtype
    assert torch.equal(keep_index, ref_index), "distances are computed in fp32 either way"
    torch.testing.assert_close(out.float(), ref_out.to(dtype).float(), rtol=0, atol=0)


def test_low_precision_under_autocast():
    x = torch.randn(2, 1 + 49, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = expand_tokens(x.to(torch.bfloat16), [12, 24], seed_stride=4)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert torch.all(x.grad.abs().sum(-1)[:, 1:] > 0)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
def test_zero_vectors_give_no_nan(distance):
    x = torch.randn(2, 1 + 36, 8)
    x[:, 5:20] = 0.0
    x[1] = 0.0
    x.requires_grad_(True)
    out, keep_index = expand_tokens(x, [9, 18, 27], distance=distance, seed_stride=4)
    assert torch.isfinite(out).all()
    assert torch.all(keep_index[:, 1:] > keep_index[:, :-1])
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    # all-zero sample: every distance ties, the lowest patch indices win
    _, again = expand_tokens(x.detach(), [9, 18, 27], distance=distance, seed_stride=4)
    assert torch.equal(again, keep_index)


def test_random_init_reproducible_with_generator():
    x = torch.randn(4, 1 + 49, 8)

    def run(seed):
        return expand_tokens(x, [12, 24], init="random", generator=torch.Generator().manual_seed(seed))[1]

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    index = run(3)
    assert index.shape == (4, 24) and torch.all(index[:, 1:] > index[:, :-1])


def test_expansion_off_spatial_is_evenly_spaced():
    x = torch.randn(2, 1 + 49, 8)
    _, keep_index = expand_tokens(x, [12, 24, 36], expand=False)
    assert keep_index[0].tolist() == [i * 49 // 36 for i in range(36)]
    assert torch.equal(keep_index[0], keep_index[1])
    _, random_index = expand_tokens(x, [12, 24, 36], expand=False, init="random", generator=torch.Generator().manual_seed(0))
    assert random_index.shape == (2, 36) and torch.all(random_index[:, 1:] > random_index[:, :-1])


def test_merge_off_keeps_anchor_values():
    x = torch.randn(2, 1 + 49 + 1, 8, requires_grad=True)
    out, keep_index = expand_tokens(x, [12, 24], num_suffix=1, merge=False, seed_stride=4)
    expected = x[:, 1:50].gather(1, keep_index.unsqueeze(-1).expand(-1, -1, 8))
    assert torch.equal(out[:, 1:25], expected)
    out.sum().backward()
    dropped = torch.ones(2, 49, dtype=torch.bool)
    dropped.scatter_(1, keep_index, False)
    assert torch.all(x.grad[:, 1:50][dropped] == 0), "without merge, dropped patches get no gradient"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(x=torch.randn(49, 8), keep_counts=[12, 24]), "rank 3"),
        (dict(x=torch.randn(2, 50, 8), keep_counts=[24, 12]), "must not decrease"),
        (dict(x=torch.randn(2, 50, 8), keep_counts=[12, 60]), "more than the 49 patch tokens"),
        (dict(x=torch.randn(2, 50, 8), keep_counts=[0, 12]), "seed tokens"),
        (dict(x=torch.randn(2, 50, 8), keep_counts=[]), "at least the seed count"),
        (dict(x=torch.randn(2, 50, 8), keep_counts=[12, 24], k=0), "k \\(repeats"),
        (dict(x=torch.randn(2, 50, 8), keep_counts=[12, 24], distance="cos"), "distance must be one of"),
        (dict(x=torch.randn(2, 50, 8), keep_counts=[12, 24], init="grid"), "init must be one of"),
        (dict(x=torch.randn(2, 50, 8), keep_counts=[12, 24], seed_stride=5), "does not fit 12 seeds"),
        (dict(x=torch.randn(2, 3, 8), keep_counts=[1], num_prefix=2, num_suffix=1), "no patch tokens"),
        (dict(x=torch.zeros(2, 50, 8, dtype=torch.long), keep_counts=[12, 24]), "floating-point"),
    ],
)
def test_impossible_inputs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        expand_tokens(**kwargs)
