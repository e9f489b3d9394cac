"""The DALI data path (``data.backend: dali``): the shard stream's encoded bytes, decoded and
augmented by an NVIDIA DALI pipeline on the GPU (``device="gpu"``) or the CPU (``device="cpu"``).

How it keeps every guarantee of ``data/stream.py`` / ``data/plan.py``: the stream is the same
``ShardStream`` (same shard order, rank / worker split, equal batches, refills, counters, state),
with another *codec*. In the DataLoader workers, ``DaliCodec.decode`` checks each sample's label
and image bytes and draws all of the sample's random augmentation parameters in Python, from the
RNGs the stream seeds per sample from ``(seed, epoch, position, repeat, pass)``; the batch carries
the encoded bytes and those parameters. In the training process, ``DaliStream`` feeds them to the
pipeline through ``fn.external_source``: the pipeline itself draws nothing (no DALI random
operator), so a sample's augmentation is a function of its seed alone and a resumed stream gives
exactly the batches of the uninterrupted one.

The parameters are drawn with the same calls, on the same RNGs, in the same order, as timm's
transform (``data/transforms.py`` ``build_transform``) would make for that sample: the crop box, the
flips, the RandAugment ops / magnitudes / signs and the erased box are the ones the PIL path picks
(tested: crop box, flips, RandAugment ops and arguments). What differs is the pixel arithmetic (DALI's operators, not
PIL's) and these deliberate deviations:

- RandAugment (timm ``rand-m9-mstd0.5-inc1``: 2 ops from timm's 15 "increasing" ops, each applied
  with p 0.5, magnitude ~ N(9, 0.5) clipped to [0, 10]): each sample's ops and their arguments are
  timm's exactly (timm's own ``level_to_arg`` formulas, ``timm/data/auto_augment.py``), fed per
  sample and applied with DALI operators picked per sample by ``nvidia.dali.auto_aug``'s
  ``select`` (DALI's ``rand_augment`` itself draws its ops and signs with a per-operator seed, and
  has no per-op probability, magnitude noise or timm's posterize / solarize-add ranges). Measured
  against timm's PIL ops on a test image at magnitude 9 (``tests/test_dali.py``): within 1 grey
  level on average for 14 of the 15 ops; Equalize follows OpenCV's formula, not PIL's (~20 levels
  apart on that image). Rotate / shear / translate interpolate bilinearly (DALI's warp has no
  bicubic; DeiT's timm uses bicubic) and fill with one grey level, the mean of timm's per-channel
  ``img_mean`` fill (DALI's warp fill is one scalar); Sharpness leaves a 1-pixel border unfiltered.
- Random erasing (timm ``RandomErasing`` 'pixel' mode, p 0.25): the same box, filled with N(0, 1)
  noise read from a fixed noise bank at a per-sample offset (drawn from the sample's seed) instead
  of fresh noise: exact per-sample noise through a DALI random operator is impossible (its seed is
  per operator, not per sample), and generating it in Python would cost a CPU core at GPU rates.
  Within an image the noise is i.i.d. N(0, 1); across images the windows of the bank overlap.
- Resizing: DALI's antialiased cubic / linear resampling, not PIL's; decoding with EXIF orientation
  ignored, as PIL's ``Image.open(...).convert("RGB")`` does.

Bad samples: a missing / bad label or missing image is counted as in the PIL path; the image
bytes are checked in the worker (the header parses, the format is one DALI decodes, a JPEG ends
with its end-of-image marker after its last scan, a PNG has its IEND chunk, and PIL decodes it:
``data.samples.check_decodable``, a JPEG at 1/8 scale, so that an image whose scan data is damaged
is skipped here exactly when the PIL path skips it; DALI's decoders conceal such damage and would
train on it): what fails is skipped, counted (``corrupt_image`` / ``unsupported_image``) and
refilled by the stream as the PIL path's undecodable images are. A sample that passes the check and still fails
in DALI fails the whole DALI batch: ``DaliStream`` then rebuilds the pipeline, runs the batch's
samples one by one, counts each that fails (``dali_failed``, logged with its sample position) and gives its
slot a copy of a good sample of the batch, marked ``valid = False`` (label -1 in evaluation), so
batches stay full and equal on every rank.

DALI's own webdataset reader (``fn.readers.webdataset``) is not used: it shards by DALI's
``shard_id`` / ``num_shards`` over samples in file order, with its own shuffle buffer and no
notion of the stream's per-epoch shard shuffle before the rank split, of DataLoader-worker slots,
of refilling bad samples to keep ranks equal, or of a position to resume from (DALI checkpointing
saves its reader's position only for one fixed world size), and it draws augmentation from
per-operator seeds, so neither exact resume nor a world-size change mid-epoch would hold.

This module imports DALI only where a pipeline is built: the workers and ``launcher.config`` use
the parsing and checking code without it.
"""
from __future__ import annotations

