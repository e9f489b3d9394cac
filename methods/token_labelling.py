"""Token labelling (Jiang et al., NeurIPS 2021) with MixToken, as a plug-in, for LV-ViT (``models/lvvit.py``).

Contract: ``/work/shared/LVVIT_SPEC.md`` ("MixToken", "The token-labeling objective").

- ``on_batch``: the micro-batch's dense targets from its maps and crop boxes (``data.token_labels.
  token_targets``: class target ``t_cls [B, K]`` = the 1 x 1 pooled teacher label of the crop, token
  targets ``t_tok [B, N, K]``), optionally the ground-truth mix, then MixToken: one box per
  micro-batch drawn from ``(seed, step, micro-batch, rank)`` is written into the model's ``mix_mask``
  (the model swaps the box's tokens with the flipped batch after the stem and swaps the aux logits
  back), and ``t_cls`` is mixed with the area actually swapped; label smoothing last.
- ``loss``: ``w_cls SoftCE(cls, t_cls) + w_dense mean_{B N} SoftCE(aux, t_tok)``
  (``tlt/loss/cross_entropy.py`` ``TokenLabelCrossEntropy``), ``token_label_loss``, replaces the
  classifier's loss (the declaration says ``owns_loss``); its declaration also has the training stream
  read the shards' dense labels (``stream_fields``) and refuses recipes that would disturb MixToken.
- ``step_metrics``: ``token_labelling/loss_cls`` and ``token_labelling/loss_dense`` over the log window
  (the terms the loss event computed, kept on the device until the log step).
- ``after_step``: the stem's BatchNorm statistics broadcast from rank 0 (no SyncBN, as official; the
  broadcast keeps evaluation and resumed runs identical across ranks).
- ``plan``: nothing (MixToken and the targets cost no model FLOPs; the aux head is in ``models.cost``).

    methods: {token_labelling: {w_dense: 1.0}}     # model.name: lvvit_s
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Declaration, MethodContext, TrainingPlugin
from .registry import register

__all__ = ["TokenLabellingConfig", "TokenLabellingPlugin", "mix_token_box", "token_label_loss", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sum_k -t_k log softmax(x)_k`` over the last axis (one value per row)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1)


def token_label_loss(
    cls_logits: torch.Tensor,
    aux_logits: torch.Tensor,
    t_cls: torch.Tensor,
    t_tok: torch.Tensor,
    w_cls: float = 1.0,
    w_dense: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, class term, dense term)``; the dense mean runs over all ``B x N`` positions (ToE's
    zero-padded ones included, LVVIT_SPEC)."""
    cls_term = soft_cross_entropy(cls_logits, t_cls).mean()
    dense_term = soft_cross_entropy(aux_logits, t_tok).mean()
    return w_cls * cls_term + w_dense * dense_term, cls_term, dense_term


def mix_token_box(
    grid: tuple[int, int], seed: int, step: int, micro: int, rank: int
) -> tuple[tuple[int, int, int, int], float]:
    """MixToken's box ``(row0, row1, col0, col1)`` on the token grid and ``lam' = 1 - area / N``.

    ``lvvit.py`` ``rand_bbox``: ``lam ~ Beta(1, 1)``, ``cut = int(side * sqrt(1 - lam))``, centre uniform
    in the grid, rows ``clip(cy - cut // 2) .. clip(cy + cut // 2)`` (an odd cut loses a row, as
    official). Drawn from ``(seed, step, micro-batch, rank)`` instead of the global numpy RNG."""
    height, width = grid
    rng = np.random.default_rng([int(seed), int(step), int(micro), int(rank), 0x70C])
    lam = rng.beta(1.0, 1.0)
    cut_h, cut_w = int(height * math.sqrt(1.0 - lam)), int(width * math.sqrt(1.0 - lam))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    row0, row1 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    col0, col1 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return (row0, row1, col0, col1), 1.0 - (row1 - row0) * (col1 - col0) / (height * width)


