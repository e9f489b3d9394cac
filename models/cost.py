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

__all__ = ["BlockLoad", "ViTShape", "forward_flops", "keep_patches_after", "patches_at", "stem_flops", "token_plan_flops"]


@dataclass(frozen=True)
class BlockLoad:
    """The work of one transformer block in one step."""

    tokens: int
    head_frac: float = 1.0
    mlp_frac: float = 1.0
    mlp_tokens: Optional[int] = None  # tokens of the MLP when a block drops tokens mid-block (Tri-Level); None: tokens


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
    stem_width: int = 0  # LV-ViT's conv stem (models/lvvit.py ConvStem) of this width; 0: a linear patch embedding
    aux_head: bool = False  # a dense head on every patch position (LV-ViT; at the full grid, also under ToE)

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
            stem_width = int(getattr(model.patch_embed, "stem_width", 0))
            return cls(
                num_patches=int(model.patch_embed.num_patches),
                embed_dim=int(model.embed_dim),
                depth=len(model.blocks),
                mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
                num_prefix=int(model.num_prefix_tokens),
                num_suffix=num_suffix,
                patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
                in_chans=int(model.patch_embed.in_chans if stem_width else model.patch_embed.proj.in_channels),
                num_classes=int(getattr(model, "num_classes", 0)),
                stem_width=stem_width,
                aux_head=isinstance(getattr(model, "aux_head", None), nn.Linear),
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
    flops = stem_flops(shape)
    for load in plan:
        t, attn_dim = load.tokens, dim * load.head_frac
        hidden = dim * shape.mlp_ratio * load.mlp_frac
        flops += 2.0 * t * dim * 3 * attn_dim  # qkv
        flops += 4.0 * t * t * attn_dim  # q @ k^T and attn @ v
        flops += 2.0 * t * attn_dim * dim  # proj
        flops += 4.0 * (t if load.mlp_tokens is None else load.mlp_tokens) * dim * hidden  # fc1 + fc2
    heads = 1 + (shape.num_patches if shape.aux_head else 0)  # the aux head runs on the restored length
    return flops + 2.0 * dim * shape.num_classes * heads


def stem_flops(shape: ViTShape) -> float:
    """Forward FLOPs of the patch embedding of one sample: a linear ``p x p`` projection, or LV-ViT's
    conv stem (7x7 s2, two 3x3 s1 at half resolution, a ``p/2`` projection; BN and ReLU left out),
    whose cost no token method reduces."""
    dim, n = shape.embed_dim, shape.num_patches
    if not shape.stem_width:
        return 2.0 * n * dim * shape.in_chans * shape.patch_size**2
    width, pixels = shape.stem_width, n * (shape.patch_size // 2) ** 2  # positions at half resolution
    return 2.0 * (pixels * (shape.in_chans * width * 49 + 2 * width * width * 9) + pixels * width * dim)


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
    return [
        replace(
            load, tokens=load.tokens - dropped, mlp_tokens=None if load.mlp_tokens is None else load.mlp_tokens - dropped
        )
        if i >= block
        else load
        for i, load in enumerate(plan)
    ]


def token_plan_flops(shape: ViTShape, toe: Optional[tuple[int, int]]) -> float:
    """Forward FLOPs with ToE after block ``toe[0]`` keeping ``toe[1]`` patches (None: dense)."""
    plan = shape.dense_plan()
    if toe is not None:
        plan = keep_patches_after(shape, plan, *toe)
    return forward_flops(shape, plan)
