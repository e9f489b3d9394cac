"""The method seam: what a training speed-up method declares, and the events it sees.

Every method (ToE, PatchDropout, Budgeted Training, EfficientTrain, token labelling, Tri-Level E-ViT's
example and token levels) is two things, registered together (``methods.registry.register``):

- a **config**, a dataclass of the recipe's options whose ``declare()`` returns a typed
  ``Declaration``: what the method claims before any data is read (token sites, the input grid,
  the run's length, an example subset, the loss, extra stream fields, what it refuses). The engine
  checks every combination of methods against the declarations, builds the stream and counts the
  run from them; it never probes a config for optional methods.
- a **plug-in**, a ``TrainingPlugin`` built from the config and the run's ``MethodContext``; the
  engine calls its events at fixed positions of the step loop, in the recipe's order, on every rank.
  Every default does nothing, so a method implements only what it needs.

The table of events (when each fires, in what order, which methods use it) is ``methods/README.md``;
``docs/write_a_method.md`` builds a complete method. Nothing the stack or a method runs per step may
sit in the model's forward as Python bookkeeping (hooks that count, host reads): the forward is
compiled (``train.compile``), and ``tests/compile_check.py`` asserts 0 graph breaks for every method.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Mapping, Optional, Sequence, TypedDict

import torch
import torch.nn as nn

from models.cost import BlockLoad, ViTShape, forward_flops

__all__ = ["Batch", "Declaration", "MethodContext", "TrainingPlugin", "PluginStack", "check_token_sites"]

TRAIN_FLOPS_PER_FORWARD = 3.0  # a training step costs forward + backward ~ 3 forwards (every matmul twice more)


class Batch(TypedDict, total=False):
    """A micro-batch as the events see it, on the device. The stream gives ``image`` / ``label`` /
    ``sample_id`` / ``valid`` (and ``token_*`` when a method declares ``stream_fields={"token_labels"}``,
    detection ``targets``); methods may add entries in ``on_batch`` for their own later events."""

    image: torch.Tensor  # [B, C, H, W]
    label: torch.Tensor  # [B] int64 (classification)
    sample_id: torch.Tensor  # [B] int64 position in the split (per-sample statistics)
    valid: torch.Tensor  # [B] bool (evaluation pads the last batches)
    targets: list  # detection: one dict of boxes / labels per image
    token_logits: torch.Tensor  # token labelling: the teacher's top-k maps, their ids and crop boxes
    token_ids: torch.Tensor
    token_box: torch.Tensor
    cls_target: torch.Tensor  # token labelling's targets, made in its on_batch
    token_target: torch.Tensor


RunSteps = Callable[[int, int, nn.Module], "tuple[int, Any]"]
Subset = Callable[[int, int], Any]


@dataclass(frozen=True, eq=False)
class Declaration:
    """What a method claims at start-up, from its config alone (``config.declare()``).

    The registry checks a recipe's declarations against each other (``check_combination``); the
    engine reads the stream fields, the run length and the subset from them when it plans the run
    (``launcher.run_plan``), the refusals when it validates the recipe, the progress keys for the
    progress bar and the phase key for the report. Every field defaults to "claims nothing".
    """

    token_sites: frozenset[int] = frozenset()  # blocks before which the method sets the token count
    input_grid: Optional[str] = None  # the method resizes the training inputs: the option that turns it off
    exclusive_tokens: bool = False  # with input_grid: no other method may set a token count anywhere
    refuses: Mapping[str, str] = field(default_factory=dict)  # {other method: why the two do not compose}
    refuses_pretrained: Optional[str] = None  # why it cannot start from model.checkpoint (fine-tuning)
    refuses_grad_checkpointing: Optional[str] = None  # why it cannot run with model.grad_checkpointing
    recipe_check: Optional[Callable[[Any], Optional[str]]] = None  # the whole recipe -> a refusal, or None
    stream_fields: frozenset[str] = frozenset()  # extra per-sample fields the training stream reads
    owns_loss: bool = False  # its ``loss`` event replaces the task's loss (one method at most)
    run_steps: Optional[RunSteps] = None  # (steps per epoch, the recipe's steps, meta model) -> (steps, config)
    initial_subset: Optional[Subset] = None  # (examples in the split, seed) -> boolean mask of those trained on
    progress: tuple[str, ...] = ()  # metric keys the progress bar shows
    phase: Optional[str] = None  # the metric whose value names the run's phase (report: speed per phase)


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
    """Base of every training speed-up method; the defaults do nothing. The events, in the order they
    fire, with when and who uses them: ``methods/README.md``."""

    name: str = "plugin"

    # -- set-up, once per process ----------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Model surgery, once, before the engine wraps the model: nothing that adds parameters or
        changes their shapes (ZeRO partitions them at ``deepspeed.initialize``)."""

    def on_engine(self, engine: Any, ema: Any = None, stream: Any = None) -> None:
        """Once, right after ``deepspeed.initialize``: the engine (its optimizer for moment edits), the run's
        EMA copy (or ``None``) and the training stream before its first pass and before a resumed run
        restores its position (``None`` where a test or bench has none)."""

    # -- the step loop ---------------------------------------------------------------------------

    def on_epoch(self, epoch: int, stream: Any) -> None:
        """Before a pass over the training stream is planned (also the resumed one): e.g. ``stream.set_subset``.
        It may come again for an epoch already begun: a change it makes must be applied once."""

    def on_step(self, step: int) -> dict[str, float]:
        """Set per-step behaviour from the 0-based global optimizer step; returns metrics to log."""
        return {}

    def on_batch(self, step: int, batch: Batch) -> Batch:
        """A micro-batch on the device, before the forward (and before Mixup / CutMix)."""
        return batch

    def loss(self, step: int, batch: Batch, outputs: Any) -> Optional[torch.Tensor]:
        """The micro-batch's training loss from the model's outputs, for a method whose declaration
        says ``owns_loss`` (token labelling); ``None``: the task's loss."""
        return None

    def after_forward(self, step: int, batch: Batch, outputs: Any) -> None:
        """A micro-batch's model outputs, after the forward and the loss: per-sample statistics."""

    def after_step(self, step: int) -> None:
        """The optimizer step ``step`` is taken."""

    def on_eval_batch(self, step: int, batch: Batch) -> Batch:
        """An evaluation batch on the device, after ``step`` optimizer steps, before the models see it."""
        return batch

    # -- cost and window metrics -----------------------------------------------------------------

    def plan(self, step: int, plan: list[BlockLoad]) -> list[BlockLoad]:
        """The step's per-block loads with this method applied (the cost model), on whatever grid the plan
        is for (read token counts off the plan)."""
        return plan

    def observe(self, samples: int, plan: list[BlockLoad]) -> None:
        """A training micro-batch of ``samples`` samples was priced at ``plan`` (its grid, every
        plug-in applied): for window metrics such as the tokens a method kept, without a hook in
        the model's forward."""

    def step_metrics(self) -> dict[str, float]:
        """Scalars measured on the training forwards since the last call; at log steps, they
        replace ``on_step``'s of the same name."""
        return {}

    # -- what the built plug-in tells the engine -------------------------------------------------

    def describe(self) -> Optional[str]:
        """A few lines for the start of the run's log (e.g. ToE's stage table)."""
        return None

    def eval_variants(self) -> dict[str, Callable[[], ContextManager]]:
        """``{result prefix: context-manager factory}``: evaluate once inside each (``{}``: plainly)."""
        return {}

    def shape_variants(self) -> Optional[int]:
        """Distinct shapes the forward visits over the run (compiled graphs), or ``None``."""
        return None

    # -- state -----------------------------------------------------------------------------------

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
                raise ValueError(
                    f"methods {owner[site]!r} and {name!r} both set the token count before block "
                    f"{site}: use one of them there, or move one to another block"
                )
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

    def on_engine(self, engine: Any, ema: Any = None, stream: Any = None) -> None:
        for plugin in self.plugins:
            plugin.on_engine(engine, ema, stream)

    def on_epoch(self, epoch: int, stream: Any) -> None:
        for plugin in self.plugins:
            plugin.on_epoch(epoch, stream)

    def on_step(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for plugin in self.plugins:
            metrics.update(plugin.on_step(step))
        return metrics

    def on_batch(self, step: int, batch: Batch) -> Batch:
        """The plug-ins' batch transforms in order, then the batch is priced on the grid it enters
        the model with (outside the model, so a compiled forward holds no Python cost code)."""
        for plugin in self.plugins:
            batch = plugin.on_batch(step, batch)
        self._price(step, batch["image"])
        return batch

    def loss(self, step: int, batch: Batch, outputs: Any, task_loss: Callable[[Batch, Any], torch.Tensor]) -> torch.Tensor:
        """The micro-batch's training loss: the one plug-in's that owns it (its declaration says so; the
        registry refuses two), else the task's; then every plug-in's ``after_forward``."""
        loss = None
        for plugin in self.plugins:
            if (loss := plugin.loss(step, batch, outputs)) is not None:
                break
        loss = task_loss(batch, outputs) if loss is None else loss
        for plugin in self.plugins:
            plugin.after_forward(step, batch, outputs)
        return loss

    def after_step(self, step: int) -> None:
        for plugin in self.plugins:
            plugin.after_step(step)

    def on_eval_batch(self, step: int, batch: Batch) -> Batch:
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
