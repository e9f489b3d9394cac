"""Token Expansion (ToE) as a training plug-in for timm Vision Transformers.

- ``ToESchedule``: stage of a global step, kept patch counts (``toe.schedule``)
- ``expand_tokens``: the op, batched (``toe.token_expansion``)
- ``TokenExpansion`` / ``apply_token_expansion``: surgery on timm ViTs (``toe.surgery``)
- ``TrainingPlugin`` / ``PluginStack`` / ``ToEPlugin``: the engine's plug-in seam (``toe.plugin``)
- ``ViTShape`` / ``forward_flops``: the analytic cost model (``toe.cost``)
"""
from .cost import BlockLoad, ViTShape, forward_flops, keep_patches_after
from .plugin import PluginStack, ToEPlugin, TrainingPlugin
from .schedule import ToESchedule
from .surgery import TokenExpansion, apply_token_expansion, gather_kept, remove_token_expansion, restore_tokens
from .token_expansion import expand_tokens

__all__ = [
    "BlockLoad", "PluginStack", "ToEPlugin", "ToESchedule", "TokenExpansion", "TrainingPlugin", "ViTShape",
    "apply_token_expansion", "expand_tokens", "forward_flops", "gather_kept", "keep_patches_after",
    "remove_token_expansion", "restore_tokens",
]
