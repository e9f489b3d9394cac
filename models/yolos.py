"""YOLOS (You Only Look at One Sequence) on a timm DeiT backbone, as hustvl/YOLOS builds it.

The backbone is a plain timm ``VisionTransformer``. ``num_det_tokens`` learnable detection tokens
(with learned position embeddings) are appended after the patch tokens. Heads are DETR-style
3-layer MLPs: classes (``num_classes`` + 1 no-object) and boxes (sigmoid ``cx, cy, w, h``).

Position embeddings follow YOLOS (``models/backbone.py``, ``finetune_det`` and
``InterpolateInitPosEmbed``): at build, the ImageNet table (14 x 14 for a 224 px DeiT) is
interpolated *once* to the ``init_pe_size`` grid (bicubic, ``align_corners=False``), and that
table is what training learns. Each forward resamples it from that grid to the input's grid
(only when they differ). Optional *mid* position embeddings (``mid_pe_size``, YOLOS-S/B) are a
learned table per block at their own grid (truncated-normal start), resampled the same way, and
added before every block but the first (YOLOS adds them after every block but the last).

The box and class heads, and their sigmoid, run in float32 even in a bf16/fp16 run: a bf16
sigmoid output has 8 significant bits, so coordinates above 0.5 fall on a 1/256 grid, about
5 px at 1333 px.

With Token Expansion (``toe.apply_token_expansion(model, schedule, num_suffix=model.num_det_tokens)``)
the detection tokens are suffix tokens: never selected, never merged. The mid position
embeddings of the blocks after ToE are gathered per sample with ToE's ``keep_index``, for any
batch size. In eval, ToE is off and this is the plain YOLOS.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import checkpoint

from .vit import create_classifier

__all__ = ["YOLOS", "MLP", "Float32Linear", "create_yolos", "resample_grid"]


def resample_grid(table: torch.Tensor, old: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """``[..., h*w, C]`` patch position embeddings on an ``old`` grid -> the ``new`` grid.

    Bicubic with ``align_corners=False`` and no antialiasing: YOLOS's ``F.interpolate`` call.
    """
    old, new = tuple(int(s) for s in old), tuple(int(s) for s in new)
    if old == new:
        return table
    *lead, count, dim = table.shape
    if count != old[0] * old[1]:
        raise ValueError(f"table has {count} patch positions, the grid {old} has {old[0] * old[1]}")
    grid = table.reshape(-1, old[0], old[1], dim).permute(0, 3, 1, 2)
    out = F.interpolate(grid.float(), size=new, mode="bicubic", align_corners=False).to(table.dtype)
    return out.permute(0, 2, 3, 1).reshape(*lead, new[0] * new[1], dim)


class Float32Linear(nn.Linear):
    """A linear layer that computes in float32 whatever the dtype of its weights and input.

    It stays an ``nn.Linear`` called through its own forward, so ZeRO-3 gathers its weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (in float32 with ``float32=True``)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int, *, float32: bool = False) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        linear = Float32Linear if float32 else nn.Linear
        self.layers = nn.ModuleList(linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def _grid(size: Optional[Sequence[int]], patch: int, name: str) -> Optional[tuple[int, int]]:
    if size is None:
        return None
    if len(size) != 2 or any(int(s) < patch for s in size):
        raise ValueError(f"{name} must be [height, width] in pixels, each >= the patch size {patch}, got {size!r}")
    return int(size[0]) // patch, int(size[1]) // patch  # YOLOS: H // patch_size, W // patch_size


class YOLOS(nn.Module):
    """YOLOS over ``backbone`` (a timm ViT created with ``dynamic_img_size=True``).

    ``init_pe_size`` / ``mid_pe_size``: ``[height, width]`` in pixels of the position-embedding
    grids (YOLOS's ``--init_pe_size`` / ``--mid_pe_size``). ``init_pe_size=None`` keeps the
    backbone's own grid; ``mid_pe_size=None`` with ``mid_pos_embed`` uses the ``init_pe_size`` grid.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int = 91,
        num_det_tokens: int = 100,
        init_pe_size: Optional[Sequence[int]] = None,
        mid_pos_embed: bool = False,
        mid_pe_size: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if getattr(backbone, "num_prefix_tokens", None) != 1 or getattr(backbone, "no_embed_class", False):
            raise ValueError("YOLOS needs a backbone with exactly one class token that has a position embedding")
        if not getattr(backbone, "dynamic_img_size", False):
            raise ValueError("create the backbone with dynamic_img_size=True (any input size, NHWC patch grid)")
        if mid_pe_size is not None and not mid_pos_embed:
            raise ValueError("mid_pe_size is given but mid_pos_embed is off")
        self.backbone = backbone
        self.num_classes, self.num_det_tokens = num_classes, num_det_tokens
        dim = backbone.embed_dim
        patch = backbone.patch_embed.patch_size[0]
        pretrained_grid = tuple(backbone.patch_embed.grid_size)
        self.pe_grid = _grid(init_pe_size, patch, "init_pe_size") or pretrained_grid
        if self.pe_grid != pretrained_grid:  # once, at build: the learned table lives on the init_pe_size grid
            with torch.no_grad():
                table = backbone.pos_embed.data
                patches = resample_grid(table[:, 1:], pretrained_grid, self.pe_grid)
                backbone.pos_embed = nn.Parameter(torch.cat([table[:, :1], patches], dim=1))
            # timm's metadata follows the table, so ViTShape.from_model reads this grid
            backbone.patch_embed.set_input_size(img_size=(self.pe_grid[0] * patch, self.pe_grid[1] * patch))
        self.det_token = nn.Parameter(torch.zeros(1, num_det_tokens, dim))
        self.det_pos_embed = nn.Parameter(torch.zeros(1, num_det_tokens, dim))
        trunc_normal_(self.det_token, std=0.02)
        trunc_normal_(self.det_pos_embed, std=0.02)
        depth = len(backbone.blocks)
        if mid_pos_embed:  # class + patch part on the mid grid, detection part; one per block 1..depth-1
            self.mid_grid = _grid(mid_pe_size, patch, "mid_pe_size") or self.pe_grid
            count = 1 + self.mid_grid[0] * self.mid_grid[1]
            self.mid_pos_embed = nn.Parameter(torch.zeros(depth - 1, 1, count, dim))
            self.mid_det_pos_embed = nn.Parameter(torch.zeros(depth - 1, 1, num_det_tokens, dim))
            trunc_normal_(self.mid_pos_embed, std=0.02)
            trunc_normal_(self.mid_det_pos_embed, std=0.02)
        else:
            self.mid_grid = None
            self.mid_pos_embed = self.mid_det_pos_embed = None
        self.class_embed = MLP(dim, dim, num_classes + 1, 3, float32=True)
        self.bbox_embed = MLP(dim, dim, 4, 3, float32=True)

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
        # YOLOS main.py build_optimizer skips backbone.no_weight_decay() = {pos_embed, cls_token,
        # det_token} (det_pos_embed is part of its pos_embed); its mid_pos_embed is decayed
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | {"det_token", "det_pos_embed"}

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[1, 1 + h*w + S, C]``: class, patch (resampled from the learned grid) and detection embeddings."""
        table = self.backbone.pos_embed
        patches = resample_grid(table[:, 1:], self.pe_grid, grid)
        return torch.cat([table[:, :1], patches, self.det_pos_embed], dim=1)

    def mid_position_embeddings(self, grid: tuple[int, int]) -> Optional[torch.Tensor]:
        """``[depth - 1, 1, 1 + h*w + S, C]``, or None without mid position embeddings."""
        if self.mid_pos_embed is None:
            return None
        table = self.mid_pos_embed
        patches = resample_grid(table[:, :, 1:], self.mid_grid, grid)
        return torch.cat([table[:, :, :1], patches, self.mid_det_pos_embed], dim=2)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's activation checkpointing of the backbone's blocks (``model.grad_checkpointing``)."""
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        bb = self.backbone
        x = bb.patch_embed(images)  # [B, H', W', C]
        batch, height, width, dim = x.shape
        cls = bb.cls_token.expand(batch, -1, -1)
        det = self.det_token.expand(batch, -1, -1)
        x = torch.cat([cls, x.reshape(batch, height * width, dim), det], dim=1)
        x = x + self.position_embeddings((height, width))
        x = bb.norm_pre(bb.pos_drop(x))
        mid = self.mid_position_embeddings((height, width))
        toe = getattr(self, "token_expansion", None)
        for i, block in enumerate(bb.blocks):
            if mid is not None and i > 0:
                pos = mid[i - 1]
                if toe is not None and toe.keep_index is not None and i > toe.schedule.block:
                    pos = toe.gather_kept(pos)  # per sample: follows this forward's selection
                x = x + pos
            x = checkpoint(block, x) if bb.grad_checkpointing and torch.is_grad_enabled() else block(x)
        tokens = bb.norm(x)[:, -self.num_det_tokens :]
        with torch.autocast(tokens.device.type, enabled=False):  # heads and sigmoid in float32
            tokens = tokens.float()
            return {"pred_logits": self.class_embed(tokens), "pred_boxes": self.bbox_embed(tokens).sigmoid()}


def create_yolos(
    name: str = "deit_tiny_patch16_224",
    *,
    num_classes: int = 91,
    num_det_tokens: int = 100,
    img_size: int = 224,
    init_pe_size: Optional[Sequence[int]] = None,
    mid_pos_embed: bool = False,
    mid_pe_size: Optional[Sequence[int]] = None,
    drop_path: float = 0.0,
    checkpoint=None,
    **kwargs,
) -> YOLOS:
    """YOLOS on ``timm.create_model(name)``; the backbone's weights only from a local ``checkpoint`` (a file
    or a state_dict: ``models.pretrained.load_pretrained``; a classifier's head is ignored).

    ``img_size`` is the grid of the checkpoint's position embeddings (224 for an ImageNet DeiT);
    ``init_pe_size`` the grid YOLOS interpolates them to once and then learns.
    """
    backbone = create_classifier(
        name, num_classes=0, img_size=img_size, drop_path=drop_path, checkpoint=checkpoint, dynamic_img_size=True, **kwargs
    )
    return YOLOS(
        backbone,
        num_classes=num_classes,
        num_det_tokens=num_det_tokens,
        init_pe_size=init_pe_size,
        mid_pos_embed=mid_pos_embed,
        mid_pe_size=mid_pe_size,
    )
