"""The method seam: registry, recipe sections, events in the real engine, ToE and PatchDropout as plug-ins."""

import json
import re
import signal
import time
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from launcher.config import ConfigError, load_config
from methods import MethodContext, build_stack, registered
from methods.patch_dropout import PatchDropoutConfig, kept_patches
from methods.toe import ToEConfig
from models.cost import forward_flops
from toe import ToESchedule, apply_token_expansion

ROOT = Path(__file__).resolve().parents[1]
TOE_CPU = str(ROOT / "configs/deit_tiny_toe_cpu.yaml")


def tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=64, patch_size=8, depth=4, **kwargs)


# -- recipes ---------------------------------------------------------------------------------------


def test_methods_come_from_the_recipe_in_order_with_overrides():
    cfg = load_config(TOE_CPU, ["methods.toe.r1=0.4", "methods.patch_dropout={rate: 0.25}"])
    assert list(cfg.methods) == ["toe", "patch_dropout"]
    assert cfg.methods["toe"] == ToEConfig(r1=0.4) and cfg.methods["patch_dropout"] == PatchDropoutConfig(0.25)
    assert load_config(TOE_CPU, ["methods.toe=null"]).methods == {}, "a derived recipe or override can drop one"
    assert "methods:\n  toe:\n    r1: 0.4" in __import__("launcher.config").config.resolved(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ("methods.tome={r: 8}", "unknown method 'tome'; registered methods: "),  # the list grows with methods
        ("methods.toe.r2=0.4", "unknown key 'methods.toe.r2'"),
        ("methods.toe.k=two", "methods.toe.k must be int"),
        ("methods.toe.r1=1.5", "methods.toe.r1 must lie in"),
        ("methods.patch_dropout={rate: 1.0}", "methods.patch_dropout.rate must be in [0, 1)"),
        ("methods.toe.distance=l3", "methods.toe.distance must be one of"),
        ("methods=[toe]", "methods must be dict"),
    ],
)
def test_bad_method_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TOE_CPU, [override])
    assert set(registered()) >= {"toe", "patch_dropout"}


def test_two_methods_setting_the_tokens_before_one_block_are_refused():
    with pytest.raises(ConfigError, match="methods 'toe' and 'patch_dropout' both set the token count before block 0"):
        load_config(TOE_CPU, ["methods.toe.block=0", "methods.patch_dropout={rate: 0.5}"])
    assert list(load_config(TOE_CPU, ["methods.patch_dropout={rate: 0.5}"]).methods) == ["toe", "patch_dropout"]


# -- ToE and PatchDropout through the registry ------------------------------------------------------


def test_toe_from_the_registry_is_the_toe_of_the_surgery():
    direct, seam = tiny(), tiny()
    module = apply_token_expansion(direct, ToESchedule(r1=0.5, total_steps=30))
    stack = build_stack({"toe": ToEConfig(r1=0.5)}, MethodContext(total_steps=30, steps_per_epoch=10))
    stack.attach(seam)
    assert stack.names == ["toe"]
    x = torch.randn(3, 3, 64, 64)
    for step in (0, 10, 20):
        module.set_step(step)
        stack.on_step(step)
        assert torch.equal(direct(x), seam(x))
    assert stack.state_dict() == {"toe": {}}


def tokens_into_blocks(model):
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.7])
def test_patch_dropout_keeps_timms_count_in_training_only(rate):
    model = tiny()
    stack = build_stack({"patch_dropout": PatchDropoutConfig(rate)}, MethodContext(total_steps=10, steps_per_epoch=5))
    stack.attach(model)
    seen = tokens_into_blocks(model)
    x = torch.randn(2, 3, 64, 64)
    stack.on_step(0)
    model.train()
    model(stack.on_batch(0, {"image": x})["image"]).sum().backward()
    assert seen == [1 + max(1, int(64 * (1 - rate)))] == [1 + kept_patches(64, rate)]
    model.eval()
    model(x)
    assert seen[-1] == 65, "evaluation keeps every token"
    assert set(model.state_dict()) == set(tiny().state_dict()), "no parameters added"
    assert stack.step_metrics()["cost/patch_tokens"] == 64, "priced on the patch grid before any method"


def counted(model, x):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / len(x)


def test_patch_dropout_cost_model_matches_the_flop_counter():
    model = tiny()
    for block in model.blocks:  # the counter misses CPU's fused SDPA kernel: count the explicit matmuls
        block.attn.fused_attn = False
    stack = build_stack({"patch_dropout": PatchDropoutConfig(0.5)}, MethodContext(total_steps=10, steps_per_epoch=5))
    stack.attach(model)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    dense = counted(model, x)
    model.train()
    stack.on_step(0)
    sparse = counted(model, x)
    assert abs(forward_flops(stack.shape) - dense) / dense < 1e-3
    assert abs(stack.forward_flops(0) - sparse) / sparse < 1e-3
    assert 0.45 < stack.flops_share(0) < 0.55