import importlib.util
import io
import logging
import math
import random
import re
import time
from collections import Counter
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .transforms import DEIT_MEAN, DEIT_STD, check_transform_options

__all__ = ["DaliCodec", "DaliStream", "RandAugmentSpec", "build_train_stream", "build_eval_stream",
           "check_dali_options", "dali_available", "RAND_OPS", "INTERP"]

log = logging.getLogger(__name__)

# timm's RandAugment "increasing" set, in timm's order (timm/data/auto_augment.py
# _RAND_INCREASING_TRANSFORMS): indices 0..14; index 15 is "identity", taken when an op is skipped (p)
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
            "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
            "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
IDENTITY = len(RAND_OPS)
LEVEL_DENOM = 10.0  # timm _LEVEL_DENOM
TRANSLATE_PCT = 0.45  # timm _translate_rel_level_to_arg default
# DALI interpolation per data.interpolation; hamming and box have no DALI counterpart
INTERP = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR", "nearest": "INTERP_NN", "lanczos": "INTERP_LANCZOS3"}
DALI_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "JPEG2000", "PPM")  # what DALI's image decoders read
# timm RandomErasing defaults (timm/data/random_erasing.py): area 2%..1/3, aspect 0.3..1/0.3, one box
ERASE_AREA, ERASE_LOG_ASPECT = (0.02, 1 / 3), (math.log(0.3), math.log(1 / 0.3))
NOISE_SEED = 0x5EED_0E1A


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


class RandAugmentSpec:
    """A timm RandAugment string (``rand-m9-mstd0.5-inc1``), parsed as timm's ``rand_augment_transform``
    does: ``m`` magnitude, ``n`` ops per image, ``p`` probability of each, ``mstd`` magnitude noise
    (> 100: uniform), ``mmax`` upper bound, ``inc`` the increasing op set (required here)."""

    def __init__(self, config: str) -> None:
        sections = config.split("-")
        if sections[0] != "rand":
            raise ValueError(f"auto_augment {config!r}: the DALI path implements timm's RandAugment ('rand-...') "
                             f"only, not AutoAugment / AugMix policies")
        self.magnitude, self.layers, self.prob, self.std, self.max = 10.0, 2, 0.5, 0.0, LEVEL_DENOM
        increasing = False
        for part in sections[1:]:
            key, *rest = re.split(r"(\d.*)", part)
            if not rest:
                raise ValueError(f"auto_augment {config!r}: section {part!r} has no value (the DALI path does not "
                                 f"take timm's 't' op-set names)")
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
            raise ValueError(f"auto_augment {config!r}: the DALI path implements timm's increasing op set only "
                             f"(add '-inc1', as DeiT's rand-m9-mstd0.5-inc1 has)")
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


def check_dali_options(prefix: str = "", *, auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
                       interpolation: str = "bicubic", color_jitter: float = 0.3, **_unused) -> None:
    """``ValueError`` naming ``prefix + option`` for a transform option the DALI path does not implement."""
    if interpolation not in INTERP:
        raise ValueError(f"{prefix}interpolation {interpolation!r} has no DALI counterpart with data.backend=dali; "
                         f"use one of {tuple(INTERP)}")
    if auto_augment:
        try:
            RandAugmentSpec(auto_augment)
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from None
    elif color_jitter:
        # timm applies ColorJitter only without auto_augment (transforms_imagenet_train); not implemented here
        raise ValueError(f"{prefix}color_jitter={color_jitter} without auto_augment is not implemented with "
                         f"data.backend=dali; set {prefix}color_jitter=0 or use data.backend=pil")


