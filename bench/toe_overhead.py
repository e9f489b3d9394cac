"""Cost of the ToE op alone against a full DeiT training step (forward + backward), per stage.

    python bench/toe_overhead.py                       # DeiT-S, CPU (or the GPU if there is one)
    python bench/toe_overhead.py --device cuda --batch 128 --dtype bf16

Every timing is a median over rounds that interleave the op, the ToE steps and the full-token
step, so the ratios come from one run under the same machine load. Prints a table and writes
JSON (default ``bench/results/toe_overhead.json``). Targets: op <= 5% of the step on CPU,
<= 2% on GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import timm
import torch

from methods import PluginStack
from methods.toe import ToEPlugin
from toe import ToESchedule, expand_tokens

from timing import add_device_options, device_options, interleaved_medians

TARGETS = {"cpu": 0.05, "cuda": 0.02}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 128 on GPU")
    parser.add_argument("--r1", type=float, default=0.5)
    add_device_options(parser)
    parser.add_argument("--out", default="bench/results/toe_overhead.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device, dtype, rounds = device_options(args)
    on_gpu = device.type == "cuda"
    batch = args.batch or (128 if on_gpu else 16)
    torch.manual_seed(0)

    model = timm.create_model(args.model).to(device).train()
    schedule = ToESchedule(r1=args.r1, num_stages=3, total_steps=3)
    stack = PluginStack([ToEPlugin(schedule)])
    stack.attach(model)
    shape = stack.shape
    images = torch.randn(batch, 3, *model.patch_embed.img_size, device=device)
    targets = torch.randint(0, shape.num_classes, (batch,), device=device)
    tokens = torch.randn(batch, shape.num_tokens, shape.embed_dim, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def train_step(step: int):
        def fn():
            stack.on_step(step)
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(images), targets)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return fn

    def op_alone(stage: int):
        counts = schedule.kept_counts(shape.num_patches, stage)

        def fn():  # forward and backward of the op, as inside the training step
            with autocast:
                out, _ = expand_tokens(
                    tokens.to(dtype), counts, num_prefix=shape.num_prefix, k=schedule.k, seed_stride=schedule.seed_stride
                )
            out.float().sum().backward()
            tokens.grad = None

        return fn

    cases = {
        "op_stage1": op_alone(1),
        "op_stage2": op_alone(2),
        "step_stage1": train_step(0),
        "step_stage2": train_step(1),
        "step_full": train_step(2),
    }
    median, samples = interleaved_medians(cases, device=device, rounds=rounds, warmup=args.warmup)

    target = TARGETS[device.type]
    rows = []
    for stage in (1, 2):
        op, step = median[f"op_stage{stage}"], median[f"step_stage{stage}"]
        rows.append(
            dict(
                stage=stage,
                kept_tokens=schedule.kept_tokens(shape.num_patches, stage),
                op_ms=op * 1e3,
                step_ms=step * 1e3,
                op_share=op / step,
                target=target,
                ok=op / step <= target,
                measured_speedup=median["step_full"] / step,
                theoretical_speedup=1 / stack.flops_share(stage - 1),
            )
        )

    cpu_name = f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    device_name = torch.cuda.get_device_name(device) if on_gpu else cpu_name
    print(
        f"ToE overhead: {args.model}, batch {batch}, {str(dtype).replace('torch.', '')}, {device_name}, "
        f"{rounds} rounds (median); full-token step {median['step_full'] * 1e3:.1f} ms"
    )
    print(
        f"{'stage':>5} {'kept':>5} {'op ms':>9} {'step ms':>10} {'op/step':>8} {'target':>7} {'speed-up':>9} {'theory':>7}"
    )
    for row in rows:
        print(
            f"{row['stage']:>5} {row['kept_tokens']:>5} {row['op_ms']:>9.2f} {row['step_ms']:>10.1f} "
            f"{row['op_share']:>8.2%} {'<=' + format(row['target'], '.0%'):>7} "
            f"{row['measured_speedup']:>8.2f}x {row['theoretical_speedup']:>6.2f}x"
            f"{'' if row['ok'] else '  OVER TARGET'}"
        )

    result = dict(
        model=args.model,
        batch=batch,
        dtype=str(dtype).replace("torch.", ""),
        device=device.type,
        device_name=device_name,
        torch=torch.__version__,
        rounds=rounds,
        r1=args.r1,
        step_full_ms=median["step_full"] * 1e3,
        stages=rows,
        samples_ms={name: [v * 1e3 for v in values] for name, values in samples.items()},
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
