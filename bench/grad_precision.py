"""bf16 training with fp32 gradients (accumulated and all-reduced in fp32: ``train.grad_precision: fp32``, the
default) against bf16 gradients (``train.grad_precision: bf16``): step time of the DeepSpeed engine as
``launcher.train`` configures it (``launcher.config.deepspeed_config``), one run, interleaved (``bench/timing.py``).

    python bench/grad_precision.py                                       # CPU: DeiT-Ti, batch 8
    python bench/grad_precision.py --model deit_small_patch16_224 --batch 128 --accum 2   # a GPU

ZeRO-1 (the recipes' stage) and ZeRO-2; one process (the all-reduce is local: what this measures is the
accumulation, the optimizer's path and the memory, not the network). Prints a table, writes JSON (default
``bench/results/grad_precision.json``) with the step times and, on a GPU, the peak memory of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from launcher.config import deepspeed_config, load_config
from models import create_classifier

from timing import interleaved_medians

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: deit_small on GPU, deit_tiny on CPU")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch; default 128 on GPU, 8 on CPU")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--stages", default="1,2", help="ZeRO stages to compare")
    parser.add_argument("--rounds", type=int, default=None, help="default 10 on GPU, 3 on CPU")
    parser.add_argument("--out", default="bench/results/grad_precision.json")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    name = args.model or ("deit_small_patch16_224" if on_gpu else "deit_tiny_patch16_224")
    batch, rounds = args.batch or (128 if on_gpu else 8), args.rounds or (10 if on_gpu else 3)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    import deepspeed

    from launcher.distributed import init_distributed

    init_distributed()
    torch.manual_seed(0)
    base = create_classifier(name, num_classes=1000, img_size=224, drop_path=0.0).to(device)
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, 1000, (batch,), device=device)
    cases, memory = {}, {}
    for stage in (int(s) for s in args.stages.split(",")):
        for grads in ("fp32", "bf16"):
            cfg = load_config(
                str(ROOT / "configs/deit_tiny.yaml"),
                [
                    "train.precision=bf16",
                    f"train.zero_stage={stage}",
                    f"train.grad_precision={grads}",
                    f"train.grad_accum={args.accum}",
                    f"train.global_batch={batch * args.accum}",
                ],
            )
            model = copy.deepcopy(base)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, 1))

            def step(engine=engine):
                for _ in range(args.accum):
                    engine.backward(F.cross_entropy(engine(images).float(), labels))
                    engine.step()

            key = f"zero{stage}_{grads}"
            cases[key] = step
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
                step()
                memory[key] = torch.cuda.max_memory_allocated() / 2**30
    median, samples = interleaved_medians(cases, device=device, rounds=rounds)
    rows = []
    for stage in (int(s) for s in args.stages.split(",")):
        fp32, bf16 = median[f"zero{stage}_fp32"], median[f"zero{stage}_bf16"]
        rows.append(
            {
                "zero_stage": stage,
                "fp32_grads_ms": fp32 * 1e3,
                "bf16_grads_ms": bf16 * 1e3,
                "fp32_over_bf16_time": fp32 / bf16,
                "fp32_grads_peak_gib": memory.get(f"zero{stage}_fp32"),
                "bf16_grads_peak_gib": memory.get(f"zero{stage}_bf16"),
            }
        )
    device_name = torch.cuda.get_device_name() if on_gpu else f"cpu x{torch.get_num_threads()} threads"
    print(
        f"{name}, micro-batch {batch} x {args.accum} accumulation steps, bf16 weights, {device_name}, "
        f"median of {rounds} rounds"
    )
    print(f"{'ZeRO':>4} {'fp32 grads ms':>14} {'bf16 grads ms':>14} {'time fp32/bf16':>15}")
    for row in rows:
        print(
            f"{row['zero_stage']:>4} {row['fp32_grads_ms']:>14.1f} {row['bf16_grads_ms']:>14.1f} "
            f"{row['fp32_over_bf16_time']:>15.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": name,
                "batch": batch,
                "accum": args.accum,
                "device": device_name,
                "rounds": rounds,
                "rows": rows,
                "torch": torch.__version__,
                "samples_s": samples,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