def check_encoded(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of encoded image bytes that DALI should decode, checked as the PIL path decides;
    ``SkipSample`` (``corrupt_image`` / ``unsupported_image``) otherwise."""
    from PIL import Image

    from .samples import SkipSample, check_decodable
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

        from .samples import IMAGE_EXTS, SkipSample, read_label

        label = read_label(sample, self.num_classes)
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise SkipSample("missing_image")
        data = sample[ext]
        width, height = check_encoded(data)
        encoded = bytes(data)  # bytes: the DataLoader's default_convert leaves them alone (numpy would become tensors)
        if not self.train:
            return (encoded, None), label
        o = {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "vflip": 0.0, "re_prob": 0.25,
             "auto_augment": "rand-m9-mstd0.5-inc1", **self._options()}
        # timm transforms_imagenet_train order: crop, hflip, vflip, RandAugment, normalise, erasing
        crop = _resized_crop_box(width, height, o["scale"], o["ratio"])
        flips = [int(o["hflip"] > 0 and torch.rand(1).item() < o["hflip"]),  # torchvision Random*Flip draws
                 int(o["vflip"] > 0 and torch.rand(1).item() < o["vflip"])]
        spec = self._spec(o["auto_augment"])
        layers = self._spec(self.options.get("auto_augment", "rand-m9-mstd0.5-inc1"))
        if (spec is None) != (layers is None) or (spec is not None and spec.layers != layers.layers):
            raise ValueError(f"a step's auto_augment {o['auto_augment']!r} turns RandAugment on or off or changes its "
                             f"number of ops, which the DALI pipeline fixes when it is built")
        if spec is not None:
            ops, args = spec.draw(self.image_size)
        else:
            ops, args = [IDENTITY], [[0.0, 0.0]]
        erase = _erase_box(self.image_size, o["re_prob"]) if o["re_prob"] > 0 else \
            [0.0] * 4 + [0.0, 0.0, float(self.image_size), float(self.image_size)]
        params = {"crop": np.asarray(crop, np.int32), "flip": np.asarray(flips, np.int32),
                  "ops": np.asarray(ops, np.int32), "args": np.asarray(args, np.float32),
                  "erase": np.asarray(erase, np.float32)}
        return (encoded, params), label

    def collate(self, decoded: list, ids: list[int], valid: list[bool]) -> dict[str, Any]:
        import torch

        filler = next((d for d in decoded if d is not None), None)
        if filler is None:
            raise RuntimeError("a batch without a single readable sample")
        entries = [(d or filler)[0] for d in decoded]
        batch = {"encoded": [e[0] for e in entries],
                 "label": torch.tensor([d[1] if d is not None else -1 for d in decoded], dtype=torch.long),
                 "sample_id": torch.tensor(ids, dtype=torch.long), "valid": torch.tensor(valid, dtype=torch.bool)}
        if self.train:
            batch["dali_params"] = {k: np.stack([e[1][k] for e in entries]) for k in entries[0][1]}
        return batch


# -- the pipeline (training process) ---------------------------------------------------------------

def _rand_ops(fill: int):
    """timm's 15 increasing RandAugment ops in ``RAND_OPS`` order + identity, as ``op(image, arg)``
    with ``arg`` the sample's 2-vector from ``level_to_arg`` (a CPU node). The pixel arithmetic is
    DALI auto_aug's (``nvidia/dali/auto_aug/augmentations.py``: PIL-like contrast, auto-contrast,
    solarize, posterize, sharpness kernel), with its parameters fed per sample instead of looked up
    from magnitude bins (that lookup is built per bin under DALI's autograph: 20 s per pipeline)."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import augmentations as A

    def on(image, node):  # arithmetic with a GPU image needs the argument on the GPU
        return node.gpu() if image.device == "gpu" else node

    def warp(image, matrix):  # inverse map: output -> input coordinates, as PIL's Image.transform(AFFINE) data
        return fn.warp_affine(image, matrix=matrix, fill_value=fill, inverse_map=True)

    def enhance_blend(image, degenerate, factor):  # PIL ImageEnhance: degenerate + factor * (image - degenerate)
        return fn.cast_like(degenerate + (image - degenerate) * on(image, factor), image)

    def auto_contrast(image, arg):
        return A.auto_contrast.op(image, None)

    def equalize(image, arg):  # OpenCV's formula, not PIL's (DALI's note)
        return fn.equalize(image)

    def invert(image, arg):
        return types.Constant(255, dtype=types.UINT8) - image

    def rotate(image, arg):
        return fn.rotate(image, angle=arg[0], fill_value=fill, keep_size=True)

    def posterize(image, arg):
        return image & on(image, fn.cast(arg[0], dtype=types.UINT8))

    def solarize(image, arg):
        keep = image < on(image, arg[0])
        return keep * image + (keep ^ True) * (types.Constant(255, dtype=types.UINT8) - image)

    def solarize_add(image, arg):
        low = image < types.Constant(128, dtype=types.UINT8)
        return low * (image + on(image, fn.cast(arg[0], dtype=types.UINT8))) + (low ^ True) * image

    def color(image, arg):
        return fn.saturation(image, saturation=arg[0])

    def contrast(image, arg):  # PIL: blend with the mean of the luma
        mean = fn.reductions.mean(image, axis_names="HW", keep_dims=True)
        weights = types.Constant(np.array([0.299, 0.587, 0.114], np.float32))
        return enhance_blend(image, fn.reductions.sum(mean * weights, axis_names="C", keep_dims=True), arg[0])

    def brightness(image, arg):
        return fn.brightness(image, brightness=arg[0])

    def sharpness(image, arg):  # PIL: blend with the 3x3 smoothing filter (DALI leaves a 1-px border unfiltered)
        blur = types.Constant(np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13)
        ident = types.Constant(np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32))
        kernel = ident * arg[0] + blur * (1.0 - arg[0])
        return fn.filter(image, on(image, kernel))

    def shear(image, arg):
        return warp(image, fn.transforms.shear(shear=arg))

    def translate(image, arg):
        return warp(image, fn.transforms.translation(offset=arg))

    def identity(image, arg):
        return image

    return [auto_contrast, equalize, invert, rotate, posterize, solarize, solarize_add, color, contrast,
            brightness, sharpness, shear, shear, translate, translate, identity]


