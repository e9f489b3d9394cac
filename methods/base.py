"""The method seam: the events a training speed-up method sees, and the stack that runs several.

Every method (ToE, PatchDropout, and the ones to come: Budgeted Training, Tri-Level E-ViT,
EfficientTrain, token labelling) is a ``TrainingPlugin``. The engine calls the events below, in
this order, on every rank; every default does nothing, so a method implements only what it needs.

Set-up, once per process:

1. ``attach(model)`` before ``deepspeed.initialize``: surgery that adds no parameters and
   changes no parameter shape (ZeRO partitions parameters at initialize; a method that grows
   heads or MLP width keeps full tensors and slices them in the forward).
2. ``on_engine(engine, ema)`` right after ``deepspeed.initialize``: the engine and, through it, the
   optimizer (``engine.optimizer``), e.g. to reset the moments of newly grown slices later, and
   the run's EMA copy (``launcher.train.EMA``, or ``None``), whose weights must follow such edits.
   Then ``on_stream(stream)``: the training stream (``data.stream.ShardStream``) before its first
   pass and before a resumed run restores its position: e.g. ``stream.set_augmentation_schedule``
   for an augmentation that follows the step in the DataLoader workers (EfficientTrain's magnitude).
3. ``load_state_dict(state)`` when the run resumes, after the engine has loaded its checkpoint.

The run, in the step loop:

4. ``on_epoch(epoch, stream)`` before every pass over the training stream (also the resumed one) is
   planned: e.g. ``stream.set_subset(mask)`` for an example subset, which that pass then reads. It
   may come again for an epoch already begun (a resumed run): a change it makes must be applied once
   (Tri-Level keeps in its state which swaps it made).
5. ``on_step(step)`` once per optimizer step, before its first forward: everything a method
   changes per step (tokens after a block, active heads / channels, a mask) is set here from
   the 0-based global step, so it is a pure function of that step. Returns scalars to log.
6. ``on_batch(step, batch) -> batch`` for every micro-batch, on the device, before the task's
   loss (and so before Mixup / CutMix, which the loss applies): a batch transform.
7. ``after_forward(step, batch, outputs)`` for every micro-batch, after the forward: the model's
   outputs and the batch (``sample_id``, ``label``): per-sample statistics.
8. ``after_step(step)`` once the optimizer step ``step`` is taken.

Evaluation (mid-run and final, on every rank):

9. ``on_eval_batch(step, batch) -> batch`` for every evaluation batch, on the device, before the
   evaluated models see it; ``step`` is the number of optimizer steps taken (the final evaluation
   has ``step == total_steps``): e.g. an input size that follows the training schedule.

At any time:

- ``plan(step, plan) -> plan``: the cost model. It edits the per-block loads of the step
  (``models.cost.BlockLoad``) for whatever input grid the plan is for (read token counts off
  the plan), so any combination of methods has one theoretical FLOPs figure.
- ``step_metrics()``: scalars measured on the training forwards since the last call (the log
  window), read at log steps only.
- ``state_dict()``: saved in the checkpoint's client state under the plug-in's ``name``; ``{}``
  for stateless methods (ToE's stage is a function of the step).
- ``token_sites``: the blocks before which the method sets the token count; two methods that
  claim the same block are refused (``check_token_sites``).

- ``observe(samples, plan)``: the plan each training micro-batch was priced at (window metrics).
- ``eval_variants()``: ways to evaluate, ``{result prefix: context-manager factory}``; the engine
  evaluates once inside each (Tri-Level: ``""`` sparse, the primary figure, and ``"dense_"``). At
  most one plug-in may have them; none: one plain evaluation.
- ``shape_variants()``: how many distinct shapes the method's forward visits over the run (one
  compiled graph each), when it is more than a few (Tri-Level's kept counts follow a cosine); the
  compiled engine raises Dynamo's recompile limit to fit. ``None``: no claim.

Before the step count, a method's config may restrict the run to a subset of the examples
(``methods.registry.initial_subset``: an optional ``initial_subset(num_samples, seed)`` hook): epochs
are then passes over the subset (Tri-Level E-ViT trains on 80%).

Before the plug-ins exist, the engine asks the methods' configs for the run's length
(``methods.registry.run_length``: an optional ``run_steps`` hook; Budgeted Training sets it from its
budget), and the registry refuses a method that sets the input grid next to another that sets a
token count (``sets_input_grid``).

``PluginStack`` runs the plug-ins in the recipe's order and prices every training micro-batch
after the plug-ins' ``on_batch``, on the grid the model gets. Nothing the stack or a method runs
per step may sit in the model's forward as Python bookkeeping (hooks that count, host reads):
the forward is compiled (``train.compile``), and ``tests/compile_check.py`` asserts 0 graph
breaks for every method.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

import torch.nn as nn

from models.cost import BlockLoad, ViTShape, forward_flops

__all__ = ["MethodContext", "TrainingPlugin", "PluginStack", "check_token_sites"]

TRAIN_FLOPS_PER_FORWARD = 3.0  # a training step costs forward + backward ~ 3 forwards (every matmul twice more)


@dataclass(frozen=True)
class MethodContext:
    """What a method's factory may know about the run."""

    total_steps: int
    steps_per_epoch: int
    num_suffix: int = 0  # tokens after the patches that no method may drop (YOLOS detection tokens)
    task: str = "classification"
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    grad_accum: int = 1  # micro-batches per optimizer step (a stream's batch index // grad_accum is the step)


