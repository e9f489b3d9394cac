"""The worker side of the DALI data path (``data.dali``): the transform options it implements, the check of
a sample's encoded image bytes, and ``DaliCodec``, which draws each sample's augmentation parameters (crop
box, flips, RandAugment ops and arguments, erased box) with timm's calls on the stream's per-sample RNGs.
Imports no DALI: ``launcher.config`` and the DataLoader workers use it without."""

from __future__ import annotations

import importlib.util
import io
import math
import random
import re
from typing import Any, Optional, Sequence

import numpy as np

__all__ = [
    "DaliCodec",
    "RandAugmentSpec",
    "check_dali_options",
    "check_encoded",
    "dali_available",
    "level_to_arg",
    "RAND_OPS",
    "IDENTITY",
    "INTERP",
]

# timm's RandAugment "increasing" set, in timm's order (timm/data/auto_augment.py
# _RAND_INCREASING_TRANSFORMS): indices 0..14; index 15 is "identity", taken when an op is skipped (p)
RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
IDENTITY = len(RAND_OPS)
LEVEL_DENOM = 10.0  # timm _LEVEL_DENOM
TRANSLATE_PCT = 0.45  # timm _translate_rel_level_to_arg default
# DALI interpolation per data.interpolation; hamming and box have no DALI counterpart
INTERP = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR", "nearest": "INTERP_NN", "lanczos": "INTERP_LANCZOS3"}
DALI_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "JPEG2000", "PPM")  # what DALI's image decoders read
# timm RandomErasing defaults (timm/data/random_erasing.py): area 2%..1/3, aspect 0.3..1/0.3, one box
ERASE_AREA, ERASE_LOG_ASPECT = (0.02, 1 / 3), (math.log(0.3), math.log(1 / 0.3))


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


class RandAugmentSpec:
    """A timm RandAugment string (``rand-m9-mstd0.5-inc1``), parsed as timm's ``rand_augment_transform``
    does: ``m`` magnitude, ``n`` ops per image, ``p`` probability of each, ``mstd`` magnitude noise
    (> 100: uniform), ``mmax`` upper bound, ``inc`` the increasing op set (required here)."""

    def __init__(self, config: str) -> None:
        sections = config.split("-")
        if sections[0] != "rand":
            raise ValueError(
                f"auto_augment {config!r}: the DALI path implements timm's RandAugment ('rand-...') "
                f"only, not AutoAugment / AugMix policies"
            )
        self.magnitude, self.layers, self.prob, self.std, self.max = 10.0, 2, 0.5, 0.0, LEVEL_DENOM
        increasing = False
        for part in sections[1:]:
            key, *rest = re.split(r"(\d.*)", part)
            if not rest:
                raise ValueError(
                    f"auto_augment {config!r}: section {part!r} has no value (the DALI path does not "
                    f"take timm's 't' op-set names)"
                )
            value = rest[0]
            try:
                if key == "m":
                    self.magnitude = float(int(value))
                elif key == "n":
                    self.layers = int(value)
                elif key == "p":
                    self.prob = float(value)
                elif key == "mstd":
                    self.std = float(value) if float(value) <= 100 else math.inf
                elif key == "mmax":
                    self.max = float(int(value))
                elif key == "inc":
                    increasing = bool(int(value))
                else:
                    raise ValueError(f"unknown section {part!r}")
            except ValueError as err:
                raise ValueError(f"auto_augment {config!r}: {err}") from None
        if not increasing:
            raise ValueError(
                f"auto_augment {config!r}: the DALI path implements timm's increasing op set only "
                f"(add '-inc1', as DeiT's rand-m9-mstd0.5-inc1 has)"
            )
        if self.layers < 1 or not 0 <= self.prob <= 1 or self.max <= 0:
            raise ValueError(f"auto_augment {config!r}: needs n >= 1, p in [0, 1] and mmax > 0")

    def draw(self, image_size: int) -> tuple[list[int], list[list[float]]]:
        """Op index and op argument(s) of each layer, drawn as timm's ``RandAugment`` /
        ``AugmentOp.__call__`` draw them: ``np.random.choice`` of the ops (with replacement), then per
        op ``random.random() > p`` (skipped: ``IDENTITY``), ``random.gauss`` (magnitude), and the
        ``random.random() > 0.5`` of ``_randomly_negate`` inside the ops' level_to_arg."""
        chosen = np.random.choice(len(RAND_OPS), self.layers, replace=True)
        ops, args = [], []
        for op in chosen:
            if self.prob < 1.0 and random.random() > self.prob:
                ops.append(IDENTITY), args.append([0.0, 0.0])
                continue
            magnitude = self.magnitude
            if self.std == math.inf:
                magnitude = random.uniform(0, magnitude)
            elif self.std > 0:
                magnitude = random.gauss(magnitude, self.std)
            magnitude = max(0.0, min(magnitude, self.max))
            ops.append(int(op)), args.append(level_to_arg(RAND_OPS[op], magnitude, image_size))
        return ops, args


