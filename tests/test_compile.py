"""torch.compile of the model: whole graphs, one per ToE stage, the same numbers as eager, and the
real engine compiled end to end (``train.compile``)."""

import json
from fractions import Fraction

import pytest
import timm
import torch

from methods import MethodContext, build_stack
from methods.patch_dropout import PatchDropoutConfig
from methods.toe import ToEConfig
from toe import ToESchedule, apply_token_expansion

from compile_check import assert_compiles


def tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2)


@pytest.mark.slow
def test_toe_compiles_to_one_graph_per_stage_and_one_for_evaluation():
    model = tiny()
    stack = build_stack({"toe": ToEConfig(r1=0.5)}, MethodContext(total_steps=30, steps_per_epoch=10))
    stack.attach(model)
    # stages 1, 2, 3, then stage 1's kept counts again from a later step of stage 1: no new graph
    assert assert_compiles(model, stack, steps=[0, 10, 20, 25, 5], image_size=32) == 4


def test_patch_dropout_compiles_to_whole_graphs():
    model = tiny()
    stack = build_stack({"patch_dropout": PatchDropoutConfig(0.5)}, MethodContext(total_steps=30, steps_per_epoch=10))
    stack.attach(model)
    assert assert_compiles(model, stack, steps=[0, 1], image_size=32) == 2  # training and evaluation


def test_compiled_toe_gives_the_eager_outputs_and_gradients():
    outputs = []
    for compiled in (False, True):
        model = tiny()
        stack = build_stack({"toe": ToEConfig(r1=0.5)}, MethodContext(total_steps=30, steps_per_epoch=10))
        stack.attach(model)
        if compiled:
            model.forward = torch.compile(model.forward, backend="aot_eager", dynamic=False, fullgraph=True)
        model.train()
        torch.manual_seed(1)
        x = torch.randn(2, 3, 32, 32)
        stack.on_step(0)
        out = model(x)
        out.sum().backward()
        outputs.append((out.detach(), model.patch_embed.proj.weight.grad.clone()))
    (eager, eager_grad), (traced, traced_grad) = outputs
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(traced_grad, eager_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("r1", [0.4, 0.5, 0.6, 1 / 3, 0.7, 0.25])
def test_the_ops_int_constants_give_the_schedules_exact_counts(r1):
    """The forward computes kept counts from (numerator, denominator) ints set at the stage change:
    the same floors as the schedule's Fractions for every grid, and the same seed stride."""
    schedule = ToESchedule(r1=r1, num_stages=3, total_steps=30)
    model = tiny()
    module = apply_token_expansion(model, schedule)
    for step in (0, 10, 20):
        module.set_step(step)
        stage = schedule.stage(step)
        for patches in (16, 49, 64, 100, 144, 196, 197, 577):
            if Fraction(schedule.r0) * patches < 1:
                continue
            assert module.kept_counts(patches) == schedule.kept_counts(patches, stage), (step, patches)
        assert module._seed_stride == schedule.seed_stride


@pytest.mark.slow
def test_the_engine_trains_compiled_with_inductor_and_resumes_exactly(tmp_path, tiny_shards):
    """train.compile=true on CPU: inductor (real code generation; one training graph, without ToE, to
    keep the test short: the graph per stage is checked above), then a run across ToE's 3 stages
    resumed from its middle checkpoint (aot_eager) ends with the weights of an uninterrupted one, so
    compiling keeps the checkpoints' keys and exact resume."""
    from helpers import module_state, records, train

    common = ["train.steps=9", "checkpoint.every=4", "train.precision=fp32", "train.compile=true", "train.log_every=3"]
    run = tmp_path / "inductor"
    out = train(run, tiny_shards, *common, "train.steps=3", "methods.toe=null", "train.compile_backend=inductor")
    assert "compiled 1 new graph(s) by step 2 (1 in all" in out
    last = records(run)[2]
    assert last["compile/graphs"] == 1 and last["compile/seconds"] > 0 and last["tflops_per_device"] > 0
    assert "mfu" not in last  # no peak is known for a CPU
    assert json.loads((run / "final.json").read_text())["step"] == 3

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, tiny_shards, *common, "train.compile_backend=aot_eager")
    train(
        resumed,
        tiny_shards,
        *common,
        "train.compile_backend=aot_eager",
        "train.steps=9",
        extra=["--resume", str(straight / "checkpoints" / "step-4")],
    )
    a, b = module_state(straight, 9), module_state(resumed, 9)
    assert set(a) == set(b) and not any(k.startswith("_orig_mod") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "a compiled run resumes bit for bit"
