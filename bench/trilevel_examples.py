"""What Tri-Level's example level costs a step: the forgetting statistics' update (on the device, over every
sample of the split, once per optimizer step) and a swap (on the host, once per swap), against a training
step of the model on the same device, one run, interleaved (``bench/timing.py``).

    python bench/trilevel_examples.py [--samples 1281167] [--batch 1024] [--model deit_small_patch16_224]
                                      [--step-batch 64] [--rounds 5] [--device cpu|cuda]

``--batch``: the presentations one update takes (the global batch: every rank's pairs are gathered);
``--step-batch``: the per-device batch of the timed training step (fp32 on CPU, bf16 autocast on CUDA).
The spec's target (TRILEVEL_SPEC, test plan 12): statistics overhead < 2% of the step. The all-gather of
``2 x batch`` integers is not timed here (one process); it is one small collective per step. Prints a table
and writes JSON (default ``bench/results/trilevel_examples.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch

from methods.trilevel_examples import ForgettingStats, forgetting_scores, initial_mask, swap_subset

from timing import interleaved_medians


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_281_167)  # ImageNet-1k train
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--step-batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "trilevel_examples.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    step_batch = args.step_batch or (256 if device.type == "cuda" else 16)

    stats = ForgettingStats(args.samples, 30, device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, args.samples, (args.batch,), generator=generator).to(device)
    correct = (torch.rand(args.batch, generator=generator) < 0.7).to(device)

    model = timm.create_model(args.model, num_classes=1000).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(step_batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (step_batch,), device=device)

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    medians, rounds = interleaved_medians(
        {"step": train_step, "update": lambda: stats.update(ids, correct)}, device=device, rounds=args.rounds, warmup=1
    )
    subset = initial_mask(args.samples, 0.2, 0)
    found = stats.host()
    start = time.perf_counter()
    scores = forgetting_scores(found["forgets"], found["ever"], 30)
    swap_subset(subset, found["presented"] | subset, scores, int(0.05 * args.samples), seed=0, swap=1)
    swap_seconds = time.perf_counter() - start
    state_bytes = sum(t.numel() * t.element_size() for t in stats.state_dict().values()) + len(np.packbits(subset))

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "samples": args.samples,
        "batch": args.batch,
        "model": args.model,
        "step_batch": step_batch,
        "step_s": medians["step"],
        "update_s": medians["update"],
        "update_share_of_step": medians["update"] / medians["step"],
        "swap_s": swap_seconds,
        "state_bytes": state_bytes,
        "rounds": rounds,
    }
    print(f"| case | seconds | share of a {args.model} step (batch {step_batch}, {device.type}) |")
    print("|---|---|---|")
    print(f"| training step | {medians['step']:.4f} | 1 |")
    print(
        f"| statistics update ({args.samples:,} samples, {args.batch} presentations) | {medians['update']:.5f} | "
        f"{result['update_share_of_step']:.4f} |"
    )
    print(f"| one swap (host, once per swap) | {swap_seconds:.3f} | - |")
    print(f"checkpoint state: {state_bytes / 2**20:.1f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
