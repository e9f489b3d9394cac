"""Recipes: YAML -> typed dataclasses, validated once at start-up.

A recipe may start from another (``base: deit_small.yaml``, relative to the recipe), then
``key=value`` overrides from the command line apply (``train.steps=100 methods.toe.r1=0.4``; values
are YAML). Unknown keys and bad values are errors that name the key, raised before any process
group starts. ``resolved(cfg)`` is what gets written to the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

__all__ = [
    "RunConfig",
    "ConfigError",
    "load_config",
    "resolved",
    "deepspeed_config",
    "recipe_changes",
    "RESUMABLE",
    "remote_options",
]

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("launcher.config")


class ConfigError(ValueError):
    """A recipe problem; the message names the key.

    ``collective``: every rank reached the same verdict together (the ranks' agreement, a resume's
    recipe check), so rank 0 alone reports it; otherwise every rank that meets it logs it."""

    def __init__(self, message: str, *, collective: bool = False) -> None:
        super().__init__(message)
        self.collective = collective


@dataclass
class ModelConfig:
    name: str = "deit_tiny_patch16_224"
    num_classes: int = 1000
    img_size: int = 224
    drop_path: float = 0.1
    # pretrained weights to fine-tune from (docs/finetuning.md), nothing is downloaded: a .pth (bare / under model /
    # state_dict), a .safetensors, launcher.export output, or a run folder of this engine (its newest verified
    # checkpoint). A run that resumes from its own checkpoint does not apply it.
    checkpoint: Optional[str] = None
    reinit_head: bool = False  # fresh classifier heads even when the file's class count matches (a new label set)
    # timm's activation checkpointing of the blocks: each block's activations are recomputed in backward
    # (about one more forward of the blocks per step) instead of kept; a method may refuse it (its reason)
    grad_checkpointing: bool = False
    kwargs: dict = field(default_factory=dict)  # more timm.create_model arguments (patch_size, depth, ...)


@dataclass
class DataConfig:
    path: str = "data/shards/synthetic"
    eval_path: Optional[str] = None  # shards of the eval split, if not in ``path``
    synthetic: bool = False  # write the embedded synthetic shards to ``path`` if they are not there
    synthetic_objects: int = 1  # objects per synthetic image (classification: 1)
    synthetic_token_labels: int = 0  # with synthetic: also exact (oracle) token-label maps on this grid; 0: none
    train_split: str = "train"
    eval_split: str = "val"
    workers: int = 2
    backend: str = "pil"  # pil: timm's transform in the DataLoader workers; dali: NVIDIA DALI (data/dali/)
    buffer_size: int = 1000
    repeats: int = 1
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    color_jitter: float = 0.3
    crop_pct: float = 0.875
    # the train transform's random resized crop, flips and resampling, and the normalisation; the
    # defaults are DeiT's (timm create_transform's, which DeiT's datasets.build_transform keeps).
    # The eval transform uses the same interpolation, mean and std.
    scale: list = field(default_factory=lambda: [0.08, 1.0])  # crop area, fraction of the image
    ratio: list = field(default_factory=lambda: [0.75, 1.3333333333333333])  # crop aspect ratio range
    hflip: float = 0.5
    vflip: float = 0.0
    interpolation: str = "bicubic"
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    label_smoothing: float = 0.1
    # shards on object storage / HTTP (data.path = s3://bucket/prefix, http(s)://host/prefix, pipe:CMD; data/remote.py)
    s3_endpoint: Optional[str] = None  # S3 endpoint URL; null: AWS_ENDPOINT_URL[_S3] / the profile's / AWS
    remote_retries: int = 6  # retries of a failing read (consecutive; progress resets the count)
    remote_backoff: float = 1.0  # seconds before the first retry, doubled each retry ...
    remote_backoff_max: float = 30.0  # ... up to this
    remote_timeout: float = 60.0  # seconds to connect and between bytes
    max_lost_share: float = 0.0  # share of a reader's shards an epoch may lose to outages; more stops the job
    cache_dir: Optional[str] = None  # node-local cache of remote shards (fetched once per node); null: none
    cache_size_gb: float = 100.0  # the cache's bound (least recently used shards evicted)


@dataclass
class OptimConfig:
    base_lr: float = 5e-4  # per 512 images: lr = base_lr * global_batch / 512
    lr: Optional[float] = None  # absolute; overrides base_lr
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: Optional[float] = None  # max gradient norm; null: none (written as 0.0, not DeepSpeed's default 1.0)
    fused: Optional[bool] = None  # torch AdamW(fused=True), one kernel for all parameters; null: on CUDA only


@dataclass
class TrainConfig:
    epochs: Optional[float] = 300.0
    steps: Optional[int] = None  # total optimizer steps; overrides epochs
    global_batch: int = 1024
    grad_accum: int = 1
    precision: str = "bf16"
    # bf16 runs: the dtype gradients are accumulated over micro-batches and all-reduced in (DeepSpeed's
    # data_types.grad_accum_dtype and communication_data_type); null: fp32 on ZeRO 1-3, bf16 on ZeRO-0
    # (DeepSpeed 0.19.8 has no fp32 accumulation without ZeRO)
    grad_precision: Optional[str] = None
    zero_stage: int = 1
    ds_config: Optional[str] = None  # default ds_configs/zero{stage}_{precision}.json
    seed: int = 0
    ema: bool = False
    ema_decay: float = 0.99996
    eval_every: int = 0  # optimizer steps; 0: at the end only
    eval_on_start: bool = False  # also evaluate before the first step of a fresh run
    log_every: int = 50
    collective_timeout_minutes: float = 30.0
    # torch.compile of the model: one static graph per method stage and one for evaluation (dynamic=False,
    # fullgraph=True: a graph break is an error, not a silent fall-back to eager); null: on CUDA only
    compile: Optional[bool] = None
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: Dynamo + autograd, no code generation)
    # steps between the ranks' agreement on a pending SIGTERM / SIGUSR1 (an all-reduce and a host read): a
    # signal is acted on within this many steps; 1 checks every step (a host sync per step)
    signal_check_every: int = 10


@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps; 0: at the end and on a signal only
    keep: int = 3


@dataclass
class DetectionConfig:  # defaults: hustvl/YOLOS main.py and datasets/coco.py for YOLOS-S (recipes name sources)
    num_det_tokens: int = 100
    # [h, w] px grid the ImageNet position table is resampled to once; null: model.img_size
    init_pe_size: Optional[list] = None
    mid_pos_embed: bool = False
    mid_pe_size: Optional[list] = None  # [h, w] px grid of the mid position tables; null: init_pe_size
    scales: list = field(default_factory=lambda: list(range(480, 801, 16)))
    max_size: int = 1333
    crop_scales: list = field(default_factory=lambda: [400, 500, 600])
    crop_size: list = field(default_factory=lambda: [384, 600])
    eval_size: Optional[int] = None  # shorter side at evaluation; null: scales[-1]
    eval_max_size: Optional[int] = None  # longer-side cap at evaluation; null: max_size
    eos_coef: float = 0.1
    weight_ce: float = 1.0
    weight_bbox: float = 5.0
    weight_giou: float = 2.0


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    task: str = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    # the speed-up methods, in the order their events fire: registered name -> options (methods/registry.py)
    methods: dict = field(default_factory=dict)
    method_modules: list = field(default_factory=list)  # extra modules that register methods (your own)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


CHOICES = {
    "task": ("classification", "detection"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.grad_precision": ("fp32", "bf16"),
    "train.zero_stage": (0, 1, 2, 3),
    "data.backend": ("pil", "dali"),
}


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric option: ``low``/``high`` bounds, each inclusive unless ``*_open``;
    ``each``: the option is a list and every element must lie in the range."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    each: bool = False

    def __contains__(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        def number(v) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        if self.low is not None and self.high is not None:
            text = (
                f"in {'(' if self.low_open else '['}{number(self.low)}, {number(self.high)}{')' if self.high_open else ']'}"
            )
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {number(self.low)}"
        else:
            text = f"{'<' if self.high_open else '<='} {number(self.high)}"
        return ("a list of numbers, each " if self.each else "") + text


def _at_least(low, *, open_=False) -> Range:
    return Range(low=low, low_open=open_)


POSITIVE, COUNT, NONNEGATIVE = _at_least(0, open_=True), _at_least(1), _at_least(0)
PROBABILITY, FRACTION = Range(0, 1), Range(0, 1, high_open=True)

# Every numeric option of the recipe and its allowed values, checked before any process group starts
# (tests/test_reliability.py checks that every int / float field of the config dataclasses is listed:
# a new numeric option gets its line here). A null Optional value is always allowed. Lists of
# numbers with a structure of their own (data.scale, data.mean, detection.scales, ...) are checked
# in ``_validate`` / ``check_transform_options``.
RANGES: dict[str, Range] = {
    "model.num_classes": COUNT,
    "model.img_size": COUNT,
    "model.drop_path": FRACTION,
    "data.synthetic_objects": COUNT,
    "data.workers": NONNEGATIVE,
    "data.buffer_size": NONNEGATIVE,
    "data.synthetic_token_labels": NONNEGATIVE,
    "data.repeats": COUNT,
    "data.re_prob": PROBABILITY,
    "data.color_jitter": NONNEGATIVE,
    "data.crop_pct": Range(0, 1, low_open=True),
    "data.hflip": PROBABILITY,
    "data.vflip": PROBABILITY,
    "data.mixup": NONNEGATIVE,
    "data.cutmix": NONNEGATIVE,
    "data.mixup_prob": PROBABILITY,
    "data.label_smoothing": FRACTION,
    "data.remote_retries": NONNEGATIVE,
    "data.remote_backoff": NONNEGATIVE,
    "data.remote_backoff_max": NONNEGATIVE,
    "data.remote_timeout": POSITIVE,
    "data.max_lost_share": PROBABILITY,
    "data.cache_size_gb": POSITIVE,
    "optim.base_lr": POSITIVE,
    "optim.lr": POSITIVE,
    "optim.min_lr": NONNEGATIVE,
    "optim.warmup_lr": NONNEGATIVE,
    "optim.warmup_epochs": NONNEGATIVE,
    "optim.weight_decay": NONNEGATIVE,
    "optim.betas": Range(0, 1, high_open=True, each=True),
    "optim.eps": POSITIVE,
    "optim.clip_grad": POSITIVE,
    "train.epochs": POSITIVE,
    "train.steps": COUNT,
    "train.global_batch": COUNT,
    "train.grad_accum": COUNT,
    "train.seed": Range(0, 2**32 - 1),
    "train.ema_decay": FRACTION,
    "train.eval_every": NONNEGATIVE,
    "train.log_every": COUNT,
    "train.collective_timeout_minutes": POSITIVE,
    "train.signal_check_every": COUNT,
    "checkpoint.every": NONNEGATIVE,
    "checkpoint.keep": COUNT,
    "detection.num_det_tokens": COUNT,
    "detection.max_size": COUNT,
    "detection.eval_size": COUNT,
    "detection.eval_max_size": COUNT,
    "detection.eos_coef": Range(0, 1, low_open=True),
    "detection.weight_ce": NONNEGATIVE,
    "detection.weight_bbox": NONNEGATIVE,
    "detection.weight_giou": NONNEGATIVE,
}


def _check_ranges(cfg: "RunConfig", sections: typing.Container[str]) -> None:
    """Every option of ``RANGES`` in ``sections`` inside its range; the error names the key, the range
    and the value."""
    for key, allowed in RANGES.items():
        section, name = key.split(".")
        if section not in sections:
            continue
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        values = value if allowed.each else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v in allowed for v in values):
            raise ConfigError(f"{key} must be {allowed.describe()}, got {value!r}")


def _yaml_error(source: str, err: yaml.YAMLError) -> ConfigError:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return ConfigError(f"{source}: YAML syntax error{where}: {problem}")


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path in seen:
        raise ConfigError(f"recipe {path} includes itself through 'base'")
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise _yaml_error(f"recipe {path}", err) from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_yaml((path.parent / base).resolve(), seen + (path,)), data)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise _yaml_error(f"override {override!r}", err) from None


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _check_type(key, value, next(a for a in args if a is not type(None)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    expected = {list: list, dict: dict}.get(origin or hint, hint)
    if (
        expected is bool
        and not isinstance(value, bool)
        or (expected is not bool and (isinstance(value, bool) or not isinstance(value, expected)))
    ):
        raise ConfigError(f"{key} must be {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'; {prefix.rstrip('.') or 'the recipe'} has: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, key + ".")
        else:
            kwargs[name] = _check_type(key, value, hints[name])
            if key in CHOICES and kwargs[name] is not None and kwargs[name] not in CHOICES[key]:
                raise ConfigError(f"{key} must be one of {CHOICES[key]}, got {value!r}")
    return cls(**kwargs)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(cfg: RunConfig) -> None:
    _check_ranges(cfg, {"model", "data", "optim", "train", "checkpoint"})  # detection.*: for task: detection
    t, o, d, c = cfg.train, cfg.optim, cfg.data, cfg.checkpoint
    positive = {
        "train.global_batch": t.global_batch,
        "train.grad_accum": t.grad_accum,
        "model.img_size": cfg.model.img_size,
        "model.num_classes": cfg.model.num_classes,
        "checkpoint.keep": c.keep,
        "data.repeats": d.repeats,
        "train.log_every": t.log_every,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in {
        "train.eval_every": t.eval_every,
        "checkpoint.every": c.every,
        "data.workers": d.workers,
        "data.buffer_size": d.buffer_size,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if t.steps is None and t.epochs is None:
        raise ConfigError("set train.steps or train.epochs")
    if t.steps is not None and t.steps < 1 or t.epochs is not None and t.epochs <= 0:
        raise ConfigError(f"train.steps must be >= 1 and train.epochs > 0, got {t.steps} and {t.epochs}")
    if not 0 <= cfg.model.drop_path < 1 or not 0 <= d.label_smoothing < 1 or not 0 <= d.mixup_prob <= 1:
        raise ConfigError("model.drop_path, data.label_smoothing in [0, 1) and data.mixup_prob in [0, 1]")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas must hold two numbers, got {o.betas}")
    if o.clip_grad is not None and o.clip_grad <= 0:
        raise ConfigError(f"optim.clip_grad must be > 0 or null, got {o.clip_grad}")
    if d.synthetic_objects < 1 or (cfg.task == "classification" and d.synthetic_objects != 1):
        raise ConfigError(f"data.synthetic_objects must be >= 1 (and 1 for classification), got {d.synthetic_objects}")
    from data.synthetic import check_synthetic_options, synthetic_geometry  # light: numpy only

    try:
        check_synthetic_options(**synthetic_geometry(d, cfg.model.img_size))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    _validate_remote(cfg)
    from data.transforms import check_transform_options  # light: no torch / timm import

    try:  # timm would refuse some of these only inside a DataLoader worker, or not at all
        check_transform_options(
            "data.",
            scale=d.scale,
            ratio=d.ratio,
            hflip=d.hflip,
            vflip=d.vflip,
            interpolation=d.interpolation,
            mean=d.mean,
            std=d.std,
            re_prob=d.re_prob,
            color_jitter=d.color_jitter,
            crop_pct=d.crop_pct,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if d.backend == "dali":  # data/dali/: what of the transform the DALI path implements
        from data.dali import check_dali_options, dali_available  # light: no DALI / torch import

        if cfg.task != "classification":
            raise ConfigError("data.backend=dali is for task: classification (detection reads through PIL)")
        if not dali_available():
            raise ConfigError(
                "data.backend=dali needs NVIDIA DALI: pip install -r requirements-dali.txt (or set data.backend=pil)"
            )
        try:
            check_dali_options(
                "data.", auto_augment=d.auto_augment, interpolation=d.interpolation, color_jitter=d.color_jitter
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err
    det = cfg.detection
    if cfg.task == "detection":
        if det.num_det_tokens < 1 or not det.scales or len(det.crop_size) != 2 or det.max_size <= max(det.scales):
            raise ConfigError(
                "detection: num_det_tokens >= 1, non-empty scales all below max_size (the cap on the "
                "longer side), crop_size [min, max]"
            )
        _check_ranges(cfg, {"detection"})
        patch = cfg.model.kwargs.get("patch_size", 16)  # what DetectionTask pads and floors sizes to
        for key in ("init_pe_size", "mid_pe_size"):
            size = getattr(det, key)
            if size is not None and (len(size) != 2 or not all(_whole(v) and v >= patch for v in size)):
                raise ConfigError(
                    f"detection.{key} must be null or [height, width] in pixels, each an int >= the "
                    f"patch size {patch}, got {size!r}"
                )
        if det.mid_pe_size is not None and not det.mid_pos_embed:
            raise ConfigError("detection.mid_pe_size is set but detection.mid_pos_embed is false")
        eval_size = det.scales[-1] if det.eval_size is None else det.eval_size
        eval_max = det.max_size if det.eval_max_size is None else det.eval_max_size
        if not all(_whole(v) and v >= patch for v in [*det.scales, *det.crop_scales, eval_size]) or eval_max <= eval_size:
            raise ConfigError(
                f"detection: scales, crop_scales and eval_size must be ints >= the patch size {patch}, and "
                f"eval_max_size ({eval_max}) above eval_size ({eval_size})"
            )
        if d.mixup > 0 or d.cutmix > 0:
            raise ConfigError("data.mixup and data.cutmix must be 0 for task: detection")
    if t.ema and t.zero_stage == 3:
        raise ConfigError(
            "train.ema with train.zero_stage=3 is not supported: ZeRO-3 partitions the weights the "
            "EMA averages; use stage 0-2 or turn the EMA off"
        )
    if t.compile and t.zero_stage == 3:
        raise ConfigError(
            "train.compile with train.zero_stage=3 is not supported: ZeRO-3's parameter fetch hooks "
            "are excluded from tracing, so the model cannot compile to one graph (launcher/perf.py); "
            "use stage 0-2 or train.compile=false"
        )
    if t.grad_precision is not None and t.precision != "bf16" and t.grad_precision != t.precision:
        raise ConfigError(
            f"train.grad_precision={t.grad_precision} is for train.precision=bf16 (fp32 runs keep fp32 "
            f"gradients, fp16 runs DeepSpeed's loss-scaled fp16 ones); got train.precision={t.precision}: "
            f"leave it null"
        )
    if t.grad_precision == "fp32" and t.zero_stage == 0:
        raise ConfigError(
            "train.grad_precision=fp32 with train.precision=bf16 needs train.zero_stage 1-3: DeepSpeed "
            "0.19.8 has no fp32 gradient accumulation for bf16 without ZeRO (NotImplementedError in "
            "engine._do_optimizer_sanity_check); set train.grad_precision=bf16 or a ZeRO stage"
        )
    if t.ds_config is not None and not _ds_path(cfg).is_file():
        raise ConfigError(f"train.ds_config {t.ds_config} does not exist")
    cfg.methods = _methods(cfg.methods, cfg.method_modules)
    _check_declarations(cfg)


def _validate_remote(cfg: RunConfig) -> None:
    """data.path / data.eval_path locations and the remote options (data/remote.py)."""
    from data.remote import check_location, is_remote  # light: no boto3 import

    d = cfg.data
    if not _whole(d.remote_retries):
        raise ConfigError(f"data.remote_retries must be an int >= 0, got {d.remote_retries!r}")
    if d.remote_backoff_max < d.remote_backoff:
        raise ConfigError(
            f"data.remote_backoff_max ({d.remote_backoff_max}) must be >= data.remote_backoff ({d.remote_backoff})"
        )
    if d.s3_endpoint is not None and not re.match(r"^https?://[^/\s]+", d.s3_endpoint):
        raise ConfigError(f"data.s3_endpoint must be an http(s):// URL, got {d.s3_endpoint!r}")
    if d.cache_dir is not None and not d.cache_dir.strip():
        raise ConfigError("data.cache_dir must be a folder path or null")
    locations = {"data.path": d.path, "data.eval_path": d.eval_path}
    for key, location in locations.items():
        if location is None:
            continue
        try:
            check_location(location)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
    remote = [key for key, location in locations.items() if location is not None and is_remote(location)]
    if not remote:
        return
    if d.synthetic:
        raise ConfigError(
            f"data.synthetic writes the embedded shards to a local folder; {remote[0]} is remote: "
            f"write them with `python -m data.write_shards synthetic DIR --upload URL` instead"
        )
    if cfg.task != "classification":
        raise ConfigError(
            f"{remote[0]} is remote, but task: {cfg.task} reads its COCO ground truth from a local "
            f"folder: remote shards are for task: classification"
        )
    if any(str(location).startswith("s3://") for location in locations.values() if location):
        import importlib.util

        if importlib.util.find_spec("boto3") is None:
            raise ConfigError(f"{remote[0]} is on S3, which needs boto3: pip install -r requirements.txt")


def remote_options(d: DataConfig):
    """The recipe's ``data.*`` remote keys as ``data.remote.RemoteOptions``."""
    from data.remote import RemoteOptions

    return RemoteOptions(
        s3_endpoint=d.s3_endpoint,
        retries=d.remote_retries,
        backoff=d.remote_backoff,
        backoff_max=d.remote_backoff_max,
        timeout=d.remote_timeout,
        max_lost_share=d.max_lost_share,
        cache_dir=d.cache_dir,
        cache_bytes=int(d.cache_size_gb * 2**30),
    )


