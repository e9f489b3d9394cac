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

This package imports DALI only where a pipeline is built: the workers and ``launcher.config`` use
the parsing and checking code (``data/dali/codec.py``) without it.
"""

from __future__ import annotations

from .codec import (
    DALI_FORMATS,
    ERASE_AREA,
    ERASE_LOG_ASPECT,
    IDENTITY,
    INTERP,
    LEVEL_DENOM,
    RAND_OPS,
    TRANSLATE_PCT,
    DaliCodec,
    RandAugmentSpec,
    check_dali_options,
    check_encoded,
    dali_available,
    level_to_arg,
)
from .pipeline import NOISE_SEED, DaliRunError, DaliStream, _rand_ops, build_eval_stream, build_train_stream  # noqa: F401

# the package: codec.py (the worker side: option checks, the encoded-bytes check, the parameter draws),
# pipeline.py (the training process: the DALI pipeline, DaliStream, the builders). The names the single
# module had are importable from here (of its private ones, _rand_ops: tests/test_dali.py); a test that
# patches a function patches it in the module that calls it (data.dali.codec.check_encoded).
__all__ = [
    "DaliCodec",
    "DaliStream",
    "DaliRunError",
    "RandAugmentSpec",
    "build_train_stream",
    "build_eval_stream",
    "check_dali_options",
    "check_encoded",
    "dali_available",
    "level_to_arg",
    "RAND_OPS",
    "IDENTITY",
    "INTERP",
    "LEVEL_DENOM",
    "TRANSLATE_PCT",
    "DALI_FORMATS",
    "ERASE_AREA",
    "ERASE_LOG_ASPECT",
    "NOISE_SEED",
]
