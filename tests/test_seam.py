"""The seam's start-up half: declarations checked against each other, and one run plan for training and
``launcher.compare`` (steps per epoch, a method's subset and run length)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from data.plan import train_batches_per_rank
from data.stream import build_train_stream
from launcher.config import ConfigError, load_config
from methods import Declaration
from methods.registry import check_combination, declarations, register

ROOT = Path(__file__).resolve().parents[1]


def _config(**declared):
    class Config:
        def declare(self):
            return Declaration(**declared)

    return Config()


def test_every_registered_method_declares_with_its_defaults():
    import methods

    for name in methods.registered():
        config = methods.method(name).config
        if name == "recording":  # tests.recording_method, when another test loaded it
            continue
        assert isinstance(config().declare(), Declaration), name


def test_a_config_without_a_declaration_is_not_registered():
    class Bare:
        pass

    with pytest.raises(TypeError, match="has no declare"):
        register("bare_method_for_the_test", Bare, lambda config, context: None)


@pytest.mark.parametrize(
    "configs,message",
    [
        (
            {"a": _config(input_grid="tokens"), "b": _config(input_grid="")},
            "methods 'a' and 'b' both set the input grid .*turn a's input-grid part off with methods.a.tokens: false",
        ),
        ({"a": _config(owns_loss=True), "b": _config(owns_loss=True)}, "both replace the training loss"),
        (
            {"a": _config(token_sites=frozenset({2})), "b": _config(token_sites=frozenset({2}))},
            "both set the token count before block 2",
        ),
        (
            {"a": _config(input_grid="tokens", exclusive_tokens=True), "b": _config(token_sites=frozenset({5}))},
            "methods 'a' and 'b' both set the token count: 'a' sets the input grid",
        ),
        (
            {"a": _config(), "b": _config(refuses={"a": "they share a buffer"})},
            "methods 'b' and 'a' do not compose: they share a buffer",
        ),
    ],
)
def test_declarations_that_do_not_compose_are_refused_naming_both(configs, message):
    with pytest.raises(ValueError, match=message):
        check_combination(configs)


def test_declarations_that_compose_pass():
    check_combination({"a": _config(input_grid=""), "b": _config(token_sites=frozenset({1}))})  # EfficientTrain + ToE
    assert set(declarations({"a": _config(progress=("a/x",))})) == {"a"}


def test_efficienttrain_and_budgeteds_input_grid_are_refused_together():
    recipe = str(ROOT / "configs/deit_tiny_budgeted_cpu.yaml")
    with pytest.raises(ConfigError, match="'budgeted'.* both set the input grid.*methods.budgeted.tokens: false"):
        load_config(recipe, ["methods.efficienttrain={}"])
    load_config(recipe, ["methods.efficienttrain={}", "methods.budgeted.tokens=false"])


@pytest.mark.parametrize(
    "world,workers,batch,repeats", [(1, 1, 16, 1), (2, 2, 8, 1), (3, 2, 5, 1), (2, 1, 8, 3), (1, 0, 7, 2)]
)
@pytest.mark.parametrize("keep", [None, 0.8])
def test_the_count_without_a_stream_is_the_streams_own(tiny_shards, world, workers, batch, repeats, keep):
    """``train_batches_per_rank`` (what compare plans with) equals ``len(stream)`` (what training runs)."""
    stream = build_train_stream(
        str(tiny_shards), batch_size=batch, rank=0, world_size=world, num_workers=workers, image_size=32, repeats=repeats
    )
    examples = stream.split.total
    if keep is not None:
        mask = np.random.default_rng(0).random(stream.split.total) < keep
        stream.set_subset(mask)
        examples = int(mask.sum())
    assert train_batches_per_rank(examples, world=world, workers=workers, batch=batch, repeats=repeats) == len(stream)


@pytest.mark.parametrize(
    "recipe,overrides",
    [
        ("configs/deit_tiny_cpu.yaml", ["train.epochs=2"]),
        ("configs/deit_tiny_trilevel_cpu.yaml", ["train.epochs=3"]),  # epochs over Tri-Level's 80% subset
        ("configs/deit_tiny_budgeted_cpu.yaml", ["train.epochs=4"]),  # the run's length is the budget's
    ],
)
def test_compare_plans_the_steps_training_runs(tiny_shards, recipe, overrides):
    from launcher import compare
    from launcher.run_plan import plan_run
    from launcher.tasks import make_task

    cfg = load_config(
        str(ROOT / recipe),
        [
            f"data.path={tiny_shards}",
            "train.steps=null",
            "train.global_batch=16",
            "model.kwargs={patch_size: 8, depth: 3, embed_dim: 48, num_heads: 2}",
            "model.img_size=32",
            *overrides,
        ],
    )
    total, exact = compare.estimate_total(cfg, world=2)
    task = make_task(cfg)
    train, _ = task.build_streams(micro=8, rank=0, world=2, pin_memory=False)

    def batches(subset, micro):
        if subset is not None:
            train.set_subset(subset)
        return len(train)

    def meta_model():
        with torch.device("meta"):
            return task.build_model(pretrained=False)[0]

    planned = plan_run(cfg, train.split.total, world=2, batches=batches, meta_model=meta_model)
    assert (total, exact) == (planned.total_steps, False)
    assert planned.total_steps > 0


def test_the_launcher_names_no_method():
    """No code under launcher/ picks a method by name: no method name (or a ``<method>/...`` metric key) compared,
    looked up by key or passed to ``.get`` (the old ``make_task`` picked token labelling's task that way, the run
    log and the report read ``toe/stage``). Docstrings, comments and recipe examples may name methods."""
    import ast

    import methods

    names = set(methods.registered()) - {"recording"}

    def names_a_method(node) -> bool:
        return (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and (node.value in names or node.value.split("/")[0] in names and "/" in node.value)
        )

    found = []
    for path in sorted((ROOT / "launcher").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            picked = []
            if isinstance(node, ast.Compare):
                picked = [node.left, *node.comparators]
            elif isinstance(node, ast.Subscript):
                picked = [node.slice]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop"):
                picked = node.args[:1]
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n.value!r}" for n in picked if names_a_method(n)]
    assert not found, "the launcher picks methods by name:\n" + "\n".join(found)
