"""DeiT recipe transforms through timm, and Mixup/CutMix keyed to the global step."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from timm.data import Mixup, create_transform

__all__ = ["build_transform", "StepMixup"]


def build_transform(train: bool, image_size: int, *, auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
                    re_prob: float = 0.25, color_jitter: float = 0.3, interpolation: str = "bicubic",
                    crop_pct: float = 0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """DeiT's training transform (RandAugment m9, bicubic, random erasing 0.25, colour jitter 0.3,
    random resized crop + flip) or its eval transform (resize, centre crop ``crop_pct``)."""
    if train:
        return create_transform(image_size, is_training=True, auto_augment=auto_augment, re_prob=re_prob,
                                re_mode="pixel", re_count=1, color_jitter=color_jitter,
                                interpolation=interpolation, mean=mean, std=std)
    return create_transform(image_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                            mean=mean, std=std)


class StepMixup:
    """``timm.data.Mixup`` whose randomness is a function of ``(seed, global step)``.

    timm draws from numpy's and torch's global RNGs; here they are seeded per step and restored
    afterwards, so a resumed run mixes its batches exactly as the uninterrupted run did.
    Like timm's, it mixes ``images`` in place.
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1, seed: int = 0) -> None:
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                           mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)
        self.seed = seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) % 2:
            raise ValueError(f"Mixup/CutMix needs an even batch size, got {len(images)}")
        np_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                seed = int(np.random.SeedSequence([self.seed, step, 0x313]).generate_state(1)[0])
                np.random.seed(seed)
                torch.default_generator.manual_seed(seed)
                return self.mixup(images, labels)
        finally:
            np.random.set_state(np_state)
