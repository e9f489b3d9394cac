"""Budgeted Training's schedule: the stage models, what each costs, and the stage lengths that meet the
budget. Pure functions of the step and the model's shape, tested directly (``methods.budgeted`` is the
plug-in; ``methods.budgeted_slicing`` the surgery)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch.nn as nn

from models.cost import BlockLoad, ViTShape, forward_flops

__all__ = [
    "StageModel",
    "BudgetSchedule",
    "round_half_up",
    "stage_models",
    "check_stage_models",
    "stage_plan",
    "stage_share",
    "solve_durations",
    "stage_of",
    "model_dims",
    "MLP_MULTIPLE",
]


MLP_MULTIPLE = 64  # [spec: Stages] MLP widths in multiples of 64 "for efficient kernels"


# -- the pure-function core ---------------------------------------------------------------------


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: the spec's rounding (Python's ``round`` goes to even on ties)."""
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class StageModel:
    """The sub-network of one stage: ``heads`` of every block, ``mlp`` hidden channels, a ``grid x grid`` input."""

    heads: int
    mlp: int
    grid: int


def stage_models(
    rho: Sequence[float],
    *,
    num_heads: int,
    hidden: int,
    grid: int,
    heads: bool = True,
    mlp: bool = True,
    tokens: bool = True,
) -> tuple[StageModel, ...]:
    """The stage models from one rate per stage [spec: Stages and activation]:
    ``h = max(1, round(rho H))``, ``m = 64 round(rho hidden / 64)`` (>= 64, <= hidden),
    ``g = round(grid sqrt(rho))`` (``grid``: the model's nominal grid, 14 at 224 px / patch 16). A
    component that is off is full in every stage; the last stage is the full model."""
    out = []
    for rate in rho:
        h = max(1, min(num_heads, round_half_up(rate * num_heads))) if heads else num_heads
        m = min(hidden, max(MLP_MULTIPLE, MLP_MULTIPLE * round_half_up(rate * hidden / MLP_MULTIPLE))) if mlp else hidden
        g = max(1, min(grid, round_half_up(grid * math.sqrt(rate)))) if tokens else grid
        out.append(StageModel(h, m, g))
    return tuple(out)


def check_stage_models(stages: Sequence[StageModel], *, num_heads: int, hidden: int, grid: int, key: str) -> None:
    """Non-decreasing, within the model, the last one the full model (``ValueError`` naming ``key``)."""
    for s, stage in enumerate(stages, 1):
        if not (1 <= stage.heads <= num_heads and 1 <= stage.mlp <= hidden and 1 <= stage.grid <= grid):
            raise ValueError(
                f"{key}: stage {s} is {stage}, outside 1 <= heads <= {num_heads}, 1 <= mlp <= {hidden}, "
                f"1 <= grid <= {grid} (the model's)"
            )
    for s, (a, b) in enumerate(zip(stages, stages[1:]), 2):
        if b.heads < a.heads or b.mlp < a.mlp or b.grid < a.grid:
            raise ValueError(f"{key}: stage {s} ({b}) is smaller than stage {s - 1} ({a}): stages never shrink")
    if stages[-1] != StageModel(num_heads, hidden, grid):
        raise ValueError(
            f"{key}: the last stage must be the full model {StageModel(num_heads, hidden, grid)}, got {stages[-1]}"
        )


def stage_plan(
    shape: ViTShape, stage: StageModel, num_heads: int, hidden: int, plan: Optional[Sequence[BlockLoad]] = None
) -> list[BlockLoad]:
    """``plan`` (default: the dense plan of ``shape``) with every block's heads and MLP at ``stage``'s."""
    plan = shape.dense_plan() if plan is None else plan
    return [replace(load, head_frac=stage.heads / num_heads, mlp_frac=stage.mlp / hidden) for load in plan]


def stage_share(shape: ViTShape, stage: StageModel, num_heads: int, hidden: int) -> float:
    """Training FLOPs of one step of ``stage`` against the dense model at its nominal grid (``models.cost``;
    the patch embedding and every block priced at the stage's ``grid ** 2`` patches)."""
    small = shape.with_patches(stage.grid**2)
    return forward_flops(small, stage_plan(small, stage, num_heads, hidden)) / forward_flops(shape)


