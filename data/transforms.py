"""DeiT recipe transforms through timm, and Mixup/CutMix keyed to the global step and the rank.

torch and timm are imported where used: ``launcher.config`` checks the transform options at
start-up (``check_transform_options``) without loading them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

__all__ = [
    "build_transform",
    "check_transform_options",
    "StepMixup",
    "ScheduledTransform",
    "with_rand_magnitude",
    "INTERPOLATIONS",
    "DEIT_MEAN",
    "DEIT_STD",
]

# what timm's str_to_interp_mode knows, minus 'random' (the eval transform needs one fixed mode)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "hamming", "box")
DEIT_MEAN, DEIT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm IMAGENET_DEFAULT_*, as DeiT uses


def _numbers(value, count: int) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def check_transform_options(
    prefix: str = "",
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    vflip: float = 0.0,
    interpolation: str = "bicubic",
    mean: Sequence[float] = DEIT_MEAN,
    std: Sequence[float] = DEIT_STD,
    re_prob: float = 0.25,
    color_jitter: float = 0.3,
    crop_pct: float = 0.875,
) -> None:
    """Raise ``ValueError`` naming ``prefix + option`` for the first option timm would misuse or refuse late."""
    if not _numbers(scale, 2) or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"{prefix}scale must be [min, max] area fractions with 0 < min <= max <= 1, got {scale!r}")
    if not _numbers(ratio, 2) or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"{prefix}ratio must be [min, max] aspect ratios with 0 < min <= max, got {ratio!r}")
    for name, value in (("hflip", hflip), ("vflip", vflip), ("re_prob", re_prob)):
        if not _probability(value):
            raise ValueError(f"{prefix}{name} must be a probability in [0, 1], got {value!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{prefix}interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if not _numbers(mean, 3):
        raise ValueError(f"{prefix}mean must be three numbers (R, G, B, images scaled to [0, 1]), got {mean!r}")
    if not _numbers(std, 3) or min(std) <= 0:
        raise ValueError(f"{prefix}std must be three numbers > 0 (R, G, B), got {std!r}")
    if not isinstance(color_jitter, (int, float)) or isinstance(color_jitter, bool) or color_jitter < 0:
        raise ValueError(f"{prefix}color_jitter must be >= 0, got {color_jitter!r}")
    if not isinstance(crop_pct, (int, float)) or isinstance(crop_pct, bool) or not 0 < crop_pct <= 1:
        raise ValueError(f"{prefix}crop_pct must be in (0, 1], got {crop_pct!r}")


def build_transform(
    train: bool,
    image_size: int,
    *,
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    color_jitter: float = 0.3,
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    mean: Sequence[float] = DEIT_MEAN,
    std: Sequence[float] = DEIT_STD,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    vflip: float = 0.0,
):
    """DeiT's training transform (random resized crop ``scale`` / ``ratio`` + flips, RandAugment m9,
    colour jitter 0.3, random erasing 0.25, bicubic) or its eval transform (resize, centre crop
    ``crop_pct``); both resize with ``interpolation`` and normalise with ``mean`` / ``std``. The
    defaults are DeiT's (facebookresearch/deit ``datasets.build_transform``, timm's defaults)."""
    from timm.data import create_transform

    check_transform_options(
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        vflip=vflip,
        interpolation=interpolation,
        mean=mean,
        std=std,
        re_prob=re_prob,
        color_jitter=color_jitter,
        crop_pct=crop_pct,
    )
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if train:
        return create_transform(
            image_size,
            is_training=True,
            scale=tuple(scale),
            ratio=tuple(ratio),
            hflip=hflip,
            vflip=vflip,
            auto_augment=auto_augment,
            re_prob=re_prob,
            re_mode="pixel",
            re_count=1,
            color_jitter=color_jitter,
            interpolation=interpolation,
            mean=mean,
            std=std,
        )
    return create_transform(
        image_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct, mean=mean, std=std
    )


def with_rand_magnitude(auto_augment: str, magnitude: float) -> str:
    """The timm RandAugment string with its magnitude set: ``("rand-m9-mstd0.5-inc1", 3)`` ->
    ``"rand-m3-mstd0.5-inc1"`` (the other sections kept; ``m`` added when the string has none).
    ``ValueError`` for a policy that is not RandAugment (``v0``, ``augmix``, ...): it has no magnitude."""
    sections = auto_augment.split("-") if isinstance(auto_augment, str) else []
    if not sections or sections[0] != "rand":
        raise ValueError(
            f"auto_augment {auto_augment!r} is not a RandAugment string ('rand-m9-mstd0.5-inc1'): "
            f"it has no magnitude to follow a schedule"
        )
    if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) or not 0 <= magnitude <= 10:
        raise ValueError(f"RandAugment magnitude must be a number in [0, 10] (timm's level range), got {magnitude!r}")
    kept = [part for part in sections[1:] if re.split(r"(\d.*)", part)[0] != "m"]  # timm's own key split
    return "-".join(["rand", f"m{magnitude:g}", *kept])


class ScheduledTransform:
    """A training transform whose ``build_transform`` options follow the global optimizer step.

    ``schedule(step, options) -> options``: the options of the batches of step ``step``, given the
    stream's own (e.g. another RandAugment magnitude). It runs in the DataLoader workers, so it must
    be picklable and a pure function of its arguments. ``set_step(step)`` before each batch picks
    the transform; one timm transform per distinct options is built on first use and kept.
    """

    def __init__(self, image_size: int, options: dict[str, Any], schedule: Callable[[int, dict], dict]) -> None:
        self.image_size, self.options, self.schedule = int(image_size), dict(options), schedule
        self.step: Optional[int] = None
        self._built: dict[str, Callable] = {}
        self._current: Optional[Callable] = None

    def options_at(self, step: int) -> dict[str, Any]:
        return self.schedule(step, dict(self.options))

    def transform_at(self, step: int) -> Callable:
        options = self.options_at(step)
        key = repr(sorted(options.items()))
        if key not in self._built:
            self._built[key] = build_transform(True, self.image_size, **options)
        return self._built[key]

    def set_step(self, step: int) -> None:
        self.step, self._current = int(step), self.transform_at(step)

    def __call__(self, image):
        if self._current is None:
            raise RuntimeError("ScheduledTransform.set_step(step) must be called before it transforms an image")
        return self._current(image)

    def __getstate__(self) -> dict:  # workers rebuild their own transforms; only the recipe travels
        return {**self.__dict__, "_built": {}, "_current": None, "step": None}


class StepMixup:
    """``timm.data.Mixup`` whose randomness is a function of ``(seed, step, rank)``.

    Each rank draws its own lambda and CutMix box, as timm's batch mode does on every rank of a
    DeiT run; a resumed run mixes every rank's batches exactly as the uninterrupted run did.
    timm draws from numpy's and torch's global RNGs; here they are seeded per (step, rank) and
    restored afterwards. Like timm's, it mixes ``images`` in place.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        from timm.data import Mixup

        self.mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=prob,
            switch_prob=switch_prob,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        self.seed, self.rank = seed, rank

    def __call__(self, images, labels, step: int):
        import torch

        if len(images) % 2:
            raise ValueError(f"Mixup/CutMix needs an even batch size, got {len(images)}")
        np_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                seed = int(np.random.SeedSequence([self.seed, step, self.rank, 0x313]).generate_state(1)[0])
                np.random.seed(seed)
                torch.default_generator.manual_seed(seed)
                return self.mixup(images, labels)
        finally:
            np.random.set_state(np_state)