class _Pipeline:
    """One DALI pipeline for a stream's batches: train (crop, flips, RandAugment, normalise, erase)
    or eval (resize, centre crop, normalise). ``run(batch)`` -> float32 ``[B, 3, size, size]`` tensor."""

    def __init__(self, train: bool, image_size: int, batch_size: int, *, device: str, device_id: Optional[int],
                 num_threads: int, options: dict) -> None:
        self.train, self.size, self.batch_size = train, int(image_size), int(batch_size)
        self.device, self.device_id, self.num_threads = device, device_id, int(num_threads)
        self.options = {"interpolation": "bicubic", "mean": DEIT_MEAN, "std": DEIT_STD, "crop_pct": 0.875,
                        "auto_augment": "rand-m9-mstd0.5-inc1", **options}
        self.spec = RandAugmentSpec(self.options["auto_augment"]) if train and self.options["auto_augment"] else None
        self.pipe = None

    def build(self):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.auto_aug.core._select import select

        o, size, gpu = self.options, self.size, self.device == "gpu"
        interp = getattr(types, INTERP[o["interpolation"]])
        mean = [255.0 * float(m) for m in o["mean"]]
        std = [255.0 * float(s) for s in o["std"]]
        decode_device = "mixed" if gpu else "cpu"
        spec, train = self.spec, self.train
        fill = int(round(sum(min(255, round(255 * m)) for m in o["mean"]) / 3))  # timm img_mean, one grey level
        suite = _rand_ops(fill) if spec is not None else None
        noise = np.random.default_rng(NOISE_SEED).standard_normal((3, 2 * size, 2 * size)).astype(np.float32)

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      enable_conditionals=True, exec_dynamic=True, prefetch_queue_depth=1)
        def graph():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            if not train:  # timm eval: resize the shorter side to floor(size / crop_pct), centre crop, normalise
                image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB,
                                          adjust_orientation=False)
                image = fn.resize(image, resize_shorter=math.floor(size / o["crop_pct"]), interp_type=interp,
                                  antialias=True)
                return fn.crop_mirror_normalize(image, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5, mean=mean,
                                                std=std, dtype=types.FLOAT, output_layout="CHW")
            crop = fn.external_source(name="crop", dtype=types.INT32)
            flip = fn.external_source(name="flip", dtype=types.INT32)
            erase = fn.external_source(name="erase", dtype=types.FLOAT)
            image = fn.decoders.image_slice(encoded, crop[0:2], crop[2:4], device=decode_device,
                                            output_type=types.RGB, normalized_anchor=False, normalized_shape=False,
                                            axis_names="WH", adjust_orientation=False)
            image = fn.resize(image, size=[size, size], interp_type=interp, antialias=True)
            image = fn.flip(image, horizontal=flip[0], vertical=flip[1])
            if spec is not None:
                ops = fn.external_source(name="ops", dtype=types.INT32)
                args = fn.external_source(name="args", dtype=types.FLOAT)
                for layer in range(spec.layers):
                    image = select(suite, ops[layer], image, args[layer])
            image = fn.crop_mirror_normalize(image, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")
            if erase[2] > 0:  # only the samples with a box (a quarter at DeiT's re_prob) pay for the blend
                where = "gpu" if gpu else "cpu"
                patch = fn.slice(types.Constant(noise, device=where), erase[4:6], erase[6:8], axes=[1, 2],
                                 normalized_anchor=False, normalized_shape=False)
                ones = types.Constant(np.ones((3, size, size), np.float32), layout="CHW", device=where)
                keep = fn.erase(ones, anchor=erase[0:2], shape=erase[2:4], axis_names="HW", fill_value=0.0)
                image = image * keep + patch * (1.0 - keep)
            return image

        start = time.perf_counter()
        self.pipe = graph()
        self.pipe.build()
        log.info("DALI %s pipeline built on the %s in %.1f s (batch %d, %d px, %d threads)",
                 "train" if train else "eval", self.device.upper(), time.perf_counter() - start, self.batch_size,
                 size, self.num_threads)

    def _feed(self, encoded: list, params: Optional[dict], index: Optional[list[int]] = None) -> None:
        # the DataLoader hands numpy arrays over as tensors (its default_convert): back to numpy, no copy
        def pick(seq):
            rows = [seq[i] for i in index] if index is not None else list(seq)
            return [np.frombuffer(r, np.uint8) if isinstance(r, bytes) else r.numpy() if hasattr(r, "numpy")
                    else np.asarray(r) for r in rows]
        self.pipe.feed_input("encoded", pick(encoded))
        if self.train:
            names = ["crop", "flip", "erase"] + (["ops", "args"] if self.spec is not None else [])
            for name in names:
                self.pipe.feed_input(name, pick(params[name]))

    def _to_torch(self, output):
        import torch
        from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray

        dense = output.as_tensor()
        if self.device == "gpu":
            target = torch.empty(dense.shape(), dtype=torch.float32, device=torch.device("cuda", self.device_id))
            return feed_ndarray(dense, target, cuda_stream=torch.cuda.current_stream(target.device))
        return feed_ndarray(dense, torch.empty(dense.shape(), dtype=torch.float32))

    def run(self, encoded: list, params: Optional[dict], index: Optional[list[int]] = None):
        """The images; ``DaliRunError`` when DALI fails on the data (the pipeline is rebuilt next time)."""
        if self.pipe is None:
            self.build()
        self._feed(encoded, params, index)
        try:
            output, = self.pipe.run()
        except RuntimeError as err:
            self.pipe = None  # a DALI error leaves the pipeline unusable: the next run builds a new one
            raise DaliRunError(str(err)) from err
        return self._to_torch(output)


class DaliRunError(RuntimeError):
    """DALI failed while running a batch (typically: it cannot decode a sample)."""


class DaliStream:
    """A ``ShardStream`` whose batches are made into images by a DALI pipeline in this process.

    Everything but iteration (``len``, ``state_dict``, ``load_state_dict``, ``epoch``, ``set_subset``,
    ``set_augmentation_schedule``, ...) is the wrapped stream's; ``counters`` adds this side's
    ``dali_failed``. Batches are those of the PIL path: ``image`` (float32 ``[B, 3, S, S]``, on the
    GPU with ``device="gpu"``), ``label``, ``sample_id``, ``valid``."""

    def __init__(self, stream, pipeline: _Pipeline, pin_memory: bool = False) -> None:
        self.__dict__.update(stream=stream, pipeline=pipeline, failures=Counter(), pin_images=pin_memory)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["stream"], name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.stream, name, value)

    def __len__(self) -> int:
        return len(self.stream)

    @property
    def counters(self) -> Counter:
        return self.stream.counters + self.failures

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.stream)
        try:
            for batch in batches:
                yield self._images(batch)
        finally:  # closing this generator ends the stream's DataLoader workers now
            batches.close()

    def _images(self, batch: dict) -> dict:
        import torch

        encoded, params = batch.pop("encoded"), batch.pop("dali_params", None)
        try:
            images = self.pipeline.run(encoded, params)
        except DaliRunError as err:  # a sample the worker's check passed and DALI refused: find it, count it
            log.warning("%s epoch %d: a DALI batch failed (%s); decoding its samples one by one",
                        self.stream.split_name, self.stream.epoch, str(err).strip().splitlines()[-1][:200])
            images = self._one_by_one(batch, encoded, params)
        if self.pin_images and images.device.type == "cpu" and torch.cuda.is_available():
            images = images.pin_memory()
        batch["image"] = images
        return batch

    def _one_by_one(self, batch: dict, encoded: list, params: Optional[dict]):
        import torch

        good: dict[int, torch.Tensor] = {}
        for i in range(len(encoded)):
            try:
                good[i] = self.pipeline.run(encoded, params, index=[i])[0]
            except DaliRunError:
                self.failures["dali_failed"] += 1
                log.warning("%s epoch %d: skipped sample %d: DALI cannot decode it (dali_failed)",
                            self.stream.split_name, self.stream.epoch, int(batch["sample_id"][i]))
        if not good:
            raise RuntimeError(f"{self.stream.split_name}: DALI decodes no sample of a batch "
                               f"(sample ids {batch['sample_id'].tolist()})")
        filler = next(iter(good))
        for i in range(len(encoded)):
            if i not in good:  # a copy of a good sample, marked: batches stay full and equal on every rank
                good[i] = good[filler]
                batch["valid"][i] = False
                batch["label"][i] = -1 if self.stream.pad else batch["label"][filler]
                batch["sample_id"][i] = batch["sample_id"][filler]
        return torch.stack([good[i] for i in range(len(encoded))])


