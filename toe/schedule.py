"""The ToE schedule: which stage a global optimizer step is in, and how many patches each stage keeps.

Everything here is a pure function of the step and the hyper-parameters (TOE_SPEC "Schedule"):
nothing needs saving in a checkpoint, and a resumed run lands in the right stage by construction.

Kept counts, by default as the paper counts them (``counting="paper"``, Sec. 3.3.2 and Algorithm 1;
the authors' ``token_select.py`` counts the same): ``n_0 = floor(r0 N)``, stage m adds
``floor(mu_m N)`` (``mu_1 = r1 - r0``, then ``(1 - r1) / (Ng - 1)``), the last stage keeps all ``N``;
the op gives a stage's remainder over its ``k`` repeats to the last repeat. ``counting="rates"`` is
this project's earlier rule: ``n_m = floor(r_m N)``, remainder to the first repeats (N = 196, r1 = 0.4:
78 / 137 / 196 instead of 78 / 136 / 196).

Rates are handled as exact rationals (``Fraction(r).limit_denominator(10**6)``), so the rate a user
writes as ``0.4`` is 2/5 and every floor in this file is exact: ``0.3 * 196`` cannot turn 58 added
patches into 57, and ``1 // 0.2`` cannot turn the seed stride 5 into 4.
"""

from __future__ import annotations

import bisect
import math
import numbers
from fractions import Fraction
from typing import TYPE_CHECKING, Optional, Sequence, TypeGuard, Union

if TYPE_CHECKING:  # pragma: no cover
    from models.cost import ViTShape

__all__ = ["ToESchedule", "exact_rate", "kept_counts_from", "COUNTINGS"]

_MAX_DENOMINATOR = 1_000_000
# "paper": stage m adds floor(mu_m N) (Sec. 3.3.2, Algorithm 1, the official code); "rates": n_m = floor(r_m N)
COUNTINGS = ("paper", "rates")


def kept_counts_from(
    num_patches: int, terms: Sequence[tuple[int, int]], *, cumulative: bool, last_is_full: bool
) -> list[int]:
    """``[n_0, ..., n_stage]`` from the stage's constants, in plain ints (``torch.compile`` traces this;
    it cannot trace ``Fraction``). ``terms``: ``(numerator, denominator)`` of r0 and then of each stage's
    increment mu_m (``cumulative``: n_m = n_(m-1) + floor(mu_m N)) or kept rate r_m (n_m = floor(r_m N));
    ``last_is_full``: the stage is the last one, which keeps every patch."""
    counts: list[int] = []
    for numerator, denominator in terms:
        count = numerator * num_patches // denominator  # floor(t * N), exact for rationals
        counts.append(counts[-1] + count if cumulative and counts else count)
    if last_is_full:
        counts[-1] = num_patches
    if counts[0] < 1:
        raise ValueError(
            f"r0={terms[0][0] / terms[0][1]:g} keeps no seed token of {num_patches} patches "
            f"(floor(r0 * N) = 0); raise r1/r0 or use more patches"
        )
    return counts