def _methods(sections: dict, modules: list) -> dict:
    """``methods:`` -> ``{name: validated config}`` through the registry, in the recipe's order; a
    ``null`` section drops a method a base recipe listed."""
    import importlib

    import methods as registry  # registers the built-in methods

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"method_modules: cannot import {module!r}: {err}") from err
    built = {}
    for name, options in sections.items():
        if options is None:
            continue
        try:
            method = registry.method(name)
        except KeyError as err:
            raise ConfigError(f"methods.{name}: {err.args[0]}") from None
        try:
            built[name] = _build(method.config, options, f"methods.{name}.")
        except ConfigError:
            raise
        except ValueError as err:  # the method's own validation (its __post_init__): name the key
            field_name = str(err).split(" ", 1)[0]
            known = {f.name for f in dataclasses.fields(method.config)}
            raise ConfigError(f"methods.{name}.{err}" if field_name in known else f"methods.{name}: {err}") from err
    try:
        registry.check_combination(built)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return built


def _check_declarations(cfg: RunConfig) -> None:
    """What the methods' declarations refuse in the rest of the recipe: ``model.checkpoint`` (a method
    that cannot fine-tune, docs/finetuning.md), ``model.grad_checkpointing``, and any other recipe value
    a method cannot run with (its ``recipe_check``), each with the method's reason."""
    from methods.registry import check_pretrained, grad_checkpointing_refusals, recipe_refusals

    if cfg.model.checkpoint is not None:
        try:
            check_pretrained(cfg.methods)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    refusals = grad_checkpointing_refusals(cfg.methods) if cfg.model.grad_checkpointing else {}
    if refusals:
        name, reason = next(iter(refusals.items()))
        raise ConfigError(f"model.grad_checkpointing=true: methods.{name} refuses it: {reason}")
    for name, reason in recipe_refusals(cfg.methods, cfg).items():
        raise ConfigError(f"methods.{name}: {reason}")