def _device(device: Optional[str]) -> tuple[str, Optional[int]]:
    import torch

    device = device or ("gpu" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"DALI device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("DALI device 'gpu' asked for, but torch sees no CUDA device")
    return device, (torch.cuda.current_device() if device == "gpu" else None)


def _require_dali() -> None:
    if not dali_available():
        raise ImportError("data.backend=dali needs NVIDIA DALI: pip install -r requirements-dali.txt")


def build_train_stream(path: str, *, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                       seed: int = 0, image_size: int = 224, split: str = "train", buffer_size: int = 1000,
                       repeats: int = 1, base: Optional[str] = None, pin_memory: bool = False,
                       device: Optional[str] = None, num_threads: int = 2, remote=None,
                       **transform_options) -> DaliStream:
    """``data.stream.build_train_stream`` with the DeiT train transform in DALI (``device``: "gpu"
    when torch sees CUDA, else "cpu"); the same transform options (``check_dali_options`` says which
    values are not implemented)."""
    from .shards import ShardIndex
    from .stream import ShardStream

    _require_dali()
    check_transform_options(**{k: v for k, v in transform_options.items() if k != "auto_augment"})
    check_dali_options(**transform_options)
    index = ShardIndex.load(path, base, remote)
    index.warn_if_unshuffled(split, buffer_size=buffer_size, readers=world_size * max(1, num_workers), rank=rank)
    classes = index.classes()
    codec = DaliCodec(True, image_size, num_classes=len(classes) or None, **transform_options)
    stream = ShardStream(index.split(split), codec, batch_size=batch_size, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=seed, shuffle=True, pad=False, buffer_size=buffer_size,
                         repeats=repeats, pin_memory=False, split_name=split)
    if hasattr(stream, "transform_options"):  # a step-aware schedule edits the codec's options per step
        stream.transform_options = {"image_size": image_size, **transform_options}
    dev, device_id = _device(device)  # images are pinned after DALI, in this process (raw batches hold bytes)
    return DaliStream(stream, _Pipeline(True, image_size, batch_size, device=dev, device_id=device_id,
                                        num_threads=num_threads, options=transform_options), pin_memory)


def build_eval_stream(path: str, *, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                      image_size: int = 224, split: str = "val", base: Optional[str] = None,
                      pin_memory: bool = False, device: Optional[str] = None, num_threads: int = 2,
                      remote=None, **transform_options) -> DaliStream:
    """``data.stream.build_eval_stream`` with timm's eval transform in DALI."""
    from .shards import ShardIndex
    from .stream import ShardStream

    _require_dali()
    check_transform_options(**{k: v for k, v in transform_options.items() if k != "auto_augment"})
    check_dali_options(**{**transform_options, "auto_augment": None, "color_jitter": 0})
    index = ShardIndex.load(path, base, remote)
    classes = index.classes()
    codec = DaliCodec(False, image_size, num_classes=len(classes) or None)
    stream = ShardStream(index.split(split), codec, batch_size=batch_size, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=0, shuffle=False, pad=True, buffer_size=0,
                         pin_memory=False, split_name=split)
    dev, device_id = _device(device)
    return DaliStream(stream, _Pipeline(False, image_size, batch_size, device=dev, device_id=device_id,
                                        num_threads=num_threads, options=transform_options), pin_memory)
