"""Fine-tuning from pretrained weights (models/pretrained.py, model.checkpoint): what is loaded, resampled,
re-initialised or refused, from every source format; and real fine-tuning runs of the engine (ToE's stages
from the fine-tuning run's own step 0, resume wins over the pretrained file, SIGKILL + resume bit-identical)."""

import json
import logging
import signal

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from models import create_classifier
from models.pretrained import PretrainedError, load_pretrained, read_state_dict
from models.yolos import create_yolos

TINY = dict(patch_size=4, depth=2, embed_dim=48, num_heads=2)


def deit(num_classes=10, img_size=28, seed=0, name="deit_tiny_patch16_224", **overrides):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes, img_size=img_size, **{**TINY, **overrides})


def test_grid_change_resamples_as_timm_and_a_new_class_count_reinitialises_the_head(caplog):
    source = deit(num_classes=10, img_size=28, seed=1).state_dict()  # 7 x 7 patches
    fresh = deit(num_classes=5, img_size=32, seed=2)  # 8 x 8 patches, the run's own initialisation
    head = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("head.")}
    with caplog.at_level(logging.INFO, logger="models.pretrained"):
        report = load_pretrained(fresh, source)
    loaded = fresh.state_dict()
    expected = resample_abs_pos_embed(source["pos_embed"], new_size=[8, 8], num_prefix_tokens=1)
    assert torch.equal(loaded["pos_embed"], expected), "timm's resampling, bit for bit"
    assert loaded["pos_embed"].shape == (1, 65, 48)
    for key, value in loaded.items():
        if key.startswith("head."):
            assert torch.equal(value, head[key]), f"{key} keeps the run's fresh initialisation"
        elif key != "pos_embed":
            assert torch.equal(value, source[key]), key
    assert report["reinitialised"] == ["head.bias", "head.weight"] and report["resampled"] == ["pos_embed"]
    lines = [r.getMessage() for r in caplog.records]
    assert sum(": loaded " in line for line in lines) == 1
    assert any("resampled pos_embed from grid 7x7 to 8x8" in line for line in lines)
    assert any("re-initialised head.bias, head.weight (the file has 10 classes, the recipe 5)" in line for line in lines)
    assert any(": ignored nothing" in line for line in lines)


def test_same_class_count_loads_every_tensor():
    source = deit(num_classes=10, seed=1).state_dict()
    model = deit(num_classes=10, seed=2)
    report = load_pretrained(model, source)
    assert report["reinitialised"] == [] and report["resampled"] == []
    assert all(torch.equal(model.state_dict()[k], source[k]) for k in source)


def test_reinit_head_gives_a_new_label_set_of_the_same_size_fresh_heads():
    source = deit(num_classes=5, seed=1).state_dict()
    model = deit(num_classes=5, seed=2)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, source, reinit_head=True)
    assert report["reinitialised"] == ["head.bias", "head.weight"]
    state = model.state_dict()
    assert all(torch.equal(state[k], fresh[k] if k.startswith("head.") else source[k]) for k in state)


def test_every_file_format_gives_the_same_model(tmp_path):
    source = deit(num_classes=10, seed=3).state_dict()
    files = {
        "bare.pth": source,
        "model.pth": {"model": source, "epoch": 7},
        "state_dict.pt": {"state_dict": source},
        "ddp.pth": {f"module.{k}": v for k, v in source.items()},
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    import argparse  # DeiT main.py's training checkpoints also pickle their args namespace

    torch.save({"model": source, "args": argparse.Namespace(lr=5e-4)}, tmp_path / "deit_training.pth")
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "weights.safetensors"))
    models = []
    for path in sorted(tmp_path.iterdir()):
        model = deit(num_classes=4, seed=4)
        load_pretrained(model, str(path))
        models.append((path.name, model.state_dict()))
    reference = models[0][1]
    for name, state in models:
        assert all(torch.equal(state[k], reference[k]) for k in reference), name


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (dict(embed_dim=64), "cls_token [1, 1, 48] in the file, [1, 1, 64] in the model"),
        (dict(depth=3), "the model has keys the file lacks: blocks.2.norm1.weight"),
        (dict(depth=1), "the file has keys the model lacks: blocks.1.norm1.weight [48]"),
        (dict(mlp_ratio=3.0), "blocks.0.mlp.fc1.weight [192, 48] in the file, [144, 48] in the model"),
    ],
)
def test_another_width_or_depth_is_refused_naming_keys_and_shapes(overrides, expected):
    source = deit(num_classes=10).state_dict()
    with pytest.raises(PretrainedError, match="does not fit the recipe's model") as err:
        load_pretrained(deit(num_classes=10, **overrides), source, where="model.checkpoint pre.pth")
    assert expected in str(err.value) and "model.checkpoint pre.pth" in str(err.value)


