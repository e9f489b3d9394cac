"""Recipes: inheritance, overrides, validation, the DeepSpeed config built from them."""

import json
from pathlib import Path

import pytest

from launcher.config import ConfigError, deepspeed_config, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_recipe_validates(recipe):
    cfg = load_config(str(ROOT / "configs" / recipe))
    assert cfg.name == recipe.removesuffix(".yaml")


def test_base_inheritance_and_overrides():
    cfg = load_config(str(ROOT / "configs/deit_base_toe_r04.yaml"), ["optim.lr=1e-3", "train.steps=10", "methods.toe.k=3"])
    assert cfg.model.name == "deit_base_patch16_224" and cfg.train.global_batch == 1024  # from deit_tiny.yaml
    assert cfg.methods["toe"].r1 == 0.4 and cfg.methods["toe"].k == 3
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 10


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.batchsize=8", "unknown key 'train.batchsize'"),
        ("trian.steps=8", "unknown key 'trian'"),
        ("optim.lr=fast", "optim.lr must be float"),
        ("train.steps=ten", "train.steps must be int"),
        ("train.zero_stage=4", "train.zero_stage must be one of"),
        ("task=segmentation", "task must be one of"),
        ("train.global_batch=0", "train.global_batch must be >= 1"),
        ("methods.toe.expand=yes please", "methods.toe.expand must be bool"),
        ("novalue", "must look like key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(ROOT / "configs/deit_tiny_toe_cpu.yaml"), [override])


def test_deepspeed_config_takes_batch_and_clipping_from_the_recipe(tmp_path):
    cfg = load_config(str(ROOT / "configs/deit_small.yaml"), ["optim.clip_grad=1.0", "train.grad_accum=2"])
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 1024 and ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        deepspeed_config(cfg, world_size=3)
    conflicting = tmp_path / "ds.json"
    conflicting.write_text(
        json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 32})
    )
    cfg = load_config(str(ROOT / "configs/deit_small.yaml"), [f"train.ds_config={conflicting}"])
    with pytest.raises(ConfigError, match="set it in the recipe only"):
        deepspeed_config(cfg, world_size=8)
    cfg = load_config(
        str(ROOT / "configs/deit_small.yaml"), ["train.zero_stage=2", "train.ds_config=ds_configs/zero1_bf16.json"]
    )
    with pytest.raises(ConfigError, match="ZeRO stage 1"):
        deepspeed_config(cfg, world_size=8)


@pytest.mark.parametrize(
    "override", ["detection.max_size=32", "detection.num_det_tokens=0", "detection.scales=[]", "detection.crop_size=[40]"]
)
def test_bad_detection_settings_are_refused_at_start_up(override):
    """torchvision refuses max_size == a scale only inside a DataLoader worker: catch it up front."""
    with pytest.raises(ConfigError, match="detection:"):
        load_config(str(ROOT / "configs/yolos_ti_cpu.yaml"), [override])


ENGINE_CLIPPING = """
import json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, torch
deepspeed.init_distributed("gloo")
out = {}
for name, ds in json.loads(sys.argv[2]).items():
    model = torch.nn.Linear(4, 2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
    out[name] = engine.gradient_clipping()
print("CLIPPING", json.dumps(out))
from launcher.distributed import exit_process
exit_process(0)  # as launcher.train ends
"""


@pytest.mark.slow
def test_the_engine_clips_only_what_the_recipe_asks_for():
    """DeepSpeed clips at norm 1.0 when the key is absent; the engine must use the recipe's value, 0 for none."""
    import subprocess
    import sys

    from helpers import free_port

    fp32 = ["train.precision=fp32", "train.zero_stage=1", "train.global_batch=8"]
    unclipped = deepspeed_config(load_config(str(ROOT / "configs/deit_tiny_cpu.yaml"), fp32), world_size=1)
    clipped = deepspeed_config(load_config(str(ROOT / "configs/yolos_ti_cpu.yaml"), fp32), world_size=1)
    silent = {k: v for k, v in unclipped.items() if k != "gradient_clipping"}  # what the engine wrote before:
    silent["zero_optimization"] = {
        k: v for k, v in silent["zero_optimization"].items() if k != "compute_grad_norm"
    }  # nor the norm switch (it needs clipping 0)
    configs = {"deit": unclipped, "yolos": clipped, "absent": silent}
    result = subprocess.run(
        [sys.executable, "-c", ENGINE_CLIPPING, str(free_port()), json.dumps(configs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    line = next((text for text in result.stdout.splitlines() if text.startswith("CLIPPING ")), None)
    assert line is not None, result.stdout[-2000:] + result.stderr[-3000:]
    used = json.loads(line.removeprefix("CLIPPING "))
    assert used == {"deit": 0.0, "yolos": 0.1, "absent": 1.0}  # 'absent' shows the default this guards against


def test_a_json_that_clips_against_the_recipe_is_refused(tmp_path):
    clipping = tmp_path / "ds.json"
    clipping.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "gradient_clipping": 1.0}))
    cfg = load_config(str(ROOT / "configs/deit_small.yaml"), [f"train.ds_config={clipping}"])
    with pytest.raises(ConfigError, match="gradient_clipping=1.0 but the recipe gives 0.0"):
        deepspeed_config(cfg, world_size=8)
    assert deepspeed_config(load_config(str(ROOT / "configs/deit_small.yaml")), world_size=8)["gradient_clipping"] == 0.0


def test_toe_seed_stride_is_validated_at_start_up():
    cfg = load_config(str(ROOT / "configs/deit_tiny_toe_r04.yaml"), ["methods.toe.seed_stride=4"])
    assert cfg.methods["toe"].seed_stride == 4
    with pytest.raises(ConfigError, match="methods.toe.seed_stride must be an int >= 1"):
        load_config(str(ROOT / "configs/deit_tiny_toe_r04.yaml"), ["methods.toe.seed_stride=0"])


def test_a_recipe_of_the_earlier_toe_section_still_loads(tmp_path, caplog):
    """Run folders and recipes written before the method registry say ``toe: {enabled: true, ...}``."""
    old = tmp_path / "old.yaml"
    old.write_text(f"base: {ROOT / 'configs/deit_tiny_cpu.yaml'}\ntoe:\n  enabled: true\n  r1: 0.4\n")
    with caplog.at_level("WARNING", logger="launcher.config"):
        cfg = load_config(str(old))
    assert list(cfg.methods) == ["toe"] and cfg.methods["toe"].r1 == 0.4
    assert "read as 'methods: {toe: ...}'" in caplog.text
    old.write_text(f"base: {ROOT / 'configs/deit_tiny_cpu.yaml'}\ntoe:\n  enabled: false\n  r1: 0.4\n")
    assert load_config(str(old)).methods == {}