def test_patch_dropout_refuses_detection_tokens():
    with pytest.raises(ValueError, match="suffix tokens"):
        build_stack(
            {"patch_dropout": PatchDropoutConfig(0.5)}, MethodContext(total_steps=10, steps_per_epoch=5, num_suffix=3)
        )


def test_the_stack_prices_every_training_forward_on_its_grid():
    model = tiny(dynamic_img_size=True)
    stack = build_stack({"toe": ToEConfig(r1=0.5)}, MethodContext(total_steps=30, steps_per_epoch=10))
    stack.attach(model)
    stack.on_step(0)
    model.train()
    kept = []
    model.token_expansion.register_forward_hook(lambda module, args, out: kept.append(out.shape[1] - 1))
    for size in (64, 32):  # the stack prices each micro-batch it hands on, on its grid
        model(stack.on_batch(0, {"image": torch.randn(2, 3, size, size)})["image"])
    assert kept == [32, 8]  # what the op kept is what the cost model priced
    flops = stack.take_flops()
    expected = 3 * 2 * (stack.forward_flops(0, 64) + stack.forward_flops(0, 16))
    assert flops == pytest.approx(expected) and stack.take_flops() == 0.0
    metrics = stack.step_metrics()
    assert metrics["cost/patch_tokens"] == 40 and metrics["toe/kept_tokens"] == (32 + 8) / 2
    dense = forward_flops(stack.shape.with_patches(64)) + forward_flops(stack.shape.with_patches(16))
    assert metrics["cost/flops_share"] == pytest.approx(expected / 6 / dense)


# -- every event in the real engine ----------------------------------------------------------------


def expected_events(start: int, end: int, steps_per_epoch: int, accum: int, resumed: bool) -> list[tuple]:
    events = [("attach",), ("on_engine",)] + ([("load_state_dict", start)] if resumed else [])
    for step in range(start, end):
        if step == start or step % steps_per_epoch == 0:
            events.append(("on_epoch", step // steps_per_epoch))
        events.append(("on_step", step))
        events += [("on_batch", step), ("loss", step), ("after_forward", step)] * accum
        events.append(("after_step", step))
    return events


def read_events(path: Path) -> list[list[tuple]]:
    """The segments of a rank's event file (each starts with attach), as comparable tuples."""
    segments = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # the line a SIGKILL cut
            continue
        key = event["event"]
        if key == "attach":
            segments.append([])
        value = {"load_state_dict": event.get("steps_seen"), "on_epoch": event.get("epoch")}.get(key, event.get("step"))
        segments[-1].append((key,) if value is None else (key, value))
    return segments


@pytest.mark.slow
def test_every_event_fires_in_order_across_a_kill_and_resume(tmp_path, tiny_shards):
    from helpers import finish, kill_tree, start, wait_for_step

    run = tmp_path / "events"
    run.mkdir()
    overrides = [
        "train.steps=20",
        "train.grad_accum=2",
        "train.zero_stage=2",
        "checkpoint.every=4",
        "method_modules=[tests.recording_method]",
        f"methods.recording={{out_dir: {run}}}",
    ]
    process = start(run, tiny_shards, *overrides, ranks=2)
    wait_for_step(run, 9, process)
    kill_tree(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    time.sleep(1)
    out = finish(start(run, tiny_shards, *overrides, ranks=2))
    assert json.loads((run / "final.json").read_text())["step"] == 20, out[-3000:]
    steps_per_epoch = 256 // 16  # 256 samples, global batch 16
    for rank in (0, 1):
        first, second = read_events(run / f"events-rank{rank}.jsonl")
        final_eval = [event for event in second if event[0] == "on_eval_batch"]
        assert final_eval and set(final_eval) == {("on_eval_batch", 20)}  # the final evaluation, after step 20
        assert second[-len(final_eval) :] == final_eval
        second = second[: -len(final_eval)]
        resume = second[2][1]  # the state came back: the steps it saw before the checkpoint it resumes from
        assert resume in (8, 12, 16) and second == expected_events(resume, 20, steps_per_epoch, 2, resumed=True)
        assert first == expected_events(0, 20, steps_per_epoch, 2, resumed=False)[: len(first)]
        assert len(first) > len(expected_events(0, 10, steps_per_epoch, 2, resumed=False)) - 8
