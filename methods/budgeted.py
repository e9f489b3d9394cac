"""Budgeted Training for Vision Transformer (Xia et al., ICLR 2023; seed 003) as a plug-in.

The model trains to a given compute budget (``budget: 0.75`` of the dense run) by activating
only part of it early on: the first ``h`` attention heads, the first ``m`` MLP hidden channels
and a ``g x g`` input grid, growing in stages to the full, dense model. The stage models are
fixed by the rates ``rho``; the stage lengths are solved so the run's training FLOPs (the cost
model of ``models.cost``) equal the budget. The contract is ``../shared/BUDGETED_SPEC.md``
(sections cited as [spec: ...]); no official code was found, so most details are its decisions.

- Core (pure functions of the step, tested directly; ``methods.budgeted_schedule``): ``stage_models``,
  ``stage_share``, ``solve_durations``, ``BudgetSchedule`` (stage, rates, cost of a step).
- Surgery (``methods.budgeted_slicing``): no parameter changes shape (ZeRO partitions at ``deepspeed.initialize``): ``qkv``,
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

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cost import BlockLoad

from .base import Declaration, MethodContext, TrainingPlugin
from .registry import register

__all__ = [
    "StageModel",
    "BudgetSchedule",
    "BudgetedConfig",
    "BudgetedTraining",
    "SlicedLinear",
    "round_half_up",
    "stage_models",
    "stage_share",
    "solve_durations",
    "stage_of",
    "slice_model",
    "growth_seed",
]

from .budgeted_schedule import (  # noqa: F401  (names tests and users import from here)
    BudgetSchedule,
    StageModel,
    check_stage_models,
    model_dims,
    round_half_up,
    solve_durations,
    stage_models,
    stage_of,
    stage_plan,
    stage_share,
)
from .budgeted_slicing import (  # noqa: F401
    BlockSlices,
    SlicedLinear,
    _full_fp32,
    _full_state,
    _partitioned,
    _relink_optimizer_states,
    _set_full_fp32,
    _set_full_state,
    _torch_optimizer,
    growth_seed,
    initial_values,
    slice_model,
)

log = logging.getLogger(__name__)

INITS = ("redraw", "zero_out", "keep")  # [spec: Ablation switches] growth init
MOMENTS = ("mean_active", "zero")
EVALS = ("stage", "full")  # mid-run evaluation: the current stage's sub-network, or the full model


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
        refusal = (
            None
            if self.init == "keep"
            else (
                f"its growth {'re-draws' if self.init == 'redraw' else 'zeroes'} the newly active head and MLP "
                f"slices at every stage boundary (init: {self.init}), which would erase those pretrained weights; "
                f"set methods.budgeted.init: keep to grow into them"
            )
        )
        return Declaration(
            token_sites=frozenset({0}) if self.tokens else frozenset(),  # the grid: tokens from block 0
            input_grid="tokens" if self.tokens else None,
            exclusive_tokens=self.tokens,
            refuses_pretrained=refusal,
            run_steps=self.run_steps,
            progress=("budget/stage",),
        )

    def __post_init__(self) -> None:
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1] (a fraction of the dense run's training FLOPs), got {self.budget}")
        if (self.budget is None) == (self.epochs is None):
            raise ValueError(
                f"budget and epochs: set exactly one (budget {self.budget}, epochs {self.epochs}); "
                f"explicit epochs need budget: null"
            )
        if self.stages is not None:
            if not all(isinstance(s, list) and len(s) == 3 and all(_whole(v) and v >= 1 for v in s) for s in self.stages):
                raise ValueError(f"stages must be a list of [heads, mlp, grid] lists of ints >= 1, got {self.stages}")
            count = len(self.stages)
        else:
            if (
                not all(_number(r) and 0 < r <= 1 for r in self.rho)
                or sorted(self.rho) != list(self.rho)
                or not self.rho
                or self.rho[-1] != 1
            ):
                raise ValueError(f"rho must be non-decreasing rates in (0, 1] ending at 1 (the full model), got {self.rho}")
            count = len(self.rho)
        if self.epochs is not None and (len(self.epochs) != count or not all(_number(e) and e > 0 for e in self.epochs)):
            raise ValueError(f"epochs must be {count} positive numbers (one per stage), got {self.epochs}")
        if len(self.weights) != count or not all(_number(w) and w > 0 for w in self.weights):
            raise ValueError(f"weights must be {count} positive numbers (one per stage), got {self.weights}")
        for key, value, allowed in (
            ("init", self.init, INITS),
            ("moments", self.moments, MOMENTS),
            ("eval", self.eval, EVALS),
        ):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        if self.dense_steps is not None and (not _whole(self.dense_steps) or self.dense_steps < 1):
            raise ValueError(f"dense_steps must be an int >= 1 or null, got {self.dense_steps}")

    def schedule(self, model: nn.Module, dense_steps: int, steps_per_epoch: int) -> BudgetSchedule:
        """The run's schedule for ``model`` (a timm ViT, the meta device will do)."""
        shape, num_heads, hidden, grid = model_dims(model)
        if self.stages is not None:
            stages = tuple(StageModel(*s) for s in self.stages)
            stages = tuple(
                StageModel(
                    s.heads if self.heads else num_heads, s.mlp if self.mlp else hidden, s.grid if self.tokens else grid
                )
                for s in stages
            )
        else:
            stages = stage_models(
                self.rho, num_heads=num_heads, hidden=hidden, grid=grid, heads=self.heads, mlp=self.mlp, tokens=self.tokens
            )
        check_stage_models(stages, num_heads=num_heads, hidden=hidden, grid=grid, key="stages" if self.stages else "rho")
        shares = tuple(stage_share(shape, s, num_heads, hidden) for s in stages)
        durations = solve_durations(
            shares,
            dense_steps=dense_steps,
            steps_per_epoch=steps_per_epoch,
            budget=self.budget,
            weights=self.weights,
            epochs=self.epochs,
            key="epochs" if self.epochs is not None else "budget",
        )
        return BudgetSchedule(stages, shares, durations, dense_steps, steps_per_epoch, shape.patch_size, num_heads, hidden)

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
            raise ValueError(
                "methods.budgeted.dense_steps is unset: the engine fills it in before building the stack "
                "(methods.registry.run_length); set it to build the plug-in directly"
            )
        if config.tokens and context.task != "classification":
            raise ValueError(
                f"methods.budgeted.tokens resizes classification inputs; the task is {context.task!r}: "
                f"set methods.budgeted.tokens: false"
            )
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
            raise ValueError(
                "methods.budgeted.tokens resizes the input, so the model must resample its position "
                "embedding: set model.kwargs.dynamic_img_size: true (or methods.budgeted.tokens: false)"
            )
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
        return {
            "budget/stage": float(stage),
            "budget/heads": float(model.heads),
            "budget/mlp": float(model.mlp),
            "budget/size": float(model.grid * s.patch_size),
            "budget/share": s.shares[stage - 1],
            "budget/spent": s.spent(step),
        }

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
        log.info(
            "budgeted: stage %d -> %d: heads %d -> %d, MLP %d -> %d, size %d -> %d px",
            old,
            new,
            before.heads,
            after.heads,
            before.mlp,
            after.mlp,
            before.grid * s.patch_size,
            after.grid * s.patch_size,
        )
        if self.engine is not None:
            _relink_optimizer_states(self.engine.optimizer)
        named = {id(p): n for n, p in self.model.named_parameters()}
        ema_params = dict(self.ema.module.named_parameters()) if self.ema is not None else {}
        for block in self.blocks:
            old_spans = block.spans(before, s.num_heads, s.hidden)
            new_spans = block.spans(after, s.num_heads, s.hidden)
            writes = []
            for part, linear in (
                ("attn.qkv", block.qkv),
                ("attn.proj", block.proj),
                ("mlp.fc1", block.fc1),
                ("mlp.fc2", block.fc2),
            ):
                if old_spans[part] == new_spans[part]:
                    continue
                for kind, param in (("weight", linear.weight), ("bias", linear.bias)):
                    if param is None:
                        continue
                    fresh = linear.active_mask(kind, *new_spans[part]) & ~linear.active_mask(kind, *old_spans[part])
                    if fresh.any():
                        writes.append(
                            (named[id(param)], part, kind, param, fresh, linear.active_mask(kind, *old_spans[part]))
                        )
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
        what = f"budget {c.budget:g} of the dense run" if c.budget is not None else f"explicit epochs {c.epochs}"
        parts = ", ".join(p for p, on in (("heads", c.heads), ("MLP", c.mlp), ("tokens", c.tokens)) if on)
        note = (
            ""
            if c.tokens
            else (
                "\n(the budget counts this method's saving only: another method's token saving, "
                "e.g. ToE's, comes on top; cost/flops_share in the log prices both)"
            )
        )
        return (
            f"Budgeted Training ({what}; grows {parts or 'nothing'}; init {c.init}, moments {c.moments}):\n"
            + self.schedule.describe()
            + note
        )


def build(config: BudgetedConfig, context: MethodContext) -> BudgetedTraining:
    return BudgetedTraining(config, context)


register("budgeted", BudgetedConfig, build)
