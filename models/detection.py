"""DETR/YOLOS set prediction: Hungarian matching and the set criterion.

Boxes are normalised ``cx, cy, w, h``; box conversions and generalized IoU come from
``torchvision.ops``, the assignment from ``scipy.optimize.linear_sum_assignment``. Matching and
losses run in float32 (autocast off) whatever the model's precision.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["hungarian_match", "SetCriterion"]


def _xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


@torch.no_grad()
def hungarian_match(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    targets: list[dict],
    *,
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
) -> list[tuple]:
    """Per image, ``(prediction indices, target indices)`` of the minimum-cost one-to-one matching.

    Cost = ``-cost_class * p(target class) + cost_bbox * L1 + -cost_giou * GIoU``, as in DETR / YOLOS.
    """
    batch, queries = pred_logits.shape[:2]
    prob = pred_logits.flatten(0, 1).float().softmax(-1)
    boxes = pred_boxes.flatten(0, 1).float()
    labels = torch.cat([t["labels"] for t in targets])
    target_boxes = torch.cat([t["boxes"] for t in targets]).float()
    if len(labels) == 0:
        empty = torch.empty(0, dtype=torch.long)
        return [(empty, empty) for _ in targets]
    with torch.autocast(boxes.device.type, enabled=False):  # float32 costs under any autocast
        cost = (
            cost_bbox * torch.cdist(boxes, target_boxes, p=1)
            - cost_class * prob[:, labels]
            - cost_giou * generalized_box_iou(_xyxy(boxes), _xyxy(target_boxes))
        )
    cost = cost.view(batch, queries, -1).cpu()
    sizes = [len(t["labels"]) for t in targets]
    matches = []
    for i, block in enumerate(cost.split(sizes, dim=-1)):
        rows, cols = linear_sum_assignment(block[i].numpy())
        matches.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return matches


class SetCriterion(nn.Module):
    """Cross-entropy (no-object class down-weighted by ``eos_coef``) + L1 + GIoU over matched pairs.

    Box losses are summed and divided by the number of target boxes in the global batch
    (all-reduced over ranks, at least 1), so every rank's gradient has the same scale.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        eos_coef: float = 0.1,
        weight_ce: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weights = {"loss_ce": weight_ce, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.costs = dict(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou)
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)

    def num_boxes(self, targets: list[dict], device: torch.device) -> float:
        count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count /= dist.get_world_size()
        return max(count.item(), 1.0)

    def forward(self, outputs: dict[str, torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        with torch.autocast(outputs["pred_boxes"].device.type, enabled=False):  # float32 matching and losses
            return self._losses(outputs["pred_logits"].float(), outputs["pred_boxes"].float(), targets)

    def _losses(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        matches = hungarian_match(logits, boxes, targets, **self.costs)
        batch_index = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(matches)]).to(logits.device)
        query_index = torch.cat([rows for rows, _ in matches]).to(logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        matched_labels = torch.cat([t["labels"][cols] for t, (_, cols) in zip(targets, matches)]).to(logits.device)
        target_classes[batch_index, query_index] = matched_labels
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.class_weight.to(logits.device))
        num_boxes = self.num_boxes(targets, logits.device)
        predicted = boxes[batch_index, query_index]
        wanted = torch.cat([t["boxes"][cols] for t, (_, cols) in zip(targets, matches)]).to(logits.device).float()
        loss_bbox = F.l1_loss(predicted, wanted, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(_xyxy(predicted), _xyxy(wanted))) if len(wanted) else predicted.sum(-1)
        loss_giou = (1 - giou).sum() / num_boxes
        losses = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        losses["loss"] = sum(self.weights[k] * v for k, v in losses.items())
        return losses
