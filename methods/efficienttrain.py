"""EfficientTrain (Wang et al., ICCV 2023) as a plug-in: low-frequency cropping and weaker RandAugment early on.

Every sample is used in every epoch, but early in training the model sees only the low-frequency
content of each image (a Fourier-domain crop, which also makes the image smaller, hence fewer
patch tokens) under weaker RandAugment; both grow back to the standard input (224 px, m9) by the
last stage, which is plain training, so the final model is an ordinary DeiT. The contract is
``../shared/EFFICIENTTRAIN_SPEC.md``; the values are those of the ICCV code (github
LeapLabTHU/EfficientTrain at 552b73c, ``ET_training.py``), which ToE's Table 4 ran.

- ``low_frequency_crop`` (pure; ``utils.py:freq_crop`` of the ICCV code) and ``EfficientTrainSchedule``
  (stage, image size B, RandAugment magnitude m as pure functions of the global step);
- the plug-in crops every training micro-batch on the device in ``on_batch`` (after the worker
  transform, before the task's Mixup / CutMix, as ``engine.py:49-53``), and evaluation batches in
  ``on_eval_batch`` during the earlier stages (``engine.py:157-158``; the final evaluation is at
  full size); the magnitude reaches the DataLoader workers through the stream's step-aware
  augmentation (``on_engine``: ``ShardStream.set_augmentation_schedule``), each worker computing
  it from the step of the batch it is producing;
- the model keeps its full-size position table (timm's ``dynamic_img_size`` resamples it in the
  forward), so parameter shapes never change (ZeRO) and the export loads strictly into timm at
  full size. Deviation from the official code, which rebuilds the model at ``img_size = B`` in
  each of its five launches and resizes ``pos_embed`` and its AdamW moments between them.

    model: {kwargs: {dynamic_img_size: true}}
    methods: {efficienttrain: {}}          # 5 stages over the run: B 160,160,160,192,224; m 1,3,5,7,9
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from models.cost import BlockLoad, ViTShape, forward_flops, keep_patches_after

from .base import Declaration, MethodContext, TrainingPlugin
from .registry import register

__all__ = [
    "low_frequency_crop",
    "EfficientTrainConfig",
    "EfficientTrainSchedule",
    "EfficientTrainPlugin",
    "MagnitudeSchedule",
    "run_flops_share",
    "ET_GRIDS",
    "ET_MAGNITUDES",
]

log = logging.getLogger(__name__)

# ET@552b73c ET_training.py:51 b_list = [160]*3 + [192] + [224], i.e. patch grids 10/10/10/12/14 of 16 px at 224
ET_GRIDS = (10, 10, 10, 12, 14)
ET_REFERENCE_GRID = 14
# ET_training.py:64 --aa rand-m{2 * ET_index + 1}-mstd0.5-inc1
ET_MAGNITUDES = (1, 3, 5, 7, 9)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- the op ------------------------------------------------------------------------------------


@torch.no_grad()
def low_frequency_crop(images: torch.Tensor, size: int, *, patch_size: int = 1) -> torch.Tensor:
    """``[..., S, S]`` images -> ``[..., size, size]`` float32: the lowest ``size x size`` frequencies.

    ET@552b73c ``utils.py:freq_crop``: the four corners of the unshifted 2-D DFT (rows and columns
    ``0..size/2-1`` and ``S-size/2..S-1``, i.e. "fftshift, centre crop, ifftshift"), scaled by
    ``(size / S)^2`` so that the mean and every kept amplitude stay, inverse DFT, real part (the
    small grid's Nyquist row holds only the negative-frequency half). ``size == S`` returns the
    images unchanged. Computed in float32: ``torch.fft`` has no bf16 and half precision needs
    power-of-two sizes. ``size`` must be even (the official ``band_width // 2`` would silently turn
    161 into 160), a multiple of ``patch_size`` and at most ``S``; the input must be square.
    """
    if images.dim() < 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"low_frequency_crop needs square images [..., S, S], got shape {tuple(images.shape)}")
    full = int(images.shape[-1])
    if not _is_int(size) or size < 2 or size % 2:
        raise ValueError(f"low_frequency_crop size must be an even int >= 2, got {size!r}")
    if size > full:
        raise ValueError(f"low_frequency_crop size {size} exceeds the image size {full}")
    if size % patch_size:
        raise ValueError(f"low_frequency_crop size {size} is not a multiple of the patch size {patch_size}")
    if size == full:
        return images
    half = size // 2
    spectrum = torch.fft.fft2(images.float())
    top = torch.cat([spectrum[..., :half, :half], spectrum[..., :half, full - half :]], dim=-1)
    bottom = torch.cat([spectrum[..., full - half :, :half], spectrum[..., full - half :, full - half :]], dim=-1)
    cropped = torch.cat([top, bottom], dim=-2) * ((size / full) ** 2)
    return torch.fft.ifft2(cropped).real.contiguous()


# -- the schedule ------------------------------------------------------------------------------


class EfficientTrainSchedule:
    """Stage, image size and RandAugment magnitude of every 0-based global optimizer step.

    Args:
        total_steps: ``T``, the run's optimizer steps.
        image_size: the full input size ``S`` (the last stage's).
        patch_size: the model's patch size; every stage size is an even multiple of it.
        sizes: the image size of each stage; default ET's 160/160/160/192/224 scaled to this grid:
            ``patch * floor(G * g / 14 + 1/2)``, ``g = 10,10,10,12,14``, ``G = S / patch``
            (224/16: 160,160,160,192,224; 32/4: 24,24,24,28,32; 28/4: 20,20,20,24,28).
        magnitudes: RandAugment magnitude of each stage (ET's 1,3,5,7,9).
        boundaries: first step of stages 2.. (ints) or fractions of ``T`` (floats in (0, 1), rounded
            up to a step), strictly increasing inside ``(0, T)``. Default: ``ceil(i * T / stages)``,
            the official epoch boundaries ``int(E / 5 * i)`` when ``T = E x steps per epoch`` and 5
            divides ``E`` (a run shorter than the stage count has empty stages).
    """

    def __init__(
        self,
        total_steps: int,
        image_size: int,
        patch_size: int,
        *,
        sizes: Optional[Sequence[int]] = None,
        magnitudes: Sequence[float] = ET_MAGNITUDES,
        boundaries: Optional[Sequence[Union[int, float]]] = None,
    ) -> None:
        if not _is_int(total_steps) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not _is_int(patch_size) or patch_size < 1 or not _is_int(image_size) or image_size % patch_size:
            raise ValueError(f"image_size {image_size!r} must be a multiple of the patch size {patch_size!r}")
        self.total_steps, self.image_size, self.patch_size = total_steps, image_size, patch_size
        self.magnitudes = tuple(magnitudes)
        grid = image_size // patch_size
        if sizes is None:
            sizes = [patch_size * ((2 * grid * g + ET_REFERENCE_GRID) // (2 * ET_REFERENCE_GRID)) for g in ET_GRIDS]
            where = f"ET's sizes 160/160/160/192/224 scaled to {image_size} px / patch {patch_size} give {sizes}"
        else:
            where = f"sizes {list(sizes)!r}"
        self.sizes = tuple(sizes)
        if len(self.sizes) != len(self.magnitudes) or len(self.sizes) < 2:
            raise ValueError(
                f"sizes and magnitudes need one entry per stage (2 or more), got {list(self.sizes)} "
                f"and {list(self.magnitudes)}"
            )
        for size in self.sizes:
            if not _is_int(size) or size < 2 or size % 2 or size % patch_size or size > image_size:
                raise ValueError(
                    f"{where}: every stage size must be an even multiple of the patch size "
                    f"{patch_size} and at most {image_size}, got {size!r}"
                )
        if list(self.sizes) != sorted(self.sizes) or self.sizes[-1] != image_size:
            raise ValueError(f"{where}: stage sizes must not decrease and the last must be the full size {image_size}")
        self.starts = self._starts(boundaries)

    def _starts(self, boundaries) -> list[int]:
        stages, total = len(self.sizes), self.total_steps
        if boundaries is None:
            return [-(-(i * total) // stages) for i in range(1, stages)]  # ceil(i * T / stages)
        boundaries = list(boundaries)
        if len(boundaries) != stages - 1:
            raise ValueError(
                f"boundaries must give the first step of stages 2..{stages} ({stages - 1} values), got {boundaries!r}"
            )
        if all(_is_int(b) for b in boundaries):
            starts = [int(b) for b in boundaries]
        elif all(isinstance(b, float) and 0.0 < b < 1.0 for b in boundaries):
            starts = [math.ceil(Fraction(b).limit_denominator(10**6) * total) for b in boundaries]
        else:
            raise ValueError(
                f"boundaries must be all ints (steps) or all floats in (0, 1) (fractions of the run), got {boundaries!r}"
            )
        if not all(a < b for a, b in zip([0] + starts, starts)) or starts[-1] >= total:
            raise ValueError(
                f"boundaries {boundaries!r} give stage starts {starts}: each must be after the previous "
                f"one, after step 0 and before total_steps={total}"
            )
        return starts

    @property
    def num_stages(self) -> int:
        return len(self.sizes)

    def stage(self, step: int) -> int:
        """0-based stage of the 0-based step; steps past the run stay in the last stage."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be a 0-based int, got {step!r}")
        return bisect.bisect_right(self.starts, step)

    def size(self, step: int) -> int:
        return self.sizes[self.stage(step)]

    def magnitude(self, step: int) -> float:
        return self.magnitudes[self.stage(step)]

    def patches(self, step: int) -> int:
        return (self.size(step) // self.patch_size) ** 2

    def eval_size(self, step: int) -> int:
        """Input size of an evaluation after ``step`` optimizer steps: the size the last step trained at
        (the official ``evaluate()`` crops to its launch's ``input_size``); full size at the end."""
        return self.image_size if step >= self.total_steps else self.size(max(step, 1) - 1)

    def stage_range(self, stage: int) -> tuple[int, int]:
        edges = [0] + self.starts + [self.total_steps]
        return min(edges[stage], self.total_steps), min(edges[stage + 1], self.total_steps)

    def describe(self, shape: Optional[ViTShape] = None) -> str:
        lines = [
            "EfficientTrain schedule (stage: steps, image size, patch tokens, RandAugment magnitude"
            + (", training FLOPs share vs the full-size model" if shape else "")
            + "):"
        ]
        for stage in range(self.num_stages):
            first, end = self.stage_range(stage)
            size = self.sizes[stage]
            patches = (size // self.patch_size) ** 2
            share = ""
            if shape is not None:
                share = f", {forward_flops(shape.with_patches(patches)) / forward_flops(shape):.3f}"
            lines.append(
                f"  {stage + 1}: [{first}, {end}), {size} px, {patches} patches, m{self.magnitudes[stage]:g}" + share
            )
        if shape is not None:
            lines.append(f"  whole run: {run_flops_share(shape, self):.3f} of the full-size training FLOPs")
        return "\n".join(lines)


@dataclass(frozen=True)
class MagnitudeSchedule:
    """The stream's augmentation schedule (``ShardStream.set_augmentation_schedule``): the recipe's
    RandAugment string with the magnitude of the step's stage. Picklable, pure; a recipe without
    RandAugment (``data.auto_augment: null``) is left as it is."""

    schedule: EfficientTrainSchedule

    def __call__(self, step: int, options: dict) -> dict:
        from data.transforms import with_rand_magnitude

        policy = options.get("auto_augment")
        if not policy:
            return options
        return {**options, "auto_augment": with_rand_magnitude(policy, self.schedule.magnitude(step))}


# -- the cost of a whole run ---------------------------------------------------------------------


def _attention_matmul_flops(shape: ViTShape, plan: Sequence[BlockLoad]) -> float:
    """The ``q @ k^T`` and ``attn @ v`` terms of ``models.cost.forward_flops`` (functional matmuls that a
    module counter such as thop, which the ToE authors used, does not see)."""
    return sum(4.0 * load.tokens**2 * shape.embed_dim * load.head_frac for load in plan)


def run_flops_share(shape: ViTShape, schedule: EfficientTrainSchedule, toe: Any = None, *, attention: bool = True) -> float:
    """Theoretical training FLOPs of the whole run against the dense full-size run.

    ``shape`` is the full-size model; ``toe`` an optional ``toe.ToESchedule`` over the same steps
    (ToE's kept counts follow each step's patch grid). ``attention=False`` leaves out the attention
    matmuls, as ``thop.profile`` does (ToE ``EfficientTrain/get_flops_and_params.py``, Table 4's
    GFLOPs): the paper's counting.
    """
    if toe is not None and toe.total_steps != schedule.total_steps:
        raise ValueError(f"ToE's schedule has {toe.total_steps} steps, EfficientTrain's {schedule.total_steps}")

    def flops(sub: ViTShape, plan) -> float:
        return forward_flops(sub, plan) - (0.0 if attention else _attention_matmul_flops(sub, plan))

    dense = flops(shape, shape.dense_plan())
    edges = sorted({0, schedule.total_steps, *schedule.starts, *(toe.starts if toe is not None else ())})
    total = 0.0
    for first, end in zip(edges, edges[1:]):
        if end <= first or first >= schedule.total_steps:
            continue
        sub = shape.with_patches(schedule.patches(first))
        plan = sub.dense_plan()
        if toe is not None:
            kept = toe.kept_tokens(sub.num_patches, toe.stage(first))
            plan = keep_patches_after(sub, plan, toe.block, kept)
        total += (end - first) * flops(sub, plan)
    return total / schedule.total_steps / dense


# -- the plug-in ---------------------------------------------------------------------------------


@dataclass
class EfficientTrainConfig:
    summary = ()  # the options a report names the method by (not a recipe key: no annotation); ET's are fixed
    sizes: Optional[list] = None  # image size per stage; null: ET's 160/160/160/192/224 scaled to the model's grid
    magnitudes: list = field(default_factory=lambda: list(ET_MAGNITUDES))  # RandAugment m per stage
    boundaries: Optional[list] = None  # first step (ints) or fraction of the run (floats) of stages 2..
    eval_crop: bool = True  # mid-run evaluation at the stage's size, as the official evaluate(); final: full size

    def __post_init__(self) -> None:
        magnitudes = self.magnitudes
        if (
            not isinstance(magnitudes, list)
            or len(magnitudes) < 2
            or not all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m <= 10 for m in magnitudes)
        ):
            raise ValueError(
                f"magnitudes must be a list of 2 or more RandAugment magnitudes in [0, 10] (one per "
                f"stage), got {magnitudes!r}"
            )
        if self.sizes is not None and (not isinstance(self.sizes, list) or len(self.sizes) != len(magnitudes)):
            raise ValueError(
                f"sizes must be null or a list with one image size per stage ({len(magnitudes)}, as "
                f"magnitudes), got {self.sizes!r}"
            )
        if self.sizes is None and len(magnitudes) != len(ET_GRIDS):
            raise ValueError(
                f"magnitudes has {len(magnitudes)} stages; ET's default sizes have {len(ET_GRIDS)}: give sizes too"
            )
        if self.sizes is not None and not all(_is_int(v) and v >= 2 and v % 2 == 0 for v in self.sizes):
            raise ValueError(f"sizes must be even ints (image sizes in px, multiples of the patch size), got {self.sizes!r}")
        if self.sizes is not None and self.sizes != sorted(self.sizes):
            raise ValueError(f"sizes must not decrease from stage to stage, got {self.sizes!r}")
        if not isinstance(self.eval_crop, bool):
            raise ValueError(f"eval_crop must be true or false, got {self.eval_crop!r}")
        if self.boundaries is not None:
            if not isinstance(self.boundaries, list):
                raise ValueError(f"boundaries must be null or a list, got {self.boundaries!r}")
            # their count, kind and order now (against the run's length at attach)
            EfficientTrainSchedule(
                10**9, 2, 2, sizes=[2] * len(magnitudes), magnitudes=magnitudes, boundaries=self.boundaries
            )

    def declare(self) -> Declaration:
        """The input grid changes by stage (no token count before a block: ToE composes, the paper's Table 4);
        another method that sets the input grid does not."""
        return Declaration(input_grid="", progress=("et/stage", "et/size"))

    def schedule(self, total_steps: int, image_size: int, patch_size: int) -> EfficientTrainSchedule:
        return EfficientTrainSchedule(
            total_steps, image_size, patch_size, sizes=self.sizes, magnitudes=self.magnitudes, boundaries=self.boundaries
        )


def _square(value, what: str) -> int:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or pair[0] != pair[1]:
        raise ValueError(f"EfficientTrain needs a square {what}, the model has {pair}")
    return int(pair[0])


class EfficientTrainPlugin(TrainingPlugin):
    """Low-frequency crop of the training (and early evaluation) inputs and the step's RandAugment magnitude."""

    name = "efficienttrain"

    def __init__(self, config: EfficientTrainConfig, context: MethodContext) -> None:
        self.config, self.context = config, context
        self.schedule: Optional[EfficientTrainSchedule] = None
        self.shape: Optional[ViTShape] = None
        self._stage: Optional[int] = None

    def attach(self, model: nn.Module) -> None:
        if not getattr(model, "dynamic_img_size", False):
            raise ValueError(
                "methods.efficienttrain: the model must resample its position embedding to each "
                "stage's input size: build it with timm's dynamic_img_size (recipe: "
                "model.kwargs: {dynamic_img_size: true})"
            )
        embed = model.patch_embed
        image_size, patch_size = _square(embed.img_size, "input"), _square(embed.patch_size, "patch")
        try:
            self.schedule = self.config.schedule(self.context.total_steps, image_size, patch_size)
        except ValueError as err:
            raise ValueError(f"methods.efficienttrain: {err}") from None
        self.shape = ViTShape.from_model(model)

    def on_engine(self, engine: Any, ema: Any = None, stream: Any = None) -> None:
        """The RandAugment magnitude of each batch's step, computed in the training stream's DataLoader workers."""
        if stream is None:
            raise ValueError("efficienttrain sets the training stream's augmentation schedule: on_engine needs it")
        if not (stream.transform_options or {}).get("auto_augment"):
            log.info(
                "EfficientTrain: RandAugment is off in this recipe (data.auto_augment: null), so only the "
                "input size follows the schedule"
            )
        stream.set_augmentation_schedule(MagnitudeSchedule(self._schedule()), batches_per_step=self.context.grad_accum)

    def _schedule(self) -> EfficientTrainSchedule:
        if self.schedule is None:
            raise RuntimeError("EfficientTrainPlugin.attach(model) must run first")
        return self.schedule

    def on_step(self, step: int) -> dict[str, float]:
        schedule = self._schedule()
        stage = schedule.stage(step)
        if stage != self._stage:
            log.info(
                "EfficientTrain stage %d of %d from step %d: %d px (%d patch tokens), RandAugment m%g",
                stage + 1,
                schedule.num_stages,
                step,
                schedule.size(step),
                schedule.patches(step),
                schedule.magnitude(step),
            )
            self._stage = stage
        return {
            "et/stage": float(stage + 1),
            "et/size": float(schedule.size(step)),
            "et/magnitude": float(schedule.magnitude(step)),
            "et/patches": float(schedule.patches(step)),
        }

    def on_batch(self, step: int, batch: dict) -> dict:
        augmented = batch.get("augment_step")
        if augmented is not None and int(augmented) != step:
            raise RuntimeError(
                f"EfficientTrain: a batch of step {step} was augmented for step {augmented} (the "
                f"stream's batch count and the run's step disagree: was train.grad_accum changed "
                f"on resume?)"
            )
        return self._crop(batch, self._schedule().size(step))

    def on_eval_batch(self, step: int, batch: dict) -> dict:
        if not self.config.eval_crop:
            return batch
        return self._crop(batch, self._schedule().eval_size(step))

    def _crop(self, batch: dict, size: int) -> dict:
        images = batch["image"]
        if images.shape[-1] != self.schedule.image_size or images.shape[-2] != self.schedule.image_size:
            raise ValueError(
                f"EfficientTrain expects {self.schedule.image_size} px inputs (model.img_size), got "
                f"{tuple(images.shape[-2:])}"
            )
        if size == images.shape[-1]:
            return batch
        return {**batch, "image": low_frequency_crop(images, size, patch_size=self.schedule.patch_size)}

    def describe(self) -> str:
        return self._schedule().describe(self.shape)


def build(config: EfficientTrainConfig, context: MethodContext) -> EfficientTrainPlugin:
    if context.task != "classification" or context.num_suffix:
        raise ValueError(
            f"methods.efficienttrain: low-frequency cropping is defined for classifiers (the "
            f"{context.task} task's boxes and detection tokens are not handled)"
        )
    return EfficientTrainPlugin(config, context)


register("efficienttrain", EfficientTrainConfig, build)
