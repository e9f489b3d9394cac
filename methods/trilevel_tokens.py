"""Tri-Level E-ViT ("Peeling the Onion", Kong et al., AAAI 2023): the token and attention-connection
levels as a plug-in (the example level is ``methods.trilevel_examples``). Contract:
``/work/shared/TRILEVEL_SPEC.md`` (Level 2, Level 3, Schedules, Training vs evaluation, Cost model).

- Tokens: inside blocks ``locations`` (0-based, official ``pruning_loc = [3, 6, 9]`` in
  ``models/models_attn_tok.py``), after the attention and its residual, keep the ``n_out = ceil(n_in r)``
  patch tokens with the highest class-token attention (head mean, computed without gradient from
  that block's own ``q, k``), then run the MLP on the kept tokens only. Kept tokens stay in
  ascending patch order (official: descending score; equivalent, ``tests`` check it).
- Connections: from the same blocks on, every patch query attends only to its ``k = ceil(n_out a)``
  largest keys of that block's head-mean patch x patch probabilities (restricted to the kept
  tokens); prefix rows and columns stay open. The boolean mask goes into SDPA in the blocks after
  the location up to and including the next one. **It saves no FLOPs**: the kernels are dense,
  the mask is applied elementwise (and SDPA leaves its flash kernel for a masked one: measured in
  ``bench/trilevel_attention.py``).
- Both ratios follow the spec's cosine, a pure function of the step (``ratio``); nothing is saved.

How it sits in the model: ``attach`` replaces ``model.blocks`` (an ``nn.Sequential``) by a
``TriLevelBlocks`` with the same children (state_dict keys unchanged, no parameter or buffer added,
deepcopy-safe for the EMA copy) whose forward threads the connection mask from a location into the
blocks after it (timm's ``Block.forward(x, attn_mask=...)``) and runs the location blocks through
``location_forward``. The per-step settings sit on that module: the kept counts as Python ints
(one compiled graph per distinct tuple: ``shape_variants``) and ``k`` as a 1-D int64 tensor filled
in place (a changing ``k`` changes no shape and no graph). At ``r = a = 1`` every block is called
as timm calls it, so the logits are exactly timm's.

Evaluation: sparse at the targets ``r_T, a_T`` (the official ``evaluate`` passes
``ratio=args.keep_ratio, attn_ratio=args.attn_ratio``, so the paper's accuracies are of the sparse
model) is the primary figure; ``evaluation: both`` also reports the dense model (plain timm: the
plug-in adds nothing to the weights) under the ``dense_`` prefix.

    methods: {trilevel_examples: {...}, trilevel_tokens: {keep_ratio: 0.9, attn_ratio: 0.1}}
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

from models.cost import BlockLoad, ViTShape, forward_flops, keep_patches_after, patches_at

from .base import Declaration, MethodContext, TrainingPlugin
from .registry import register

__all__ = [
    "TriLevelTokensConfig",
    "TriLevelTokensPlugin",
    "TriLevelBlocks",
    "ratio",
    "kept_count",
    "kept_counts",
    "connection_count",
    "attention_scores",
    "keep_index",
    "drop_tokens",
    "connection_mask",
    "location_forward",
    "build",
]

CEIL_TOLERANCE = 1e-9  # spec "Count": 25 * 0.28 is 7.000000000000001 in floats and must give 7
SCORES = ("attention", "random")
MASK_TIES = ("exact_k", "official")
EVALUATIONS = ("sparse", "dense", "both")


# -- the pure core ------------------------------------------------------------------------------------


def ratio(
    step: int, total_steps: int, target: float, warmup: float = 1 / 30, decay_end: float = 11 / 30, constant: bool = False
) -> float:
    """The keep (or connection) ratio at the 0-based global ``step`` of a ``total_steps`` run (spec
    "Schedules"): 1 before ``t_w = warmup T``, ``target`` from ``t_e = decay_end T``, a half cosine
    between. Official ``engine.py`` ``adjust_keep_rate`` (after EViT's ``helpers.py``) with
    ``WARM_UP_EPOCH = 10``, ``TOTAL_DECAY_EPOCH = 100`` of 300 epochs: ``t_w = T / 30``, ``t_e = 11 T / 30``.
    ``constant``: ``target`` at every step (ablation)."""
    if constant:
        return float(target)
    t_w, t_e = warmup * total_steps, decay_end * total_steps
    if step < t_w:
        return 1.0
    if step >= t_e:
        return float(target)
    return target + (1.0 - target) * (1.0 + math.cos(math.pi * (step - t_w) / (t_e - t_w))) / 2.0


def _robust_ceil(value: float) -> int:
    return math.ceil(value - CEIL_TOLERANCE)


def kept_count(n_in: int, keep: float) -> int:
    """Patch tokens a location keeps of ``n_in``: ``ceil(n_in r)`` (robust), clamped to ``[1, n_in]``."""
    return min(n_in, max(1, _robust_ceil(n_in * keep)))


def kept_counts(num_patches: int, keep: float, num_locations: int) -> tuple[int, ...]:
    """Patches after each location: the same ``r`` at every location, so the kept share compounds
    (the official comment: 0.7, 0.49, 0.343). 196 at 0.9 -> (177, 160, 144)."""
    counts, n = [], num_patches
    for _ in range(num_locations):
        n = kept_count(n, keep)
        counts.append(n)
    return tuple(counts)


def connection_count(n: int, attn: float) -> int:
    """Keys each patch query keeps of ``n`` kept patches: ``ceil(n a)`` (robust), clamped to ``[1, n]``."""
    return min(n, max(1, _robust_ceil(n * attn)))


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    num_prefix: int,
    mask: Optional[torch.Tensor] = None,
    patch_probs: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """From a block's ``q, k`` (``[B, H, N, D]``): the class token's head-mean attention on the patch
    keys ``[B, n]`` and (``patch_probs``) the head-mean patch x patch probabilities ``[B, n, n]``, both
    under the boolean ``mask`` (``[B, 1, N, N]``, True = attend; masked entries get exactly 0).
    Softmax in fp32; the class row's softmax runs over every key, prefix included (spec "Level 2")."""
    if not patch_probs:  # the class row only: [B, H, 1, N]; prefix rows are never masked
        logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)
        return logits.float().softmax(dim=-1).mean(dim=1)[:, 0, num_prefix:], None
    logits = ((q * scale) @ k.transpose(-2, -1)).float()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=1)
    return probs[:, 0, num_prefix:], probs[:, num_prefix:, num_prefix:]