def _negate(value: float) -> float:
    return -value if random.random() > 0.5 else value  # timm _randomly_negate


def level_to_arg(name: str, magnitude: float, image_size: int) -> list[float]:
    """timm's ``LEVEL_TO_ARG[name](magnitude)`` (timm/data/auto_augment.py), as the two numbers the
    DALI op takes: ``[arg, 0]`` or, for the y variants of shear / translate, ``[0, arg]``."""
    level = magnitude / LEVEL_DENOM
    if name == "Rotate":
        return [_negate(level * 30.0), 0.0]
    if name == "PosterizeIncreasing":  # keep 4 - int(level * 4) high bits: the AND mask
        keep = 4 - int(level * 4)
        return [float((0xFF << (8 - keep)) & 0xFF), 0.0]
    if name == "SolarizeIncreasing":  # invert at and above this threshold
        return [float(256 - min(256, int(level * 256))), 0.0]
    if name == "SolarizeAdd":  # add this below 128
        return [float(min(128, int(level * 110))), 0.0]
    if name.endswith("Increasing"):  # Color / Contrast / Brightness / Sharpness: the enhance factor
        return [max(0.1, 1.0 + _negate(level * 0.9)), 0.0]
    if name in ("ShearX", "ShearY"):
        shear = _negate(level * 0.3)
        return [shear, 0.0] if name == "ShearX" else [0.0, shear]
    if name in ("TranslateXRel", "TranslateYRel"):  # pixels of the (square) crop
        pixels = _negate(level * TRANSLATE_PCT) * image_size
        return [pixels, 0.0] if name == "TranslateXRel" else [0.0, pixels]
    return [0.0, 0.0]  # AutoContrast, Equalize, Invert: no argument


def check_dali_options(
    prefix: str = "",
    *,
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
    interpolation: str = "bicubic",
    color_jitter: float = 0.3,
    **_unused,
) -> None:
    """``ValueError`` naming ``prefix + option`` for a transform option the DALI path does not implement."""
    if interpolation not in INTERP:
        raise ValueError(
            f"{prefix}interpolation {interpolation!r} has no DALI counterpart with data.backend=dali; "
            f"use one of {tuple(INTERP)}"
        )
    if auto_augment:
        try:
            RandAugmentSpec(auto_augment)
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from None
    elif color_jitter:
        # timm applies ColorJitter only without auto_augment (transforms_imagenet_train); not implemented here
        raise ValueError(
            f"{prefix}color_jitter={color_jitter} without auto_augment is not implemented with "
            f"data.backend=dali; set {prefix}color_jitter=0 or use data.backend=pil"
        )


