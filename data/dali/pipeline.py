"""The training-process side of the DALI data path (``data.dali``): the DALI pipeline fed with the
parameters ``DaliCodec`` drew (``_Pipeline``), ``DaliStream`` (a ``ShardStream`` whose batches it turns into
images) and the stream builders. DALI itself is imported only where a pipeline is built."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Iterator, Optional

import numpy as np

from ..transforms import DEIT_MEAN, DEIT_STD, check_transform_options
from .codec import INTERP, DaliCodec, RandAugmentSpec, check_dali_options, dali_available

__all__ = ["DaliStream", "DaliRunError", "build_train_stream", "build_eval_stream"]

log = logging.getLogger("data.dali")  # the name it had as one module
NOISE_SEED = 0x5EED_0E1A


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

    return [
        auto_contrast,
        equalize,
        invert,
        rotate,
        posterize,
        solarize,
        solarize_add,
        color,
        contrast,
        brightness,
        sharpness,
        shear,
        shear,
        translate,
        translate,
        identity,
    ]


class _Pipeline:
    """One DALI pipeline for a stream's batches: train (crop, flips, RandAugment, normalise, erase)
    or eval (resize, centre crop, normalise). ``run(batch)`` -> float32 ``[B, 3, size, size]`` tensor."""

    def __init__(
        self,
        train: bool,
        image_size: int,
        batch_size: int,
        *,
        device: str,
        device_id: Optional[int],
        num_threads: int,
        options: dict,
    ) -> None:
        self.train, self.size, self.batch_size = train, int(image_size), int(batch_size)
        self.device, self.device_id, self.num_threads = device, device_id, int(num_threads)
        self.options = {
            "interpolation": "bicubic",
            "mean": DEIT_MEAN,
            "std": DEIT_STD,
            "crop_pct": 0.875,
            "auto_augment": "rand-m9-mstd0.5-inc1",
            **options,
        }
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

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            enable_conditionals=True,
            exec_dynamic=True,
            prefetch_queue_depth=1,
        )
        def graph():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            if not train:  # timm eval: resize the shorter side to floor(size / crop_pct), centre crop, normalise
                image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, adjust_orientation=False)
                image = fn.resize(image, resize_shorter=math.floor(size / o["crop_pct"]), interp_type=interp, antialias=True)
                return fn.crop_mirror_normalize(
                    image,
                    crop=(size, size),
                    crop_pos_x=0.5,
                    crop_pos_y=0.5,
                    mean=mean,
                    std=std,
                    dtype=types.FLOAT,
                    output_layout="CHW",
                )
            crop = fn.external_source(name="crop", dtype=types.INT32)
            flip = fn.external_source(name="flip", dtype=types.INT32)
            erase = fn.external_source(name="erase", dtype=types.FLOAT)
            image = fn.decoders.image_slice(
                encoded,
                crop[0:2],
                crop[2:4],
                device=decode_device,
                output_type=types.RGB,
                normalized_anchor=False,
                normalized_shape=False,
                axis_names="WH",
                adjust_orientation=False,
            )
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
                patch = fn.slice(
                    types.Constant(noise, device=where),
                    erase[4:6],
                    erase[6:8],
                    axes=[1, 2],
                    normalized_anchor=False,
                    normalized_shape=False,
                )
                ones = types.Constant(np.ones((3, size, size), np.float32), layout="CHW", device=where)
                keep = fn.erase(ones, anchor=erase[0:2], shape=erase[2:4], axis_names="HW", fill_value=0.0)
                image = image * keep + patch * (1.0 - keep)
            return image

        start = time.perf_counter()
        self.pipe = graph()
        self.pipe.build()
        log.info(
            "DALI %s pipeline built on the %s in %.1f s (batch %d, %d px, %d threads)",
            "train" if train else "eval",
            self.device.upper(),
            time.perf_counter() - start,
            self.batch_size,
            size,
            self.num_threads,
        )

    def _feed(self, encoded: list, params: Optional[dict], index: Optional[list[int]] = None) -> None:
        # the DataLoader hands numpy arrays over as tensors (its default_convert): back to numpy, no copy
        def pick(seq):
            rows = [seq[i] for i in index] if index is not None else list(seq)
            return [
                np.frombuffer(r, np.uint8) if isinstance(r, bytes) else r.numpy() if hasattr(r, "numpy") else np.asarray(r)
                for r in rows
            ]

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
            (output,) = self.pipe.run()
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
            log.warning(
                "%s epoch %d: a DALI batch failed (%s); decoding its samples one by one",
                self.stream.split_name,
                self.stream.epoch,
                str(err).strip().splitlines()[-1][:200],
            )
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
                log.warning(
                    "%s epoch %d: skipped sample %d: DALI cannot decode it (dali_failed)",
                    self.stream.split_name,
                    self.stream.epoch,
                    int(batch["sample_id"][i]),
                )
        if not good:
            raise RuntimeError(
                f"{self.stream.split_name}: DALI decodes no sample of a batch (sample ids {batch['sample_id'].tolist()})"
            )
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


def build_train_stream(
    path: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    image_size: int = 224,
    split: str = "train",
    buffer_size: int = 1000,
    repeats: int = 1,
    base: Optional[str] = None,
    pin_memory: bool = False,
    device: Optional[str] = None,
    num_threads: int = 2,
    remote=None,
    **transform_options,
) -> DaliStream:
    """``data.stream.build_train_stream`` with the DeiT train transform in DALI (``device``: "gpu"
    when torch sees CUDA, else "cpu"); the same transform options (``check_dali_options`` says which
    values are not implemented)."""
    from ..shards import ShardIndex
    from ..stream import ShardStream

    _require_dali()
    check_transform_options(**{k: v for k, v in transform_options.items() if k != "auto_augment"})
    check_dali_options(**transform_options)
    index = ShardIndex.load(path, base, remote)
    index.warn_if_unshuffled(split, buffer_size=buffer_size, readers=world_size * max(1, num_workers), rank=rank)
    classes = index.classes()
    codec = DaliCodec(True, image_size, num_classes=len(classes) or None, **transform_options)
    stream = ShardStream(
        index.split(split),
        codec,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        shuffle=True,
        pad=False,
        buffer_size=buffer_size,
        repeats=repeats,
        pin_memory=False,
        split_name=split,
    )
    if hasattr(stream, "transform_options"):  # a step-aware schedule edits the codec's options per step
        stream.transform_options = {"image_size": image_size, **transform_options}
    dev, device_id = _device(device)  # images are pinned after DALI, in this process (raw batches hold bytes)
    return DaliStream(
        stream,
        _Pipeline(
            True, image_size, batch_size, device=dev, device_id=device_id, num_threads=num_threads, options=transform_options
        ),
        pin_memory,
    )


def build_eval_stream(
    path: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    image_size: int = 224,
    split: str = "val",
    base: Optional[str] = None,
    pin_memory: bool = False,
    device: Optional[str] = None,
    num_threads: int = 2,
    remote=None,
    **transform_options,
) -> DaliStream:
    """``data.stream.build_eval_stream`` with timm's eval transform in DALI."""
    from ..shards import ShardIndex
    from ..stream import ShardStream

    _require_dali()
    check_transform_options(**{k: v for k, v in transform_options.items() if k != "auto_augment"})
    check_dali_options(**{**transform_options, "auto_augment": None, "color_jitter": 0})
    index = ShardIndex.load(path, base, remote)
    classes = index.classes()
    codec = DaliCodec(False, image_size, num_classes=len(classes) or None)
    stream = ShardStream(
        index.split(split),
        codec,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=0,
        shuffle=False,
        pad=True,
        buffer_size=0,
        pin_memory=False,
        split_name=split,
    )
    dev, device_id = _device(device)
    return DaliStream(
        stream,
        _Pipeline(
            False,
            image_size,
            batch_size,
            device=dev,
            device_id=device_id,
            num_threads=num_threads,
            options=transform_options,
        ),
        pin_memory,
    )
