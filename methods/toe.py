"""Token Expansion (ToE, CVPR 2024) as a plug-in: the thin adapter over ``toe/``.

Surgery at ``attach`` (a forward pre-hook on ``model.blocks[block]``, no parameters), the stage
from the global step at ``on_step``, the kept tokens after ``block`` in the cost model. The op,
its schedule and the surgery are in ``toe/`` (``toe.expand_tokens``, ``toe.ToESchedule``).

    methods: {toe: {r1: 0.5}}          # 3 stages over the run, k = 2, after block 1
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn as nn

from models.cost import BlockLoad, ViTShape, keep_patches_after, patches_at
from toe import ToESchedule, TokenExpansion, apply_token_expansion
from toe.token_expansion import DISTANCES, INITS

from .base import Declaration, MethodContext, TrainingPlugin
from .registry import register

__all__ = ["ToEConfig", "ToEPlugin", "build"]

log = logging.getLogger(__name__)


@dataclass
class ToEConfig:
    summary = ("r1",)  # the options a report names the method by (not a recipe key: no annotation)
    # what an option absent from an older run folder's config.yaml meant (launcher.config.recipe_changes):
    # runs from before ``counting`` existed counted by rates, so resuming one under the new default is a change
    legacy = {"counting": "rates"}
    r1: float = 0.5
    r0: Optional[float] = None  # null: r1 / 2
    num_stages: int = 3
    k: int = 2
    block: int = 1
    boundaries: Optional[list] = None  # first step (int) or fraction of the run (float) of stages 2..Ng
    # first (0-based) epoch of stages 2..Ng, e.g. [130, 260] of 300 (appendix Sec. 1.2, the "Hyper" recipes);
    # steps = round(epoch x steps per epoch); excludes ``boundaries``
    boundary_epochs: Optional[list] = None
    warmup_steps: int = 0
    warmup_epochs: Optional[float] = None  # full-token warm-up in epochs (steps from the run's epoch length)
    distance: str = "cosine"
    init: str = "spatial"
    expand: bool = True
    merge: bool = True
    sparse_eval: bool = False
    seed_stride: Optional[int] = None  # null: the paper's floor(1 / r0); 4 at r1=0.4 reproduces the authors' code
    # paper: stage m adds floor(mu_m N), remainder of the k repeats to the last (Sec. 3.3.2, Algorithm 1, the
    # official token_select.py); rates: this project's earlier floor(r_m N), remainder to the first repeats
    counting: str = "paper"

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        warm = self.warmup_epochs
        if warm is not None and (not 0 <= warm < math.inf or self.warmup_steps):  # NaN fails the test too
            raise ValueError(
                f"warmup_epochs must be a finite number >= 0, with warmup_steps left at 0 (set one of "
                f"them), got {warm} and {self.warmup_steps}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        epochs = self.boundary_epochs
        if epochs is not None:
            if self.boundaries is not None:
                raise ValueError("boundary_epochs and boundaries exclude each other: set one of them")
            if (
                len(epochs) != self.num_stages - 1
                or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e < math.inf for e in epochs)
                or any(b <= a for a, b in zip(epochs, epochs[1:]))
            ):
                raise ValueError(
                    f"boundary_epochs must give the first epoch of stages 2..{self.num_stages} "
                    f"({self.num_stages - 1} increasing numbers > 0), got {epochs!r}"
                )
        self.schedule(max(self.warmup_steps + self.num_stages, 10**9), steps_per_epoch=1)  # validates the numbers

    def declare(self) -> Declaration:
        return Declaration(token_sites=frozenset({self.block}), progress=("toe/stage", "toe/kept_tokens"), phase="toe/stage")

    def schedule(self, total_steps: int, steps_per_epoch: int) -> ToESchedule:
        warmup = self.warmup_steps if self.warmup_epochs is None else round(self.warmup_epochs * steps_per_epoch)
        boundaries = self.boundaries
        if self.boundary_epochs is not None:
            boundaries = [round(epoch * steps_per_epoch) for epoch in self.boundary_epochs]
        return ToESchedule(
            r1=self.r1,
            r0=self.r0,
            num_stages=self.num_stages,
            total_steps=total_steps,
            k=self.k,
            boundaries=boundaries,
            block=self.block,
            warmup_steps=warmup,
            seed_stride=self.seed_stride,
            counting=self.counting,
        )


class ToEPlugin(TrainingPlugin):
    """Token Expansion as a plug-in: surgery at ``attach``, the stage from the global step at ``on_step``."""

    name = "toe"

    def __init__(self, schedule: ToESchedule, **options: Any) -> None:
        self.schedule = schedule
        self.options = options  # apply_token_expansion's: num_suffix, distance, init, expand, merge, sparse_eval
        self.module: Optional[TokenExpansion] = None
        self.shape: Optional[ViTShape] = None
        self._kept = [0, 0]  # kept patch tokens summed over samples, samples: training forwards since the last log

    def attach(self, model: nn.Module) -> None:
        # a model with a dense head (LV-ViT's aux head) gets every patch position back after its final
        # norm: kept tokens where they came from, zeros elsewhere (LVVIT_SPEC "ToE on LV-ViT")
        restore = bool(getattr(model, "dense_head", False))
        self.module = apply_token_expansion(model, self.schedule, restore=restore, **self.options)
        self.shape = ViTShape.from_model(model, num_suffix=self.options.get("num_suffix", 0))

    def observe(self, samples: int, plan: list[BlockLoad]) -> None:
        """The patch tokens the blocks after ToE's see in a priced training micro-batch (the op keeps
        exactly the schedule's count of the grid it gets, which ``tests`` check against the model)."""
        self._kept[0] += patches_at(self.shape, plan, self.schedule.block) * samples
        self._kept[1] += samples

    def on_step(self, step: int) -> dict[str, float]:
        """``toe/stage``, and ``toe/kept_tokens`` at the model's nominal grid (``step_metrics``
        replaces it in the log with what the window's forwards kept)."""
        if self.module is None:
            raise RuntimeError("ToEPlugin.attach(model) must run before on_step()")
        stage = self.module.stage
        if self.module.set_step(step):
            log.info(
                "ToE stage %s -> %d at step %d: kept rate %.4g of the patch tokens after block %d "
                "(%d of %d at the model's nominal grid)",
                stage,
                self.module.stage,
                step,
                float(self.schedule.rate(self.module.stage)),
                self.schedule.block,
                self.kept_tokens(step),
                self.shape.num_patches,
            )
        return {"toe/stage": float(self.module.stage), "toe/kept_tokens": float(self.kept_tokens(step))}

    def step_metrics(self) -> dict[str, float]:
        """``toe/kept_tokens``: mean patch tokens the training forwards since the last call kept after ToE."""
        (total, samples), self._kept = self._kept, [0, 0]
        return {"toe/kept_tokens": total / samples} if samples else {}

    def kept_tokens(self, step: int, num_patches: Optional[int] = None) -> int:
        """Patch tokens kept at ``step`` of ``num_patches`` (default: the model's nominal grid)."""
        n = self.shape.num_patches if num_patches is None else num_patches
        return self.schedule.kept_tokens(n, self.schedule.stage(step))

    def plan(self, step: int, plan: list[BlockLoad]) -> list[BlockLoad]:
        patches = patches_at(self.shape, plan, self.schedule.block)  # the plan's grid, not the nominal one
        return keep_patches_after(self.shape, plan, self.schedule.block, self.kept_tokens(step, patches))

    def describe(self) -> str:
        return (
            "ToE schedule at the model's nominal grid (the log's toe/kept_tokens and cost/flops_share follow "
            "each step's actual input):\n" + self.schedule.describe(self.shape.num_patches, self.shape)
        )


def build(config: ToEConfig, context: MethodContext) -> ToEPlugin:
    return ToEPlugin(
        config.schedule(context.total_steps, context.steps_per_epoch),
        num_suffix=context.num_suffix,
        distance=config.distance,
        init=config.init,
        expand=config.expand,
        merge=config.merge,
        sparse_eval=config.sparse_eval,
    )


register("toe", ToEConfig, build)
