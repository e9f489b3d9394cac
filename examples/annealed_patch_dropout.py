"""A complete training method in one file: PatchDropout whose drop rate falls linearly to 0.

docs/write_a_method.md walks through it; tests/test_write_a_method.py trains with it. A recipe loads it
by module path (from the repository root) and lists it under ``methods:`` like a built-in method:

    method_modules: [examples.annealed_patch_dropout]
    methods: {annealed_patch_dropout: {start: 0.5, until: 0.8}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
from timm.layers import PatchDropout

from methods import Declaration, MethodContext, TrainingPlugin, register
from models.cost import BlockLoad, ViTShape, keep_patches_after, patches_at

NAME = "annealed_patch_dropout"


@dataclass
class AnnealedPatchDropoutConfig:
    start: float = 0.5  # the drop rate at step 0
    until: float = 0.8  # the fraction of the run at which the rate reaches 0 (all tokens from there on)

    def __post_init__(self) -> None:  # a ValueError here names the key: methods.annealed_patch_dropout.start
        if not 0 <= self.start < 1:
            raise ValueError(f"start must be in [0, 1), got {self.start}")
        if not 0 < self.until <= 1:
            raise ValueError(f"until must be in (0, 1], got {self.until}")

    def declare(self) -> Declaration:
        # it sets the token count before block 0: the registry refuses another method that does (PatchDropout,
        # Budgeted Training's input grid) and the progress bar shows the rate
        return Declaration(token_sites=frozenset({0}), progress=(f"{NAME}/rate",))


def rate_at(step: int, total_steps: int, start: float, until: float) -> float:
    """The pure core: the drop rate of a 0-based global optimizer step. Tests call it directly; a resumed
    run gets the same rate at the same step, so the plug-in holds no state."""
    end = max(1, round(until * total_steps))
    return start * max(0.0, 1.0 - step / end)


def kept_patches(num_patches: int, rate: float) -> int:
    """The patch tokens timm's ``PatchDropout`` keeps of ``num_patches`` (its own expression)."""
    return max(1, int(num_patches * (1.0 - rate)))


class AnnealedPatchDropout(TrainingPlugin):
    name = NAME

    def __init__(self, config: AnnealedPatchDropoutConfig, total_steps: int) -> None:
        self.config, self.total_steps = config, total_steps
        self.module: Optional[PatchDropout] = None
        self.shape: Optional[ViTShape] = None

    def rate(self, step: int) -> float:
        return rate_at(step, self.total_steps, self.config.start, self.config.until)

    def attach(self, model: nn.Module) -> None:
        """Surgery before the engine wraps the model: timm's own PatchDropout (no parameters) in the slot timm
        keeps for it."""
        if not isinstance(getattr(model, "patch_drop", None), nn.Identity):
            raise TypeError(f"{type(model).__name__} has no empty patch_drop slot (a timm VisionTransformer)")
        self.shape = ViTShape.from_model(model)
        self.module = PatchDropout(self.config.start, num_prefix_tokens=self.shape.num_prefix)
        model.patch_drop = self.module

    def on_step(self, step: int) -> dict[str, float]:
        """Before the step's first forward: the step's rate (evaluation keeps every token: timm's module is
        the identity in eval mode)."""
        assert self.module is not None, "attach runs first"
        self.module.prob = self.rate(step)
        return {f"{NAME}/rate": self.module.prob}

    def plan(self, step: int, plan: list[BlockLoad]) -> list[BlockLoad]:
        """The cost model: blocks 0 .. depth-1 see only the kept patches, on whatever grid the plan is for."""
        assert self.shape is not None, "attach runs first"
        return keep_patches_after(self.shape, plan, 0, kept_patches(patches_at(self.shape, plan, 0), self.rate(step)))


def build(config: AnnealedPatchDropoutConfig, context: MethodContext) -> AnnealedPatchDropout:
    if context.num_suffix:
        raise ValueError(f"methods.{NAME}: the model has suffix tokens (YOLOS detection tokens) that would be dropped")
    return AnnealedPatchDropout(config, context.total_steps)


register(NAME, AnnealedPatchDropoutConfig, build)
