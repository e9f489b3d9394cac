"""One count of a run: the examples an epoch passes over, its steps per epoch and in all, and the
method configs resolved against them. ``launcher.train`` plans from its open training stream and
``launcher.compare`` from the shard index; both through ``plan_run``, so a comparison's step counts are
the runs' own (a method's example subset and run length included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .config import ConfigError, RunConfig, deepspeed_config

__all__ = ["RunPlan", "plan_run", "plan_from_index"]


@dataclass(frozen=True)
class RunPlan:
    steps_per_epoch: int  # optimizer steps in an epoch (over a method's example subset, if it sets one)
    total_steps: int
    methods: dict  # the recipe's method configs resolved against the run (Budgeted Training's dense_steps)


def plan_run(
    cfg: RunConfig,
    split_total: int,
    *,
    world: int,
    batches: Callable[[Optional[np.ndarray], int], int],
    meta_model: Callable[[], Any],
) -> RunPlan:
    """The run of ``cfg`` on a training split of ``split_total`` examples over ``world`` ranks.

    ``batches(subset, micro_batch)``: this rank's micro-batches per epoch over the subset (``None``: all):
    the open stream's ``len`` after ``set_subset`` in training, ``data.plan.train_batches_per_rank`` from
    the index in a plan without a stream. ``meta_model()``: the recipe's model on the meta device, built
    only when a method sets the run's length from its shapes. ``train.steps`` wins over every count.
    """
    from methods.registry import initial_subset, run_length

    t = cfg.train
    micro = deepspeed_config(cfg, world)["train_micro_batch_size_per_gpu"]
    subset = initial_subset(cfg.methods, split_total, t.seed)  # Tri-Level E-ViT: epochs are passes over 80%
    steps_per_epoch = batches(subset, micro) // t.grad_accum
    recipe_steps = math.ceil(t.epochs * steps_per_epoch) if t.epochs is not None else t.steps
    if recipe_steps is None:  # the recipe loader refuses this already; here for a RunConfig built by hand
        raise ConfigError("set train.epochs or train.steps")
    try:  # a method may set the run's length (Budgeted Training: the stages that meet its budget)
        run_steps, methods = run_length(cfg.methods, steps_per_epoch, recipe_steps, meta_model)
    except ValueError as err:  # a budget the data cannot meet: the same on every rank
        raise ConfigError(str(err)) from err
    return RunPlan(steps_per_epoch, t.steps or run_steps, methods)


def plan_from_index(cfg: RunConfig, *, world: int) -> Optional[RunPlan]:
    """``plan_run`` from the training split's shard index alone (``launcher.compare``), or ``None`` when
    the index cannot be read here (a remote or not yet written data set)."""
    from data.plan import train_batches_per_rank
    from data.shards import ShardIndex

    try:
        split = ShardIndex.load(cfg.data.path).split(cfg.data.train_split)
    except (OSError, KeyError, ValueError):
        return None
    d = cfg.data

    def batches(subset: Optional[np.ndarray], micro: int) -> int:
        examples = int(subset.sum()) if subset is not None else split.total
        return train_batches_per_rank(examples, world=world, workers=d.workers, batch=micro, repeats=d.repeats)

    def meta_model():
        import torch

        from .tasks import make_task

        with torch.device("meta"):
            return make_task(cfg).build_model(pretrained=False)[0]

    return plan_run(cfg, split.total, world=world, batches=batches, meta_model=meta_model)
