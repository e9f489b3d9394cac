"""Dense token labels (Token Labeling, Jiang et al. 2021): shard members, the paired image / map
transform, oracle maps for the embedded shapes, and the targets built on the device.

Contract: ``/work/shared/LVVIT_SPEC.md`` ("Dense label maps", "Dense labels in this project's shards").

- Shards: per sample ``KEY.tlv.npy`` (float16 ``[k, h, w]``, teacher logits of the top-k classes per
  map cell) and ``KEY.tli.npy`` (uint16 ``[k, h, w]``, their class ids); ``shards.json`` has a
  ``token_labels`` block (``teacher``, ``input_size``, ``k``, ``h``, ``w``, ``kind: logits``), checked
  when a stream is built (``check_index``). The map covers the whole image (the teacher saw it
  warped to a square), so map coordinates are image coordinates.
- ``TokenLabelCodec`` (training): flip image and map together, RandAugment on the image (photometric
  ops only, see below), a random resized crop of the image whose box is kept, normalised
  ``(x1, y1, x2, y2)``; ToTensor, Normalize, random erasing (image only). Order as
  ``tlt/data/label_transforms_factory.py``. A sample without maps is skipped and counted
  (``missing_token_label``), like one without a ``.cls``.
- ``token_targets`` (device side, in the ``token_labelling`` method): the top-k logits scattered into
  ``[B, K, h, w]`` (0 elsewhere: a missing class keeps logit 0), ``roi_align(aligned=False)`` over the
  box to the token grid and to 1 x 1 (class target), softmax over K (``tlt/data/mixup.py``
  ``get_labelmaps_with_coords``). The box goes to torchvision as ``(x1, y1, x2, y2) * map size - 0.5``;
  the official code passes ``(y1, x1, y2, x2)``, which crops the region mirrored across the diagonal
  (``tests/test_token_labels.py`` pins the order with an asymmetric marker).

Deviation (said): RandAugment's geometric ops (Rotate, ShearX/Y, TranslateX/YRel) are left out of
the policy when token labels are on, instead of being applied to the map too (the official
``random_augment_label.py`` warps the map with scipy); applying them to the map is left for later.
"""

from __future__ import annotations

import io
import random
import re
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import default_collate

__all__ = [
    "TOKEN_LOGITS",
    "TOKEN_IDS",
    "GEOMETRIC_OPS",
    "TokenLabelCodec",
    "encode_maps",
    "decode_maps",
    "check_index",
    "index_block",
    "topk_maps",
    "oracle_maps",
    "dense_maps",
    "token_targets",
    "smooth_targets",
    "with_ground_truth",
    "paired_flip",
    "box_of_crop",
]

TOKEN_LOGITS, TOKEN_IDS = "tlv.npy", "tli.npy"  # WebDataset splits a member name at the first dot of its base
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")  # timm's RandAugment names


# -- shard members and the index block -----------------------------------------------------------


