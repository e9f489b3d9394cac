"""PatchDropout (Liu et al. 2022, "PatchDropout: Economizing Vision Transformers Using Patch
Dropout"): random patch tokens dropped after the position embedding, in training only.

The simplest rival of ToE a timm user would pick: timm's ``VisionTransformer`` has it built in
(``patch_drop_rate``). The plug-in puts timm's own ``PatchDropout`` module in the model's
``patch_drop`` slot at ``attach`` (no parameters, so ZeRO and strict state_dict loads are
unaffected) and adds its cost model. Evaluation keeps every token. Each sample draws its own
patches from torch's global RNG, whose per-rank state the checkpoint saves, so resume stays exact.

    methods: {patch_dropout: {rate: 0.5}}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from timm.layers import PatchDropout

from models.cost import BlockLoad, ViTShape, keep_patches_after, patches_at

from .base import Declaration, MethodContext, TrainingPlugin
from .registry import register

__all__ = ["PatchDropoutConfig", "PatchDropoutPlugin", "kept_patches"]


def kept_patches(num_patches: int, rate: float) -> int:
    """Patch tokens timm's ``PatchDropout`` keeps of ``num_patches`` (its own float expression)."""
    return max(1, int(num_patches * (1.0 - rate)))


@dataclass
class PatchDropoutConfig:
    summary = ("rate",)  # the options a report names the method by (not a recipe key: no annotation)
    rate: float = 0.5  # fraction of the patch tokens dropped in every training forward

    def __post_init__(self) -> None:
        if not 0 <= self.rate < 1:
            raise ValueError(f"rate must be in [0, 1) (timm's PatchDropout), got {self.rate}")

    def declare(self) -> Declaration:
        return Declaration(
            token_sites=frozenset({0}),  # right after the patch embedding, before block 0
            progress=("patch_dropout/kept_tokens",),
        )


class PatchDropoutPlugin(TrainingPlugin):
    name = "patch_dropout"

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.shape: ViTShape | None = None

    def attach(self, model: nn.Module) -> None:
        if not isinstance(getattr(model, "patch_drop", None), nn.Identity):
            raise TypeError(
                f"{type(model).__name__} has no empty patch_drop slot (a timm VisionTransformer built "
                f"without patch_drop_rate): PatchDropout cannot be inserted"
            )
        self.shape = ViTShape.from_model(model)
        if self.shape.num_suffix:
            raise ValueError("PatchDropout would drop suffix tokens (YOLOS detection tokens): not supported")
        model.patch_drop = PatchDropout(self.rate, num_prefix_tokens=self.shape.num_prefix)

    def on_step(self, step: int) -> dict[str, float]:
        return {"patch_dropout/kept_tokens": float(kept_patches(self.shape.num_patches, self.rate))}

    def plan(self, step: int, plan: list[BlockLoad]) -> list[BlockLoad]:
        return keep_patches_after(self.shape, plan, 0, kept_patches(patches_at(self.shape, plan, 0), self.rate))


def build(config: PatchDropoutConfig, context: MethodContext) -> PatchDropoutPlugin:
    if context.num_suffix:
        raise ValueError(
            "methods.patch_dropout: the model has suffix tokens (YOLOS detection tokens), which "
            "timm's PatchDropout would drop; use it on classifiers only"
        )
    return PatchDropoutPlugin(config.rate)


register("patch_dropout", PatchDropoutConfig, build)
