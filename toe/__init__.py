"""Token Expansion (ToE): the op, its schedule and the surgery on timm Vision Transformers.

- ``ToESchedule``: stage of a global step, kept patch counts (``toe.schedule``)
- ``expand_tokens``: the op, batched (``toe.token_expansion``)
- ``TokenExpansion`` / ``apply_token_expansion``: surgery on timm ViTs (``toe.surgery``)

The engine carries ToE as a method plug-in (``methods.toe.ToEPlugin``, in the registry as
``toe``); the cost model every method shares is ``models.cost``.
"""

from .schedule import ToESchedule
from .surgery import TokenExpansion, apply_token_expansion, gather_kept, remove_token_expansion, restore_tokens
from .token_expansion import expand_tokens

__all__ = [
    "ToESchedule",
    "TokenExpansion",
    "apply_token_expansion",
    "expand_tokens",
    "gather_kept",
    "remove_token_expansion",
    "restore_tokens",
]