def keep_index(scores: torch.Tensor, n_out: int, order: str = "index") -> torch.Tensor:
    """The ``n_out`` highest ``scores`` per row (ties to the lower patch index: a stable descending
    sort), in ascending patch order (``order="score"``: descending score, the official order)."""
    top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :n_out]
    return top if order == "score" else top.sort(dim=-1).values


def drop_tokens(x: torch.Tensor, index: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The prefix tokens and the patch tokens ``index`` (``[B, n_out]``) of ``x``: a gather, so the
    gradient reaches the kept tokens only."""
    patches = x[:, num_prefix:].gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :num_prefix], patches], dim=1)


def connection_mask(probs: torch.Tensor, k: torch.Tensor, num_prefix: int, ties: str = "exact_k") -> torch.Tensor:
    """The boolean attention mask ``[B, 1, P + n, P + n]`` of head-mean patch probabilities ``[B, n, n]``:
    each patch row keeps its ``k`` (0-d int tensor) largest keys; prefix rows and columns open, the
    diagonal not forced. ``exact_k``: exactly ``k`` per row (rank of a stable descending sort, ties
    to the lower index); ``official``: every key ``>=`` the k-th value (ties included, the authors'
    threshold in ``models_attn_tok.py``)."""
    batch, n, _ = probs.shape
    ordered = torch.sort(probs, dim=-1, descending=True, stable=True)
    if ties == "exact_k":  # the first k of each row's order, scattered back to their keys (cheaper than an argsort)
        first = (torch.arange(n, device=probs.device) < k).expand(batch, n, n)
        patch = torch.zeros_like(first).scatter_(-1, ordered.indices, first)
    else:
        threshold = ordered.values.gather(-1, (k - 1).reshape(1, 1, 1).expand(batch, n, 1))
        patch = probs >= threshold
    full = torch.ones(batch, num_prefix + n, num_prefix + n, dtype=torch.bool, device=probs.device)
    full[:, num_prefix:, num_prefix:] = patch
    return full.unsqueeze(1)


def _attention(
    attn: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor], num_prefix: int, patch_probs: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """timm 1.0.31 ``Attention.forward`` (same ops, same order) that also returns the no-gradient
    scores of ``attention_scores`` from the same ``q, k`` (no second qkv projection). Fused: SDPA
    for the output and a separate ``q k^T`` for the scores (the class row only when no patch
    probabilities are needed); unfused: the explicit probabilities serve both."""
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        with torch.no_grad():
            cls_scores, probs = attention_scores(q.detach(), k.detach(), attn.scale, num_prefix, mask, patch_probs)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = logits.softmax(dim=-1)
        with torch.no_grad():
            mean = weights.detach().float().mean(dim=1)
            cls_scores = mean[:, 0, num_prefix:]
            probs = mean[:, num_prefix:, num_prefix:] if patch_probs else None
        out = attn.attn_drop(weights) @ v
    out = out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), cls_scores, probs


def location_forward(
    block: nn.Module,
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    n_out: int,
    k: Optional[torch.Tensor],
    num_prefix: int,
    score: str = "attention",
    ties: str = "exact_k",
    order: str = "index",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A timm ``Block`` at a location: attention over all incoming tokens (under the incoming ``mask``),
    residual and drop path, then keep ``n_out`` patch tokens, then the MLP on the kept ones. Returns
    the tokens and the connection mask for the blocks after it (``k`` None: no mask). With nothing
    to drop and no mask to make it is the block's own forward."""
    n_in = x.shape[1] - num_prefix
    drop = n_out < n_in
    if not drop and k is None:
        return (block(x) if mask is None else block(x, attn_mask=mask)), None
    out, cls_scores, probs = _attention(block.attn, block.norm1(x), mask, num_prefix, patch_probs=k is not None)
    x = x + block.drop_path1(block.ls1(out))
    if drop:
        scores = cls_scores if score == "attention" else torch.rand_like(cls_scores)
        index = keep_index(scores, n_out, order)
        x = drop_tokens(x, index, num_prefix)
        if probs is not None:
            probs = probs.gather(1, index.unsqueeze(-1).expand(-1, -1, n_in))
            probs = probs.gather(2, index.unsqueeze(1).expand(-1, n_out, -1))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, (None if k is None else connection_mask(probs, k, num_prefix, ties))


class TriLevelBlocks(nn.Sequential):
    """``model.blocks`` with the same children; the forward runs the locations through
    ``location_forward`` and passes each location's connection mask to the blocks after it.

    Per-step settings (``TriLevelTokensPlugin.apply``): ``n_in`` / ``n_out`` (Python ints per
    location: a guard, one graph per tuple), ``connect`` (bool), ``k`` (int64 ``[L]`` tensor, filled
    in place: not a buffer, so neither the state_dict nor the graph changes with it)."""

    def __init__(
        self, blocks: Sequence[nn.Module], locations: Sequence[int], num_prefix: int, score: str, ties: str, num_patches: int
    ) -> None:
        super().__init__(*blocks)
        self.locations = tuple(locations)
        self.num_prefix = num_prefix
        self.score = score
        self.ties = ties
        self.order = "index"  # "score": kept tokens in descending score (the official order; tests)
        self.n_in = tuple([num_patches] * len(self.locations))
        self.n_out = self.n_in
        self.connect = False
        self.k = torch.ones(len(self.locations), dtype=torch.long)
        self.k_values = (1,) * len(self.locations)  # what k holds, on the host (never read back from k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask: Optional[torch.Tensor] = None
        location = 0
        for index, block in enumerate(self):
            if location < len(self.locations) and index == self.locations[location]:
                if x.shape[1] - self.num_prefix != self.n_in[location]:  # static shapes: checked at trace time
                    raise RuntimeError(
                        f"trilevel_tokens set its kept counts for {self.n_in[location]} patch tokens into block "
                        f"{index}, but {x.shape[1] - self.num_prefix} arrive: the input grid differs from the one "
                        f"the plug-in saw in on_batch / on_eval_batch, or another method changes the tokens"
                    )
                x, mask = location_forward(
                    block,
                    x,
                    mask,
                    self.n_out[location],
                    self.k[location] if self.connect else None,
                    self.num_prefix,
                    self.score,
                    self.ties,
                    self.order,
                )
                location += 1
            else:
                x = block(x) if mask is None else block(x, attn_mask=mask)
        return x


# -- the config -------------------------------------------------------------------------------------------


@dataclass
class TriLevelTokensConfig:
    summary = ("keep_ratio", "attn_ratio")  # the options a report names the method by (not a recipe key)
    tokens: bool = True  # level 2 on/off (spec "Ablation switches")
    connections: bool = True  # level 3 on/off
    keep_ratio: float = 0.9  # r_T: official README's DeiT-T command (--keep_ratio 0.9; main.py's argparse default: 0.7)
    attn_ratio: float = 0.1  # a_T: official README's DeiT-T command (--attn_ratio 0.1; argparse default: 0.3)
    locations: list = field(default_factory=lambda: [3, 6, 9])  # 0-based blocks: models_attn_tok.py pruning_loc
    warmup: float = 1 / 30  # t_w / T: engine.py WARM_UP_EPOCH = 10 of 300 epochs (spec "Schedules")
    decay_end: float = 11 / 30  # t_e / T: engine.py WARM_UP_EPOCH + TOTAL_DECAY_EPOCH = 110 of 300 epochs
    constant: bool = False  # ratios at their targets from step 0 (ablation: no cosine)
    score: str = "attention"  # class-token attention (official) | random (ablation)
    mask_ties: str = "exact_k"  # exactly k keys per row (spec) | official (every key >= the k-th value)
    evaluation: str = "both"  # sparse (official evaluate: r_T, a_T) | dense | both (sparse is the primary figure)

    def __post_init__(self) -> None:
        for key in ("tokens", "connections", "constant"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        for key in ("keep_ratio", "attn_ratio"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{key} must be a number in (0, 1], got {value!r}")
        if (
            not isinstance(self.locations, list)
            or not self.locations
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in self.locations)
            or self.locations != sorted(set(self.locations))
        ):
            raise ValueError(
                f"locations must be a non-empty increasing list of distinct 0-based block indices, got {self.locations!r}"
            )
        for key in ("warmup", "decay_end"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{key} must be a fraction of the run in [0, 1], got {value!r}")
        if not self.warmup < self.decay_end:
            raise ValueError(
                f"warmup must be below decay_end (fractions of the run), got {self.warmup} and {self.decay_end}"
            )
        for key, allowed in (("score", SCORES), ("mask_ties", MASK_TIES), ("evaluation", EVALUATIONS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not (self.tokens or self.connections):
            raise ValueError(
                "tokens must be true when connections is false (both off leaves nothing to do: drop "
                "the trilevel_tokens section instead)"
            )

    def declare(self) -> Declaration:
        return Declaration(
            token_sites=frozenset(b + 1 for b in self.locations) if self.tokens else frozenset(),  # after a location
            refuses=REFUSES,
            refuses_grad_checkpointing=(
                "timm's checkpointed forward calls the blocks one by one, past the token drop "
                "and the attention mask this method threads through them"
            ),
        )


REFUSES = {  # the methods Tri-Level's tokens / connections do not run next to, and why
    "toe": (
        "ToE's pre-hook refuses an attn_mask and changes the token count the kept counts are set for "
        "(spec 'What it needs from the engine' item 5); trilevel_examples composes with ToE"
    ),
    "token_labelling": (
        "token labelling's dense head scores every patch position at the output, which the token drop "
        "removes, and LV-ViT's blocks scale their residuals, which the location forward re-stating "
        "timm's Block does not"
    ),
    "patch_dropout": (
        "PatchDropout changes the patch count inside the model in training only, so the kept counts "
        "set for the input grid would not match; drop one of them"
    ),
}


# -- the plug-in -----------------------------------------------------------------------------------------


class TriLevelTokensPlugin(TrainingPlugin):
    """Tokens and attention connections of Tri-Level E-ViT: surgery at ``attach``, ratios from the step."""

    name = "trilevel_tokens"

    def __init__(self, config: TriLevelTokensConfig, total_steps: int) -> None:
        self.config = config
        self.total_steps = int(total_steps)
        self.shape: Optional[ViTShape] = None
        self.copies: list[TriLevelBlocks] = []  # the live model's blocks, then the EMA copy's
        self._ratios = (1.0, 1.0)  # (r, a) of the current step
        self._grid: Optional[int] = None  # patch tokens of the input the settings are for
        self._applied: Optional[tuple] = None
        self._variants: Optional[int] = None
        self._window = [0] * (len(config.locations) + 1)  # kept patches x samples per location, samples

    # -- schedule --------------------------------------------------------------------------------

    def ratios(self, step: int) -> tuple[float, float]:
        """``(r(t), a(t))``; a level that is off stays at 1."""
        c = self.config
        keep = ratio(step, self.total_steps, c.keep_ratio, c.warmup, c.decay_end, c.constant) if c.tokens else 1.0
        attn = ratio(step, self.total_steps, c.attn_ratio, c.warmup, c.decay_end, c.constant) if c.connections else 1.0
        return keep, attn

    def counts(self, num_patches: int, keep: float, attn: float) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(n_in, n_out, k)`` per location for ``num_patches`` input patches at ratios ``(r, a)``."""
        n_out = kept_counts(num_patches, keep, len(self.config.locations))
        n_in = (num_patches,) + n_out[:-1]
        return n_in, n_out, tuple(connection_count(n, attn) for n in n_out)

    def _key(self, num_patches: int, keep: float, attn: float) -> tuple:
        """What the compiled forward specialises on: the kept counts and whether a mask is made."""
        n_in, n_out, k = self.counts(num_patches, keep, attn)
        return n_out, any(kk < n for kk, n in zip(k, n_out))

    def shape_variants(self) -> int:
        """Distinct graphs of the forward over the run at the model's nominal grid: one per distinct
        (kept counts, mask made) over the training steps, plus one per evaluation setting (an
        evaluation forward is a graph of its own)."""
        if self._variants is None:
            n, c, total = self.shape.num_patches, self.config, self.total_steps
            t_w, t_e = c.warmup * total, c.decay_end * total
            steps = {0, max(total - 1, 0)} | set(range(max(0, math.floor(t_w)), min(total, math.ceil(t_e) + 1)))
            if c.constant:
                steps = {0}
            keys = {self._key(n, *self.ratios(step)) for step in steps}
            self._variants = len(keys) + len(self.eval_variants())
        return self._variants

    # -- events ----------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        blocks = getattr(model, "blocks", None)
        if type(blocks) is not nn.Sequential:
            raise TypeError(
                f"trilevel_tokens needs a timm VisionTransformer with model.blocks an nn.Sequential, "
                f"got {type(blocks).__name__} in {type(model).__name__}"
            )
        self.shape = ViTShape.from_model(model)
        depth, locations = len(blocks), self.config.locations
        if locations[-1] >= depth:
            raise ValueError(
                f"methods.trilevel_tokens.locations {locations} must be blocks of the model (0-based, "
                f"the model has {depth}: 0..{depth - 1})"
            )
        if getattr(model, "grad_checkpointing", False):
            raise ValueError(
                "trilevel_tokens cannot run with the model's gradient checkpointing: timm's "
                "checkpoint_seq calls the blocks one by one, past the token drop"
            )
        for index in locations:
            block = blocks[index]
            # location_forward re-states timm 1.0.31's Block and Attention forwards: a block that changes
            # them (LV-ViT's scaled residuals) would silently get timm's
            if (
                getattr(type(block), "forward", None) is not Block.forward
                or getattr(type(getattr(block, "attn", None)), "forward", None) is not Attention.forward
            ):
                raise TypeError(
                    f"trilevel_tokens: block {index} ({type(block).__name__} with "
                    f"{type(getattr(block, 'attn', None)).__name__}) does not run timm's Block and "
                    f"Attention forwards, which the token drop re-states"
                )
            if block._forward_hooks or block._forward_pre_hooks:
                raise ValueError(f"trilevel_tokens: block {index} has forward hooks, which its replaced forward would skip")
        model.blocks = TriLevelBlocks(
            list(blocks), locations, self.shape.num_prefix, self.config.score, self.config.mask_ties, self.shape.num_patches
        )
        self.copies = [model.blocks]
        self._grid = self.shape.num_patches

    def on_engine(self, engine: Any, ema: Any = None, stream: Any = None) -> None:
        """The EMA copy (a deepcopy made after ``attach``) has its own ``TriLevelBlocks``: it gets
        the same settings as the live model from now on."""
        if ema is not None:
            blocks = getattr(ema.module, "blocks", None)
            if not isinstance(blocks, TriLevelBlocks):
                raise TypeError("trilevel_tokens: the EMA copy has no TriLevelBlocks (made before attach?)")
            if all(blocks is not known for known in self.copies):
                self.copies.append(blocks)
        self._applied = None
        self.apply()

    def apply(self, ratios: Optional[tuple[float, float]] = None, grid: Optional[int] = None) -> None:
        """Set the counts of ``ratios`` (default: the step's) for ``grid`` input patches on every copy."""
        keep, attn = self._ratios if ratios is None else ratios
        grid = self._grid if grid is None else grid
        state = (grid, keep, attn)
        if state == self._applied:
            return
        n_in, n_out, k = self.counts(grid, keep, attn)
        connect = any(kk < n for kk, n in zip(k, n_out))
        for blocks in self.copies:
            device = next(blocks.parameters()).device
            if blocks.k.device != device:  # once, after the engine moved the model (k is not a buffer)
                blocks.k = blocks.k.to(device)
            blocks.n_in, blocks.n_out, blocks.connect = n_in, n_out, connect
            if blocks.k_values != k:  # fill_ from a Python int: a kernel launch, no host sync (a host->device
                for i, value in enumerate(k):  # copy from pageable memory would wait for the stream)
                    blocks.k[i].fill_(value)
                blocks.k_values = k
        self._applied = state

    def on_step(self, step: int) -> dict[str, float]:
        if not self.copies:
            raise RuntimeError("TriLevelTokensPlugin.attach(model) must run before on_step()")
        self._ratios = self.ratios(step)
        self.apply()
        return self._metrics(self.shape.num_patches, *self._ratios)

    def _metrics(self, grid: int, keep: float, attn: float) -> dict[str, float]:
        n_in, n_out, k = self.counts(grid, keep, attn)
        metrics = {"trilevel/keep_ratio": keep, "trilevel/attn_ratio": attn}
        for block, n, kk in zip(self.config.locations, n_out, k):
            metrics[f"trilevel/kept_patches_{block}"] = float(n)
            metrics[f"trilevel/keys_{block}"] = float(kk)
        return metrics

    def observe(self, samples: int, plan: list[BlockLoad]) -> None:
        """The patches each location kept in a priced training micro-batch (read off the plan: the MLP's
        tokens of the location, so the batch's own grid)."""
        for i, block in enumerate(self.config.locations):
            load = plan[block]
            self._window[i] += (
                (load.tokens if load.mlp_tokens is None else load.mlp_tokens) - self.shape.num_prefix
            ) * samples
        self._window[-1] += samples

    def step_metrics(self) -> dict[str, float]:
        """``trilevel/kept_patches_<block>``: mean patches kept there by the training forwards since the last call."""
        window, self._window = self._window, [0] * (len(self.config.locations) + 1)
        if not window[-1]:
            return {}
        return {f"trilevel/kept_patches_{block}": window[i] / window[-1] for i, block in enumerate(self.config.locations)}

    def _patches(self, images: torch.Tensor) -> int:
        p = self.shape.patch_size
        return (int(images.shape[-2]) // p) * (int(images.shape[-1]) // p)

    def on_batch(self, step: int, batch: dict) -> dict:
        """The kept counts follow the grid of the batch (host metadata only: no sync)."""
        self._grid = self._patches(batch["image"])
        self.apply()
        return batch

    def on_eval_batch(self, step: int, batch: dict) -> dict:
        self.apply(grid=self._patches(batch["image"]))
        return batch

    @contextmanager
    def _evaluating(self, sparse: bool) -> Iterator[None]:
        """Every copy at the targets (sparse) or dense for the evaluation; the step's settings after."""
        saved = self._ratios
        c = self.config
        self._ratios = (c.keep_ratio if c.tokens else 1.0, c.attn_ratio if c.connections else 1.0) if sparse else (1.0, 1.0)
        try:
            self.apply()
            yield
        finally:
            self._ratios = saved
            self.apply()

    def eval_variants(self) -> dict[str, Callable[[], ContextManager]]:
        """``{"": sparse}`` / ``{"": dense}`` / ``{"": sparse, "dense_": dense}`` (``evaluation``)."""
        sparse, dense = (lambda: self._evaluating(True)), (lambda: self._evaluating(False))
        return {"sparse": {"": sparse}, "dense": {"": dense}, "both": {"": sparse, "dense_": dense}}[self.config.evaluation]

    # -- cost ------------------------------------------------------------------------------------

    def plan(self, step: int, plan: list[BlockLoad]) -> list[BlockLoad]:
        """A location's attention on ``P + n_in`` tokens and its MLP on ``P + n_out``; the blocks after it
        on ``P + n_out``. Connections save 0 (dense kernels, the mask applied elementwise). Token counts
        are read off the incoming plan (any grid)."""
        keep, _ = self.ratios(step)
        for block in self.config.locations:
            n_in = patches_at(self.shape, plan, block)
            n_out = kept_count(n_in, keep)
            plan = keep_patches_after(self.shape, plan, block + 1, n_out) if block + 1 < len(plan) else list(plan)
            load = plan[block]
            dropped = n_in - n_out
            mlp = (load.tokens if load.mlp_tokens is None else load.mlp_tokens) - dropped
            plan[block] = BlockLoad(load.tokens, load.head_frac, load.mlp_frac, mlp_tokens=mlp)
        return plan

    def describe(self) -> str:
        c, n = self.config, self.shape.num_patches
        t_w, t_e = c.warmup * self.total_steps, c.decay_end * self.total_steps
        _, n_out, k = self.counts(n, *self.ratios(self.total_steps))
        dense = forward_flops(self.shape)
        lines = [
            f"Tri-Level tokens {'on' if c.tokens else 'off'} (r_T {c.keep_ratio}, score {c.score}), connections "
            f"{'on' if c.connections else 'off'} (a_T {c.attn_ratio}, ties {c.mask_ties}) at blocks "
            f"{c.locations}; "
            + (
                "constant ratios"
                if c.constant
                else f"ratios 1 before step {t_w:.0f}, cosine to the targets at step {t_e:.0f} of {self.total_steps}"
            ),
            f"at the targets, of {n} patches: kept {list(n_out)}, keys per patch query {list(k)}; "
            f"evaluation {c.evaluation}; compiled graphs over the run: {self.shape_variants()}",
            "step      r       a       kept patches      FLOPs share (connections save 0)",
        ]
        for step in sorted({0, round(t_w), round((t_w + t_e) / 2), round(t_e), self.total_steps - 1}):
            if 0 <= step < self.total_steps:
                keep, attn = self.ratios(step)
                share = forward_flops(self.shape, self.plan(step, self.shape.dense_plan())) / dense
                lines.append(
                    f"{step:<9d} {keep:.4f}  {attn:.4f}  {str(list(self.counts(n, keep, attn)[1])):17s} {share:.3f}"
                )
        return "\n".join(lines)


def build(config: TriLevelTokensConfig, context: MethodContext) -> TriLevelTokensPlugin:
    if context.num_suffix:
        raise ValueError(
            "methods.trilevel_tokens: the model has suffix tokens (YOLOS detection tokens), which "
            "the token drop and the class-token score do not handle; use it on classifiers only"
        )
    return TriLevelTokensPlugin(config, context.total_steps)


register("trilevel_tokens", TriLevelTokensConfig, build)
