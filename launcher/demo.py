"""ToE demo: a tiny DeiT learns the embedded synthetic shapes on a laptop CPU, with Token Expansion.

    python -m launcher.demo                     # ~2-3 minutes on 2 cores
    python -m launcher.demo --steps 60 --train-size 1024   # a quick look

Shows the ToE schedule, logs every stage transition at its global step, times each stage against
full-token training, evaluates with all tokens (ToE is off in eval), and checks that the trained
weights load into a plain timm model with ``strict=True``. Writes ``metrics.jsonl`` and
``model.pth`` to ``--out``. The DeepSpeed engine (``launcher.train``) supersedes this as the main job.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from data.synthetic import NUM_CLASSES, draw_batch
from toe import PluginStack, ToEPlugin, ToESchedule

log = logging.getLogger("launcher.demo")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=450, help="total optimizer steps T")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=8192)
    parser.add_argument("--val-size", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--r1", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)
    for key in ("steps", "batch", "train_size", "val_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine to 1% of the peak: a pure function of the global step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def to_tensor(images) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def make_model(image_size: int) -> torch.nn.Module:
    return timm.create_model("deit_tiny_patch16_224", img_size=image_size, patch_size=4, depth=6,
                             num_classes=NUM_CLASSES, drop_path_rate=0.0)


@torch.no_grad()
def evaluate(model, images, labels, batch: int) -> float:
    model.eval()
    correct = sum((model(images[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(images), batch))
    model.train()
    return correct / len(images)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    train_x, train_y = draw_batch(range(args.train_size), seed=args.seed, size=args.image_size)
    val_x, val_y = draw_batch(range(10**6, 10**6 + args.val_size), seed=args.seed, size=args.image_size)
    train_x, train_y, val_x, val_y = to_tensor(train_x), torch.from_numpy(train_y), to_tensor(val_x), torch.from_numpy(val_y)
    log.info("drew %d train + %d val synthetic images (%d classes, %d px) in %.1f s", args.train_size,
             args.val_size, NUM_CLASSES, args.image_size, time.perf_counter() - started)

    model = make_model(args.image_size)
    schedule = ToESchedule(r1=args.r1, num_stages=3, total_steps=args.steps)
    plugins = PluginStack([ToEPlugin(schedule)])
    plugins.attach(model)
    print(schedule.describe(plugins.shape.num_patches, plugins.shape), flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = max(1, args.train_size // args.batch)

    stage_time: dict[int, float] = {}
    stage_images: dict[int, int] = {}
    with open(out / "metrics.jsonl", "w") as metrics_file:
        for step in range(args.steps):
            epoch, position = divmod(step, steps_per_epoch)  # batch order: a pure function of the step
            order = torch.randperm(args.train_size, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            index = order[position * args.batch:(position + 1) * args.batch]
            metrics = plugins.on_step(step)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, warmup=args.steps // 10)
            tick = time.perf_counter()
            loss = F.cross_entropy(model(train_x[index]), train_y[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            stage = int(metrics["toe/stage"])
            stage_time[stage] = stage_time.get(stage, 0.0) + time.perf_counter() - tick
            stage_images[stage] = stage_images.get(stage, 0) + args.batch
            record = {"step": step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"], **metrics}
            metrics_file.write(json.dumps(record) + "\n")
            if step % 50 == 0 or step == args.steps - 1:
                log.info("step %4d  stage %d  kept %3d  loss %.3f  lr %.2e", step, stage,
                         metrics["toe/kept_tokens"], record["loss"], record["lr"])

    accuracy = evaluate(model, val_x, val_y, 256)
    torch.save(model.state_dict(), out / "model.pth")
    plain = make_model(args.image_size)
    plain.load_state_dict(torch.load(out / "model.pth"), strict=True)
    assert evaluate(plain, val_x, val_y, 256) == accuracy

    full = stage_images[3] / stage_time[3]
    print(f"\n{'stage':>5} {'img/s':>8} {'speed-up':>9} {'theory':>7}")
    for stage in sorted(stage_time):
        speed = stage_images[stage] / stage_time[stage]
        step_in_stage = schedule.stage_range(stage)[0]
        print(f"{stage:>5} {speed:>8.0f} {speed / full:>8.2f}x {1 / plugins.flops_share(step_in_stage):>6.2f}x")
    summary = {"val_top1": accuracy, "chance": 1 / NUM_CLASSES, "steps": args.steps,
               "seconds": time.perf_counter() - started}
    print(f"\nval top-1 {accuracy:.1%} with all tokens (chance {1 / NUM_CLASSES:.1%}); weights load into plain "
          f"timm with strict=True; {summary['seconds']:.0f} s in all; outputs in {out}/")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