def check_encoded(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of encoded image bytes that DALI should decode, checked as the PIL path decides;
    ``SkipSample`` (``corrupt_image`` / ``unsupported_image``) otherwise."""
    from PIL import Image

    from ..samples import SkipSample, check_decodable

    try:
        with Image.open(io.BytesIO(data)) as image:
            size, fmt = image.size, image.format
    except Exception:  # PIL raises many types for broken headers
        raise SkipSample("corrupt_image") from None
    if fmt not in DALI_FORMATS:
        raise SkipSample("unsupported_image")
    if fmt == "JPEG":  # cut short: no end-of-image marker after the last start-of-scan (markers cannot occur in scans)
        scan = data.rfind(b"\xff\xda")
        if scan < 0 or data.rfind(b"\xff\xd9") < scan:
            raise SkipSample("corrupt_image")
    elif fmt == "PNG" and b"IEND" not in data[-64:]:
        raise SkipSample("corrupt_image")
    if size[0] < 1 or size[1] < 1:
        raise SkipSample("corrupt_image")
    check_decodable(data)  # the PIL path's verdict: DALI's decoders would train on damaged scan data
    return size


def _resized_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float]) -> list[int]:
    """``[x, y, w, h]``: timm's ``RandomResizedCropAndInterpolation.get_params`` (the same ``random``
    calls in the same order, so the same box for the same seed)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = random.uniform(*scale) * area
        aspect = math.exp(random.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            top = random.randint(0, height - h)
            left = random.randint(0, width - w)
            return [left, top, w, h]
    in_ratio = width / height  # timm's fallback: the central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return [(width - w) // 2, (height - h) // 2, w, h]


def _erase_box(size: int, prob: float) -> list[float]:
    """``[top, left, h, w, noise_y, noise_x, size, size]`` (h = w = 0: not erased): timm's
    ``RandomErasing._erase`` draws (one box, area 2%..1/3, aspect 0.3..3.3); the noise offset is
    drawn after them (the PIL path draws its noise from torch instead)."""
    box = [0.0, 0.0, 0.0, 0.0]
    if random.random() <= prob:  # timm: `if random.random() > self.probability: return`
        for _ in range(10):
            target_area = random.uniform(*ERASE_AREA) * size * size
            aspect = math.exp(random.uniform(*ERASE_LOG_ASPECT))
            h, w = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if w < size and h < size:
                box = [float(random.randint(0, size - h)), float(random.randint(0, size - w)), float(h), float(w)]
                break
    return box + [float(random.randint(0, size)), float(random.randint(0, size)), float(size), float(size)]


class DaliCodec:
    """Worker side: raw sample -> (encoded bytes + this sample's augmentation parameters, label).

    Used by ``ShardStream`` in place of ``ClassificationCodec``: ``decode`` runs under the stream's
    per-sample seeding of ``random`` / ``numpy`` / ``torch`` and makes timm's draws (module docstring).
    ``transform``: None, or a step-aware ``data.transforms.ScheduledTransform`` set by
    ``ShardStream.set_augmentation_schedule``; its options for the current step are used then."""

    def __init__(self, train: bool, image_size: int, num_classes: Optional[int] = None, **options) -> None:
        self.train, self.image_size, self.num_classes = train, int(image_size), num_classes
        self.options = dict(options)
        self.transform = None
        self._specs: dict[Optional[str], Optional[RandAugmentSpec]] = {}

    def _options(self) -> dict:
        schedule = self.transform
        if schedule is not None and getattr(schedule, "step", None) is not None:
            return schedule.options_at(schedule.step)
        return self.options

    def _spec(self, auto_augment: Optional[str]) -> Optional[RandAugmentSpec]:
        if auto_augment not in self._specs:
            self._specs[auto_augment] = RandAugmentSpec(auto_augment) if auto_augment else None
        return self._specs[auto_augment]

    def decode(self, sample: dict[str, bytes]):
        import torch

        from ..samples import IMAGE_EXTS, SkipSample, read_label

        label = read_label(sample, self.num_classes)
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise SkipSample("missing_image")
        data = sample[ext]
        width, height = check_encoded(data)
        encoded = bytes(data)  # bytes: the DataLoader's default_convert leaves them alone (numpy would become tensors)
        if not self.train:
            return (encoded, None), label
        o = {
            "scale": (0.08, 1.0),
            "ratio": (3 / 4, 4 / 3),
            "hflip": 0.5,
            "vflip": 0.0,
            "re_prob": 0.25,
            "auto_augment": "rand-m9-mstd0.5-inc1",
            **self._options(),
        }
        # timm transforms_imagenet_train order: crop, hflip, vflip, RandAugment, normalise, erasing
        crop = _resized_crop_box(width, height, o["scale"], o["ratio"])
        flips = [
            int(o["hflip"] > 0 and torch.rand(1).item() < o["hflip"]),  # torchvision Random*Flip draws
            int(o["vflip"] > 0 and torch.rand(1).item() < o["vflip"]),
        ]
        spec = self._spec(o["auto_augment"])
        layers = self._spec(self.options.get("auto_augment", "rand-m9-mstd0.5-inc1"))
        if (spec is None) != (layers is None) or (spec is not None and spec.layers != layers.layers):
            raise ValueError(
                f"a step's auto_augment {o['auto_augment']!r} turns RandAugment on or off or changes its "
                f"number of ops, which the DALI pipeline fixes when it is built"
            )
        if spec is not None:
            ops, args = spec.draw(self.image_size)
        else:
            ops, args = [IDENTITY], [[0.0, 0.0]]
        erase = (
            _erase_box(self.image_size, o["re_prob"])
            if o["re_prob"] > 0
            else [0.0] * 4 + [0.0, 0.0, float(self.image_size), float(self.image_size)]
        )
        params = {
            "crop": np.asarray(crop, np.int32),
            "flip": np.asarray(flips, np.int32),
            "ops": np.asarray(ops, np.int32),
            "args": np.asarray(args, np.float32),
            "erase": np.asarray(erase, np.float32),
        }
        return (encoded, params), label

    def collate(self, decoded: list, ids: list[int], valid: list[bool]) -> dict[str, Any]:
        import torch

        filler = next((d for d in decoded if d is not None), None)
        if filler is None:
            raise RuntimeError("a batch without a single readable sample")
        entries = [(d or filler)[0] for d in decoded]
        batch = {
            "encoded": [e[0] for e in entries],
            "label": torch.tensor([d[1] if d is not None else -1 for d in decoded], dtype=torch.long),
            "sample_id": torch.tensor(ids, dtype=torch.long),
            "valid": torch.tensor(valid, dtype=torch.bool),
        }
        if self.train:
            batch["dali_params"] = {k: np.stack([e[1][k] for e in entries]) for k in entries[0][1]}
        return batch