def encode_maps(logits: np.ndarray, ids: np.ndarray) -> dict[str, bytes]:
    """``{tlv.npy, tli.npy}`` members of one sample (``np.save``: byte-reproducible)."""
    logits, ids = np.asarray(logits), np.asarray(ids)
    if logits.shape != ids.shape or logits.ndim != 3:
        raise ValueError(f"token label maps must both be [k, h, w], got {logits.shape} and {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"class ids must fit uint16, got [{ids.min()}, {ids.max()}]")
    out = {}
    for ext, array in ((TOKEN_LOGITS, logits.astype(np.float16)), (TOKEN_IDS, ids.astype(np.uint16))):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        out[ext] = buffer.getvalue()
    return out


def decode_maps(
    sample: dict[str, bytes], block: Optional[dict] = None, num_classes: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits float32 [k, h, w], ids int64 [k, h, w])`` of a raw sample; ``SkipSample`` with
    ``missing_token_label`` when a member is missing and ``bad_token_label`` when it does not parse,
    does not have the index block's shape, or names a class id >= ``num_classes``."""
    from .samples import SkipSample

    if TOKEN_LOGITS not in sample or TOKEN_IDS not in sample:
        raise SkipSample("missing_token_label")
    try:
        logits = np.load(io.BytesIO(sample[TOKEN_LOGITS]), allow_pickle=False)
        ids = np.load(io.BytesIO(sample[TOKEN_IDS]), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise SkipSample("bad_token_label") from None
    shape = None if block is None else (block["k"], block["h"], block["w"])
    if (
        logits.shape != ids.shape
        or logits.ndim != 3
        or (shape is not None and logits.shape != shape)
        or ids.dtype != np.uint16
        or not np.isfinite(logits).all()
        or (num_classes is not None and ids.size and int(ids.max()) >= num_classes)
    ):
        raise SkipSample("bad_token_label")
    return logits.astype(np.float32), ids.astype(np.int64)


def index_block(teacher: str, input_size: int, k: int, h: int, w: int) -> dict[str, Any]:
    """The ``token_labels`` block of ``shards.json``."""
    return {"teacher": str(teacher), "input_size": int(input_size), "k": int(k), "h": int(h), "w": int(w), "kind": "logits"}


def check_index(meta: dict, where: str, num_classes: Optional[int] = None) -> dict[str, Any]:
    """The index's ``token_labels`` block, checked; ``ValueError`` naming ``where`` and the field."""
    from .shards import ShardIndexError as Refused  # a start-up refusal: exit 2 with this message

    block = meta.get("token_labels")
    if not isinstance(block, dict):
        raise Refused(
            f"{where} has no 'token_labels' block: these shards carry no dense token labels. Write "
            f"them with `python -m launcher.label --oracle --shards DIR --out DIR_labelled` (synthetic "
            f"data) or `--teacher RUN` (a trained run of this engine)"
        )
    for key in ("k", "h", "w", "input_size"):
        if not isinstance(block.get(key), int) or isinstance(block.get(key), bool) or block[key] < 1:
            raise Refused(f"{where}: token_labels.{key} must be an int >= 1, got {block.get(key)!r}")
    if block.get("kind") != "logits":
        raise Refused(f"{where}: token_labels.kind must be 'logits', got {block.get('kind')!r}")
    if num_classes is not None and block["k"] > num_classes:
        raise Refused(f"{where}: token_labels.k={block['k']} is more than the {num_classes} classes")
    return block


# -- maps from logits and from the synthetic shapes ---------------------------------------------


def topk_maps(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``[K, h, w]`` logits -> the top-k ``(logits, ids)`` per cell, each ``[k, h, w]`` (largest first)."""
    values, ids = logits.float().topk(k, dim=0)
    return values.cpu().numpy(), ids.cpu().numpy()


# logit of the object's class in a fully covered cell. The class target is the map pooled over the crop
# (roi_align 1 x 1: the mean logit), so this sets how sure it is: an object covering 20% of the crop gets
# softmax(30 x 0.2 = 6) = 0.93 against 31 zeros (at 10 it was 0.19: a near-flat class target)
ORACLE_LOGIT = 30.0


def oracle_maps(region: np.ndarray, label: int, num_classes: int, grid: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact maps of a synthetic image: ``region`` ``[H, W]`` bool (where the object is), ``grid x grid``
    cells. Per cell the object's class gets ``ORACLE_LOGIT x`` the covered fraction; the other top-k
    entries are the next classes with logit 0, as every class missing from the map: a background cell
    gives a flat, low-confidence target (LVVIT_SPEC "Oracle maps")."""
    size_h, size_w = region.shape
    if size_h % grid or size_w % grid:
        raise ValueError(f"the oracle grid {grid} must divide the image size {region.shape}")
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in [1, {num_classes}], got {k}")
    covered = region.reshape(grid, size_h // grid, grid, size_w // grid).mean(axis=(1, 3))
    logits = np.zeros((k, grid, grid), np.float32)
    logits[0] = ORACLE_LOGIT * covered
    ids = ((label + np.arange(k)) % num_classes)[:, None, None] * np.ones((1, grid, grid), np.int64)
    return logits, ids


# -- the paired transform -----------------------------------------------------------------------


def paired_flip(image, logits: np.ndarray, ids: np.ndarray):
    """Horizontal flip of the image and of the maps' W axis."""
    from PIL import Image

    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), logits[:, :, ::-1].copy(), ids[:, :, ::-1].copy()


def box_of_crop(top: int, left: int, height: int, width: int, image_h: int, image_w: int) -> np.ndarray:
    """A crop ``(top, left, height, width)`` in pixels -> normalised ``(x1, y1, x2, y2)``."""
    return np.asarray([left / image_w, top / image_h, (left + width) / image_w, (top + height) / image_h], np.float32)


def _photometric_rand_augment(auto_augment: str, mean: Sequence[float]):
    """timm's RandAugment of ``auto_augment`` (``rand-m9-mstd0.5-inc1``) with its geometric ops left out."""
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS, rand_augment_transform

    sections = auto_augment.split("-")
    if sections[0] != "rand" or any(part.startswith("t") for part in sections[1:]):
        raise ValueError(
            f"auto_augment {auto_augment!r}: token labelling supports RandAugment strings "
            f"('rand-m9-mstd0.5-inc1') without a transform set ('t...')"
        )
    increasing = any(re.fullmatch(r"inc1", part) for part in sections[1:])
    ops = [op for op in (_RAND_INCREASING_TRANSFORMS if increasing else _RAND_TRANSFORMS) if op not in GEOMETRIC_OPS]
    hparams = {"img_mean": tuple(min(255, round(255 * m)) for m in mean)}
    return rand_augment_transform(auto_augment, hparams, transforms=ops)


class TokenLabelCodec:
    """Raw sample -> (image tensor, label, map logits, map ids, crop box); a batch -> dict of tensors
    (``image``, ``label``, ``token_logits`` ``[B, k, h, w]`` float32, ``token_ids`` int64, ``token_box``
    ``[B, 4]``, ``sample_id``, ``valid``). Randomness from Python's ``random`` and torch's global RNG,
    which the stream seeds per sample (``_decode_seeded``), so a resumed stream repeats it exactly."""

    def __init__(
        self,
        image_size: int,
        block: dict,
        *,
        num_classes: Optional[int] = None,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        color_jitter: float = 0.3,
        interpolation: str = "bicubic",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        from timm.data.random_erasing import RandomErasing
        from torchvision import transforms as T

        from .transforms import check_transform_options

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
        )
        if vflip:
            raise ValueError(
                "token labelling has no vertical flip of the maps (the official pipeline has none): set data.vflip to 0"
            )
        self.image_size, self.block, self.num_classes = int(image_size), block, num_classes
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.interpolation = T.InterpolationMode(interpolation)
        self.augment = _photometric_rand_augment(auto_augment, mean) if auto_augment else None
        # timm's create_transform: colour jitter only when there is no auto-augment policy
        self.jitter = T.ColorJitter(*(float(color_jitter),) * 3) if color_jitter and not auto_augment else None
        self.finish = T.Compose([T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])
        self.erase = RandomErasing(re_prob, mode="pixel", max_count=1, device="cpu") if re_prob > 0 else None

    def decode(self, sample: dict[str, bytes]):
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as F

        from .samples import decode_image, read_label

        label = read_label(sample, self.num_classes)
        logits, ids = decode_maps(sample, self.block, self.num_classes)
        image = decode_image(sample)
        if random.random() < self.hflip:  # 1. flip, image and map
            image, logits, ids = paired_flip(image, logits, ids)
        if self.augment is not None:  # 2. RandAugment on the full image (photometric only)
            image = self.augment(image)
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, self.ratio)  # 3. crop the image
        box = box_of_crop(top, left, height, width, image.height, image.width)
        image = F.resized_crop(image, top, left, height, width, [self.image_size, self.image_size], self.interpolation)
        if self.jitter is not None:
            image = self.jitter(image)
        tensor = self.finish(image)  # 4. ToTensor, Normalize, random erasing
        if self.erase is not None:
            tensor = self.erase(tensor)
        return tensor, label, torch.from_numpy(logits), torch.from_numpy(ids), torch.from_numpy(box)

    def collate(self, decoded: list, ids: list[int], valid: list[bool]) -> dict[str, torch.Tensor]:
        filler = next((d for d in decoded if d is not None), None)
        if filler is None:
            raise RuntimeError("a batch without a single readable sample")
        rows = [d or filler for d in decoded]
        # default_collate stacks straight into shared memory in a DataLoader worker (ClassificationCodec.collate)
        return {
            "image": default_collate([r[0] for r in rows]),
            "label": torch.tensor([d[1] if d is not None else -1 for d in decoded], dtype=torch.long),
            "token_logits": default_collate([r[2] for r in rows]),
            "token_ids": default_collate([r[3] for r in rows]),
            "token_box": default_collate([r[4] for r in rows]),
            "sample_id": torch.tensor(ids, dtype=torch.long),
            "valid": torch.tensor(valid, dtype=torch.bool),
        }


# -- targets on the device ----------------------------------------------------------------------


def dense_maps(logits: torch.Tensor, ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Top-k ``[B, k, h, w]`` -> dense ``[B, K, h, w]`` logits, 0 for the classes not in a cell's top-k
    (``mixup.py`` ``get_featuremaps``). Class ids were checked against the classes when decoded (no
    host read here)."""
    batch, _, height, width = logits.shape
    dense = logits.new_zeros(batch, num_classes, height, width)
    return dense.scatter_(1, ids, logits)


def token_targets(
    logits: torch.Tensor,
    ids: torch.Tensor,
    boxes: torch.Tensor,
    num_classes: int,
    grid: tuple[int, int],
    official_box_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_cls [B, K], t_tok [B, gh * gw, K])``: softmax of the box's teacher logits pooled to 1 x 1 and
    to the token grid (row-major, the ViT's patch order) by ``roi_align(aligned=False)``, box scaled to
    map pixels minus 0.5 (naver-ai/relabel_imagenet #13). ``official_box_order`` passes the box as
    TokenLabeling does, ``(y1, x1, y2, x2)`` (for the test that shows it is wrong)."""
    from torchvision.ops import roi_align

    dense = dense_maps(logits.float(), ids, num_classes)
    height, width = dense.shape[-2:]
    boxes = boxes.float()
    if official_box_order:
        boxes = boxes[:, [1, 0, 3, 2]]
    scale = boxes.new_tensor([width, height, width, height])
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes * scale - 0.5], dim=1)
    cls = roi_align(dense, rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1, aligned=False)
    tok = roi_align(dense, rois, output_size=tuple(grid), spatial_scale=1.0, sampling_ratio=-1, aligned=False)
    t_cls = cls.flatten(1).softmax(-1)
    t_tok = tok.flatten(2).transpose(1, 2).softmax(-1)
    return t_cls, t_tok


def smooth_targets(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``p (1 - s + s/K) + s/K`` (``mixup.py``): sums to ``1 + s/K``, an official quirk kept."""
    off = smoothing / targets.shape[-1]
    return targets * (1.0 - smoothing + off) + off


def with_ground_truth(t_cls: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The official ``--ground-truth`` mix: ``r t + (1 - r) one_hot``, ``r = 0.9 - 0.4 [argmax t == label]``."""
    one_hot = torch.nn.functional.one_hot(labels, t_cls.shape[-1]).to(t_cls.dtype)
    ratio = 0.9 - 0.4 * (t_cls.argmax(-1) == labels).to(t_cls.dtype)[:, None]
    return ratio * t_cls + (1 - ratio) * one_hot
