"""Detection samples: image + boxes through YOLOS-style transforms, padded batches, COCO evaluation.

Shards hold an image (``.jpg``/``.png``) and ``.json`` ``{"boxes": [[x0, y0, x1, y1], ...] (pixels),
"labels": [...], "image_id": int, "width": W, "height": H}`` (what ``data.write_shards synthetic``
writes). Transforms are ``torchvision.transforms.v2``, which move the boxes with the image.

Resizing follows YOLOS (``datasets/transforms.py`` ``resize``): the shorter side goes to the
scale unless the longer one would pass ``max_size``, and both sides are then floored to a
multiple of ``pad_multiple`` (the patch size; YOLOS floors to 16). Batches pad every image to
the largest height and width of the batch (rounded up to ``pad_multiple``): image at the top
left, zeros below and to the right.
Target boxes are ``cx, cy, w, h`` normalised by the *unpadded* image (``size``), as YOLOS
(``Normalize``) does, so a box means the same whatever the rest of the batch pads it to;
``postprocess`` multiplies them by ``orig_size``, as YOLOS's ``PostProcess``.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any, Callable, Optional, Sequence

import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .samples import SkipSample, decode_image
from .stream import ShardStream

__all__ = [
    "RandomSizeCrop",
    "RandomResize",
    "resized_size",
    "build_detection_transform",
    "DetectionCodec",
    "postprocess",
    "coco_evaluate",
    "build_detection_stream",
]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class RandomSizeCrop(v2.Transform):
    """Crop a random ``h x w`` region, each side uniform in ``[min_size, min(max_size, side)]`` (DETR/YOLOS)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low_w, low_h = min(self.min_size, width), min(self.min_size, height)
        crop_w = int(torch.randint(low_w, max(min(width, self.max_size), low_w) + 1, ()))
        crop_h = int(torch.randint(low_h, max(min(height, self.max_size), low_h) + 1, ()))
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.crop, inpt, **params)


def resized_size(height: int, width: int, size: int, max_size: Optional[int] = None, multiple: int = 1) -> tuple[int, int]:
    """YOLOS's output size (``get_size_with_aspect_ratio``): shorter side ``size``, unless the longer
    side would pass ``max_size``; then both sides floored to ``multiple`` (at least one multiple)."""
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        out_h, out_w = height, width
    elif width < height:
        out_h, out_w = int(size * height / width), size
    else:
        out_h, out_w = size, int(size * width / height)
    return max(multiple, out_h - out_h % multiple), max(multiple, out_w - out_w % multiple)


