"""DeiT / ViT classifiers through timm, and AdamW parameter groups as DeiT trains them."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import timm
import torch
import torch.nn as nn
from timm.models import VisionTransformer

__all__ = ["create_classifier", "weight_decay_groups"]


def create_classifier(
    name: str,
    *,
    num_classes: int,
    img_size: int,
    drop_path: float = 0.0,
    checkpoint: Optional[Union[str, Mapping[str, torch.Tensor]]] = None,
    reinit_head: bool = False,
    **kwargs: Any,
) -> VisionTransformer:
    """``timm.create_model(name, ...)``; weights only from a local ``checkpoint`` (no downloads).

    ``checkpoint``: a weights file or a state_dict, fitted by ``models.pretrained.load_pretrained``:
    position embeddings resampled to this grid, a classifier head of another class count
    re-initialised (always with ``reinit_head``), anything else that differs refused (``PretrainedError``).
    """
    model = timm.create_model(
        name, pretrained=False, num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path, **kwargs
    )
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model {name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    if checkpoint is not None:
        from .pretrained import load_pretrained

        load_pretrained(model, checkpoint, reinit_head=reinit_head)
    return model


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, position embeddings and class/distillation tokens."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
