"""Budgeted Training for Vision Transformer (Xia et al., ICLR 2023; seed 003) as a plug-in.

The model trains to a given compute budget (``budget: 0.75`` of the dense run) by activating
only part of it early on: the first ``h`` attention heads, the first ``m`` MLP hidden channels
and a ``g x g`` input grid, growing in stages to the full, dense model. The stage models are
fixed by the rates ``rho``; the stage lengths are solved so the run's training FLOPs (the cost
model of ``models.cost``) equal the budget. The contract is ``../shared/BUDGETED_SPEC.md``
(sections cited as [spec: ...]); no official code was found, so most details are its decisions.

- Core (pure functions of the step, tested directly): ``stage_models``, ``stage_share``,
  ``solve_durations``, ``BudgetSchedule`` (stage, rates, cost of a step).
- Surgery: no parameter changes shape (ZeRO partitions at ``deepspeed.initialize``): ``qkv``,
  ``proj``, ``fc1``, ``fc2`` become ``SlicedLinear`` (same parameters, the forward uses the active
  rows / columns) and each block's ``attn.num_heads`` / ``attn.attn_dim`` follow the stage.
- Tokens: the batch is resized on the device to ``g * patch`` pixels in ``on_batch`` (before
  Mixup, which the task's loss applies); the model needs ``model.kwargs.dynamic_img_size: true``.
- Growth at a stage boundary, inside ``on_step``: the newly active slices are re-drawn from timm's
  init (seeded by run seed, stage, parameter name: the same on every rank) in the module
  parameter, the fp32 master and the EMA copy; their Adam ``exp_avg`` is 0 and ``exp_avg_sq`` the
  mean of the active part. The stage is a function of the step: no checkpoint state.

    methods: {budgeted: {budget: 0.75}}                  # DeiT defaults [spec: Stages, Durations]
    methods: {budgeted: {budget: 0.8, tokens: false}, toe: {r1: 0.5}}   # heads/MLP + ToE tokens
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cost import BlockLoad, ViTShape, forward_flops

from .base import Declaration, MethodContext, TrainingPlugin
from .registry import register

__all__ = ["StageModel", "BudgetSchedule", "BudgetedConfig", "BudgetedTraining", "SlicedLinear", "round_half_up",
           "stage_models", "stage_share", "solve_durations", "stage_of", "slice_model", "growth_seed"]

log = logging.getLogger(__name__)

INITS = ("redraw", "zero_out", "keep")  # [spec: Ablation switches] growth init
MOMENTS = ("mean_active", "zero")
EVALS = ("stage", "full")  # mid-run evaluation: the current stage's sub-network, or the full model
MLP_MULTIPLE = 64  # [spec: Stages] MLP widths in multiples of 64 "for efficient kernels"
INIT_STD, INIT_LOW, INIT_HIGH = 0.02, -2.0, 2.0  # timm init_weights_vit_timm: trunc_normal_(std=.02), a=-2, b=2


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


def stage_models(rho: Sequence[float], *, num_heads: int, hidden: int, grid: int, heads: bool = True,
                 mlp: bool = True, tokens: bool = True) -> tuple[StageModel, ...]:
    """The stage models from one rate per stage [spec: Stages and activation]:
    ``h = max(1, round(rho H))``, ``m = 64 round(rho hidden / 64)`` (>= 64, <= hidden),
    ``g = round(grid sqrt(rho))`` (``grid``: the model's nominal grid, 14 at 224 px / patch 16). A
    component that is off is full in every stage; the last stage is the full model."""
    out = []
    for rate in rho:
        h = max(1, min(num_heads, round_half_up(rate * num_heads))) if heads else num_heads
        m = (min(hidden, max(MLP_MULTIPLE, MLP_MULTIPLE * round_half_up(rate * hidden / MLP_MULTIPLE)))
             if mlp else hidden)
        g = max(1, min(grid, round_half_up(grid * math.sqrt(rate)))) if tokens else grid
        out.append(StageModel(h, m, g))
    return tuple(out)


def check_stage_models(stages: Sequence[StageModel], *, num_heads: int, hidden: int, grid: int, key: str) -> None:
    """Non-decreasing, within the model, the last one the full model (``ValueError`` naming ``key``)."""
    for s, stage in enumerate(stages, 1):
        if not (1 <= stage.heads <= num_heads and 1 <= stage.mlp <= hidden and 1 <= stage.grid <= grid):
            raise ValueError(f"{key}: stage {s} is {stage}, outside 1 <= heads <= {num_heads}, 1 <= mlp <= {hidden}, "
                             f"1 <= grid <= {grid} (the model's)")
    for s, (a, b) in enumerate(zip(stages, stages[1:]), 2):
        if b.heads < a.heads or b.mlp < a.mlp or b.grid < a.grid:
            raise ValueError(f"{key}: stage {s} ({b}) is smaller than stage {s - 1} ({a}): stages never shrink")
    if stages[-1] != StageModel(num_heads, hidden, grid):
        raise ValueError(f"{key}: the last stage must be the full model {StageModel(num_heads, hidden, grid)}, got "
                         f"{stages[-1]}")


def stage_plan(shape: ViTShape, stage: StageModel, num_heads: int, hidden: int,
               plan: Optional[Sequence[BlockLoad]] = None) -> list[BlockLoad]:
    """``plan`` (default: the dense plan of ``shape``) with every block's heads and MLP at ``stage``'s."""
    plan = shape.dense_plan() if plan is None else plan
    return [replace(load, head_frac=stage.heads / num_heads, mlp_frac=stage.mlp / hidden) for load in plan]


def stage_share(shape: ViTShape, stage: StageModel, num_heads: int, hidden: int) -> float:
    """Training FLOPs of one step of ``stage`` against the dense model at its nominal grid (``models.cost``;
    the patch embedding and every block priced at the stage's ``grid ** 2`` patches)."""
    small = shape.with_patches(stage.grid ** 2)
    return forward_flops(small, stage_plan(small, stage, num_heads, hidden)) / forward_flops(shape)


def solve_durations(shares: Sequence[float], *, dense_steps: int, steps_per_epoch: int, budget: Optional[float] = None,
                    weights: Optional[Sequence[float]] = None, epochs: Optional[Sequence[float]] = None,
                    key: str = "budget") -> tuple[int, ...]:
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
            raise ValueError(f"{key}: {where} leaves stage {s} with {steps} steps (durations {durations}); "
                             f"raise it or lengthen the run")
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
        return stage.heads / full.heads, stage.mlp / full.mlp, stage.grid ** 2 / full.grid ** 2

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
            rows.append(f"{s:<6} {start:>6} - {start + t - 1:<7} {t / self.steps_per_epoch:<8.3g} {model.heads:<6} "
                        f"{model.mlp:<6} {model.grid * self.patch_size:<8} {model.grid ** 2:<7} {c:.3f}")
            start += t
        rows.append(f"run: {self.total_steps} steps; training FLOPs {self.budget:.4f} of the dense run's "
                    f"{self.dense_steps} steps ({self.dense_steps / self.steps_per_epoch:.4g} epochs)")
        return "\n".join(rows)


def model_dims(model: nn.Module) -> tuple[ViTShape, int, int, int]:
    """``(ViTShape, heads, MLP hidden width, nominal grid side)`` of a timm ViT (also on the meta device)."""
    shape = ViTShape.from_model(model)
    block = model.blocks[0]
    grid = math.isqrt(shape.num_patches)
    if grid * grid != shape.num_patches:
        raise ValueError(f"methods.budgeted needs a square patch grid, the model has {shape.num_patches} patches")
    return shape, int(block.attn.num_heads), int(block.mlp.fc1.out_features), grid


# -- surgery ------------------------------------------------------------------------------------

class SlicedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses only its first ``active_out`` rows (in each of ``groups``
    equal row blocks: qkv's q, k, v) and first ``active_in`` columns; ``None`` uses all. The
    parameters keep their full shapes, so ZeRO, checkpoints and strict loads see plain Linears."""

    groups: int = 1
    active_out: Optional[int] = None
    active_in: Optional[int] = None

    @classmethod
    def convert(cls, linear: nn.Linear, groups: int = 1) -> "SlicedLinear":
        if type(linear) is not nn.Linear or linear.out_features % groups:
            raise TypeError(f"expected an nn.Linear with out_features divisible by {groups}, got {linear}")
        linear.__class__ = cls
        linear.groups, linear.active_out, linear.active_in = groups, None, None
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.active_out is not None:
            rows = self.out_features // self.groups
            weight = weight.view(self.groups, rows, self.in_features)[:, :self.active_out].reshape(-1, self.in_features)
            if bias is not None:
                bias = bias.view(self.groups, rows)[:, :self.active_out].reshape(-1)
        if self.active_in is not None:
            weight = weight[:, :self.active_in]
        return F.linear(x, weight, bias)

    def active_mask(self, name: str, active_out: Optional[int], active_in: Optional[int]) -> torch.Tensor:
        """Boolean mask of the entries of parameter ``name`` (``weight`` / ``bias``) a forward with these spans uses."""
        rows = self.out_features // self.groups
        out = torch.zeros(self.groups, rows, dtype=torch.bool)
        out[:, :rows if active_out is None else active_out] = True
        out = out.reshape(-1)
        if name == "bias":
            return out
        cols = torch.zeros(self.in_features, dtype=torch.bool)
        cols[:self.in_features if active_in is None else active_in] = True
        return out[:, None] & cols[None, :]


@dataclass
class BlockSlices:
    """One block's sliced pieces."""

    index: int
    attn: nn.Module
    qkv: SlicedLinear
    proj: SlicedLinear
    fc1: SlicedLinear
    fc2: SlicedLinear

    def set(self, stage: StageModel, num_heads: int, hidden: int) -> None:
        head_dim = self.attn.head_dim
        heads = None if stage.heads == num_heads else stage.heads * head_dim
        mlp = None if stage.mlp == hidden else stage.mlp
        self.attn.num_heads, self.attn.attn_dim = stage.heads, stage.heads * head_dim
        self.qkv.active_out, self.proj.active_in = heads, heads
        self.fc1.active_out, self.fc2.active_in = mlp, mlp

    def spans(self, stage: StageModel, num_heads: int, hidden: int) -> dict[str, tuple[Optional[int], Optional[int]]]:
        """``(active_out, active_in)`` of each sliced Linear at ``stage``."""
        head_dim = self.attn.head_dim
        heads = None if stage.heads == num_heads else stage.heads * head_dim
        mlp = None if stage.mlp == hidden else stage.mlp
        return {"attn.qkv": (heads, None), "attn.proj": (None, heads), "mlp.fc1": (mlp, None), "mlp.fc2": (None, mlp)}


def slice_model(model: nn.Module) -> list[BlockSlices]:
    """Swap every block's ``qkv`` / ``proj`` / ``fc1`` / ``fc2`` to ``SlicedLinear`` (in place; a model
    already sliced, such as a deep copy of one, is only read)."""
    out = []
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        problems = [what for what, bad in (
            ("attention with a scale norm", not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)),
            ("a gated attention", getattr(attn, "gate", None) is not None),
            ("an MLP norm", not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)),
            ("heads of another width than embed_dim / num_heads", attn.attn_dim != attn.num_heads * attn.head_dim),
        ) if bad]
        if problems or not all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim")):
            raise TypeError(f"methods.budgeted: block {i} ({type(block).__name__}) is not a timm ViT block it can "
                            f"slice: {', '.join(problems) or 'no qkv / proj / num_heads / head_dim'}")
        pieces = []
        for linear, groups in ((attn.qkv, 3), (attn.proj, 1), (mlp.fc1, 1), (mlp.fc2, 1)):
            pieces.append(linear if isinstance(linear, SlicedLinear) else SlicedLinear.convert(linear, groups))
        out.append(BlockSlices(i, attn, *pieces))
    return out


def growth_seed(seed: int, stage: int, name: str) -> int:
    """The generator seed of parameter ``name``'s draws at the start of ``stage``: the same on every rank."""
    digest = hashlib.sha256(f"budgeted/{seed}/{stage}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def initial_values(param_shape: torch.Size, name: str, seed: int, stage: int) -> torch.Tensor:
    """timm's init of a ViT Linear (``init_weights_vit_timm``): truncated normal std 0.02 for weights,
    zeros for biases; drawn in float32 on the CPU from the seeded generator."""
    values = torch.zeros(param_shape, dtype=torch.float32)
    if name.endswith(".weight"):
        generator = torch.Generator().manual_seed(growth_seed(seed, stage, name))
        nn.init.trunc_normal_(values, std=INIT_STD, a=INIT_LOW, b=INIT_HIGH, generator=generator)
    return values


# -- the config and the plug-in -----------------------------------------------------------------

@dataclass
class BudgetedConfig:
    summary = ("budget",)  # the options a report names the method by (not a recipe key: no annotation)
    budget: Optional[float] = 0.75  # training FLOPs / the dense run's [spec: Durations]; null with explicit epochs
    epochs: Optional[list] = None  # explicit stage lengths [E1, E2, E3] in epochs (the slides' notation)
    weights: list = field(default_factory=lambda: [22, 51, 127])  # [spec: Durations] the slides' 50% DeiT-T shape
    rho: list = field(default_factory=lambda: [0.4, 2 / 3, 1.0])  # [spec: Stages] one rate per stage
    stages: Optional[list] = None  # explicit [[heads, mlp, grid], ...] per stage (replaces rho)
    heads: bool = True  # components [spec: Ablation switches]: off = full in every stage
    mlp: bool = True
    tokens: bool = True  # input resolution; off when another method (ToE) sets the token count
    init: str = "redraw"  # growth init of new slices: redraw | zero_out | keep
    moments: str = "mean_active"  # Adam moments of new slices: mean_active | zero
    eval: str = "stage"  # mid-run evaluation: stage (the current sub-network at its size) | full
    dense_steps: Optional[int] = None  # the dense run in steps; null: the recipe's (filled in at start-up)

    def declare(self) -> Declaration:
        """The input grid (its ``tokens`` part) sets every block's token count: exclusive of any other method
        that sets one, its budget is priced on its own grids. Growth re-draws (``redraw``) or zeroes
        (``zero_out``) the newly active slices: from pretrained weights that would erase the part of them each
        stage grows into. The run's length is the budget's (``run_steps``)."""
        refusal = None if self.init == "keep" else (
            f"its growth {'re-draws' if self.init == 'redraw' else 'zeroes'} the newly active head and MLP "
            f"slices at every stage boundary (init: {self.init}), which would erase those pretrained weights; "
            f"set methods.budgeted.init: keep to grow into them")
        return Declaration(token_sites=frozenset({0}) if self.tokens else frozenset(),  # the grid: tokens from block 0
                           input_grid="tokens" if self.tokens else None, exclusive_tokens=self.tokens,
                           refuses_pretrained=refusal, run_steps=self.run_steps, progress=("budget/stage",))

    def __post_init__(self) -> None:
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1] (a fraction of the dense run's training FLOPs), "
                             f"got {self.budget}")
        if (self.budget is None) == (self.epochs is None):
            raise ValueError(f"budget and epochs: set exactly one (budget {self.budget}, epochs {self.epochs}); "
                             f"explicit epochs need budget: null")
        if self.stages is not None:
            if not all(isinstance(s, list) and len(s) == 3 and all(_whole(v) and v >= 1 for v in s)
                       for s in self.stages):
                raise ValueError(f"stages must be a list of [heads, mlp, grid] lists of ints >= 1, got {self.stages}")
            count = len(self.stages)
        else:
            if not all(_number(r) and 0 < r <= 1 for r in self.rho) or sorted(self.rho) != list(self.rho) \
                    or not self.rho or self.rho[-1] != 1:
                raise ValueError(f"rho must be non-decreasing rates in (0, 1] ending at 1 (the full model), "
                                 f"got {self.rho}")
            count = len(self.rho)
        if self.epochs is not None and (len(self.epochs) != count
                                        or not all(_number(e) and e > 0 for e in self.epochs)):
            raise ValueError(f"epochs must be {count} positive numbers (one per stage), got {self.epochs}")
        if len(self.weights) != count or not all(_number(w) and w > 0 for w in self.weights):
            raise ValueError(f"weights must be {count} positive numbers (one per stage), got {self.weights}")
        for key, value, allowed in (("init", self.init, INITS), ("moments", self.moments, MOMENTS),
                                    ("eval", self.eval, EVALS)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        if self.dense_steps is not None and (not _whole(self.dense_steps) or self.dense_steps < 1):
            raise ValueError(f"dense_steps must be an int >= 1 or null, got {self.dense_steps}")

    def schedule(self, model: nn.Module, dense_steps: int, steps_per_epoch: int) -> BudgetSchedule:
        """The run's schedule for ``model`` (a timm ViT, the meta device will do)."""
        shape, num_heads, hidden, grid = model_dims(model)
        if self.stages is not None:
            stages = tuple(StageModel(*s) for s in self.stages)
            stages = tuple(StageModel(s.heads if self.heads else num_heads, s.mlp if self.mlp else hidden,
                                      s.grid if self.tokens else grid) for s in stages)
        else:
            stages = stage_models(self.rho, num_heads=num_heads, hidden=hidden, grid=grid, heads=self.heads,
                                  mlp=self.mlp, tokens=self.tokens)
        check_stage_models(stages, num_heads=num_heads, hidden=hidden, grid=grid,
                           key="stages" if self.stages else "rho")
        shares = tuple(stage_share(shape, s, num_heads, hidden) for s in stages)
        durations = solve_durations(shares, dense_steps=dense_steps, steps_per_epoch=steps_per_epoch,
                                    budget=self.budget, weights=self.weights, epochs=self.epochs,
                                    key="epochs" if self.epochs is not None else "budget")
        return BudgetSchedule(stages, shares, durations, dense_steps, steps_per_epoch, shape.patch_size, num_heads,
                              hidden)

    def run_steps(self, steps_per_epoch: int, default_total: int, model: nn.Module) -> tuple[int, "BudgetedConfig"]:
        """The declared run length (``methods.registry.run_length``): ``T_1 + ... + T_M`` replaces the
        recipe's ``default_total`` (its dense run, which the budget is a fraction of)."""
        dense = self.dense_steps or default_total
        try:
            schedule = self.schedule(model, dense, steps_per_epoch)
        except ValueError as err:
            raise ValueError(f"methods.budgeted.{err}") from err
        return schedule.total_steps, replace(self, dense_steps=dense)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class BudgetedTraining(TrainingPlugin):
    """Heads, MLP width and input grid grow in stages to the full model; see the module docstring."""

    name = "budgeted"

    def __init__(self, config: BudgetedConfig, context: MethodContext) -> None:
        if config.dense_steps is None:
            raise ValueError("methods.budgeted.dense_steps is unset: the engine fills it in before building the stack "
                             "(methods.registry.run_length); set it to build the plug-in directly")
        if config.tokens and context.task != "classification":
            raise ValueError(f"methods.budgeted.tokens resizes classification inputs; the task is {context.task!r}: "
                             f"set methods.budgeted.tokens: false")
        self.config, self.context = config, context
        self.schedule: Optional[BudgetSchedule] = None
        self.blocks: list[BlockSlices] = []
        self.ema_blocks: list[BlockSlices] = []
        self.model: Optional[nn.Module] = None
        self.engine: Any = None
        self.ema: Any = None

    # -- set-up --------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        if self.config.tokens and not getattr(model, "dynamic_img_size", False):
            raise ValueError("methods.budgeted.tokens resizes the input, so the model must resample its position "
                             "embedding: set model.kwargs.dynamic_img_size: true (or methods.budgeted.tokens: false)")
        self.schedule = self.config.schedule(model, self.config.dense_steps, self.context.steps_per_epoch)
        self.model = model
        self.blocks = slice_model(model)
        self._set(self.blocks, self.schedule.stages[0])

    def on_engine(self, engine: Any, ema: Any = None, stream: Any = None) -> None:
        self.engine, self.ema = engine, ema
        if ema is not None:
            self.ema_blocks = slice_model(ema.module)  # a deep copy of the sliced model: its own instances

    # -- the run -------------------------------------------------------------------------------

    def _set(self, blocks: list[BlockSlices], stage: StageModel) -> None:
        for block in blocks:
            block.set(stage, self.schedule.num_heads, self.schedule.hidden)

    def _set_all(self, stage: StageModel) -> None:
        self._set(self.blocks, stage)
        self._set(self.ema_blocks, stage)

    def on_step(self, step: int) -> dict[str, float]:
        s = self.schedule
        stage = s.stage(step)
        if step in s.boundaries:  # the first step of a stage: once per run (a resume at it has not grown yet)
            self.grow(stage - 1, stage)
        self._set_all(s.stages[stage - 1])
        model = s.stages[stage - 1]
        return {"budget/stage": float(stage), "budget/heads": float(model.heads), "budget/mlp": float(model.mlp),
                "budget/size": float(model.grid * s.patch_size), "budget/share": s.shares[stage - 1],
                "budget/spent": s.spent(step)}

    def on_batch(self, step: int, batch: dict) -> dict:
        return self._resized(batch, self.schedule.size(step)) if self.config.tokens else batch

    def on_eval_batch(self, step: int, batch: dict) -> dict:
        """The final evaluation (and ``eval: full``) is the dense model at full size; a mid-run one is the
        sub-network trained last (the stage of step ``step - 1``) at its size."""
        s = self.schedule
        final = step >= self.context.total_steps or self.config.eval == "full"
        model = s.stages[-1] if final else s.model(max(step - 1, 0))
        self._set_all(model)
        return self._resized(batch, model.grid * s.patch_size) if self.config.tokens else batch

    @staticmethod
    def _resized(batch: dict, size: int) -> dict:
        images = batch["image"]
        if tuple(images.shape[-2:]) == (size, size):
            return batch
        # [spec: Stages] on device, bicubic with antialias, in float32
        resized = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        return {**batch, "image": resized.to(images.dtype)}

    # -- growth --------------------------------------------------------------------------------

    @torch.no_grad()
    def grow(self, old: int, new: int) -> None:
        """Stage ``old`` -> ``new`` (1-based): write the newly active slices of every sliced Linear in the
        module parameter, the fp32 master, the optimizer moments and the EMA copy. Every rank runs it in
        the same order (the ZeRO gathers inside are collectives)."""
        s = self.schedule
        before, after = s.stages[old - 1], s.stages[new - 1]
        log.info("budgeted: stage %d -> %d: heads %d -> %d, MLP %d -> %d, size %d -> %d px", old, new, before.heads,
                 after.heads, before.mlp, after.mlp, before.grid * s.patch_size, after.grid * s.patch_size)
        if self.engine is not None:
            _relink_optimizer_states(self.engine.optimizer)
        named = {id(p): n for n, p in self.model.named_parameters()}
        ema_params = dict(self.ema.module.named_parameters()) if self.ema is not None else {}
        for block in self.blocks:
            old_spans = block.spans(before, s.num_heads, s.hidden)
            new_spans = block.spans(after, s.num_heads, s.hidden)
            writes = []
            for part, linear in (("attn.qkv", block.qkv), ("attn.proj", block.proj), ("mlp.fc1", block.fc1),
                                 ("mlp.fc2", block.fc2)):
                if old_spans[part] == new_spans[part]:
                    continue
                for kind, param in (("weight", linear.weight), ("bias", linear.bias)):
                    if param is None:
                        continue
                    fresh = linear.active_mask(kind, *new_spans[part]) & ~linear.active_mask(kind, *old_spans[part])
                    if fresh.any():
                        writes.append((named[id(param)], part, kind, param, fresh,
                                       linear.active_mask(kind, *old_spans[part])))
            self._write(writes, new, ema_params)

    def _write(self, writes: list, stage: int, ema_params: dict) -> None:
        c = self.config
        optimizer = _torch_optimizer(self.engine) if self.engine is not None else None
        values = {}
        for name, part, kind, param, fresh, active in writes:
            master = _full_fp32(param)
            if c.init != "keep":
                drawn = initial_values(master.shape, name, self.context.seed, stage)
                if c.init == "zero_out" and part in ("attn.proj", "mlp.fc2"):
                    drawn.zero_()  # new columns of the output projections: the function is unchanged
                master = master.clone()
                master[fresh.to(master.device)] = drawn.to(master.device)[fresh.to(master.device)]
                _set_full_fp32(param, master)
                values[name] = master
            if optimizer is not None or _partitioned(param):
                for key in ("exp_avg", "exp_avg_sq"):
                    state = _full_state(param, optimizer, key)
                    if state is None:
                        continue  # no step taken yet: the optimizer has no moments
                    state = state.clone()
                    mask = fresh.to(state.device)
                    if key == "exp_avg_sq" and c.moments == "mean_active":
                        state[mask] = state[active.to(state.device)].mean()
                    else:
                        state[mask] = 0.0
                    _set_full_state(param, optimizer, key, state)
        if not values:
            return
        params = [param for name, _, _, param, _, _ in writes if name in values]
        masks = {name: fresh for name, _, _, _, fresh, _ in writes}
        if any(_partitioned(p) for p in params):  # ZeRO-3: the module parameters are partitioned
            import deepspeed
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                self._write_modules(writes, values, masks)
        else:
            self._write_modules(writes, values, masks)
        for name, value in values.items():
            if name in ema_params:
                target = ema_params[name]
                mask = masks[name].to(target.device)
                target.data[mask] = value.to(target.device, target.dtype)[mask]

    @staticmethod
    def _write_modules(writes: list, values: dict, masks: dict) -> None:
        for name, _, _, param, _, _ in writes:
            if name in values:
                mask = masks[name].to(param.device)
                param.data[mask] = values[name].to(param.device, param.dtype)[mask]

    # -- cost and description ------------------------------------------------------------------

    def plan(self, step: int, plan: list[BlockLoad]) -> list[BlockLoad]:
        """Heads and MLP fractions of the step's stage; the tokens follow the input grid the plan is for
        (the stack prices each training forward on its resized grid)."""
        return stage_plan(None, self.schedule.model(step), self.schedule.num_heads, self.schedule.hidden, plan)

    def describe(self) -> str:
        c = self.config
        what = (f"budget {c.budget:g} of the dense run" if c.budget is not None else f"explicit epochs {c.epochs}")
        parts = ", ".join(p for p, on in (("heads", c.heads), ("MLP", c.mlp), ("tokens", c.tokens)) if on)
        note = "" if c.tokens else ("\n(the budget counts this method's saving only: another method's token saving, "
                                    "e.g. ToE's, comes on top; cost/flops_share in the log prices both)")
        return (f"Budgeted Training ({what}; grows {parts or 'nothing'}; init {c.init}, moments {c.moments}):\n"
                + self.schedule.describe() + note)


# -- optimizer and ZeRO access --------------------------------------------------------------------

def _partitioned(param: nn.Parameter) -> bool:
    """The fp32 master lives in DeepSpeed's partitions (ZeRO 1-3, or the bf16 optimizer), not in the parameter."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _torch_optimizer(engine: Any):
    optimizer = getattr(engine, "optimizer", None)
    while (optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer)
           and hasattr(optimizer, "optimizer")):
        optimizer = optimizer.optimizer
    return optimizer


def _relink_optimizer_states(optimizer: Any) -> None:
    """Point every ZeRO-1/2 parameter's optimizer-state fragments at the moments of its group.

    DeepSpeed 0.19.8 links them once, right after the first parameter group's first step
    (``stage_1_and_2.py`` ``_optimizer_step``), when the other groups (here: no weight decay) have no
    moments yet, so ``safe_get_full_optimizer_state`` raises "exp_avg not found" for their
    parameters. Linking again once every group has stepped is what DeepSpeed meant to do; a no-op
    for other optimizers.
    """
    groups = getattr(optimizer, "bit16_groups", None)
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None)
    inner = getattr(optimizer, "optimizer", None)
    if groups is None or flats is None or inner is None:
        return
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
    for params, flat in zip(groups, flats):
        if flat in inner.state:
            lazy_init_hp_params_optimizer_state(params, flat, inner.state)


def _full_fp32(param: nn.Parameter) -> torch.Tensor:
    if _partitioned(param):
        from deepspeed.utils import safe_get_full_fp32_param
        return safe_get_full_fp32_param(param)
    return param.data.float()


def _set_full_fp32(param: nn.Parameter, value: torch.Tensor) -> None:
    if _partitioned(param):
        from deepspeed.utils import safe_set_full_fp32_param
        safe_set_full_fp32_param(param, value)
    # ZeRO-0 fp32: the parameter is the master; written with the module parameters


def _full_state(param: nn.Parameter, optimizer: Any, key: str) -> Optional[torch.Tensor]:
    if _partitioned(param):
        from deepspeed.utils import safe_get_full_optimizer_state
        return safe_get_full_optimizer_state(param, key)
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    return state.get(key)


def _set_full_state(param: nn.Parameter, optimizer: Any, key: str, value: torch.Tensor) -> None:
    if _partitioned(param):
        from deepspeed.utils import safe_set_full_optimizer_state
        safe_set_full_optimizer_state(param, value, key)
    else:
        optimizer.state[param][key].copy_(value)


def build(config: BudgetedConfig, context: MethodContext) -> BudgetedTraining:
    return BudgetedTraining(config, context)


register("budgeted", BudgetedConfig, build)
