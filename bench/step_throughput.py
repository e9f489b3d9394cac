"""Training-step throughput: the DeepSpeed engine vs a plain PyTorch + timm loop, and ToE stages vs full tokens.

    python bench/step_throughput.py                          # CPU: DeiT-Ti, fp32, batch 32
    python bench/step_throughput.py --model deit_small_patch16_224 --precision bf16 --batch 256   # a GPU

One process, one device. Every configuration runs the same batch through forward, backward and
the optimizer step (torch AdamW in both loops; the engine uses ZeRO-1 with ``--precision``, the
plain loop autocasts to it). Rounds interleave the configurations, so ratios come from one run
under the same load; timings are medians. ToE rows give the measured speed-up over the engine's
full-token step beside the theoretical one (``models.cost``) and the one counted by
``torch.utils.flop_counter`` on forward + backward. Targets: engine >= 1.0x the plain loop;
measured / theoretical ToE speed-up >= 0.98. Prints a table, writes JSON.
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
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import interleaved_medians  # noqa: E402
from models import create_classifier  # noqa: E402
from methods import PluginStack  # noqa: E402
from methods.toe import ToEPlugin  # noqa: E402
from toe import ToESchedule  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: deit_small on GPU, deit_tiny on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on GPU, 32 on CPU")
    parser.add_argument("--precision", default=None, choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--r1", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=None, help="default: 20 on GPU, 10 on CPU")
    parser.add_argument("--steps-per-round", type=int, default=None, help="default: 5 on GPU, 2 on CPU")
    parser.add_argument("--out", default="bench/results/step_throughput.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    name = args.model or ("deit_small_patch16_224" if on_gpu else "deit_tiny_patch16_224")
    batch = args.batch or (256 if on_gpu else 32)
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    dtype = DTYPES[precision]
    rounds, per_round = args.rounds or (20 if on_gpu else 10), args.steps_per_round or (5 if on_gpu else 2)

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    from launcher.distributed import init_distributed
    import deepspeed
    init_distributed()

    torch.manual_seed(0)
    base = create_classifier(name, num_classes=1000, img_size=224, drop_path=0.0).to(device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    plain = copy.deepcopy(base)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def plain_step():
        with autocast:
            loss = F.cross_entropy(plain(images).float(), labels)
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    model = copy.deepcopy(base)
    schedule = ToESchedule(r1=args.r1, num_stages=3, total_steps=3)
    plugins = PluginStack([ToEPlugin(schedule)])
    plugins.attach(model)
    ds_config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
                 "bf16": {"enabled": precision == "bf16"},
                 "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                           config=ds_config)
    engine_input = images.to(dtype)

    def engine_step(stage_step):
        def fn():
            plugins.on_step(stage_step)
            loss = F.cross_entropy(engine(engine_input).float(), labels)
            engine.backward(loss)
            engine.step()
        return fn

    cases = {"plain": plain_step, "engine_full": engine_step(2), "engine_stage1": engine_step(0),
             "engine_stage2": engine_step(1)}

    median, samples = interleaved_medians(cases, device=device, rounds=rounds, calls=per_round)

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

    rows = [{"config": "plain loop", "img_per_s": batch / median["plain"]},
            {"config": "engine, full tokens", "img_per_s": batch / median["engine_full"],
             "vs_plain": median["plain"] / median["engine_full"]}]
    for stage_step in (0, 1):
        measured = median["engine_full"] / median[f"engine_stage{stage_step + 1}"]
        theory = 1 / plugins.flops_share(stage_step)
        rows.append({"config": f"engine, ToE stage {stage_step + 1} "
                               f"({schedule.kept_tokens(plugins.shape.num_patches, stage_step + 1)} tokens)",
                     "img_per_s": batch / median[f"engine_stage{stage_step + 1}"], "speedup": measured,
                     "theoretical_speedup": theory, "counted_flops_speedup": counted[2] / counted[stage_step],
                     "measured_over_theoretical": measured / theory})

    device_name = torch.cuda.get_device_name() if on_gpu else f"cpu x{torch.get_num_threads()} threads"
    print(f"{name}, batch {batch}, {precision}, {device_name}, median of {rounds} rounds x {per_round} steps")
    print(f"{'configuration':<32} {'img/s':>8} {'vs plain':>9} {'speed-up':>9} {'theory':>7} {'counted':>8} {'meas/theory':>11}")
    for row in rows:
        cells = [f"{row['img_per_s']:>8.1f}", f"{row['vs_plain']:>8.3f}x" if "vs_plain" in row else " " * 9]
        if "speedup" in row:
            cells += [f"{row['speedup']:>8.3f}x", f"{row['theoretical_speedup']:>6.3f}x",
                      f"{row['counted_flops_speedup']:>7.3f}x", f"{row['measured_over_theoretical']:>11.3f}"]
        print(f"{row['config']:<32} " + " ".join(cells))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": name, "batch": batch, "precision": precision, "device": device_name,
                               "rounds": rounds, "steps_per_round": per_round, "rows": rows,
                               "samples_s": samples, "torch": torch.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