class TrainingPlugin:
    """Base of every training speed-up method; the defaults do nothing."""

    name: str = "plugin"
    token_sites: frozenset = frozenset()

    def attach(self, model: nn.Module) -> None:
        """Model surgery, once, before the engine wraps the model."""

    def on_engine(self, engine: Any, ema: Any = None) -> None:
        """The DeepSpeed engine and the run's EMA copy (or ``None``), once, right after ``deepspeed.initialize``."""

    def on_stream(self, stream: Any) -> None:
        """The training stream, once, after ``on_engine``, before its first pass (and before a resumed run
        restores its position)."""

    def on_epoch(self, epoch: int, stream: Any) -> None:
        """Before the first batch of a pass over the training stream."""

    def on_step(self, step: int) -> dict[str, float]:
        """Set per-step behaviour from the 0-based global optimizer step; returns metrics to log."""
        return {}

    def on_batch(self, step: int, batch: dict) -> dict:
        """A micro-batch on the device, before the loss (and Mixup / CutMix)."""
        return batch

    def after_forward(self, step: int, batch: dict, outputs: Any) -> None:
        """A micro-batch's model outputs, after the forward."""

    def after_step(self, step: int) -> None:
        """The optimizer step ``step`` is taken."""

    def on_eval_batch(self, step: int, batch: dict) -> dict:
        """An evaluation batch on the device, after ``step`` optimizer steps, before the models see it."""
        return batch

    def plan(self, step: int, plan: list[BlockLoad]) -> list[BlockLoad]:
        """The step's per-block loads with this method applied (cost model)."""
        return plan

    def observe(self, samples: int, plan: list[BlockLoad]) -> None:
        """A training micro-batch of ``samples`` samples was priced at ``plan`` (its grid, every
        plug-in applied): for window metrics such as the tokens a method kept, without a hook in
        the model's forward."""

    def step_metrics(self) -> dict[str, float]:
        """Scalars measured on the training forwards since the last call; at log steps, they
        replace ``on_step``'s of the same name."""
        return {}

    def describe(self) -> Optional[str]:
        """A few lines for the start of the run's log (e.g. ToE's stage table)."""
        return None

    def eval_variants(self) -> dict[str, Callable[[], ContextManager]]:
        """``{result prefix: context-manager factory}``: evaluate once inside each (``{}``: plainly)."""
        return {}

    def shape_variants(self) -> Optional[int]:
        """Distinct shapes the forward visits over the run (compiled graphs), or ``None``."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"plug-in {self.name!r} holds no state, but the checkpoint has {sorted(state)}")


def check_token_sites(claims: Iterable[tuple[str, Iterable[int]]]) -> None:
    """Refuse two methods that set the token count before the same block (``ValueError`` naming both)."""
    owner: dict[int, str] = {}
    for name, sites in claims:
        for site in sorted(sites):
            if site in owner:
                raise ValueError(f"methods {owner[site]!r} and {name!r} both set the token count before block "
                                 f"{site}: use one of them there, or move one to another block")
            owner[site] = name


class PluginStack:
    """Plug-ins run in order, with one cost model over all of them.

    ``on_batch`` prices every training micro-batch on its actual input grid (detection inputs change
    size every batch; a method may resize them) at the step's plan.
    """

    def __init__(self, plugins: Sequence[TrainingPlugin]) -> None:
        names = [p.name for p in plugins]
        if len(set(names)) != len(names):
            raise ValueError(f"plug-in names must be unique (they key checkpoint state), got {names}")
        check_token_sites((plugin.name, plugin.token_sites) for plugin in plugins)
        self.plugins = list(plugins)
        self.shape: Optional[ViTShape] = None
        self._window = [0.0, 0.0, 0.0, 0]  # training FLOPs, dense FLOPs, patch tokens x samples, samples
        self._unread_flops = 0.0
        self._priced_key: Optional[tuple[int, int]] = None
        self._priced: tuple = ()

    @property
    def names(self) -> list[str]:
        return [plugin.name for plugin in self.plugins]

    # -- events --------------------------------------------------------------------------------

    def attach(self, model: nn.Module, num_suffix: int = 0) -> None:
        self.shape = ViTShape.from_model(model, num_suffix=num_suffix)
        for plugin in self.plugins:
            plugin.attach(model)

    def on_engine(self, engine: Any, ema: Any = None) -> None:
        for plugin in self.plugins:
            plugin.on_engine(engine, ema)

    def on_stream(self, stream: Any) -> None:
        for plugin in self.plugins:
            plugin.on_stream(stream)

    def on_epoch(self, epoch: int, stream: Any) -> None:
        for plugin in self.plugins:
            plugin.on_epoch(epoch, stream)

    def on_step(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for plugin in self.plugins:
            metrics.update(plugin.on_step(step))
        return metrics

    def on_batch(self, step: int, batch: dict) -> dict:
        """The plug-ins' batch transforms in order, then the batch is priced on the grid it enters
        the model with (outside the model, so a compiled forward holds no Python cost code)."""
        for plugin in self.plugins:
            batch = plugin.on_batch(step, batch)
        self._price(step, batch["image"])
        return batch

    def after_forward(self, step: int, batch: dict, outputs: Any) -> None:
        for plugin in self.plugins:
            plugin.after_forward(step, batch, outputs)

    def after_step(self, step: int) -> None:
        for plugin in self.plugins:
            plugin.after_step(step)

    def on_eval_batch(self, step: int, batch: dict) -> dict:
        for plugin in self.plugins:
            batch = plugin.on_eval_batch(step, batch)
        return batch

    def describe(self) -> list[str]:
        return [text for plugin in self.plugins if (text := plugin.describe())]

    def eval_variants(self) -> dict[str, Callable[[], ContextManager]]:
        """The one plug-in's evaluation variants, or a single plain evaluation (``{"": nullcontext}``)."""
        owners = [(plugin.name, variants) for plugin in self.plugins if (variants := plugin.eval_variants())]
        if len(owners) > 1:
            raise ValueError(f"plug-ins {owners[0][0]!r} and {owners[1][0]!r} both set how the model is evaluated")
        return owners[0][1] if owners else {"": nullcontext}

    def shape_variants(self) -> Optional[int]:
        """The distinct shapes of the forward over the run, if a plug-in claims them (their product)."""
        claims = [count for plugin in self.plugins if (count := plugin.shape_variants()) is not None]
        return math.prod(claims) if claims else None

    # -- cost ----------------------------------------------------------------------------------

    def forward_flops(self, step: int, num_patches: Optional[int] = None) -> float:
        """Forward FLOPs of one sample at ``step`` with every plug-in applied, on an input of
        ``num_patches`` patch tokens (default: the model's nominal grid)."""
        if self.shape is None:
            raise RuntimeError("PluginStack.attach(model) must run first")
        shape = self.shape if num_patches is None else self.shape.with_patches(num_patches)
        plan = shape.dense_plan()
        for plugin in self.plugins:
            plan = plugin.plan(step, plan)
        return forward_flops(shape, plan)

    def flops_share(self, step: int, num_patches: Optional[int] = None) -> float:
        """Theoretical training FLOPs of ``step`` relative to the dense model on the same grid."""
        if self.shape is None:
            raise RuntimeError("PluginStack.attach(model) must run first")
        shape = self.shape if num_patches is None else self.shape.with_patches(num_patches)
        return self.forward_flops(step, num_patches) / forward_flops(shape)

    def _price(self, step: int, images) -> None:
        """Price a training micro-batch ``[B, C, H, W]`` at ``step``'s plan on its ``H/p x W/p`` grid; the
        plan is memoised per (step, grid), so a step's micro-batches cost one plan."""
        if self.shape is None:
            raise RuntimeError("PluginStack.attach(model) must run first")
        samples, (height, width) = int(images.shape[0]), tuple(images.shape[-2:])
        patches = (height // self.shape.patch_size) * (width // self.shape.patch_size)
        key = (step, patches)
        if self._priced_key != key:
            shape = self.shape.with_patches(patches)
            plan = shape.dense_plan()
            for plugin in self.plugins:
                plan = plugin.plan(step, plan)
            self._priced_key, self._priced = key, (plan, forward_flops(shape, plan), forward_flops(shape))
        plan, sample_flops, dense = self._priced
        for plugin in self.plugins:
            plugin.observe(samples, plan)
        flops = TRAIN_FLOPS_PER_FORWARD * samples * sample_flops
        self._window[0] += flops
        self._window[1] += TRAIN_FLOPS_PER_FORWARD * samples * dense
        self._window[2] += patches * samples
        self._window[3] += samples
        self._unread_flops += flops

    def take_flops(self) -> float:
        """This rank's theoretical training FLOPs of the forwards since the last call."""
        flops, self._unread_flops = self._unread_flops, 0.0
        return flops

    def step_metrics(self) -> dict[str, float]:
        """What the training forwards since the last call saw: ``cost/patch_tokens``, the mean patch
        tokens of their input grids; ``cost/flops_share``, their theoretical FLOPs against the dense
        model's on the same grids; and every plug-in's ``step_metrics``."""
        (flops, dense, tokens, samples), self._window = self._window, [0.0, 0.0, 0.0, 0]
        measured: dict[str, float] = {}
        for plugin in self.plugins:  # every plug-in's window ends here, forwards or not
            measured.update(plugin.step_metrics())
        if not samples:
            return measured
        return {"cost/patch_tokens": tokens / samples, "cost/flops_share": flops / dense, **measured}

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {plugin.name: plugin.state_dict() for plugin in self.plugins}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        unknown = set(state) - set(self.names)
        if unknown:
            raise ValueError(f"checkpoint has state for plug-ins {sorted(unknown)} that this run does not use")
        for plugin in self.plugins:
            plugin.load_state_dict(state.get(plugin.name, {}))
