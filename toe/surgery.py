"""Model surgery: insert Token Expansion after block ``l`` of a timm ``VisionTransformer``.

Not a fork of timm: ``apply_token_expansion`` registers a forward pre-hook on ``model.blocks[l]``
(so ``l = 0`` means right after the patch embedding) that runs a parameter-free
``TokenExpansion`` module, attached as ``model.token_expansion``. Nothing is added to the
state_dict, so a trained model loads into a plain ``timm.create_model(...)`` with ``strict=True``.

The hook is a bound method of the module: ``copy.deepcopy(model)`` (e.g. an EMA copy) rebinds it
to the copy's own module. ToE only acts in ``training`` mode (or with ``sparse_eval``), so
evaluation, EMA copies and export see the original architecture with every token.

With timm's ``set_grad_checkpointing``, the pre-hook runs inside block ``l``'s checkpoint and the
op is re-run in backward: the selection is deterministic (random init draws from the global RNG,
which checkpointing restores), so gradients are unchanged; the cost is one extra op per step.

Seams for later models:
- YOLOS: suffix detection tokens (``num_suffix``); mid position embeddings of the blocks after
  ``l`` are gathered per sample with ``module.gather_kept(pos)`` (the last forward's keep_index).
- LV-ViT: token labelling needs every patch position back after the last block:
  ``module.restore(x)`` zero-pads kept tokens into their original positions.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn as nn

from .schedule import ToESchedule, kept_counts_from
from .token_expansion import DISTANCES, INITS, expand_tokens

__all__ = ["TokenExpansion", "apply_token_expansion", "remove_token_expansion", "gather_kept", "restore_tokens"]

log = logging.getLogger(__name__)


def gather_kept(tokens: torch.Tensor, keep_index: torch.Tensor, num_prefix: int, num_suffix: int = 0) -> torch.Tensor:
    """``[B or 1, P + N + S, C]`` -> ``[B, P + n + S, C]``: prefix, the kept patches, suffix.

    For per-token tensors that must follow ToE's selection (YOLOS mid position embeddings).
    """
    batch, kept = keep_index.shape
    tokens = tokens.expand(batch, -1, -1)
    patches_end = tokens.shape[1] - num_suffix
    index = (keep_index + num_prefix).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.cat([tokens[:, :num_prefix], tokens.gather(1, index), tokens[:, patches_end:]], dim=1)


def restore_tokens(
    x: torch.Tensor, keep_index: torch.Tensor, num_patches: int, num_prefix: int, num_suffix: int = 0
) -> torch.Tensor:
    """``[B, P + n + S, C]`` -> ``[B, P + N + S, C]``: kept tokens back at their original patch
    positions, zeros elsewhere (LV-ViT token labelling, appendix Fig. 1)."""
    batch, kept = keep_index.shape
    if x.shape[1] != num_prefix + kept + num_suffix:
        raise ValueError(f"x has {x.shape[1]} tokens, keep_index implies {num_prefix + kept + num_suffix}")
    patches = x.new_zeros(batch, num_patches, x.shape[-1])
    index = keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    patches = patches.scatter(1, index, x[:, num_prefix : num_prefix + kept])
    return torch.cat([x[:, :num_prefix], patches, x[:, num_prefix + kept :]], dim=1)


class TokenExpansion(nn.Module):
    """Parameter-free module that applies ``expand_tokens`` at the schedule's current stage.

    Call ``set_step(global_step)`` once per optimizer step before the forward pass; the stage is
    a pure function of that step.
    """

    def __init__(
        self,
        schedule: ToESchedule,
        *,
        num_prefix: int,
        num_suffix: int = 0,
        distance: str = "cosine",
        init: str = "spatial",
        expand: bool = True,
        merge: bool = True,
        sparse_eval: bool = False,
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.schedule = schedule
        self.num_prefix = int(num_prefix)
        self.num_suffix = int(num_suffix)
        self.options: dict[str, Any] = dict(distance=distance, init=init, expand=bool(expand), merge=bool(merge))
        self.sparse_eval = bool(sparse_eval)
        self.step: Optional[int] = None
        self.stage: Optional[int] = None
        # (numerator, denominator) of r0 and each stage's increment (or rate): ToESchedule.count_terms
        self._terms: tuple[tuple[int, int], ...] = ()
        self._last_stage = False
        self._seed_stride = 0
        # original patch index of each kept token in the last forward; None when all were kept
        self.keep_index: Optional[torch.Tensor] = None
        self.num_patches: Optional[int] = None

    def set_step(self, step: int) -> bool:
        """Set the global step; returns True when this moves ToE into a different stage.

        A stage change also sets the stage's constants as plain ints (each rate or increment as a
        numerator and a denominator, the seed stride), so the forward does integer arithmetic only:
        nothing traced by ``torch.compile`` reaches ``Fraction``, and the exact floors stay exact.
        """
        stage = self.schedule.stage(step)
        changed = stage != self.stage
        self.step, self.stage = int(step), stage
        if changed and stage:
            self._terms = self.schedule.count_terms(stage)
            self._last_stage = stage == self.schedule.num_stages
            self._seed_stride = int(self.schedule.seed_stride)
        return changed

    def kept_counts(self, num_patches: int) -> list[int]:
        """``ToESchedule.kept_counts(num_patches, stage)`` from the stage's int constants."""
        return kept_counts_from(
            num_patches, self._terms, cumulative=self.schedule.counting == "paper", last_is_full=self._last_stage
        )

    @property
    def active(self) -> bool:
        return self.training or self.sparse_eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.keep_index = None
        self.num_patches = x.shape[1] - self.num_prefix - self.num_suffix
        if not self.active:
            return x
        if self.stage is None:
            raise RuntimeError("TokenExpansion.set_step(global_step) must be called before a training forward pass")
        if self.stage == 0:  # full-token warm-up
            return x
        counts = self.kept_counts(self.num_patches)
        if counts[-1] == self.num_patches:
            return x
        out, keep_index = expand_tokens(
            x,
            counts,
            num_prefix=self.num_prefix,
            num_suffix=self.num_suffix,
            k=self.schedule.k,
            seed_stride=self._seed_stride,
            remainder=self.schedule.remainder,
            **self.options,
        )
        self.keep_index = keep_index
        return out

    def gather_kept(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token tensor ``[B or 1, P + N + S, C]`` reduced like the last forward's tokens."""
        if self.keep_index is None:
            return tokens
        return gather_kept(tokens, self.keep_index, self.num_prefix, self.num_suffix)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens of the last forward zero-padded back to every patch position."""
        if self.keep_index is None or self.num_patches is None:
            return x
        return restore_tokens(x, self.keep_index, self.num_patches, self.num_prefix, self.num_suffix)

    def _restore_hook(self, norm: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the final norm (``restore=True``): its output zero-padded back to every
        patch position when this forward dropped tokens (LV-ViT, appendix Fig. 1); else unchanged."""
        return self.restore(output)

    def _pre_hook(self, block: nn.Module, args: tuple, kwargs: dict[str, Any]):
        x, *rest = args
        if self.active and kwargs.get("attn_mask") is not None:
            raise RuntimeError("Token Expansion changes the token count: an attn_mask for all tokens cannot follow it")
        return (self(x), *rest), kwargs

    def extra_repr(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return (
            f"block={self.schedule.block}, num_prefix={self.num_prefix}, num_suffix={self.num_suffix}, "
            f"{options}, sparse_eval={self.sparse_eval}, stage={self.stage}"
        )


def apply_token_expansion(
    model: nn.Module, schedule: ToESchedule, *, num_suffix: int = 0, restore: bool = False, **options: Any
) -> TokenExpansion:
    """Insert ToE before ``model.blocks[schedule.block]`` (i.e. after block ``schedule.block``, 1-based).

    Works on any timm ``VisionTransformer`` (DeiT, distilled DeiT with two prefix tokens, any
    patch or image size): the prefix count is read from ``model.num_prefix_tokens``. ``options``
    are ``TokenExpansion``'s (distance, init, expand, merge, sparse_eval). ``restore``: a forward
    hook on ``model.norm`` gives the kept tokens back their original positions, zeros elsewhere, after
    the last block (LV-ViT's dense head). Returns the module, also reachable as ``model.token_expansion``.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not hasattr(model, "num_prefix_tokens"):
        raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer (needs .blocks and .num_prefix_tokens)")
    if isinstance(getattr(model, "token_expansion", None), TokenExpansion):
        raise ValueError("Token Expansion is already applied to this model")
    if not 0 <= schedule.block < len(blocks):
        raise ValueError(
            f"schedule.block={schedule.block} must be in [0, {len(blocks) - 1}] for a "
            f"{len(blocks)}-block model (ToE must be followed by at least one block)"
        )
    module = TokenExpansion(schedule, num_prefix=int(getattr(model, "num_prefix_tokens")), num_suffix=num_suffix, **options)
    module.train(model.training)
    model.token_expansion = module
    blocks[schedule.block].register_forward_pre_hook(module._pre_hook, with_kwargs=True)
    if restore:
        if not isinstance(getattr(model, "norm", None), nn.Module):
            raise TypeError(f"{type(model).__name__} has no final norm to restore the tokens after")
        getattr(model, "norm").register_forward_hook(module._restore_hook)
    log.info("Token Expansion inserted before blocks[%d]: %r", schedule.block, schedule)
    return module


def remove_token_expansion(model: nn.Module) -> None:
    """Undo ``apply_token_expansion``: the model is a plain timm model again."""
    module = getattr(model, "token_expansion", None)
    if not isinstance(module, TokenExpansion):
        raise ValueError("Token Expansion is not applied to this model")
    # find the hook by the module it is bound to: a handle kept from apply_token_expansion would
    # point at the original model's hooks even inside a deep copy of the model
    block = getattr(model, "blocks")[module.schedule.block]
    for key, hook in list(block._forward_pre_hooks.items()):
        if getattr(hook, "__self__", None) is module:
            del block._forward_pre_hooks[key]
            block._forward_pre_hooks_with_kwargs.pop(key, None)
    norm = getattr(model, "norm", nn.Identity())
    for key, hook in list(norm._forward_hooks.items()):
        if getattr(hook, "__self__", None) is module:
            del norm._forward_hooks[key]
    del model.token_expansion
