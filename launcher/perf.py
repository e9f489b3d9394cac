"""Speed plumbing of the engine: ``torch.compile`` of the model, and model FLOP/s utilisation (MFU).

Compilation: the model's ``forward`` (``engine.module.forward = torch.compile(...)``), after
``deepspeed.initialize``. Not ``engine.compile()``: DeepSpeed's entry compiles the module's whole
call, hooks included, and the engine's own forward pre-hook (its throughput timer calls
``time.time``, ``deepspeed/runtime/engine.py`` ``_forward_prologue``) breaks the graph there; with
``forward`` compiled, the engine's hooks on the top module stay eager and everything inside the
model (ToE's pre-hook on its block included) is traced. Not before ``initialize`` either: that
wraps the model in an ``OptimizedModule`` whose state_dict keys gain ``_orig_mod.``. So the
state_dict keys, the checkpoints and the strict export are those of the eager model.

Static shapes (``dynamic=False``) and ``fullgraph=True``: each method stage (ToE's kept counts, an
input size) and evaluation get one graph, re-used whenever the run is in that stage again; a graph
break is an error instead of a silent fall-back to eager. ZeRO 0-2 only: ZeRO-3 fetches each
module's parameters in forward hooks that DeepSpeed excludes from tracing (``torch.compiler.disable``
in ``deepspeed/runtime/zero/parameter_offload.py``), so its model breaks into a graph per module
and block, and the resumed frames of every block recompile per block and stage (tried here: the
32-graph limit is hit within the first step of a 3-block model). The config refuses
``train.compile: true`` with ZeRO-3, and the default (on for CUDA) leaves ZeRO-3 eager. DeepSpeed's
own answer for ZeRO-3 is DeepCompile, which is not wired here. Dynamo's recompile limit is raised to
``RECOMPILE_LIMIT`` graphs and made fatal (``fail_on_recompile_limit_hit``): a run that visits more
shapes than that is a shape leak (say, a batch of a changing size), which is better stopped than
run slowly. The methods keep every per-step decision outside the traced forward (plain ints set at
``on_step``; pricing after ``on_batch``), which ``tests/compile_check.py`` asserts for each of them.

MFU: the plug-in stack's theoretical training FLOPs (``methods.PluginStack``: 3 x the forward, 2
FLOPs per multiply-add) per second and device, against the device's dense peak in the run's
precision (``PEAK_TFLOPS``). Unknown devices (and CPUs) get TFLOP/s only. Note that timm's and
fvcore's "GFLOPs" of a ViT are multiply-adds: ViT-B/16's 17.6 is about 35 GFLOPs here.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

__all__ = ["RECOMPILE_LIMIT", "PEAK_TFLOPS", "compile_model", "compile_engine", "compile_stats", "peak_tflops"]

log = logging.getLogger(__name__)

# graphs of one compiled forward: ToE's 3 stages x a few input sizes (EfficientTrain) + evaluation fit well
RECOMPILE_LIMIT = 32

# dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s, from NVIDIA's data sheets: H100 / H200 SXM (H100
# Tensor Core GPU data sheet; the H200 data sheet gives the same compute), H100 PCIe, A100 (A100 data
# sheet, SXM and PCIe alike). "fp32" is plain FP32 (no TF32 tensor cores).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM5
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def compile_model(train: Any, device: torch.device) -> bool:
    """``train.compile``, or by default: on for CUDA with ZeRO 0-2 (ZeRO-3 stays eager, see above)."""
    if train.compile is None:
        return device.type == "cuda" and train.zero_stage < 3
    return bool(train.compile)


def compile_engine(engine: Any, backend: str, graphs: Optional[int] = None) -> None:
    """Compile the engine's model in place: static shapes, whole graphs (ZeRO 0-2), a fatal recompile limit.

    ``graphs``: the distinct shapes the methods' forward visits over the run, when a method knows it
    (``PluginStack.shape_variants``: Tri-Level's kept counts follow a cosine, one graph per distinct
    tuple); the limit is then that plus a margin for evaluation and input sizes, never below
    ``RECOMPILE_LIMIT``."""
    import torch._dynamo

    if engine.zero_optimization_stage() == 3:  # refused before Dynamo's process-wide settings change
        raise ValueError("train.compile with ZeRO-3: see launcher.perf (the config refuses it earlier)")
    limit = RECOMPILE_LIMIT if graphs is None else max(RECOMPILE_LIMIT, int(graphs) + 8)
    if limit > RECOMPILE_LIMIT:
        log.info("the methods' forward visits %d shapes over the run: recompile limit %d", graphs, limit)
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, limit)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    log.info(
        "torch.compile of the model's forward (backend %s, dynamic=False, fullgraph=True): one graph per "
        "method stage and input size, compiled the first time the run gets there",
        backend,
    )
    module = engine.module
    module.forward = torch.compile(module.forward, backend=backend, dynamic=False, fullgraph=True)


def compile_stats() -> tuple[int, float]:
    """Graphs Dynamo has compiled in this process, and the seconds spent compiling (forward and backward)."""
    from torch._dynamo.utils import calculate_time_spent, counters

    graphs = int(counters["stats"].get("unique_graphs", 0))
    return graphs, float(calculate_time_spent().get("total_wall_time", 0.0)) if graphs else 0.0


def matmul_precision(precision: str) -> str:
    """The tensor-core format a run's matmuls use: bf16 / fp16, or for fp32 TF32 when torch allows it."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """The dense peak TFLOP/s of ``device`` in the run's ``precision``, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return peaks[matmul_precision(precision)]
    log.info("no peak TFLOP/s known for %r: the log gives TFLOP/s without MFU", name)
    return None
