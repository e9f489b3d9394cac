"""Budgeted Training's surgery: ``SlicedLinear`` (full parameters, the forward uses the active rows /
columns), the per-block slices, the seeded growth values, and the access to full fp32 weights and Adam
moments under ZeRO that growth needs (``methods.budgeted`` is the plug-in)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .budgeted_schedule import StageModel

__all__ = ["SlicedLinear", "BlockSlices", "slice_model", "growth_seed", "initial_values"]


INIT_STD, INIT_LOW, INIT_HIGH = 0.02, -2.0, 2.0  # timm init_weights_vit_timm: trunc_normal_(std=.02), a=-2, b=2


# -- surgery ------------------------------------------------------------------------------------


class SlicedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses only its first ``active_out`` rows (in each of ``groups``
    equal row blocks: qkv's q, k, v) and first ``active_in`` columns; ``None`` uses all. The
    parameters keep their full shapes, so ZeRO, checkpoints and strict loads see plain Linears."""

    groups: int = 1
    active_out: Optional[int] = None
    active_in: Optional[int] = None

    @classmethod
    def convert(cls, linear: nn.Linear, groups: int = 1) -> "SlicedLinear":
        if type(linear) is not nn.Linear or linear.out_features % groups:
            raise TypeError(f"expected an nn.Linear with out_features divisible by {groups}, got {linear}")
        linear.__class__ = cls
        linear.groups, linear.active_out, linear.active_in = groups, None, None
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.active_out is not None:
            rows = self.out_features // self.groups
            weight = weight.view(self.groups, rows, self.in_features)[:, : self.active_out].reshape(-1, self.in_features)
            if bias is not None:
                bias = bias.view(self.groups, rows)[:, : self.active_out].reshape(-1)
        if self.active_in is not None:
            weight = weight[:, : self.active_in]
        return F.linear(x, weight, bias)

    def active_mask(self, name: str, active_out: Optional[int], active_in: Optional[int]) -> torch.Tensor:
        """Boolean mask of the entries of parameter ``name`` (``weight`` / ``bias``) a forward with these spans uses."""
        rows = self.out_features // self.groups
        out = torch.zeros(self.groups, rows, dtype=torch.bool)
        out[:, : rows if active_out is None else active_out] = True
        out = out.reshape(-1)
        if name == "bias":
            return out
        cols = torch.zeros(self.in_features, dtype=torch.bool)
        cols[: self.in_features if active_in is None else active_in] = True
        return out[:, None] & cols[None, :]


@dataclass
class BlockSlices:
    """One block's sliced pieces."""

    index: int
    attn: nn.Module
    qkv: SlicedLinear
    proj: SlicedLinear
    fc1: SlicedLinear
    fc2: SlicedLinear

    def set(self, stage: StageModel, num_heads: int, hidden: int) -> None:
        head_dim = self.attn.head_dim
        heads = None if stage.heads == num_heads else stage.heads * head_dim
        mlp = None if stage.mlp == hidden else stage.mlp
        self.attn.num_heads, self.attn.attn_dim = stage.heads, stage.heads * head_dim
        self.qkv.active_out, self.proj.active_in = heads, heads
        self.fc1.active_out, self.fc2.active_in = mlp, mlp

    def spans(self, stage: StageModel, num_heads: int, hidden: int) -> dict[str, tuple[Optional[int], Optional[int]]]:
        """``(active_out, active_in)`` of each sliced Linear at ``stage``."""
        head_dim = self.attn.head_dim
        heads = None if stage.heads == num_heads else stage.heads * head_dim
        mlp = None if stage.mlp == hidden else stage.mlp
        return {"attn.qkv": (heads, None), "attn.proj": (None, heads), "mlp.fc1": (mlp, None), "mlp.fc2": (None, mlp)}


