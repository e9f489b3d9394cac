"""Training speed-up methods as plug-ins of one seam (``methods.base``), found by name in the
registry (``methods.registry``); each module registers itself on import.

- ``toe``: Token Expansion (the adapter over ``toe/``)
- ``patch_dropout``: timm's PatchDropout, the simplest rival
- ``budgeted``: Budgeted Training (heads, MLP width and input grid grow to a training budget)
- ``efficienttrain``: EfficientTrain (ICCV 2023): low-frequency crop and RandAugment magnitude by stage
- ``token_labelling``: LV-ViT's token labelling with MixToken (dense teacher labels, its own loss)
- ``trilevel_examples``: Tri-Level E-ViT's example level (a forgetting-scored subset of the data)
- ``trilevel_tokens``: Tri-Level E-ViT's token and attention-connection levels (class-attention pruning, top-k mask)
"""

from . import (  # noqa: F401  (registration)
    budgeted,  # noqa: F401  (registration)
    efficienttrain,
    patch_dropout,
    toe,
    token_labelling,  # noqa: F401  (registration)
    trilevel_examples,  # noqa: F401  (registration)
    trilevel_tokens,  # noqa: F401  (registration)
)
from .base import Batch, Declaration, MethodContext, PluginStack, TrainingPlugin
from .registry import build_stack, check_combination, method, register, registered

__all__ = [
    "Batch",
    "Declaration",
    "MethodContext",
    "PluginStack",
    "TrainingPlugin",
    "build_stack",
    "check_combination",
    "method",
    "register",
    "registered",
]
