"""The Token Expansion op (TOE_SPEC "The op"; paper Sec. 3.3, Eq. 2-7).

``expand_tokens`` keeps ``keep_counts[-1]`` of the ``N`` patch tokens of ``x``, chosen per sample:
spatial seeds (Eq. 2), widest feature-distribution expansion in ``k`` repeats per stage
(Eq. 3-6), then every other patch is mean-merged into its nearest anchor (Eq. 7).

Batched over the batch with no Python loop over samples or tokens. The selection runs under
``no_grad`` in float32 (float64 for float64 inputs); the merge is a matmul with a row-normalised
one-hot assignment matrix, so gradients reach every patch token and the result is deterministic
on GPUs too (no scatter-add atomics).

Ties (equal distances, e.g. zero vectors) go to the lowest patch index, both in the expansion
top-q and in the nearest-anchor choice, so the result does not depend on kernel order.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["expand_tokens", "repeat_sizes", "DISTANCES", "INITS", "REMAINDERS"]

DISTANCES = ("cosine", "euclidean", "manhattan")
REMAINDERS = ("last", "first")  # which repeat of a stage's expansion takes the tokens left over by e // k
INITS = ("spatial", "random")
_EPS = 1e-6  # cosine normalisation: zero vectors get distance 1 to everything, not NaN


def expand_tokens(
    x: torch.Tensor,
    keep_counts: Sequence[int],
    *,
    num_prefix: int = 1,
    num_suffix: int = 0,
    k: int = 2,
    distance: str = "cosine",
    init: str = "spatial",
    expand: bool = True,
    merge: bool = True,
    seed_stride: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    remainder: str = "last",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token Expansion of ``x`` ``[B, P + N + S, C]`` down to ``n = keep_counts[-1]`` patch tokens.

    Args:
        x: tokens after block ``l``: ``num_prefix`` prefix tokens (class / distillation), ``N``
            patch tokens, ``num_suffix`` suffix tokens (YOLOS detection tokens).
        keep_counts: ``[n_0, n_1, ..., n_stage]`` from ``ToESchedule.kept_counts``: seeds, then
            the kept count after each stage's expansion (non-decreasing, ``n_0 >= 1``).
        k: repeats per expansion; each repeat adds ``e // k`` of a stage's ``e`` tokens (Eq. 6) and
            the repeat named by ``remainder`` also takes ``e % k``.
        distance: ``"cosine"`` (default), ``"euclidean"`` or ``"manhattan"`` (ablation, Table 9).
        init: ``"spatial"`` seeds every ``seed_stride``-th patch (Eq. 2); ``"random"`` draws seeds
            per sample from ``generator`` (ablation, Table 7).
        expand: ``False`` skips the widest-distribution expansion: the initialization picks all
            ``n`` anchors (spatial: evenly spaced patches ``floor(i * N / n)``; random: ``n``
            random patches) (ablation, Table 7).
        merge: ``False`` drops the non-anchor patches instead of merging them (ablation, Table 7).
        seed_stride: ``s = floor(1 / r0)`` of Eq. 2 (``ToESchedule.seed_stride``); ``n_0`` alone
            does not determine it. Default ``N // n_0``.
        generator: random seeds' generator (``init="random"`` only).
        remainder: ``"last"`` (default): the last repeat takes the ``e % k`` left over, as the
            authors' ``token_select.py``; ``"first"``: one more for each of the first ``e % k``
            repeats (this project's earlier rule, ``ToESchedule(counting="rates")``).

    Returns:
        ``(out, keep_index)``: ``out`` is ``[B, P + n + S, C]`` (prefix, merged anchors in
        ascending patch index, suffix); ``keep_index`` is ``[B, n]`` long, the original patch
        index of each anchor. When ``n == N``, ``out`` is ``x`` itself and ``keep_index`` an
        ``arange(N)`` view.
    """
    batch, num_patches, counts = _validate(x, keep_counts, num_prefix, num_suffix, k, distance, init, seed_stride)
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    kept = counts[-1]
    if kept == num_patches:
        return x, torch.arange(num_patches, device=x.device).expand(batch, num_patches)

    patches = x[:, num_prefix : num_prefix + num_patches]
    with torch.no_grad():
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        feats = patches.detach().to(compute_dtype)
        if distance == "cosine":
            feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        is_anchor, nearest_index = _select_anchors(
            feats, counts, k, distance, init, expand, seed_stride, generator, remainder
        )
        # anchors in ascending patch index: sort the anchor indices (N marks non-anchors) and cut
        positions = torch.arange(num_patches, device=x.device).expand(batch, num_patches)
        keep_index = torch.where(is_anchor, positions, num_patches).sort(dim=1).values[:, :kept]
        if merge:
            assignment = _merge_matrix(is_anchor, nearest_index, kept, compute_dtype)

    if merge:
        with torch.autocast(device_type=x.device.type, enabled=False):
            merged = torch.bmm(assignment, patches.to(compute_dtype)).to(x.dtype)
    else:
        merged = patches.gather(1, keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    out = torch.cat([x[:, :num_prefix], merged, x[:, num_prefix + num_patches :]], dim=1)
    return out, keep_index


def _validate(x, keep_counts, num_prefix, num_suffix, k, distance, init, seed_stride):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a [B, P + N + S, C] tensor (rank 3), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if num_prefix < 0 or num_suffix < 0:
        raise ValueError(f"num_prefix and num_suffix must be >= 0, got {num_prefix} and {num_suffix}")
    batch, tokens, _ = x.shape
    num_patches = tokens - num_prefix - num_suffix
    if num_patches < 1:
        raise ValueError(
            f"x has {tokens} tokens: no patch tokens left after {num_prefix} prefix and {num_suffix} suffix tokens"
        )
    counts = [int(c) for c in keep_counts]
    if not counts:
        raise ValueError("keep_counts must hold at least the seed count n_0")
    if counts[0] < 1:
        raise ValueError(f"keep_counts[0] (seed tokens) must be >= 1, got {counts}")
    if any(b < a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"keep_counts must not decrease (tokens only grow), got {counts}")
    if counts[-1] > num_patches:
        raise ValueError(f"keep_counts {counts} asks for more than the {num_patches} patch tokens of x")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (repeats per expansion) must be an int >= 1, got {k!r}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if seed_stride is not None and (seed_stride < 1 or (counts[0] - 1) * seed_stride >= num_patches):
        raise ValueError(f"seed_stride={seed_stride} does not fit {counts[0]} seeds into {num_patches} patches")
    return batch, num_patches, counts


def _pairwise_distance(feats: torch.Tensor, anchors: torch.Tensor, distance: str) -> torch.Tensor:
    """``[B, N, q]`` distances from every patch to ``q`` anchors (cosine feats are pre-normalised)."""
    if distance == "cosine":
        return 1.0 - torch.bmm(feats, anchors.transpose(1, 2))
    # no matmul shortcut for euclidean: exact differences keep ties and zero distances exact
    return torch.cdist(
        feats, anchors, p=2.0 if distance == "euclidean" else 1.0, compute_mode="donot_use_mm_for_euclid_dist"
    )


def _gather_rows(feats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return feats.gather(1, index.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))


def _initial_anchors(batch, num_patches, count, init, stride, device, generator) -> torch.Tensor:
    """``[B, count]`` initial anchor indices, ascending."""
    if init == "random":
        noise = torch.rand(batch, num_patches, generator=generator, device=device)
        return noise.argsort(dim=1)[:, :count].sort(dim=1).values
    index = torch.arange(count, device=device) * stride
    return index.expand(batch, count)


def _nearest(feats, anchors, distance) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance from every patch to its nearest anchor among ``anchors`` (``[B, q]``, ascending)
    and that anchor's patch index; ``min`` returns the first minimum, so ties go to the lowest index."""
    dist, column = _pairwise_distance(feats, _gather_rows(feats, anchors), distance).min(dim=-1)
    return dist, anchors.gather(1, column)


def repeat_sizes(added: int, k: int, remainder: str = "last") -> list[int]:
    """Tokens each of the ``k`` repeats adds when a stage adds ``added``: ``added // k`` each (Eq. 6),
    and the remainder ``added % k`` to the last repeat (or one each to the first ``added % k``)."""
    share, rest = divmod(added, k)
    if remainder == "last":
        return [share] * (k - 1) + [share + rest]
    return [share + (1 if repeat < rest else 0) for repeat in range(k)]


def _select_anchors(feats, counts, k, distance, init, expand, seed_stride, generator, remainder="last"):
    """Anchor mask ``[B, N]`` after initialization and expansion (Eq. 2-6), and the patch index of
    every patch's nearest anchor (Eq. 7's argmin), tracked along the way."""
    batch, num_patches, _ = feats.shape
    device = feats.device
    if not expand:
        kept = counts[-1]
        if init == "spatial":  # evenly spaced: the spatial initialization at the stage's rate
            anchors = (torch.arange(kept, device=device) * num_patches // kept).expand(batch, kept)
        else:
            anchors = _initial_anchors(batch, num_patches, kept, init, None, device, generator)
        is_anchor = torch.zeros(batch, num_patches, dtype=torch.bool, device=device).scatter_(1, anchors, True)
        return is_anchor, _nearest(feats, anchors, distance)[1]

    stride = seed_stride if seed_stride is not None else num_patches // counts[0]
    seeds = _initial_anchors(batch, num_patches, counts[0], init, stride, device, generator)
    is_anchor = torch.zeros(batch, num_patches, dtype=torch.bool, device=device).scatter_(1, seeds, True)
    # min is exact, so folding each repeat's new anchors into the running nearest distance equals
    # recomputing D(U, A) over all anchors (Algorithm 1 lines 14-15)
    nearest_dist, nearest_index = _nearest(feats, seeds, distance)
    for added in (b - a for a, b in zip(counts, counts[1:])):
        for take in repeat_sizes(added, k, remainder):
            if take == 0:
                continue
            score = nearest_dist.masked_fill(is_anchor, float("-inf"))
            # stable descending sort: among equal distances the lowest patch index wins
            new = score.sort(dim=1, descending=True, stable=True).indices[:, :take].sort(dim=1).values
            is_anchor.scatter_(1, new, True)
            dist, index = _nearest(feats, new, distance)
            closer = (dist < nearest_dist) | ((dist == nearest_dist) & (index < nearest_index))
            nearest_dist = torch.where(closer, dist, nearest_dist)
            nearest_index = torch.where(closer, index, nearest_index)
    return is_anchor, nearest_index


def _merge_matrix(is_anchor, nearest_index, kept, dtype) -> torch.Tensor:
    """``[B, n, N]`` row-normalised assignment: row j averages anchor j and the patches nearest to it (Eq. 7)."""
    batch, num_patches = is_anchor.shape
    anchor_slot = is_anchor.long().cumsum(dim=1) - 1  # output row of each anchor (ascending order)
    slot = torch.where(is_anchor, anchor_slot, anchor_slot.gather(1, nearest_index))
    assignment = torch.zeros(batch, kept, num_patches, dtype=dtype, device=is_anchor.device)
    assignment.scatter_(1, slot.unsqueeze(1), 1.0)
    return assignment / assignment.sum(dim=-1, keepdim=True)
