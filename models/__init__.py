"""Model families: DeiT / ViT classifiers through timm (``models.vit``); YOLOS comes next."""

from . import lvvit  # noqa: F401  (registers lvvit_t / lvvit_s / lvvit_m with timm)
from .vit import create_classifier, weight_decay_groups

__all__ = ["create_classifier", "weight_decay_groups"]
