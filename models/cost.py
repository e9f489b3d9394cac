"""Analytic cost model of a ViT training step, shared by every method and by ``toe.ToESchedule``.

A step's work is described as a *plan*: one ``BlockLoad`` per transformer block (tokens it sees,
fraction of attention heads and MLP channels that are active). Plug-ins edit the plan for a step
(ToE shrinks the tokens of the blocks after its block; a head/MLP growth method would shrink the
fractions; token pruning at several blocks would shrink tokens there), so any combination of
methods gets one theoretical FLOPs figure. Backward costs about twice forward for every matmul
here, so forward FLOPs ratios are training FLOPs ratios.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch.nn as nn

__all__ = ["BlockLoad", "ViTShape", "forward_flops", "keep_patches_after", "patches_at", "token_plan_flops"]


@dataclass(frozen=True)
class BlockLoad:
    """The work of one transformer block in one step."""

    tokens: int
    head_frac: float = 1.0
    mlp_frac: float = 1.0


@dataclass(frozen=True)
class ViTShape:
    """What the cost model needs to know about a ViT."""

    num_patches: int
    embed_dim: int
    depth: int
    mlp_ratio: float = 4.0
    num_prefix: int = 1
    num_suffix: int = 0
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches + self.num_suffix

    def dense_plan(self) -> list[BlockLoad]:
        return [BlockLoad(self.num_tokens) for _ in range(self.depth)]

    @classmethod
    def vit_small(cls, num_patches: int = 196) -> "ViTShape":
        return cls(num_patches=num_patches, embed_dim=384, depth=12)

    def with_patches(self, num_patches: int) -> "ViTShape":
        """The same ViT on another input grid (detection inputs vary per batch)."""
        return self if num_patches == self.num_patches else replace(self, num_patches=int(num_patches))

    @classmethod
    def from_model(cls, model: nn.Module, num_suffix: int = 0) -> "ViTShape":
        """Read the shape off a timm ``VisionTransformer`` (or anything with the same attributes).

        ``num_patches`` is the model's nominal grid (``patch_embed.num_patches``: the input size it
        was built for; YOLOS: its position-embedding grid). For inputs of another size, use
        ``with_patches``; ``methods.PluginStack`` does so for every training forward.
        """
        try:
            block = model.blocks[0]
            patch = model.patch_embed.patch_size
            return cls(
                num_patches=int(model.patch_embed.num_patches),
                embed_dim=int(model.embed_dim),
                depth=len(model.blocks),
                mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
                num_prefix=int(model.num_prefix_tokens),
                num_suffix=num_suffix,
                patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
                in_chans=int(model.patch_embed.proj.in_channels),
                num_classes=int(getattr(model, "num_classes", 0)),
            )
        except AttributeError as err:
            raise TypeError(f"{type(model).__name__} does not look like a timm VisionTransformer: {err}") from err


def forward_flops(shape: ViTShape, plan: Optional[Sequence[BlockLoad]] = None) -> float:
    """Forward FLOPs (2 per multiply-add) of one sample: patch embedding, blocks, classifier head.

    Norms, GELU, softmax and residual adds are left out (a few percent of a ViT, same share at
    every token count).
    """
    plan = shape.dense_plan() if plan is None else plan
    if len(plan) != shape.depth:
        raise ValueError(f"plan has {len(plan)} blocks, the model has {shape.depth}")
    dim = shape.embed_dim
    flops = 2.0 * shape.num_patches * dim * shape.in_chans * shape.patch_size ** 2
    for load in plan:
        t, attn_dim = load.tokens, dim * load.head_frac
        hidden = dim * shape.mlp_ratio * load.mlp_frac
        flops += 2.0 * t * dim * 3 * attn_dim  # qkv
        flops += 4.0 * t * t * attn_dim  # q @ k^T and attn @ v
        flops += 2.0 * t * attn_dim * dim  # proj
        flops += 4.0 * t * dim * hidden  # fc1 + fc2
    return flops + 2.0 * dim * shape.num_classes


def patches_at(shape: ViTShape, plan: Sequence[BlockLoad], block: int) -> int:
    """Patch tokens that enter block ``block`` (0-based) in ``plan``: its tokens less prefix and suffix."""
    return plan[block].tokens - shape.num_prefix - shape.num_suffix


def keep_patches_after(shape: ViTShape, plan: Sequence[BlockLoad], block: int, kept_patches: int) -> list[BlockLoad]:
    """The plan with only ``kept_patches`` of the patch tokens that reach block ``block`` entering blocks
    ``block`` .. depth-1 (0-based). The patch count is the plan's own, so a plan for another grid
    (``shape.with_patches(N).dense_plan()``) works the same."""
    dropped = patches_at(shape, plan, block) - kept_patches
    if dropped < 0:
        raise ValueError(f"cannot keep {kept_patches} of {patches_at(shape, plan, block)} patch tokens")
    return [replace(load, tokens=load.tokens - dropped) if i >= block else load for i, load in enumerate(plan)]


def token_plan_flops(shape: ViTShape, toe: Optional[tuple[int, int]]) -> float:
    """Forward FLOPs with ToE after block ``toe[0]`` keeping ``toe[1]`` patches (None: dense)."""
    plan = shape.dense_plan()
    if toe is not None:
        plan = keep_patches_after(shape, plan, *toe)
    return forward_flops(shape, plan)