def solve_durations(
    shares: Sequence[float],
    *,
    dense_steps: int,
    steps_per_epoch: int,
    budget: Optional[float] = None,
    weights: Optional[Sequence[float]] = None,
    epochs: Optional[Sequence[float]] = None,
    key: str = "budget",
) -> tuple[int, ...]:
    """Stage lengths in optimizer steps [spec: Durations and the budget].

    ``epochs`` given: ``T_s = round(E_s S_e)`` (the budget is then an output). Else ``budget`` with
    duration ``weights``: ``T_s = round(w_s beta D / sum(w c))`` for ``s < M`` and
    ``T_M = floor((beta D - sum_{s<M} T_s c_s) / c_M)``, so ``sum T_s c_s <= beta D <
    sum T_s c_s + c_M``: never above the budget, short by less than one full-model step.
    """
    if epochs is not None:
        durations = [round_half_up(e * steps_per_epoch) for e in epochs]
        where = f"epochs {list(epochs)} at {steps_per_epoch} steps per epoch"
    else:
        allowed = budget * dense_steps
        scale = allowed / sum(w * c for w, c in zip(weights, shares))
        durations = [round_half_up(w * scale) for w in weights[:-1]]
        spent = sum(t * c for t, c in zip(durations, shares))
        # the tolerance keeps an exact fit (e.g. budget 1) from losing a step to float rounding
        durations.append(math.floor((allowed - spent) / shares[-1] + 1e-9))
        where = f"budget {budget} of a dense run of {dense_steps} steps"
    for s, steps in enumerate(durations, 1):
        if steps < 1:
            raise ValueError(
                f"{key}: {where} leaves stage {s} with {steps} steps (durations {durations}); raise it or lengthen the run"
            )
    return tuple(durations)


def stage_of(step: int, durations: Sequence[int]) -> int:
    """The 1-based stage of the 0-based ``step``: one plus the boundaries ``T_1, T_1 + T_2, ...`` at or before it."""
    stage, edge = 1, 0
    for steps in durations[:-1]:
        edge += steps
        if step >= edge:
            stage += 1
    return stage


@dataclass(frozen=True)
class BudgetSchedule:
    """Stage models, their cost shares and lengths: everything a step needs is a function of the step."""

    stages: tuple[StageModel, ...]
    shares: tuple[float, ...]
    durations: tuple[int, ...]
    dense_steps: int  # D: the dense run the budget is a fraction of
    steps_per_epoch: int
    patch_size: int
    num_heads: int
    hidden: int

    @property
    def total_steps(self) -> int:
        return sum(self.durations)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """First steps of stages 2 .. M."""
        return tuple(sum(self.durations[:s]) for s in range(1, len(self.durations)))

    def stage(self, step: int) -> int:
        return stage_of(step, self.durations)

    def model(self, step: int) -> StageModel:
        return self.stages[self.stage(step) - 1]

    def size(self, step: int) -> int:
        """Input side in pixels at ``step``."""
        return self.model(step).grid * self.patch_size

    def rates(self, step: int) -> tuple[float, float, float]:
        """Activation rates of heads, MLP channels and patch tokens at ``step`` (non-decreasing in the step)."""
        stage, full = self.model(step), self.stages[-1]
        return stage.heads / full.heads, stage.mlp / full.mlp, stage.grid**2 / full.grid**2

    @property
    def cost(self) -> float:
        """The run's training FLOPs in dense-step units: ``sum_s T_s c_s``."""
        return sum(t * c for t, c in zip(self.durations, self.shares))

    @property
    def budget(self) -> float:
        """The run's training FLOPs as a fraction of the dense run's."""
        return self.cost / self.dense_steps

    def spent(self, step: int) -> float:
        """FLOPs of steps ``0 .. step`` as a fraction of the dense run's."""
        total, start = 0.0, 0
        for t, c in zip(self.durations, self.shares):
            total += c * max(0, min(t, step + 1 - start))
            start += t
        return total / self.dense_steps

    def describe(self) -> str:
        rows = ["stage  steps            epochs   heads  mlp    size px  tokens  share"]
        start = 0
        for s, (model, t, c) in enumerate(zip(self.stages, self.durations, self.shares), 1):
            rows.append(
                f"{s:<6} {start:>6} - {start + t - 1:<7} {t / self.steps_per_epoch:<8.3g} {model.heads:<6} "
                f"{model.mlp:<6} {model.grid * self.patch_size:<8} {model.grid**2:<7} {c:.3f}"
            )
            start += t
        rows.append(
            f"run: {self.total_steps} steps; training FLOPs {self.budget:.4f} of the dense run's "
            f"{self.dense_steps} steps ({self.dense_steps / self.steps_per_epoch:.4g} epochs)"
        )
        return "\n".join(rows)


def model_dims(model: nn.Module) -> tuple[ViTShape, int, int, int]:
    """``(ViTShape, heads, MLP hidden width, nominal grid side)`` of a timm ViT (also on the meta device)."""
    shape = ViTShape.from_model(model)
    block = model.blocks[0]
    grid = math.isqrt(shape.num_patches)
    if grid * grid != shape.num_patches:
        raise ValueError(f"methods.budgeted needs a square patch grid, the model has {shape.num_patches} patches")
    return shape, int(block.attn.num_heads), int(block.mlp.fc1.out_features), grid
