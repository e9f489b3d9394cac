"""Training-step throughput: (a) the plain loop a user would write, (b) the engine, (c) the engine with ToE
at each stage; img/s, TFLOP/s and MFU of each.

    python bench/step_throughput.py                                  # CPU: DeiT-Ti, fp32, batch 32, eager
    python bench/step_throughput.py --model deit_small_patch16_224   # a GPU: bf16, the largest batch of
    python bench/step_throughput.py --model deit_base_patch16_224    #   512 / 256 / 128 that fits, compiled

One process, one device, synthetic tensors on it. (a) timm model, ``torch.autocast`` to the precision,
torch AdamW with its defaults, eager. (b) the DeepSpeed engine as ``launcher.train`` builds it: ZeRO-1
in the precision, AdamW ``fused=True`` on CUDA (``optim.fused``), the model's forward compiled
(``launcher.perf.compile_engine``: dynamic=False, fullgraph=True; ``--compile`` on by default on CUDA).
(b') the same engine with ToE (``--r1``) attached, in its last stage (every token kept: the op returns its
input), against (b) without methods: what ToE costs when it saves nothing (target >= 0.98). (c) the ToE engine
in stages 1 and 2.
Rounds interleave the configurations, so ratios come from one run under the same load; timings are
medians; compilation happens in the warm-up round. TFLOP/s are the cost model's training FLOPs
(``models.cost``: 3 x forward, 2 FLOPs per multiply-add) per second; MFU is that against the device's
dense peak (``launcher.perf.PEAK_TFLOPS``; none for CPUs). Targets: engine >= 1.2x the plain loop on a GPU;
DeiT-B full-token MFU >= 50% on an H100/H200; measured / theoretical ToE speed-up >= 0.98 per stage.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from methods import PluginStack
from methods.toe import ToEPlugin
from models import create_classifier
from toe import ToESchedule

from timing import DTYPES, interleaved_medians


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: deit_small on GPU, deit_tiny on CPU")
    parser.add_argument(
        "--batch", type=int, default=None, help="default: the largest of 512 / 256 / 128 that fits on a GPU, 32 on CPU"
    )
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--precision", default=None, choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--r1", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=None, help="default: 20 on GPU, 10 on CPU")
    parser.add_argument("--steps-per-round", type=int, default=None, help="default: 5 on GPU, 2 on CPU")
    parser.add_argument(
        "--out", default=None, help="default: bench/results/step_throughput.json (end_to_end.json with --end-to-end)"
    )
    end = parser.add_argument_group("--end-to-end: the real launcher.train on JPEG shards (bench/end_to_end.py)")
    end.add_argument("--end-to-end", action="store_true")
    end.add_argument("--steps", type=int, default=None, help="default: 600 on GPU, 48 on CPU")
    end.add_argument("--images", type=int, default=None, help="JPEGs to write (default: 4 batches, at least 512)")
    end.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    end.add_argument("--repeats", type=int, default=1, help="pairs of runs (dense, ToE), alternating")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    on_gpu = torch.cuda.is_available()
    if args.end_to_end:
        from end_to_end import end_to_end

        out = Path(args.out or "bench/results/end_to_end.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(end_to_end(args, on_gpu), indent=2))
        print(f"wrote {out}")
        return
    args.out = args.out or "bench/results/step_throughput.json"
    device = torch.device("cuda" if on_gpu else "cpu")
    name = args.model or ("deit_small_patch16_224" if on_gpu else "deit_tiny_patch16_224")
    batch = args.batch or (256 if on_gpu else 32)
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    dtype = DTYPES[precision]
    rounds, per_round = args.rounds or (20 if on_gpu else 10), args.steps_per_round or (5 if on_gpu else 2)

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    import deepspeed

    from launcher.distributed import init_distributed
    from launcher.perf import compile_engine, peak_tflops

    init_distributed()
    compiled = args.compile == "on" or (args.compile == "auto" and on_gpu)

    torch.manual_seed(0)
    base = create_classifier(name, num_classes=1000, img_size=224, drop_path=0.0).to(device)
    schedule = ToESchedule(r1=args.r1, num_stages=3, total_steps=3)

    def build(batch: int):
        images = torch.randn(batch, 3, 224, 224, device=device)
        labels = torch.randint(0, 1000, (batch,), device=device)
        plain = copy.deepcopy(base)
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)  # torch's defaults: foreach, not fused
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        def plain_step():
            with autocast:
                loss = F.cross_entropy(plain(images).float(), labels)
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

        def make_engine(plugin_list):
            model = copy.deepcopy(base)
            stack = PluginStack(plugin_list)
            stack.attach(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
            if compiled:
                compile_engine(engine, args.compile_backend)
            return engine, stack

        ds_config = {
            "train_micro_batch_size_per_gpu": batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 1},
            "steps_per_print": 10**9,
            "gradient_clipping": 0.0,
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12},
        }
        engine, plugins = make_engine([ToEPlugin(schedule)])
        baseline, no_plugins = make_engine([])  # what launcher.train runs for a recipe without methods
        engine_input = images.to(dtype)

        def engine_step(stage_step, engine=engine, plugins=plugins):
            def fn():
                plugins.on_step(stage_step)
                loss = F.cross_entropy(
                    engine(plugins.on_batch(stage_step, {"image": engine_input})["image"]).float(), labels
                )
                engine.backward(loss)
                engine.step()

            return fn

        cases = {
            "plain": plain_step,
            "baseline": engine_step(2, baseline, no_plugins),
            "engine_full": engine_step(2),
            "engine_stage1": engine_step(0),
            "engine_stage2": engine_step(1),
        }  # baseline and full back to back
        for fn in cases.values():  # a batch that does not fit fails here, before any timing
            fn()
        return cases, plugins, images, labels

    candidates = [args.batch] if args.batch else ([512, 256, 128] if on_gpu else [32])
    for batch in candidates:
        try:
            cases, plugins, images, labels = build(batch)
            break
        except torch.OutOfMemoryError:
            print(f"batch {batch} does not fit: trying a smaller one")
            torch.cuda.empty_cache()
    else:
        raise SystemExit(f"none of the batches {candidates} fits")
    median, samples = interleaved_medians(cases, device=device, rounds=rounds, calls=per_round)
    peak = peak_tflops(device, precision)

    def speed(case: str, stage_step: int) -> dict:
        tflops = 3 * batch * plugins.forward_flops(stage_step) / median[case] / 1e12
        return {"img_per_s": batch / median[case], "tflops": tflops, **({"mfu": tflops / peak} if peak else {})}

    counted = {}
    counter_model = copy.deepcopy(base).to(device)
    for block in counter_model.blocks:
        block.attn.fused_attn = False  # the counter does not see every fused SDPA kernel
    count_plugins = PluginStack([ToEPlugin(schedule)])
    count_plugins.attach(counter_model)
    for stage_step in range(3):
        count_plugins.on_step(stage_step)
        small = images[:2]
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(counter_model(small), labels[:2]).backward()
        counted[stage_step] = counter.get_total_flops()

    rows = [
        {"config": "(a) plain loop", **speed("plain", 2)},
        {"config": "(b) engine, no method", **speed("baseline", 2), "vs_plain": median["plain"] / median["baseline"]},
        {
            "config": "(b') engine, ToE last stage (all tokens)",
            **speed("engine_full", 2),
            "vs_plain": median["plain"] / median["engine_full"],
            "vs_no_method": median["baseline"] / median["engine_full"],
            # the same, round by round (each round times the two back to back), then the median: steadier on a
            # machine whose load swings between rounds
            "vs_no_method_paired": statistics.median(b / f for b, f in zip(samples["baseline"], samples["engine_full"])),
        },
    ]
    for stage_step in (0, 1):
        measured = median["engine_full"] / median[f"engine_stage{stage_step + 1}"]
        theory = 1 / plugins.flops_share(stage_step)
        rows.append(
            {
                "config": f"(c) engine, ToE stage {stage_step + 1} "
                f"({schedule.kept_tokens(plugins.shape.num_patches, stage_step + 1)} tokens)",
                **speed(f"engine_stage{stage_step + 1}", stage_step),
                "speedup": measured,
                "theoretical_speedup": theory,
                "counted_flops_speedup": counted[2] / counted[stage_step],
                "measured_over_theoretical": measured / theory,
            }
        )

    device_name = torch.cuda.get_device_name() if on_gpu else f"cpu x{torch.get_num_threads()} threads"
    print(
        f"{name}, batch {batch}, {precision}, {device_name}, {'compiled' if compiled else 'eager'} engine, "
        f"median of {rounds} rounds x {per_round} steps"
    )
    print(
        f"{'configuration':<42} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'vs plain':>9} {'speed-up':>9} "
        f"{'theory':>7} {'counted':>8} {'meas/theory':>11}"
    )
    for row in rows:
        cells = [
            f"{row['img_per_s']:>8.1f}",
            f"{row['tflops']:>8.3f}",
            f"{row['mfu']:>6.1%}" if "mfu" in row else f"{'-':>6}",
            f"{row['vs_plain']:>8.3f}x" if "vs_plain" in row else " " * 9,
        ]
        if "speedup" in row:
            cells += [
                f"{row['speedup']:>8.3f}x",
                f"{row['theoretical_speedup']:>6.3f}x",
                f"{row['counted_flops_speedup']:>7.3f}x",
                f"{row['measured_over_theoretical']:>11.3f}",
            ]
        print(f"{row['config']:<42} " + " ".join(cells))
    full = next(row for row in rows if "vs_no_method" in row)
    print(
        f"ToE's last stage (all tokens) against the engine without methods: {full['vs_no_method']:.3f} of its "
        f"speed, {full['vs_no_method_paired']:.3f} paired by round (target >= 0.98)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": name,
                "batch": batch,
                "precision": precision,
                "device": device_name,
                "compiled": compiled,
                "peak_tflops": peak,
                "rounds": rounds,
                "steps_per_round": per_round,
                "rows": rows,
                "samples_s": samples,
                "torch": torch.__version__,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
