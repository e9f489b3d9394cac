"""What differs between training a classifier and a detector: model, streams, forward, loss, evaluation.

The step loop in ``launcher.train`` is the same for both; it asks its task for these things. A method
changes them only through its declaration (``stream_fields``: what the training stream reads) and its
events (``loss``: a method that owns the loss replaces the task's); this module names no method.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import RunConfig, remote_options

__all__ = ["ClassificationTask", "DetectionTask", "make_task", "pretrained_source"]

log = logging.getLogger(__name__)


class ClassificationTask:
    def __init__(self, cfg: RunConfig) -> None:
        from methods.registry import stream_fields

        self.cfg = cfg
        self.mixup = None
        self.stream_fields = stream_fields(cfg.methods)  # extra per-sample fields a method reads ("token_labels")

    def build_model(self, pretrained: bool = True):
        """The model and its suffix-token count; ``pretrained``: with ``model.checkpoint``'s weights (a run
        that resumes from its own checkpoint builds without them)."""
        from models import create_classifier

        m = self.cfg.model
        with pretrained_refusals():
            return create_classifier(
                m.name,
                num_classes=m.num_classes,
                img_size=m.img_size,
                drop_path=m.drop_path,
                checkpoint=pretrained_source(m.checkpoint) if pretrained else None,
                reinit_head=m.reinit_head,
                **m.kwargs,
            ), 0

    def build_streams(self, *, micro: int, rank: int, world: int, pin_memory: bool):
        from data.stream import build_eval_stream, build_train_stream
        from data.transforms import StepMixup

        cfg, d = self.cfg, self.cfg.data
        _check_num_classes(cfg)
        if d.backend == "dali":  # the same stream; images made by DALI (GPU when there is one), data/dali/
            from data.dali import build_eval_stream, build_train_stream  # noqa: F811
        common = dict(interpolation=d.interpolation, mean=tuple(d.mean), std=tuple(d.std))  # train and eval alike
        options = dict(
            auto_augment=d.auto_augment,
            re_prob=d.re_prob,
            color_jitter=d.color_jitter,
            scale=tuple(d.scale),
            ratio=tuple(d.ratio),
            hflip=d.hflip,
            vflip=d.vflip,
            **common,
        )
        remote = {"remote": remote_options(d)}  # data/remote.py: s3://, http(s)://, retries, the node cache
        train = build_train_stream(
            d.path,
            batch_size=micro,
            rank=rank,
            world_size=world,
            num_workers=d.workers,
            seed=cfg.train.seed,
            image_size=cfg.model.img_size,
            split=d.train_split,
            buffer_size=d.buffer_size,
            repeats=d.repeats,
            pin_memory=pin_memory,
            **({"token_labels": True} if "token_labels" in self.stream_fields else {}),
            **remote,
            **options,
        )
        evaluation = build_eval_stream(
            d.eval_path or d.path,
            batch_size=micro,
            rank=rank,
            world_size=world,
            num_workers=d.workers,
            image_size=cfg.model.img_size,
            split=d.eval_split,
            crop_pct=d.crop_pct,
            pin_memory=pin_memory,
            **remote,
            **common,
        )
        if d.mixup > 0 or d.cutmix > 0:  # per rank: each rank draws its own lambda and box, as timm does
            self.mixup = StepMixup(
                cfg.model.num_classes,
                mixup_alpha=d.mixup,
                cutmix_alpha=d.cutmix,
                prob=d.mixup_prob,
                label_smoothing=d.label_smoothing,
                seed=cfg.train.seed,
                rank=rank,
            )
        return train, evaluation

    def to_device(self, batch: dict, device) -> dict:
        return _tensors_to(batch, device)

    def forward(self, model, batch: dict, micro_step: int, dtype):
        """The model's fp32 outputs for the micro-batch (logits; a tuple for a model with a dense head).
        With Mixup / CutMix the batch's images are mixed in place and its ``mixed_target`` set first."""
        images = batch["image"]
        if self.mixup is not None:
            images, batch["mixed_target"] = self.mixup(images, batch["label"], micro_step)  # in place, as timm's
        outputs = model(images.to(dtype))
        return outputs.float() if isinstance(outputs, torch.Tensor) else tuple(o.float() for o in outputs)

    def loss(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing, or soft cross-entropy on the Mixup / CutMix targets."""
        if "mixed_target" in batch:
            return torch.sum(-batch["mixed_target"] * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, batch["label"], label_smoothing=self.cfg.data.label_smoothing)

    @torch.no_grad()
    def evaluate(
        self,
        models: dict[str, tuple[Any, torch.dtype]],
        stream,
        device,
        transform: Callable[[dict], dict] = lambda batch: batch,
    ) -> dict[str, float]:
        """Top-1 / top-5 of every model over the eval stream; ``transform`` edits each batch on the
        device first (the plug-ins' ``on_eval_batch``)."""
        totals = torch.zeros(len(models), 3, device=device)  # correct top-1, correct top-5, count
        for batch in stream:
            batch = transform(_tensors_to(batch, device))
            images, labels, valid = batch["image"], batch["label"], batch["valid"]
            for i, (model, dtype) in enumerate(models.values()):
                logits = model(images.to(dtype)).float()
                hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
                totals[i] += torch.stack([(hits[:, 0] & valid).sum(), (hits.any(-1) & valid).sum(), valid.sum()]).float()
        dist.all_reduce(totals)
        results = {}
        for prefix, (top1, top5, count) in zip(models, totals.tolist()):
            results[f"{prefix}top1"], results[f"{prefix}top5"] = top1 / count, top5 / count
        results["eval_samples"] = int(totals[0, 2].item())
        return results


def _check_num_classes(cfg: RunConfig) -> None:
    """``model.num_classes`` covers the classes of the training and eval shards (``classes.json``): a
    start-up refusal naming both numbers instead of an ``IndexError`` in the loss at the first label
    it cannot hold."""
    from data.shards import check_num_classes

    for path in dict.fromkeys(filter(None, (cfg.data.path, cfg.data.eval_path))):
        check_num_classes(path, cfg.model.num_classes, remote=remote_options(cfg.data))


def _tensors_to(batch: dict, device) -> dict:
    """The batch with its tensors on ``device`` (other entries as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class DetectionTask:
    """YOLOS + Hungarian set criterion; COCO AP through pycocotools against ``{eval_split}_coco.json``."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        from models.detection import SetCriterion

        det = cfg.detection
        self.criterion = SetCriterion(
            cfg.model.num_classes,
            eos_coef=det.eos_coef,
            weight_ce=det.weight_ce,
            weight_bbox=det.weight_bbox,
            weight_giou=det.weight_giou,
        )

    def build_model(self, pretrained: bool = True):
        from models.yolos import create_yolos

        m, det = self.cfg.model, self.cfg.detection
        with pretrained_refusals():
            model = create_yolos(
                m.name,
                num_classes=m.num_classes,
                num_det_tokens=det.num_det_tokens,
                img_size=m.img_size,
                init_pe_size=det.init_pe_size,
                mid_pos_embed=det.mid_pos_embed,
                mid_pe_size=det.mid_pe_size,
                drop_path=m.drop_path,
                checkpoint=pretrained_source(m.checkpoint) if pretrained else None,
                **m.kwargs,
            )
        return model, det.num_det_tokens

    def build_streams(self, *, micro: int, rank: int, world: int, pin_memory: bool):
        from data.detection import build_detection_stream

        cfg, d, det = self.cfg, self.cfg.data, self.cfg.detection
        _check_num_classes(cfg)
        patch = self.cfg.model.kwargs.get("patch_size", 16)
        common = dict(
            batch_size=micro,
            rank=rank,
            world_size=world,
            num_workers=d.workers,
            scales=det.scales,
            max_size=det.max_size,
            crop_scales=det.crop_scales,
            crop_size=tuple(det.crop_size),
            eval_size=det.eval_size,
            eval_max_size=det.eval_max_size,
            pad_multiple=patch,
            pin_memory=pin_memory,
        )
        train = build_detection_stream(
            d.path, train=True, seed=cfg.train.seed, split=d.train_split, buffer_size=d.buffer_size, **common
        )
        evaluation = build_detection_stream(d.eval_path or d.path, train=False, split=d.eval_split, **common)
        return train, evaluation

    def to_device(self, batch: dict, device) -> dict:
        return {**_tensors_to(batch, device), "targets": [_tensors_to(t, device) for t in batch["targets"]]}

    def forward(self, model, batch: dict, micro_step: int, dtype) -> dict:
        """The model's outputs (``pred_logits``, ``pred_boxes``)."""
        return model(batch["image"].to(dtype))

    def loss(self, batch: dict, outputs: dict) -> torch.Tensor:
        return self.criterion(outputs, batch["targets"])["loss"]

    @torch.no_grad()
    def evaluate(
        self,
        models: dict[str, tuple[Any, torch.dtype]],
        stream,
        device,
        transform: Callable[[dict], dict] = lambda batch: batch,
    ) -> dict[str, float]:
        """COCO AP of every model over the eval stream; ``transform`` edits each batch's images on the
        device first (the plug-ins' ``on_eval_batch``; boxes are normalised, so a resize keeps them)."""
        from data.detection import coco_evaluate, postprocess

        predictions: dict[str, list] = {prefix: [] for prefix in models}
        samples = 0
        for batch in stream:
            samples += int(batch["valid"].sum())
            images = transform({"image": batch["image"].to(device), "valid": batch["valid"]})["image"]
            for prefix, (model, dtype) in models.items():
                predictions[prefix] += postprocess(model(images.to(dtype)), batch["targets"])
        results: dict[str, float] = {}
        ground_truth = str(Path(self.cfg.data.eval_path or self.cfg.data.path) / f"{self.cfg.data.eval_split}_coco.json")
        for prefix, mine in predictions.items():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            detections = [r for part in gathered for r in part]
            scores = [coco_evaluate(detections, ground_truth)] if dist.get_rank() == 0 else [None]
            dist.broadcast_object_list(scores, src=0)
            results.update({f"{prefix}{k}": v for k, v in scores[0].items()})
        count = torch.tensor([float(samples)], device=device)
        dist.all_reduce(count)
        results["eval_samples"] = int(count.item())
        return results


def pretrained_source(checkpoint: Optional[str]):
    """``model.checkpoint`` as the model builders take it: a file path as it is; a run folder (or a ``step-N``
    folder) of this engine as the fp32 state_dict of its newest checkpoint that verifies (``launcher.export``)."""
    if checkpoint is None or not Path(checkpoint).is_dir():
        return checkpoint
    from models.pretrained import NamedStateDict, PretrainedError

    from .checkpoint import checkpoint_state_dict

    try:
        state, point = checkpoint_state_dict(checkpoint)
    except RuntimeError as err:  # damaged or non-finite checkpoints: named, a start-up refusal
        raise PretrainedError(f"model.checkpoint {checkpoint}: {err}") from err
    log.info("model.checkpoint %s: the run's checkpoint %s (verified)", checkpoint, point.folder)
    return NamedStateDict(state, f"model.checkpoint {checkpoint} ({point.folder.name})")


@contextlib.contextmanager
def pretrained_refusals():
    """A pretrained source that is missing, damaged or does not fit: a start-up refusal (exit 2) naming it."""
    from models.pretrained import PretrainedError

    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        yield
    except (PretrainedError, CheckpointError, FileNotFoundError) as err:
        raise ConfigError(str(err) if isinstance(err, PretrainedError) else f"model.checkpoint: {err}") from err


def make_task(cfg: RunConfig):
    return {"classification": ClassificationTask, "detection": DetectionTask}[cfg.task](cfg)
