"""The plug-in seam: how the engine carries training speed-up methods, and ToE's thin adapter.

ToE is the first method; Tri-Level E-ViT and Budgeted Training (``../shared/SIBLINGS.md``) will
sit beside it. The engine only ever talks to ``TrainingPlugin``s, in this order:

- ``attach(model)`` once, before ``deepspeed.initialize``: surgery that adds no parameters and
  changes no parameter shape (ZeRO partitions parameters at initialize). A method that grows
  heads or MLP width keeps full tensors and slices in forward.
- ``on_step(step)`` once per optimizer step, before the forward pass: everything a method
  changes per step (tokens after a block, active heads/channels, an attention mask) is a pure
  function of the global step set here. Returns scalars for the step's log.
- ``plan(step, plan)``: the method's cost model. It edits the per-block loads of the step
  (``toe.cost.BlockLoad``), so any combination of methods has one theoretical FLOPs figure.
- ``state_dict()`` / ``load_state_dict()``: saved in the checkpoint's client state under the
  plug-in's ``name``; ``{}`` for stateless methods such as ToE (its stage is a function of the
  step). Tri-Level's per-example statistics will live here.

``PluginStack`` runs several plug-ins in order (ToE + head/MLP growth, ToE + example sparsity).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch.nn as nn

from .cost import BlockLoad, ViTShape, forward_flops, keep_patches_after
from .schedule import ToESchedule
from .surgery import TokenExpansion, apply_token_expansion

__all__ = ["TrainingPlugin", "PluginStack", "ToEPlugin"]

log = logging.getLogger(__name__)


class TrainingPlugin:
    """Base of every training speed-up method; the defaults do nothing."""

    name: str = "plugin"

    def attach(self, model: nn.Module) -> None:
        """Model surgery, once, before the engine wraps the model."""

    def on_step(self, step: int) -> dict[str, float]:
        """Set per-step behaviour from the 0-based global optimizer step; returns metrics to log."""
        return {}

    def plan(self, step: int, plan: list[BlockLoad]) -> list[BlockLoad]:
        """The step's per-block loads with this method applied (cost model)."""
        return plan

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"plug-in {self.name!r} holds no state, but the checkpoint has {sorted(state)}")


class PluginStack:
    """Plug-ins applied in order, with one cost model over all of them."""

    def __init__(self, plugins: Sequence[TrainingPlugin]) -> None:
        names = [p.name for p in plugins]
        if len(set(names)) != len(names):
            raise ValueError(f"plug-in names must be unique (they key checkpoint state), got {names}")
        self.plugins = list(plugins)
        self.shape: Optional[ViTShape] = None

    def attach(self, model: nn.Module, num_suffix: int = 0) -> None:
        self.shape = ViTShape.from_model(model, num_suffix=num_suffix)
        for plugin in self.plugins:
            plugin.attach(model)

    def on_step(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for plugin in self.plugins:
            metrics.update(plugin.on_step(step))
        return metrics

    def flops_share(self, step: int) -> float:
        """Theoretical training FLOPs of this step relative to the dense model."""
        if self.shape is None:
            raise RuntimeError("PluginStack.attach(model) must run before flops_share()")
        plan = self.shape.dense_plan()
        for plugin in self.plugins:
            plan = plugin.plan(step, plan)
        return forward_flops(self.shape, plan) / forward_flops(self.shape)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {plugin.name: plugin.state_dict() for plugin in self.plugins}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        unknown = set(state) - {plugin.name for plugin in self.plugins}
        if unknown:
            raise ValueError(f"checkpoint has state for plug-ins {sorted(unknown)} that this run does not use")
        for plugin in self.plugins:
            plugin.load_state_dict(state.get(plugin.name, {}))


class ToEPlugin(TrainingPlugin):
    """Token Expansion as a plug-in: surgery at ``attach``, the stage from the global step at ``on_step``."""

    name = "toe"

    def __init__(self, schedule: ToESchedule, **options: Any) -> None:
        self.schedule = schedule
        self.options = options  # apply_token_expansion's: num_suffix, distance, init, expand, merge, sparse_eval
        self.module: Optional[TokenExpansion] = None
        self.shape: Optional[ViTShape] = None

    def attach(self, model: nn.Module) -> None:
        self.module = apply_token_expansion(model, self.schedule, **self.options)
        self.shape = ViTShape.from_model(model, num_suffix=self.options.get("num_suffix", 0))

    def on_step(self, step: int) -> dict[str, float]:
        if self.module is None:
            raise RuntimeError("ToEPlugin.attach(model) must run before on_step()")
        stage = self.module.stage
        if self.module.set_step(step):
            log.info("ToE stage %s -> %d at step %d: %d of %d patch tokens kept after block %d",
                     stage, self.module.stage, step, self.kept_tokens(step), self.shape.num_patches,
                     self.schedule.block)
        return {"toe/stage": float(self.module.stage), "toe/kept_tokens": float(self.kept_tokens(step))}

    def kept_tokens(self, step: int) -> int:
        return self.schedule.kept_tokens(self.shape.num_patches, self.schedule.stage(step))

    def plan(self, step: int, plan: list[BlockLoad]) -> list[BlockLoad]:
        return keep_patches_after(self.shape, plan, self.schedule.block, self.kept_tokens(step))