def test_another_family_is_refused():
    lvvit = timm.create_model("lvvit_t", num_classes=10, img_size=28, stem_width=8, **TINY).state_dict()
    with pytest.raises(PretrainedError, match="the file has keys the model lacks: patch_embed.conv.0.weight"):
        load_pretrained(deit(), lvvit)
    distilled = deit(name="deit_tiny_distilled_patch16_224").state_dict()
    with pytest.raises(PretrainedError, match="dist_token"):
        load_pretrained(deit(), distilled)


def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(PretrainedError, match=r"model.checkpoint .*nothing.pth: no such file or directory"):
        read_state_dict(tmp_path / "nothing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(PretrainedError, match=r"garbage.pth cannot be read as a weights file"):
        read_state_dict(tmp_path / "garbage.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(PretrainedError, match=r"garbage.safetensors cannot be read"):
        read_state_dict(tmp_path / "garbage.safetensors")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(PretrainedError, match="holds no tensors"):
        read_state_dict(tmp_path / "empty.pth")


def test_lvvit_heads_reinitialised_stem_and_batchnorm_loaded():
    kw = dict(img_size=32, stem_width=8, **TINY)
    torch.manual_seed(0)
    source = timm.create_model("lvvit_t", num_classes=10, **kw)
    for module in source.modules():  # non-default BN statistics, to see them travel
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_()
    source = source.state_dict()
    torch.manual_seed(1)
    model = timm.create_model("lvvit_t", num_classes=5, **kw)
    report = load_pretrained(model, source)
    assert report["reinitialised"] == ["aux_head.bias", "aux_head.weight", "head.bias", "head.weight"]
    state = model.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in source if not k.startswith(("head.", "aux_head.")))


def test_yolos_backbone_from_a_classifier_and_from_a_detector():
    classifier = deit(num_classes=10, img_size=32, seed=5).state_dict()
    yolos = create_yolos(num_classes=4, num_det_tokens=3, img_size=32, checkpoint=classifier, **TINY)
    backbone = yolos.backbone.state_dict()
    assert all(torch.equal(backbone[k], classifier[k]) for k in backbone), "the backbone is the classifier's"
    assert not any(k.startswith("head.") and v.numel() for k, v in backbone.items())
    # a detector of this engine (launcher.export of a YOLOS run) gives its backbone; detection parts ignored
    again = create_classifier("deit_tiny_patch16_224", num_classes=10, img_size=32, checkpoint=yolos.state_dict(), **TINY)
    assert all(torch.equal(again.state_dict()[k], classifier[k]) for k in backbone)


# -- the engine ---------------------------------------------------------------------------------


def engine():
    from helpers import finish, kill_tree, module_state, records, start, train, wait_for_step

    return finish, kill_tree, module_state, records, start, train, wait_for_step


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, tiny_shards):
    """A pre-training run of this engine (ToE, 40 classes: the fine-tuning runs' 32 re-initialise the head)."""
    *_, train, _ = engine()
    run = tmp_path_factory.mktemp("pre") / "pre"
    train(run, tiny_shards, "train.steps=6", "model.num_classes=40", "checkpoint.every=0")
    return run


@pytest.mark.slow
def test_finetuning_starts_at_step_0_from_a_run_folder_an_export_or_safetensors(tmp_path, tiny_shards, pretrained_run):
    finish, kill_tree, module_state, records, start, train, wait_for_step = engine()
    from launcher.export import export

    exported = export(str(pretrained_run), str(tmp_path / "pre.pth"))
    state = torch.load(exported, weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "pre.safetensors"))
    starts = {}
    for name, source in (("folder", pretrained_run), ("pth", exported), ("safetensors", tmp_path / "pre.safetensors")):
        run = tmp_path / name
        out = train(
            run, tiny_shards, "train.steps=6", f"model.checkpoint={source}", "checkpoint.every=0", "train.eval_on_start=true"
        )
        assert "re-initialised head.bias, head.weight (the file has 40 classes, the recipe 32)" in out
        assert "resampled nothing (same grid)" in out
        steps = records(run)
        # ToE's stages key off the fine-tuning run's own global step: stage 1 at its step 0 (the
        # pre-training run ended in stage 3), stages 2 and 3 at 2 and 4 of its 6 steps
        assert [steps[t]["toe/stage"] for t in range(6)] == [1, 1, 2, 2, 3, 3]
        assert [steps[t]["toe/kept_tokens"] for t in range(6)] == [8, 8, 12, 12, 16, 16]
        evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval/" in line]
        assert evaluations[0]["step"] == 0
        starts[name] = (evaluations[0]["eval/top1"], evaluations[0]["eval/top5"], steps[0]["loss"], steps[5]["loss"])
        if name == "folder":
            assert "the run's checkpoint" in out and "(verified)" in out
    # the same starting model from each source: the same evaluation before step 0, the same losses after
    assert starts["folder"] == starts["pth"] == starts["safetensors"], starts


