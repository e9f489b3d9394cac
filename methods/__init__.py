"""Training speed-up methods as plug-ins of one seam (``methods.base``), found by name in the
registry (``methods.registry``); each module registers itself on import.

- ``toe``: Token Expansion (the adapter over ``toe/``)
- ``patch_dropout``: timm's PatchDropout, the simplest rival
"""
from . import patch_dropout, toe  # noqa: F401  (registration)
from .base import MethodContext, PluginStack, TrainingPlugin
from .registry import build_stack, check_combination, method, register, registered

__all__ = ["MethodContext", "PluginStack", "TrainingPlugin", "build_stack", "check_combination", "method",
           "register", "registered"]