@dataclass
class TokenLabellingConfig:
    summary = ("w_dense",)  # the options a report names the method by (not a recipe key: no annotation)
    w_cls: float = 1.0  # TokenLabeling main.py --cls-weight default (every commit)
    w_dense: float = 1.0  # TokenLabeling main.py --dense-weight default; VOLO's main.py uses 0.5
    smoothing: float = 0.1  # main.py --smoothing, applied to both targets after the softmax
    mix_token: bool = True  # lvvit.py mix_token=True in every registered LV-ViT
    ground_truth: bool = False  # main.py --ground-truth (off): mix the dataset label into t_cls

    def __post_init__(self) -> None:
        for name in ("w_cls", "w_dense"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.w_cls == 0 and self.w_dense == 0:
            raise ValueError("w_cls and w_dense are both 0: nothing to train")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")

    def declare(self) -> Declaration:
        """The training stream reads the shards' dense labels; the loss is this method's; the rest of the
        recipe must leave MixToken its batch (``recipe_check``)."""
        return Declaration(stream_fields=frozenset({"token_labels"}), owns_loss=True, recipe_check=_recipe_refusal)


class TokenLabellingPlugin(TrainingPlugin):
    name = "token_labelling"

    def __init__(self, config: TokenLabellingConfig, *, seed: int = 0, rank: int = 0) -> None:
        self.config, self.seed, self.rank = config, int(seed), int(rank)
        self.model: Optional[nn.Module] = None
        self.grid: tuple[int, int] = (0, 0)
        self.num_classes = 0
        self._micro = 0
        self._window: list = []  # (class term, dense term) device tensors since the last log

    def attach(self, model: nn.Module) -> None:
        if not isinstance(getattr(model, "aux_head", None), nn.Linear) or not hasattr(model, "mix_mask"):
            raise TypeError(
                f"methods.token_labelling needs a model with a dense aux head and a MixToken mask "
                f"(LV-ViT: model.name lvvit_t / lvvit_s / lvvit_m), got {type(model).__name__}"
            )
        self.model = model
        model.dense_outputs = True  # training forwards return (cls_logits, aux_logits)
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
        self.num_classes = int(model.num_classes)

    def on_step(self, step: int) -> dict[str, float]:
        self._micro = 0
        return {}

    @torch.no_grad()
    def on_batch(self, step: int, batch: dict) -> dict:
        """Targets and MixToken for one training micro-batch (on the device)."""
        for key in ("token_logits", "token_ids", "token_box"):
            if key not in batch:
                raise KeyError(
                    f"methods.token_labelling: the batch has no {key!r}: the training stream must read "
                    f"dense token labels (the method's declared stream_fields)"
                )
        c = self.config
        t_cls, t_tok = _targets(batch, self.num_classes, self.grid)
        if c.ground_truth:
            from data.token_labels import with_ground_truth

            t_cls = with_ground_truth(t_cls, batch["label"])
        mask = self.model.mix_mask
        if c.mix_token:
            if len(t_cls) % 2:
                raise ValueError(f"MixToken needs an even micro-batch, got {len(t_cls)}")
            (row0, row1, col0, col1), lam = mix_token_box(self.grid, self.seed, step, self._micro, self.rank)
            box = torch.zeros(self.grid, dtype=torch.bool)
            box[row0:row1, col0:col1] = True
            mask.copy_(box.flatten())  # in place: a buffer of the model, on its device
            t_cls = lam * t_cls + (1.0 - lam) * t_cls.flip(0)
        else:
            mask.zero_()
        self._micro += 1
        from data.token_labels import smooth_targets

        return {
            **batch,
            "cls_target": smooth_targets(t_cls, c.smoothing),
            "token_target": smooth_targets(t_tok, c.smoothing),
        }

    def after_step(self, step: int) -> None:
        """The stem's BatchNorm statistics from rank 0 on every rank (``models.lvvit.broadcast_batchnorm``):
        evaluation then agrees across ranks and a checkpoint resumes every rank exactly."""
        from models.lvvit import broadcast_batchnorm

        broadcast_batchnorm(self.model)

    def loss(self, step: int, batch: dict, outputs: Any) -> torch.Tensor:
        """``w_cls SoftCE(cls, t_cls) + w_dense mean SoftCE(aux, t_tok)`` on the targets ``on_batch`` put in the
        batch; ``outputs`` are the training forward's ``(cls_logits, aux_logits)``."""
        if "cls_target" not in batch:
            raise KeyError("methods.token_labelling: the batch has no 'cls_target' (its on_batch builds it)")
        cls_logits, aux_logits = outputs
        c = self.config
        loss, cls_term, dense_term = token_label_loss(
            cls_logits.float(), aux_logits.float(), batch["cls_target"], batch["token_target"], c.w_cls, c.w_dense
        )
        self._window.append(torch.stack([cls_term, dense_term]).detach())
        return loss

    def step_metrics(self) -> dict[str, float]:
        window, self._window = self._window, []
        if not window:
            return {}
        cls_term, dense_term = torch.stack(window).mean(0).tolist()  # one host read per log step
        return {"token_labelling/loss_cls": cls_term, "token_labelling/loss_dense": dense_term}

    def describe(self) -> str:
        c = self.config
        return (
            f"token labelling: w_cls {c.w_cls} w_dense {c.w_dense} smoothing {c.smoothing} MixToken "
            f"{'on' if c.mix_token else 'off'} ground truth {'on' if c.ground_truth else 'off'}; token grid "
            f"{self.grid[0]}x{self.grid[1]}, {self.num_classes} classes"
        )


def _recipe_refusal(recipe: Any) -> Optional[str]:
    """What in the rest of the recipe (a ``launcher.config.RunConfig``) token labelling cannot run with."""
    d = recipe.data
    if d.mixup > 0 or d.cutmix > 0:
        return "it replaces Mixup / CutMix with MixToken (LV-ViT's recipe: both 0): set data.mixup and data.cutmix to 0"
    if d.backend != "pil":
        return "it reads its maps through the PIL path: set data.backend=pil"
    if not recipe.model.name.startswith("lvvit_"):
        return f"it needs a model with a dense aux head (model.name lvvit_t, lvvit_s or lvvit_m), got {recipe.model.name!r}"
    if d.vflip:
        return "it has no vertical flip of the label maps: set data.vflip to 0"
    return None


def _targets(batch: dict, num_classes: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    from data.token_labels import token_targets

    return token_targets(batch["token_logits"], batch["token_ids"], batch["token_box"], num_classes, grid)


def build(config: TokenLabellingConfig, context: MethodContext) -> TokenLabellingPlugin:
    if context.task != "classification":
        raise ValueError(f"methods.token_labelling is for task: classification, got {context.task!r}")
    return TokenLabellingPlugin(config, seed=context.seed, rank=context.rank)


register("token_labelling", TokenLabellingConfig, build)