@pytest.mark.slow
def test_a_file_that_does_not_fit_is_refused_at_start_up(tmp_path, tiny_shards, pretrained_run):
    *_, train, _ = engine()
    out = train(
        tmp_path / "wide",
        tiny_shards,
        "train.steps=2",
        f"model.checkpoint={pretrained_run}",
        "model.kwargs={patch_size: 8, depth: 3, embed_dim: 64, num_heads: 2}",
        expect=2,
    )
    assert "bad recipe" in out and "cls_token [1, 1, 48] in the file, [1, 1, 64] in the model" in out
    out = train(tmp_path / "gone", tiny_shards, "train.steps=2", f"model.checkpoint={tmp_path / 'gone.pth'}", expect=2)
    assert "gone.pth: no such file or directory" in out


@pytest.mark.slow
def test_sigkill_and_resume_of_a_finetuning_run_is_bit_identical_and_never_reloads_the_file(
    tmp_path, tiny_shards, pretrained_run
):
    finish, kill_tree, module_state, records, start, train, wait_for_step = engine()
    from launcher.export import export

    weights = export(str(pretrained_run), str(tmp_path / "weights" / "pre.pth"))
    total = 16
    common = [
        f"train.steps={total}",
        "checkpoint.every=4",
        "train.zero_stage=1",
        "train.precision=fp32",
        "model.drop_path=0.1",
        f"model.checkpoint={weights}",
    ]
    train(tmp_path / "straight", tiny_shards, *common, ranks=2)
    victim = tmp_path / "killed"
    process = start(victim, tiny_shards, *common, ranks=2)
    wait_for_step(victim, 6, process)
    kill_tree(process.pid, signal.SIGKILL)
    process.wait()
    latest = int((victim / "checkpoints" / "latest").read_text().split("-")[1])
    assert 4 <= latest < total
    # the pretrained file is gone: a resume that reloaded it would be refused (exit 2), not resume
    weights.rename(tmp_path / "moved.pth")
    out = train(victim, tiny_shards, *common, ranks=2)
    assert f"resumed at step {latest}" in out and "is not applied: the run resumes from its own checkpoint" in out
    straight, resumed = records(tmp_path / "straight"), records(victim)
    assert [straight[t]["loss"] for t in range(total)] == [resumed[t]["loss"] for t in range(total)]
    a, b = module_state(tmp_path / "straight", total), module_state(victim, total)
    assert all(torch.equal(a[k], b[k]) for k in a), "identical final weights"


def test_a_method_that_cannot_fine_tune_refuses_with_its_reason(tmp_path):
    """Budgeted Training re-draws the slices it grows into: from pretrained weights it refuses, naming the way
    out (init: keep); ToE and the others take model.checkpoint."""
    from pathlib import Path

    from launcher.config import ConfigError, load_config

    recipe = str(Path(__file__).resolve().parents[1] / "configs/deit_tiny_budgeted_cpu.yaml")
    with pytest.raises(
        ConfigError,
        match="methods.budgeted cannot start from model.checkpoint: its growth re-draws .* set methods.budgeted.init: keep",
    ):
        load_config(recipe, ["model.checkpoint=pre.pth"])
    assert load_config(recipe, ["model.checkpoint=pre.pth", "methods.budgeted.init=keep"]).model.checkpoint
    assert load_config(recipe).model.checkpoint is None  # no pretrained weights: nothing to refuse
    toe = str(Path(__file__).resolve().parents[1] / "configs/deit_tiny_toe_cpu.yaml")
    assert "toe" in load_config(toe, ["model.checkpoint=pre.pth"]).methods