def _legacy_sections(data: dict) -> None:
    """Recipes and run folders written before the method registry have a top-level section named after
    the method, with ``enabled: true`` (``toe:``): read as ``methods: {name: ...}``, ahead of the others."""
    import methods as registry  # registers the built-in methods

    for name in reversed(registry.registered()):
        if name not in data:
            continue
        section = data.pop(name)
        if not isinstance(section, dict):
            raise ConfigError(f"{name} must be a mapping, got {section!r}")
        if section.pop("enabled", False):
            log.warning("the recipe's '%s:' section is read as 'methods: {%s: ...}'; write it that way", name, name)
            data.setdefault("methods", {})
            if isinstance(data["methods"], dict):
                data["methods"] = {name: section, **data["methods"]}


def load_config(path: str, overrides: typing.Sequence[str] = ()) -> RunConfig:
    data = _read_yaml(Path(path).resolve())
    _legacy_sections(data)
    for override in overrides:
        _apply_override(data, override)
    cfg = _build(RunConfig, data, "")
    _validate(cfg)
    return cfg


def resolved(cfg: RunConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


# Options a resumed run may change: where the run is and how it is watched, not what it trains
# (logging, evaluation and checkpoint cadence, DataLoader workers, timeouts, compilation, activation
# checkpointing, the pretrained file and head choice a resume does not re-apply). The world size is not a recipe
# key: another one resumes through a universal checkpoint. Any other change on resume is refused unless
# --allow-recipe-change.
RESUMABLE = (
    "name",
    "out_dir",
    "model.checkpoint",
    "model.reinit_head",
    "data.workers",
    "train.log_every",
    "train.eval_every",
    "train.eval_on_start",
    "train.collective_timeout_minutes",
    "train.signal_check_every",
    "train.compile",
    "train.compile_backend",
    "checkpoint.every",
    "checkpoint.keep",
    "model.grad_checkpointing",  # recomputes activations: the same numbers, less memory
    # how remote shards are reached, retried and cached (data/remote.py), not which data is read
    "data.s3_endpoint",
    "data.remote_retries",
    "data.remote_backoff",
    "data.remote_backoff_max",
    "data.remote_timeout",
    "data.max_lost_share",
    "data.cache_dir",
    "data.cache_size_gb",
)

_MISSING = object()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _absent_value(key: str, defaults: dict[str, Any]) -> Any:
    """What an option absent from an older run folder's config stood for: its default, or, for a
    method option that changed behaviour when it was added, the value its config class names in
    ``legacy`` (``methods.NAME.OPTION``)."""
    parts = key.split(".")
    if parts[0] == "methods" and len(parts) == 3:
        import methods as registry

        try:
            config = registry.method(parts[1]).config
            legacy = getattr(config, "legacy", {})
            return legacy[parts[2]] if parts[2] in legacy else getattr(config(), parts[2], _MISSING)
        except (KeyError, TypeError):
            return _MISSING
    return defaults.get(key, _MISSING)


def recipe_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for each option two resolved recipes (``yaml.safe_load`` of
    ``resolved``) set differently. An option the old one lacks (a run folder written before the option
    existed) counts only if the new one sets it away from what its absence meant (``_absent_value``)."""
    before, after = _flatten(old or {}), _flatten(new or {})
    defaults = _flatten(yaml.safe_load(resolved(RunConfig())))
    changes = []
    for key in sorted(set(before) | set(after)):
        was, now = before.get(key, _MISSING), after.get(key, _MISSING)
        if was is _MISSING:
            was = _absent_value(key, defaults)
        if was == now:
            continue
        changes.append((key, None if was is _MISSING else was, None if now is _MISSING else now))
    return changes


def _ds_path(cfg: RunConfig) -> Path:
    name = cfg.train.ds_config or f"ds_configs/zero{cfg.train.zero_stage}_{cfg.train.precision}.json"
    path = Path(name)
    return path if path.is_absolute() or path.exists() else ROOT / name


# keys the recipe owns: a DeepSpeed JSON may repeat them only with the same value
_RECIPE_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def grad_precision(cfg: RunConfig) -> Optional[str]:
    """The dtype a bf16 run accumulates and all-reduces its gradients in ("fp32" / "bf16"); None otherwise."""
    t = cfg.train
    if t.precision != "bf16":
        return None
    return t.grad_precision or ("bf16" if t.zero_stage == 0 else "fp32")


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config: the JSON's ZeRO / precision blocks + batch, accumulation and clipping
    from the recipe (one source of truth; a JSON that disagrees is an error)."""
    t = cfg.train
    micro, rest = divmod(t.global_batch, world_size * t.grad_accum)
    if rest or micro < 1:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by world size {world_size} x "
            f"train.grad_accum={t.grad_accum}"
        )
    path = _ds_path(cfg)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path} (train.ds_config) is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    # gradient_clipping is always written: DeepSpeed's own default is 1.0 (GRADIENT_CLIPPING_DEFAULT in
    # deepspeed/runtime/constants.py), which would clip every recipe that, like DeiT, trains unclipped
    owned = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optim.clip_grad or 0.0,
    }
    for key in _RECIPE_OWNED:
        if key in ds and ds[key] != owned[key]:
            raise ConfigError(
                f"{path} sets {key}={ds[key]} but the recipe gives {owned[key]}: "
                f"set it in the recipe only (optim.clip_grad for gradient_clipping)"
            )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != t.zero_stage:
        raise ConfigError(f"{path} has ZeRO stage {stage}, the recipe says train.zero_stage={t.zero_stage}")
    precisions = {"bf16": ds.get("bf16", {}).get("enabled", False), "fp16": ds.get("fp16", {}).get("enabled", False)}
    got = next((p for p, on in precisions.items() if on), "fp32")
    if got != t.precision:
        raise ConfigError(f"{path} trains in {got}, the recipe says train.precision={t.precision}")
    fp32_grads = grad_precision(cfg) == "fp32" and t.precision == "bf16"
    if fp32_grads:  # recipe-owned too: a JSON that says otherwise is an error
        for key, value in (("data_types", {"grad_accum_dtype": "fp32"}), ("communication_data_type", "fp32")):
            if key in ds and ds[key] != value:
                raise ConfigError(
                    f"{path} sets {key}={ds[key]} but the recipe's train.grad_precision=fp32 gives "
                    f"{value}: set train.grad_precision=bf16 in the recipe instead"
                )
            ds[key] = value
    ds.update(owned)
    ds.setdefault("steps_per_print", 10**9)
    # (ZeRO-1 with bf16 weights and fp32 gradients is DeepSpeed's BF16_Optimizer, which refuses the switch)
    if stage in (1, 2) and not owned["gradient_clipping"] and t.precision != "fp16" and not (fp32_grads and stage == 1):
        # ZeRO-1/2 compute the global gradient norm every step (an all-reduce and a host read, only for
        # clipping and DeepSpeed's inf/NaN check) unless told not to; unclipped bf16 / fp32 recipes have no use
        # for it, as a plain torch loop has none (fp16 keeps it: its loss scaler needs the overflow check)
        ds["zero_optimization"].setdefault("compute_grad_norm", False)
    return ds
