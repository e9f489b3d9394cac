"""YOLOS (You Only Look at One Sequence) on a timm DeiT backbone.

The backbone is a plain timm ``VisionTransformer``. ``num_det_tokens`` learnable detection
tokens (with learned position embeddings) are appended after the patch tokens. Patch position
embeddings are resampled bicubically (timm's ``resample_abs_pos_embed``) to the input's grid on
the fly. Optional *mid* position embeddings are added before every block but the first (YOLOS
adds them after every block but the last). Heads are DETR-style 3-layer MLPs: classes
(``num_classes`` + 1 no-object) and boxes (sigmoid ``cx, cy, w, h``).

With Token Expansion (``toe.apply_token_expansion(model, schedule, num_suffix=model.num_det_tokens)``)
the detection tokens are suffix tokens: never selected, never merged. The mid position
embeddings of the blocks after ToE are gathered per sample with ToE's ``keep_index``, for any
batch size. In eval, ToE is off and this is the plain YOLOS.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_

from .vit import create_classifier

__all__ = ["YOLOS", "MLP", "create_yolos"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class YOLOS(nn.Module):
    def __init__(self, backbone: nn.Module, *, num_classes: int = 91, num_det_tokens: int = 100,
                 mid_pos_embed: bool = False) -> None:
        super().__init__()
        if getattr(backbone, "num_prefix_tokens", None) != 1 or getattr(backbone, "no_embed_class", False):
            raise ValueError("YOLOS needs a backbone with exactly one class token that has a position embedding")
        if not getattr(backbone, "dynamic_img_size", False):
            raise ValueError("create the backbone with dynamic_img_size=True (any input size, NHWC patch grid)")
        self.backbone = backbone
        self.num_classes, self.num_det_tokens = num_classes, num_det_tokens
        dim = backbone.embed_dim
        self.det_token = nn.Parameter(torch.zeros(1, num_det_tokens, dim))
        self.det_pos_embed = nn.Parameter(torch.zeros(1, num_det_tokens, dim))
        trunc_normal_(self.det_token, std=0.02)
        trunc_normal_(self.det_pos_embed, std=0.02)
        depth = len(backbone.blocks)
        if mid_pos_embed:  # class + patch part (resampled like pos_embed) and detection part, per block 1..depth-1
            self.mid_pos_embed = nn.Parameter(torch.zeros(depth - 1, 1, backbone.pos_embed.shape[1], dim))
            self.mid_det_pos_embed = nn.Parameter(torch.zeros(depth - 1, 1, num_det_tokens, dim))
            trunc_normal_(self.mid_pos_embed, std=0.02)
            trunc_normal_(self.mid_det_pos_embed, std=0.02)
        else:
            self.mid_pos_embed = self.mid_det_pos_embed = None
        self.class_embed = MLP(dim, dim, num_classes + 1, 3)
        self.bbox_embed = MLP(dim, dim, 4, 3)

    # what toe.apply_token_expansion and toe.cost read off a ViT
    @property
    def blocks(self) -> nn.Sequential:
        return self.backbone.blocks

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def patch_embed(self) -> nn.Module:
        return self.backbone.patch_embed

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def no_weight_decay(self) -> set[str]:
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | {"det_token", "det_pos_embed"}
        return names | ({"mid_pos_embed", "mid_det_pos_embed"} if self.mid_pos_embed is not None else set())

    def _grid_pos(self, pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``[n, 1 + N0, C]`` class + patch position embeddings resampled to ``grid`` (bicubic)."""
        return resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        bb = self.backbone
        x = bb.patch_embed(images)  # [B, H', W', C]
        batch, height, width, dim = x.shape
        pos = self._grid_pos(bb.pos_embed, (height, width))
        cls = bb.cls_token.expand(batch, -1, -1)
        det = self.det_token.expand(batch, -1, -1)
        x = torch.cat([cls, x.reshape(batch, height * width, dim), det], dim=1)
        x = x + torch.cat([pos, self.det_pos_embed], dim=1)
        x = bb.norm_pre(bb.pos_drop(x))
        toe = getattr(self, "token_expansion", None)
        for i, block in enumerate(bb.blocks):
            if self.mid_pos_embed is not None and i > 0:
                mid = torch.cat([self._grid_pos(self.mid_pos_embed[i - 1], (height, width)),
                                 self.mid_det_pos_embed[i - 1]], dim=1)
                if toe is not None and toe.keep_index is not None and i > toe.schedule.block:
                    mid = toe.gather_kept(mid)  # per sample: follows this forward's selection
                x = x + mid
            x = block(x)
        tokens = bb.norm(x)[:, -self.num_det_tokens:]
        return {"pred_logits": self.class_embed(tokens), "pred_boxes": self.bbox_embed(tokens).sigmoid()}


def create_yolos(name: str = "deit_tiny_patch16_224", *, num_classes: int = 91, num_det_tokens: int = 100,
                 img_size: int = 224, mid_pos_embed: bool = False, drop_path: float = 0.0,
                 checkpoint: Optional[str] = None, **kwargs) -> YOLOS:
    """YOLOS on ``timm.create_model(name)``; the backbone's weights only from a local ``checkpoint``."""
    backbone = create_classifier(name, num_classes=0, img_size=img_size, drop_path=drop_path, checkpoint=checkpoint,
                                 dynamic_img_size=True, **kwargs)
    return YOLOS(backbone, num_classes=num_classes, num_det_tokens=num_det_tokens, mid_pos_embed=mid_pos_embed)