def exact_rate(rate: Union[float, Fraction], name: str = "rate") -> Fraction:
    """The rational a user meant by a float rate (0.4 -> 2/5, 1/3 -> 1/3); must lie in (0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, Fraction)):
        raise ValueError(f"{name} must be a number in (0, 1], got {rate!r}")
    exact = Fraction(rate).limit_denominator(_MAX_DENOMINATOR)
    if not 0 < exact <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {rate!r}")
    return exact


class ToESchedule:
    """Stage of each global step and kept patch counts of each stage (TOE_SPEC, Eq. 1, Algorithm 1).

    Args:
        r1: kept rate of stage 1 (the paper uses 0.4 / 0.5 / 0.6).
        num_stages: ``Ng``, the number of stages; the last one keeps every token.
        total_steps: ``T``, the run's total optimizer steps.
        r0: kept rate of the seed tokens; ``r1 / 2`` unless set.
        k: repeats per expansion (Eq. 6).
        boundaries: first step of stages 2..Ng, either all ints (steps) or all floats in (0, 1)
            (fractions of ``T``, rounded up to a step so that ``[1/3, 2/3]`` equals the even
            split). Default: ``[warmup_steps, T)`` split evenly.
        block: ToE runs on the output of block ``block`` (1 = after the first transformer block,
            0 = right after the patch embedding).
        warmup_steps: steps of full-token training before stage 1 (the YOLOS recipe); they are
            stage 0, in which ToE is off.
        seed_stride: stride of the spatial initialization; ``None`` is the paper's
            ``floor(1 / r0)`` (Eq. 2). The authors' code computes ``int(1 // r0)`` in floating
            point (token_select.py ``token_initialization``), which is 4, not 5, for r0 = 0.2
            (r1 = 0.4): set 4 there to reproduce it.
        counting: ``"paper"`` (default): stage m adds ``floor(mu_m N)`` tokens and the op gives
            the remainder of ``k`` repeats to the last one, as Sec. 3.3.2 / Algorithm 1 and the
            official code; ``"rates"``: the project's earlier ``floor(r_m N)``, remainder first.

    With no warm-up and the even split, ``stage(t) == min(Ng, Ng * t // T + 1)`` for 0-based t.
    """

    def __init__(
        self,
        r1: float = 0.5,
        num_stages: int = 3,
        total_steps: Optional[int] = None,
        r0: Optional[float] = None,
        k: int = 2,
        boundaries: Optional[Sequence[Union[int, float]]] = None,
        block: int = 1,
        warmup_steps: int = 0,
        seed_stride: Optional[int] = None,
        counting: str = "paper",
    ) -> None:
        self.r1 = exact_rate(r1, "r1")
        self.r0 = self.r1 / 2 if r0 is None else exact_rate(r0, "r0")
        if self.r0 > self.r1:
            raise ValueError(f"r0 ({float(self.r0)}) must not exceed r1 ({float(self.r1)})")
        if not _is_int(num_stages) or num_stages < 2:
            raise ValueError(f"num_stages must be an int >= 2 (the last stage keeps all tokens), got {num_stages!r}")
        if not _is_int(total_steps) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int (the run's optimizer steps), got {total_steps!r}")
        if not _is_int(k) or k < 1:
            raise ValueError(f"k (repeats per expansion) must be an int >= 1, got {k!r}")
        if not _is_int(block) or block < 0:
            raise ValueError(f"block must be an int >= 0 (0 = after the patch embedding), got {block!r}")
        if not _is_int(warmup_steps) or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}), got {warmup_steps!r}")
        if seed_stride is not None and (not _is_int(seed_stride) or seed_stride < 1):
            raise ValueError(f"seed_stride must be an int >= 1 or None (the paper's floor(1 / r0)), got {seed_stride!r}")
        if counting not in COUNTINGS:
            raise ValueError(f"counting must be one of {COUNTINGS}, got {counting!r}")
        self.counting = counting
        self._seed_stride = None if seed_stride is None else int(seed_stride)
        self.num_stages = int(num_stages)
        self.total_steps = int(total_steps)
        self.k = int(k)
        self.block = int(block)
        self.warmup_steps = int(warmup_steps)
        # starts[d - 1] is the first step of stage d, for d = 1 .. Ng.
        self.starts = [self.warmup_steps] + self._later_starts(boundaries)

    # -- stage of a step ------------------------------------------------------------------------

    def _later_starts(self, boundaries: Optional[Sequence[Union[int, float]]]) -> list[int]:
        ng, total, warm = self.num_stages, self.total_steps, self.warmup_steps
        if boundaries is None:
            span = total - warm
            return [warm + -(-(d * span) // ng) for d in range(1, ng)]  # ceil(d * span / Ng)
        boundaries = list(boundaries)
        if len(boundaries) != ng - 1:
            raise ValueError(f"boundaries must give the first step of stages 2..{ng} ({ng - 1} values), got {boundaries!r}")
        if all(_is_int(b) for b in boundaries):
            steps = [int(b) for b in boundaries]
        elif all(isinstance(b, float) and 0.0 < b < 1.0 for b in boundaries):
            steps = [math.ceil(Fraction(b).limit_denominator(_MAX_DENOMINATOR) * total) for b in boundaries]
        else:
            raise ValueError(
                f"boundaries must be all ints (steps) or all floats in (0, 1) (fractions of total_steps), got {boundaries!r}"
            )
        previous = warm
        for step in steps:
            if not previous < step < total:
                raise ValueError(
                    f"boundaries {boundaries!r} give stage starts {[warm] + steps}: each must be strictly "
                    f"after the previous one (stage 1 starts at warmup_steps={warm}) and before "
                    f"total_steps={total}"
                )
            previous = step
        return steps

    def stage(self, step: int) -> int:
        """Stage of the 0-based global optimizer step: 1..Ng, or 0 during the full-token warm-up.

        Steps past ``total_steps`` stay in the last stage.
        """
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be a 0-based int, got {step!r}")
        return bisect.bisect_right(self.starts, step)

    def stage_range(self, stage: int) -> tuple[int, int]:
        """``[first, end)`` steps of a stage (0 = warm-up)."""
        self._check_stage(stage, allow_warmup=True)
        edges = [0] + self.starts + [self.total_steps]
        return edges[stage], edges[stage + 1]

    # -- kept tokens of a stage ------------------------------------------------------------------

    def rate(self, stage: int) -> Fraction:
        """Kept rate ``r_stage`` (Eq. 1): r1 + (stage - 1) * (1 - r1) / (Ng - 1); 1 in the warm-up."""
        self._check_stage(stage, allow_warmup=True)
        if stage == 0:
            return Fraction(1)
        return self.r1 + (stage - 1) * (1 - self.r1) / (self.num_stages - 1)

    @property
    def seed_stride(self) -> int:
        """``s = floor(1 / r0)`` of the spatial initialization (Eq. 2), floored exactly, unless set."""
        return math.floor(1 / self.r0) if self._seed_stride is None else self._seed_stride

    def increment(self, stage: int) -> Fraction:
        """``mu_stage`` (Eq. 1): ``r1 - r0`` for stage 1, ``(1 - r1) / (Ng - 1)`` after."""
        self._check_stage(stage, allow_warmup=False)
        return self.r1 - self.r0 if stage == 1 else (1 - self.r1) / (self.num_stages - 1)

    @property
    def remainder(self) -> str:
        """Which of the ``k`` repeats of a stage's expansion takes its remainder (``expand_tokens``)."""
        return "last" if self.counting == "paper" else "first"

    def count_terms(self, stage: int) -> tuple[tuple[int, int], ...]:
        """The stage's counting constants for ``kept_counts_from``: ``(numerator, denominator)`` of r0,
        then of mu_1 .. mu_stage (``counting="paper"``) or r_1 .. r_stage (``"rates"``)."""
        self._check_stage(stage, allow_warmup=False)
        per_stage = self.increment if self.counting == "paper" else self.rate
        rates = [self.r0] + [per_stage(d) for d in range(1, stage + 1)]
        return tuple((int(r.numerator), int(r.denominator)) for r in rates)

    def kept_counts(self, num_patches: int, stage: int) -> list[int]:
        """``[n_0, n_1, ..., n_stage]``: ``n_0 = floor(r0 * N)``; ``counting="paper"``: ``n_m = n_(m-1) +
        floor(mu_m * N)``, ``n_Ng = N``; ``"rates"``: ``n_m = floor(r_m * N)``.

        Stage 0 (the warm-up) has no expansion and is refused; ``kept_tokens`` answers for it.
        """
        self._check_stage(stage, allow_warmup=False)
        if not _is_int(num_patches) or num_patches < 1:
            raise ValueError(f"num_patches must be a positive int, got {num_patches!r}")
        return kept_counts_from(
            num_patches, self.count_terms(stage), cumulative=self.counting == "paper", last_is_full=stage == self.num_stages
        )

    def kept_tokens(self, num_patches: int, stage: int) -> int:
        """Patch tokens that blocks after ``block`` see in a stage (all of them in the warm-up)."""
        return num_patches if stage == 0 else self.kept_counts(num_patches, stage)[-1]

    # -- reporting -------------------------------------------------------------------------------

    def mean_flops_share(self, shape: "ViTShape") -> float:
        """Training FLOPs of the whole run relative to full-token training (1 / theoretical speed-up)."""
        from models.cost import token_plan_flops

        dense = token_plan_flops(shape, None)
        total = 0.0
        for stage in range(0 if self.warmup_steps else 1, self.num_stages + 1):
            first, end = self.stage_range(stage)
            kept = self.kept_tokens(shape.num_patches, stage)
            total += (end - first) * token_plan_flops(shape, (self.block, kept)) / dense
        return total / self.total_steps

    def describe(self, num_patches: int, shape: Optional["ViTShape"] = None) -> str:
        """A table: stage, step range, kept rate, kept tokens, theoretical training-FLOPs share.

        FLOPs shares use ``shape`` (see ``models.cost.ViTShape.from_model``); without one, a ViT-S/16
        (depth 12, width 384) with ``num_patches`` patches.
        """
        from models.cost import ViTShape, token_plan_flops

        shape = shape or ViTShape.vit_small(num_patches)
        if shape.num_patches != num_patches:
            raise ValueError(f"shape has {shape.num_patches} patches, describe() was asked for {num_patches}")
        dense = token_plan_flops(shape, None)
        header = f"{'stage':>5} {'steps':>21} {'kept rate':>9} {'kept tokens':>13} {'FLOPs share':>11}"
        lines = [
            f"ToE: r1={float(self.r1):g} r0={float(self.r0):g} Ng={self.num_stages} k={self.k} "
            f"block={self.block} T={self.total_steps} N={num_patches} seed stride={self.seed_stride} "
            f"counting={self.counting}",
            header,
            "-" * len(header),
        ]
        for stage in range(0 if self.warmup_steps else 1, self.num_stages + 1):
            first, end = self.stage_range(stage)
            kept = self.kept_tokens(num_patches, stage)
            share = token_plan_flops(shape, (self.block, kept)) / dense
            label = "warm" if stage == 0 else str(stage)
            lines.append(
                f"{label:>5} {f'[{first}, {end})':>21} {float(self.rate(stage)):>9.4f} "
                f"{f'{kept}/{num_patches}':>13} {share:>11.3f}"
            )
        mean = self.mean_flops_share(shape)
        lines.append(f"mean FLOPs share {mean:.3f} -> theoretical training speed-up {1 / mean:.3f}x")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ToESchedule(r1={float(self.r1):g}, num_stages={self.num_stages}, total_steps={self.total_steps}, "
            f"r0={float(self.r0):g}, k={self.k}, starts={self.starts}, block={self.block}, "
            f"warmup_steps={self.warmup_steps}, counting={self.counting!r})"
        )

    def _check_stage(self, stage: int, *, allow_warmup: bool) -> None:
        low = 0 if allow_warmup else 1
        if not _is_int(stage) or not low <= stage <= self.num_stages:
            hint = "" if allow_warmup else " (stage 0 is the full-token warm-up: ToE is off there)"
            raise ValueError(f"stage must be an int in [{low}, {self.num_stages}], got {stage!r}{hint}")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
