"""DeiT / ViT classifiers through timm, and AdamW parameter groups as DeiT trains them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from timm.models import VisionTransformer

__all__ = ["create_classifier", "weight_decay_groups"]


def create_classifier(name: str, *, num_classes: int, img_size: int, drop_path: float = 0.0,
                      checkpoint: Optional[str] = None, **kwargs: Any) -> VisionTransformer:
    """``timm.create_model(name, ...)``; weights only from a local ``checkpoint`` file (no downloads).

    A checkpoint whose classifier head has another number of classes loads without the head.
    """
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size,
                              drop_path_rate=drop_path, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model {name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"model.checkpoint {checkpoint} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
        own = model.state_dict()
        # a classifier head of another size (or none, for a detection backbone) is not loaded
        head = [k for k in state if k.startswith(("head.", "head_dist.")) and (k not in own or state[k].shape != own[k].shape)]
        for key in head:
            del state[key]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {k for k in own if k.startswith(("head.", "head_dist."))}:
            raise ValueError(f"{checkpoint} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
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