def slice_model(model: nn.Module) -> list[BlockSlices]:
    """Swap every block's ``qkv`` / ``proj`` / ``fc1`` / ``fc2`` to ``SlicedLinear`` (in place; a model
    already sliced, such as a deep copy of one, is only read)."""
    out = []
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        problems = [
            what
            for what, bad in (
                ("attention with a scale norm", not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)),
                ("a gated attention", getattr(attn, "gate", None) is not None),
                ("an MLP norm", not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)),
                ("heads of another width than embed_dim / num_heads", attn.attn_dim != attn.num_heads * attn.head_dim),
            )
            if bad
        ]
        if problems or not all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim")):
            raise TypeError(
                f"methods.budgeted: block {i} ({type(block).__name__}) is not a timm ViT block it can "
                f"slice: {', '.join(problems) or 'no qkv / proj / num_heads / head_dim'}"
            )
        pieces = []
        for linear, groups in ((attn.qkv, 3), (attn.proj, 1), (mlp.fc1, 1), (mlp.fc2, 1)):
            pieces.append(linear if isinstance(linear, SlicedLinear) else SlicedLinear.convert(linear, groups))
        out.append(BlockSlices(i, attn, *pieces))
    return out


def growth_seed(seed: int, stage: int, name: str) -> int:
    """The generator seed of parameter ``name``'s draws at the start of ``stage``: the same on every rank."""
    digest = hashlib.sha256(f"budgeted/{seed}/{stage}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_values(param_shape: torch.Size, name: str, seed: int, stage: int) -> torch.Tensor:
    """timm's init of a ViT Linear (``init_weights_vit_timm``): truncated normal std 0.02 for weights,
    zeros for biases; drawn in float32 on the CPU from the seeded generator."""
    values = torch.zeros(param_shape, dtype=torch.float32)
    if name.endswith(".weight"):
        generator = torch.Generator().manual_seed(growth_seed(seed, stage, name))
        nn.init.trunc_normal_(values, std=INIT_STD, a=INIT_LOW, b=INIT_HIGH, generator=generator)
    return values


# -- optimizer and ZeRO access --------------------------------------------------------------------


def _partitioned(param: nn.Parameter) -> bool:
    """The fp32 master lives in DeepSpeed's partitions (ZeRO 1-3, or the bf16 optimizer), not in the parameter."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _torch_optimizer(engine: Any):
    optimizer = getattr(engine, "optimizer", None)
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _relink_optimizer_states(optimizer: Any) -> None:
    """Point every ZeRO-1/2 parameter's optimizer-state fragments at the moments of its group.

    DeepSpeed 0.19.8 links them once, right after the first parameter group's first step
    (``stage_1_and_2.py`` ``_optimizer_step``), when the other groups (here: no weight decay) have no
    moments yet, so ``safe_get_full_optimizer_state`` raises "exp_avg not found" for their
    parameters. Linking again once every group has stepped is what DeepSpeed meant to do; a no-op
    for other optimizers.
    """
    groups = getattr(optimizer, "bit16_groups", None)
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None)
    inner = getattr(optimizer, "optimizer", None)
    if groups is None or flats is None or inner is None:
        return
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    for params, flat in zip(groups, flats):
        if flat in inner.state:
            lazy_init_hp_params_optimizer_state(params, flat, inner.state)


def _full_fp32(param: nn.Parameter) -> torch.Tensor:
    if _partitioned(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    return param.data.float()


def _set_full_fp32(param: nn.Parameter, value: torch.Tensor) -> None:
    if _partitioned(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value)
    # ZeRO-0 fp32: the parameter is the master; written with the module parameters


def _full_state(param: nn.Parameter, optimizer: Any, key: str) -> Optional[torch.Tensor]:
    if _partitioned(param):
        from deepspeed.utils import safe_get_full_optimizer_state

        return safe_get_full_optimizer_state(param, key)
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    return state.get(key)


def _set_full_state(param: nn.Parameter, optimizer: Any, key: str, value: torch.Tensor) -> None:
    if _partitioned(param):
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(param, value, key)
    else:
        optimizer.state[param][key].copy_(value)