class RandomResize(v2.Transform):
    """Resize to ``resized_size`` at a scale drawn uniformly from ``sizes`` (YOLOS ``T.RandomResize``)."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None, multiple: int = 1) -> None:
        super().__init__()
        self.sizes, self.max_size, self.multiple = [int(s) for s in sizes], max_size, int(multiple)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        return {"size": list(resized_size(height, width, size, self.max_size, self.multiple))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, size=params["size"], antialias=True)


def build_detection_transform(
    train: bool,
    *,
    scales: Sequence[int],
    max_size: int,
    crop_scales: Sequence[int] = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
    eval_size: Optional[int] = None,
    eval_max_size: Optional[int] = None,
    multiple: int = 1,
):
    """YOLOS's training transform (``datasets/coco.py`` ``make_coco_transforms``: flip; multi-scale
    resize capped at ``max_size``, or resize + random crop + multi-scale resize) or its eval transform
    (``eval_size`` capped at ``eval_max_size``; default ``scales[-1]`` and ``max_size``)."""
    normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    if not train:
        size = scales[-1] if eval_size is None else eval_size
        return v2.Compose([RandomResize([size], max_size if eval_max_size is None else eval_max_size, multiple), normalize])
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomChoice(
                [
                    RandomResize(scales, max_size, multiple),
                    v2.Compose(
                        [
                            RandomResize(crop_scales, None, multiple),
                            RandomSizeCrop(*crop_size),
                            RandomResize(scales, max_size, multiple),
                        ]
                    ),
                ]
            ),
            v2.SanitizeBoundingBoxes(labels_getter=lambda sample: sample["labels"]),
            normalize,
        ]
    )


class DetectionCodec:
    """Raw sample -> (image tensor, target); a list of those -> a padded batch."""

    def __init__(self, transform: Callable, *, num_classes: Optional[int] = None, pad_multiple: int = 1) -> None:
        self.transform, self.num_classes, self.pad_multiple = transform, num_classes, pad_multiple

    def decode(self, sample: dict[str, bytes]):
        if "json" not in sample:
            raise SkipSample("missing_boxes")
        try:
            meta = json.loads(sample["json"])
            boxes = torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor(meta["labels"], dtype=torch.long).reshape(-1)
        except (ValueError, KeyError, TypeError):
            raise SkipSample("bad_boxes") from None
        if len(boxes) != len(labels) or not torch.isfinite(boxes).all() or (boxes[:, 2:] <= boxes[:, :2]).any():
            raise SkipSample("bad_boxes")
        crowd = torch.tensor(meta.get("iscrowd", [0] * len(labels)), dtype=torch.bool).reshape(-1)
        if len(crowd) == len(labels) and crowd.any():  # crowd regions are not targets (as in DETR / YOLOS)
            boxes, labels = boxes[~crowd], labels[~crowd]
        if (labels < 0).any() or (self.num_classes is not None and (labels >= self.num_classes).any()):
            raise SkipSample("bad_label")
        image = TF.pil_to_tensor(decode_image(sample))
        height, width = image.shape[-2:]
        out = self.transform(
            {
                "image": tv_tensors.Image(image),
                "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
                "labels": labels,
            }
        )
        size = out["image"].shape[-2:]
        target = {
            "boxes": out["boxes"].as_subclass(torch.Tensor).float(),
            "labels": out["labels"],
            "image_id": torch.tensor(int(meta.get("image_id", -1))),
            "orig_size": torch.tensor([height, width]),
            "size": torch.tensor(list(size)),
        }
        return out["image"].as_subclass(torch.Tensor), target

    def collate(self, decoded: list, ids: list[int], valid: list[bool]) -> dict[str, Any]:
        real = [d for d in decoded if d is not None]
        if not real:
            raise RuntimeError("a batch without a single readable sample")
        m = self.pad_multiple
        height = -(-max(image.shape[-2] for image, _ in real) // m) * m
        width = -(-max(image.shape[-1] for image, _ in real) // m) * m
        images = torch.zeros(len(decoded), 3, height, width)
        targets = []
        for i, entry in enumerate(decoded):
            if entry is None:  # evaluation padding
                targets.append(
                    {
                        "boxes": torch.zeros(0, 4),
                        "labels": torch.zeros(0, dtype=torch.long),
                        "image_id": torch.tensor(-1),
                        "orig_size": torch.tensor([height, width]),
                        "size": torch.tensor([height, width]),
                    }
                )
                continue
            image, target = entry
            images[i, :, : image.shape[-2], : image.shape[-1]] = image
            size_h, size_w = target["size"].tolist()  # the unpadded image: the pad of the batch does not move a box
            normalised = box_convert(target["boxes"], "xyxy", "cxcywh") / torch.tensor([size_w, size_h, size_w, size_h])
            targets.append({**target, "boxes": normalised})
        return {
            "image": images,
            "targets": targets,
            "sample_id": torch.tensor(ids, dtype=torch.long),
            "valid": torch.tensor(valid, dtype=torch.bool),
        }


@torch.no_grad()
def postprocess(outputs: dict[str, torch.Tensor], targets: list[dict]) -> list[dict]:
    """COCO result entries (``image_id, category_id, bbox [x, y, w, h] in original pixels, score``):
    each query's best class that is not no-object. Boxes are relative to the unpadded image, so
    they scale by ``orig_size`` alone (YOLOS ``PostProcess``)."""
    prob = outputs["pred_logits"].float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    results = []
    for i, target in enumerate(targets):
        if int(target["image_id"]) < 0:
            continue
        orig_h, orig_w = target["orig_size"].tolist()
        scale = torch.tensor([orig_w, orig_h] * 2, dtype=torch.float32)
        boxes = box_convert(outputs["pred_boxes"][i].float().cpu() * scale, "cxcywh", "xywh")
        for box, score, label in zip(boxes.tolist(), scores[i].tolist(), labels[i].tolist()):
            results.append(
                {"image_id": int(target["image_id"]), "category_id": int(label), "bbox": box, "score": float(score)}
            )
    return results


def coco_evaluate(results: list[dict], ground_truth: str) -> dict[str, float]:
    """AP, AP50, AP75 and AP for small / medium / large objects through pycocotools' COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ground_truth)
        if not results:
            return {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    return {name: float(value) for name, value in zip(names, evaluator.stats[:6])}


def build_detection_stream(
    path: str,
    *,
    train: bool,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    split: Optional[str] = None,
    scales: Sequence[int],
    max_size: int,
    crop_scales: Sequence[int] = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
    eval_size: Optional[int] = None,
    eval_max_size: Optional[int] = None,
    pad_multiple: int = 16,
    buffer_size: int = 1000,
    base: Optional[str] = None,
    pin_memory: bool = False,
) -> ShardStream:
    """The classification stream's guarantees (equal batches, exact resume, counted skips) for detection.

    ``pad_multiple`` (the patch size) is also the multiple YOLOS floors resized sides to. With
    ``pin_memory`` the DataLoader pins the images and every target tensor (it pins nested lists and
    dicts), so their ``non_blocking`` copies to the GPU do not block the host.
    """
    from .shards import ShardIndex

    index = ShardIndex.load(path, base)
    transform = build_detection_transform(
        train,
        scales=scales,
        max_size=max_size,
        crop_scales=crop_scales,
        crop_size=crop_size,
        eval_size=eval_size,
        eval_max_size=eval_max_size,
        multiple=pad_multiple,
    )
    codec = DetectionCodec(transform, num_classes=len(index.classes()) or None, pad_multiple=pad_multiple)
    split = split or ("train" if train else "val")
    return ShardStream(
        index.split(split),
        codec,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        shuffle=train,
        pad=not train,
        buffer_size=buffer_size if train else 0,
        split_name=split,
        pin_memory=pin_memory,
    )
