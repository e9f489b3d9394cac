"""Model families: DeiT / ViT classifiers through timm (``models.vit``); YOLOS comes next."""
from .vit import create_classifier, weight_decay_groups

__all__ = ["create_classifier", "weight_decay_groups"]
