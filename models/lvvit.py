"""LV-ViT-T / S / M (Jiang et al., NeurIPS 2021, "All Tokens Matter: Token Labeling for Training Better
Vision Transformers") as a timm ``VisionTransformer``: a convolutional stem, residual branches divided by
a constant, and an auxiliary dense head on every patch token.

Contract: ``/work/shared/LVVIT_SPEC.md`` ("Models"), read against zihangJiang/TokenLabeling
``tlt/models/lvvit.py`` / ``tlt/models/layers.py`` (HEAD 9dbfd59). Being a ``VisionTransformer`` (stem
as ``embed_layer``, a ``Block`` subclass as ``block_fn``), the model works unchanged with
``create_classifier``, ``toe/surgery.py`` (``.blocks``, ``num_prefix_tokens = 1``) and the cost model.

- Training forward with token labelling (``dense_outputs``, set by the method):
  ``(cls_logits [B, K], aux_logits [B, N, K])``; without, the eval rule below. MixToken (when the
  ``token_labelling`` method fills ``mix_mask``) swaps the patch tokens inside one box with the
  flipped batch right after the stem, and swaps the box region of ``aux_logits`` back, so position
  ``n`` of sample ``i`` always predicts image ``i``'s label there (spec "MixToken" 1-3). The official
  forward also returns the box; here the method that drew it keeps it.
- Evaluation forward: ``cls_logits + 0.5 * max_n aux_logits`` (``lvvit.py`` ``forward``, eval branch).
- ToE's zero-pad restore (``methods.toe`` with ``restore``) is a forward hook on ``self.norm``: the
  heads then see every patch position (spec "ToE on LV-ViT").

    timm.create_model("lvvit_s", num_classes=1000)  # after ``import models``
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import VisionTransformer, checkpoint_seq, register_model
from timm.models.vision_transformer import Block

__all__ = [
    "LVViT",
    "ConvStem",
    "ScaledResidualBlock",
    "LVVIT_SHAPES",
    "broadcast_batchnorm",
    "lvvit_t",
    "lvvit_s",
    "lvvit_m",
]

# name -> (embed dim, depth, heads, residual divisor); lvvit.py registrations (TokenLabeling 9dbfd59):
# lvvit_t / lvvit_s / lvvit_m, all with mlp_ratio 3, qkv_bias False, stem "4_2" of width 64
LVVIT_SHAPES = {
    "lvvit_t": (240, 12, 4, 1.0),
    "lvvit_s": (384, 16, 6, 2.0),
    "lvvit_m": (512, 20, 8, 2.0),
}
STEM_WIDTH = 64  # layers.PatchEmbed4_2: new_patch_size 4 -> convs of 64 channels (LV-ViT-L: 128)


class ConvStem(nn.Module):
    """``layers.PatchEmbed4_2``: conv 7x7 s2 (no bias) + BN + ReLU, twice conv 3x3 s1 (no bias) + BN +
    ReLU, then a projection conv of kernel = stride = ``patch_size / 2`` with bias (8 at patch 16:
    224 px -> 14 x 14 tokens). Returns ``[B, N, D]`` and takes timm's ``PatchEmbed`` keyword
    arguments, so it plugs in as a ``VisionTransformer``'s ``embed_layer``.

    ``patch_size`` must be even (the first conv halves the image); the CPU variants use 4 on 32 px.
    """

    def __init__(
        self,
        img_size: Any = 224,
        patch_size: Any = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        bias: bool = True,
        stem_width: int = STEM_WIDTH,
        dynamic_img_pad: bool = False,
        strict_img_size: bool = True,
        output_fmt: Optional[str] = None,
        norm_layer=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        img = img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        patch = patch_size if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
        if patch[0] != patch[1] or patch[0] < 2 or patch[0] % 2:
            raise ValueError(
                f"ConvStem needs a square, even patch size >= 2 (a stride-2 conv, then a "
                f"patch/2 projection), got {patch_size!r}"
            )
        if img[0] % patch[0] or img[1] % patch[1]:
            raise ValueError(f"img_size {img_size!r} is not a multiple of patch_size {patch[0]}")
        if output_fmt not in (None, "NLC") or dynamic_img_pad or norm_layer is not None:
            raise ValueError("ConvStem has no dynamic image size, padding or embed norm (LV-ViT has none)")
        dd = {"device": device, "dtype": dtype}
        self.img_size, self.patch_size = tuple(img), tuple(patch)
        self.grid_size = (img[0] // patch[0], img[1] // patch[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans, self.stem_width = int(in_chans), int(stem_width)
        self.strict_img_size = strict_img_size
        width = self.stem_width
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False, **dd),
            nn.BatchNorm2d(width, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False, **dd),
            nn.BatchNorm2d(width, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False, **dd),
            nn.BatchNorm2d(width, **dd),
            nn.ReLU(inplace=True),
        )
        half = patch[0] // 2
        self.proj = nn.Conv2d(width, embed_dim, half, stride=half, bias=bias, **dd)

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not the model's image size {self.img_size}")
        return self.proj(self.conv(x)).flatten(2).transpose(1, 2)


class ScaledResidualBlock(Block):
    """timm's pre-LN ``Block`` with both residual branches divided by a constant
    (``lvvit.py`` ``Block.skip_lam``: ``x + drop_path(attn(norm1(x))) / skip_lam``, same for the MLP)."""

    def __init__(self, *args: Any, residual_divisor: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.residual_divisor = float(residual_divisor)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        x = (
            x
            + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
            / self.residual_divisor
        )
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) / self.residual_divisor


class LVViT(VisionTransformer):
    """LV-ViT: ``VisionTransformer`` with ``ConvStem``, ``ScaledResidualBlock`` and ``aux_head``."""

    dense_head = True  # methods.toe restores every patch position before the heads; token_labelling needs it
    # training returns (cls_logits, aux_logits) for the token-labelling loss (set by methods.token_labelling);
    # otherwise the training output is the eval rule's, so the model trains as a plain classifier
    dense_outputs = False

    def __init__(
        self,
        *,
        residual_divisor: float = 1.0,
        stem_width: int = STEM_WIDTH,
        embed_dim: int = 384,
        depth: int = 16,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        num_classes: int = 1000,
        aux_weight: float = 0.5,
        **kwargs: Any,
    ) -> None:
        for key in (
            "embed_layer",
            "block_fn",
            "norm_layer",
            "global_pool",
            "class_token",
            "no_embed_class",
            "reg_tokens",
            "pre_norm",
            "fc_norm",
            "dynamic_img_size",
        ):
            if key in kwargs:
                raise ValueError(f"LV-ViT fixes {key!r}; it cannot be set")
        super().__init__(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            num_classes=num_classes,
            global_pool="token",
            class_token=True,
            embed_layer=partial(ConvStem, stem_width=stem_width),
            block_fn=partial(ScaledResidualBlock, residual_divisor=residual_divisor),
            norm_layer=partial(nn.LayerNorm, eps=1e-5),  # lvvit.py: nn.LayerNorm default eps (timm ViT: 1e-6)
            weight_init="skip",
            **kwargs,
        )
        self.residual_divisor = float(residual_divisor)
        self.aux_weight = float(aux_weight)  # lvvit.py eval: x_cls + 0.5 * x_aux.max(1)[0]
        self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # MixToken box over the patch grid (1: token taken from the flipped batch); zeros: no mixing.
        # Not persistent: nothing about it is in the state_dict, so checkpoints load into the plain model.
        self.register_buffer("mix_mask", torch.zeros(self.patch_embed.num_patches, dtype=torch.bool), persistent=False)
        self._init_lvvit()

    def _init_lvvit(self) -> None:
        """``lvvit.py`` ``_init_weights``: trunc-normal 0.02 for Linear weights, ``pos_embed`` and
        ``cls_token``; zero biases; LayerNorm 1 / 0; convs and BN at PyTorch defaults."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)  # timm's ViT draws it with std 1e-6
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _mix(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]``: inside the MixToken box, sample ``i`` takes sample ``B-1-i``'s tokens. Applied
        twice it is the identity, which is how the aux logits are swapped back."""
        return torch.where(self.mix_mask[None, :, None], tokens.flip(0), tokens)

    def forward_features(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("LV-ViT takes no attention mask")
        x = self.patch_embed(x)
        if self.training:
            x = self._mix(x)  # before the class token and position embedding (lvvit.py forward)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        # Token Expansion (a pre-hook on blocks[l]) acts inside, in training, and again when a checkpointed
        # block is recomputed in backward (the same selection: checkpointing restores the RNG)
        x = checkpoint_seq(self.blocks, x) if self.grad_checkpointing and torch.is_grad_enabled() else self.blocks(x)
        return self.norm(x)  # ToE's restore (a forward hook on norm) gives every patch position back

    def forward_heads(self, x: torch.Tensor):
        cls_logits = self.head(self.head_drop(x[:, 0]))
        aux_logits = self.aux_head(x[:, self.num_prefix_tokens :])
        if self.training and self.dense_outputs:
            return cls_logits, self._mix(aux_logits)
        return cls_logits + self.aux_weight * aux_logits.max(1).values

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        return x[:, 0] if pre_logits else self.forward_heads(x)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        return self.forward_heads(self.forward_features(x))


def broadcast_batchnorm(model: nn.Module, src: int = 0) -> int:
    """Copy the BatchNorm running statistics of rank ``src`` to every rank; returns the tensors sent.

    The stem's BN is not synchronised (official ``--dist-bn ''``), so each rank's running statistics
    drift apart: evaluation would differ per rank and a checkpoint (rank 0's buffers) would not resume
    what rank 1 had. Broadcasting after every optimizer step makes them rank 0's everywhere (the EMA
    copy then averages the same statistics on every rank). A no-op without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    tensors = [
        buffer
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]
    for tensor in tensors:
        dist.broadcast(tensor, src)
    return len(tensors)


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> LVViT:
    if pretrained:
        raise ValueError(f"{name}: no pretrained weights (nothing is downloaded); use model.checkpoint")
    dim, depth, heads, divisor = LVVIT_SHAPES[name]
    options = dict(embed_dim=dim, depth=depth, num_heads=heads, residual_divisor=divisor)
    options.update(kwargs)  # the CPU variants shrink depth / width / stem / patch size
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory arguments
        options.pop(key, None)
    return LVViT(**options)


@register_model
def lvvit_t(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-T: D 240, 12 blocks, 4 heads, residual divisor 1 (8.53M parameters)."""
    return _create("lvvit_t", pretrained, **kwargs)


@register_model
def lvvit_s(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-S: D 384, 16 blocks, 6 heads, residual divisor 2 (26.15M parameters)."""
    return _create("lvvit_s", pretrained, **kwargs)


@register_model
def lvvit_m(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-M: D 512, 20 blocks, 8 heads, residual divisor 2 (55.83M parameters)."""
    return _create("lvvit_m", pretrained, **kwargs)
