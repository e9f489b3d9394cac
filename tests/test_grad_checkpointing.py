"""``model.grad_checkpointing``: timm's activation checkpointing of the blocks gives the same losses and
gradients (CPU, fp32) with every method that accepts it, for every model family; a method that cannot run
with it refuses the recipe at start-up, with its reason."""

from pathlib import Path

import pytest
import torch

from launcher.config import ConfigError, load_config
from launcher.tasks import make_task
from methods import MethodContext, build_stack
from methods.registry import run_length

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 30


def outputs_sum(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    values = out.values() if isinstance(out, dict) else out
    return sum(v.float().sum() for v in values)


def losses_and_grads(recipe: str, checkpointing: bool, overrides=()):
    cfg = load_config(str(ROOT / "configs" / recipe), [f"model.grad_checkpointing={str(checkpointing).lower()}", *overrides])
    task = make_task(cfg)
    torch.manual_seed(0)
    model, num_suffix = task.build_model()
    if checkpointing:
        model.set_grad_checkpointing(True)
    total, configs = run_length(cfg.methods, 10, TOTAL, lambda: task.build_model()[0])  # Budgeted sets its own
    steps = [0, total // 2, total - 1]  # first, middle and last stage of every method's schedule
    stack = build_stack(
        configs, MethodContext(total_steps=total, steps_per_epoch=10, num_suffix=num_suffix, task=cfg.task, seed=0)
    )
    stack.attach(model)
    model.train()
    losses, grads = [], []
    for step in steps:
        stack.on_step(step)
        generator = torch.Generator().manual_seed(step)
        size = cfg.model.img_size
        batch = {
            "image": torch.randn(4, 3, size, size, generator=generator),
            "label": torch.randint(0, cfg.model.num_classes, (4,), generator=generator),
        }
        images = stack.on_batch(step, batch)["image"]
        torch.manual_seed(100 + step)  # drop path, ToE's random init, MixToken: the same draws on both sides
        loss = outputs_sum(model(images))
        model.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    return losses, grads


@pytest.mark.parametrize(
    "recipe",
    [
        "deit_tiny_toe_cpu.yaml",
        "deit_tiny_budgeted_cpu.yaml",
        "deit_tiny_et_cpu.yaml",
        "deit_tiny_patchdrop_cpu.yaml",
        "lvvit_tiny_toe_cpu.yaml",
        "yolos_ti_toe_cpu.yaml",
    ],
)
@pytest.mark.slow
def test_checkpointed_blocks_give_the_same_losses_and_gradients(recipe):
    overrides = {
        "yolos_ti_toe_cpu.yaml": ["detection.scales=[64]", "detection.max_size=96"],
        # token labelling is a loss on the dense head (its batches need label maps): the model is the point
        "lvvit_tiny_toe_cpu.yaml": ["methods.token_labelling=null"],
    }.get(recipe, [])
    plain_losses, plain_grads = losses_and_grads(recipe, False, overrides)
    ckpt_losses, ckpt_grads = losses_and_grads(recipe, True, overrides)
    assert ckpt_losses == plain_losses
    for plain, ckpt in zip(plain_grads, ckpt_grads):
        assert len(plain) == len(ckpt) and all(torch.equal(a, b) for a, b in zip(plain, ckpt))


def test_checkpointing_really_recomputes_the_blocks():
    """Not a no-op: the checkpointed model runs each block's forward again in backward."""
    cfg = load_config(str(ROOT / "configs/deit_tiny_toe_cpu.yaml"))
    for checkpointing, expected in ((False, 1), (True, 2)):
        torch.manual_seed(0)
        model, _ = make_task(cfg).build_model()
        model.set_grad_checkpointing(checkpointing)
        calls = []
        model.blocks[-1].register_forward_pre_hook(lambda *args: calls.append(1))  # recompute stops early: no post-hook
        model.train()
        outputs_sum(model(torch.randn(2, 3, 32, 32))).backward()
        assert len(calls) == expected


def test_a_method_that_cannot_run_with_it_refuses_the_recipe_by_name():
    with pytest.raises(ConfigError, match="model.grad_checkpointing=true: methods.trilevel_tokens refuses it: timm's"):
        load_config(str(ROOT / "configs/deit_tiny_trilevel_cpu.yaml"), ["model.grad_checkpointing=true"])
    load_config(str(ROOT / "configs/deit_tiny_trilevel_cpu.yaml"))  # without it, the recipe loads


@pytest.mark.slow
def test_a_checkpointed_run_logs_the_same_losses_and_its_peak_memory(tmp_path, tiny_shards):
    from helpers import records, train

    runs = {}
    for name, flag in (("plain", "false"), ("ckpt", "true")):
        train(
            tmp_path / name, tiny_shards, "train.steps=6", "train.precision=fp32", f"model.grad_checkpointing={flag}"
        )  # 6 steps: ToE's 3 stages
        runs[name] = records(tmp_path / name)
    assert [r["loss"] for r in runs["ckpt"].values()] == [r["loss"] for r in runs["plain"].values()]
    assert all(r["memory/peak_gib"] > 0 for r in runs["ckpt"].values())
