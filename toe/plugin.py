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
  (``toe.cost.BlockLoad``), so any combination of methods has one theoretical FLOPs figure. The
  plan may be for any input grid: read token counts off the plan, not off the nominal shape.
- ``step_metrics()``: scalars measured on the training forwards since the last call (the step that
  just ran), for the step's log; ``PluginStack.step_metrics`` adds the patch tokens of those
  forwards' actual input grids and the theoretical FLOPs share on them (detection inputs change
  size every batch, so the model's nominal grid would misstate both).
- ``state_dict()`` / ``load_state_dict()``: saved in the checkpoint's client state under the
  plug-in's ``name``; ``{}`` for stateless methods such as ToE (its stage is a function of the
  step). Tri-Level's per-example statistics will live here.

``PluginStack`` runs several plug-ins in order (ToE + head/MLP growth, ToE + example sparsity).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch.nn as nn

from .cost import BlockLoad, ViTShape, forward_flops, keep_patches_after, patches_at
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

    def step_metrics(self) -> dict[str, float]:
        """Scalars measured on the training forwards since the last call; they replace ``on_step``'s
        of the same name in the step's log."""
        return {}

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
        self._grids: dict[int, int] = {}  # patch tokens of a training forward's input -> samples, since the last log

    def attach(self, model: nn.Module, num_suffix: int = 0) -> None:
        self.shape = ViTShape.from_model(model, num_suffix=num_suffix)
        if self.plugins:  # registered before the plug-ins' hooks, so it sees every patch token of the input
            model.blocks[0].register_forward_pre_hook(self._observe)
        for plugin in self.plugins:
            plugin.attach(model)

    def _observe(self, block: nn.Module, args: tuple) -> None:
        if block.training and args:
            x = args[0]
            patches = x.shape[1] - self.shape.num_prefix - self.shape.num_suffix
            self._grids[patches] = self._grids.get(patches, 0) + x.shape[0]

    def on_step(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for plugin in self.plugins:
            metrics.update(plugin.on_step(step))
        return metrics

    def flops_share(self, step: int, num_patches: Optional[int] = None) -> float:
        """Theoretical training FLOPs of this step relative to the dense model, on an input of
        ``num_patches`` patch tokens (default: the model's nominal grid)."""
        if self.shape is None:
            raise RuntimeError("PluginStack.attach(model) must run before flops_share()")
        shape = self.shape if num_patches is None else self.shape.with_patches(num_patches)
        plan = shape.dense_plan()
        for plugin in self.plugins:
            plan = plugin.plan(step, plan)
        return forward_flops(shape, plan) / forward_flops(shape)

    def step_metrics(self, step: int) -> dict[str, float]:
        """What the training forwards since the last call (this rank's, normally the micro-batches of
        ``step``) saw: ``cost/patch_tokens``, the mean patch tokens of their input grids;
        ``cost/flops_share``, the theoretical FLOPs share of ``step`` on those grids, weighted by each
        forward's dense FLOPs; and every plug-in's ``step_metrics``. ``{}`` without plug-ins or forwards.
        """
        grids, self._grids = self._grids, {}
        measured: dict[str, float] = {}
        for plugin in self.plugins:  # every plug-in's window ends here, forwards or not
            measured.update(plugin.step_metrics())
        if not self.plugins or not grids:
            return measured
        samples = sum(grids.values())
        dense = {n: count * forward_flops(self.shape.with_patches(n)) for n, count in grids.items()}
        share = sum(self.flops_share(step, n) * flops for n, flops in dense.items()) / sum(dense.values())
        return {"cost/patch_tokens": sum(n * count for n, count in grids.items()) / samples,
                "cost/flops_share": share, **measured}

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
        self._kept = [0, 0]  # kept patch tokens summed over samples, samples: training forwards since the last log

    def attach(self, model: nn.Module) -> None:
        self.module = apply_token_expansion(model, self.schedule, **self.options)
        self.shape = ViTShape.from_model(model, num_suffix=self.options.get("num_suffix", 0))
        self.module.register_forward_hook(self._observe)

    def _observe(self, module: TokenExpansion, args: tuple, out) -> None:
        if module.training:  # training forwards only (sparse_eval forwards are not training cost)
            self._kept[0] += (out.shape[1] - module.num_prefix - module.num_suffix) * out.shape[0]
            self._kept[1] += out.shape[0]

    def on_step(self, step: int) -> dict[str, float]:
        """``toe/stage``, and ``toe/kept_tokens`` at the model's nominal grid (``step_metrics``
        replaces it in the log with what the step's forwards kept)."""
        if self.module is None:
            raise RuntimeError("ToEPlugin.attach(model) must run before on_step()")
        stage = self.module.stage
        if self.module.set_step(step):
            log.info("ToE stage %s -> %d at step %d: kept rate %.4g of the patch tokens after block %d "
                     "(%d of %d at the model's nominal grid)", stage, self.module.stage, step,
                     float(self.schedule.rate(self.module.stage)), self.schedule.block, self.kept_tokens(step),
                     self.shape.num_patches)
        return {"toe/stage": float(self.module.stage), "toe/kept_tokens": float(self.kept_tokens(step))}

    def step_metrics(self) -> dict[str, float]:
        """``toe/kept_tokens``: mean patch tokens the training forwards since the last call kept after ToE."""
        (total, samples), self._kept = self._kept, [0, 0]
        return {"toe/kept_tokens": total / samples} if samples else {}

    def kept_tokens(self, step: int, num_patches: Optional[int] = None) -> int:
        """Patch tokens kept at ``step`` of ``num_patches`` (default: the model's nominal grid)."""
        n = self.shape.num_patches if num_patches is None else num_patches
        return self.schedule.kept_tokens(n, self.schedule.stage(step))

    def plan(self, step: int, plan: list[BlockLoad]) -> list[BlockLoad]:
        patches = patches_at(self.shape, plan, self.schedule.block)  # the plan's grid, not the nominal one
        return keep_patches_after(self.shape, plan, self.schedule.block, self.kept_tokens(step, patches))
