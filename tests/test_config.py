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
    cfg = load_config(str(ROOT / "configs/deit_base_toe_r04.yaml"), ["optim.lr=1e-3", "train.steps=10", "toe.k=3"])
    assert cfg.model.name == "deit_base_patch16_224" and cfg.train.global_batch == 1024  # from deit_tiny.yaml
    assert cfg.toe.enabled and cfg.toe.r1 == 0.4 and cfg.toe.k == 3
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 10


@pytest.mark.parametrize("override,message", [
    ("train.batchsize=8", "unknown key 'train.batchsize'"),
    ("trian.steps=8", "unknown key 'trian'"),
    ("optim.lr=fast", "optim.lr must be float"),
    ("train.steps=ten", "train.steps must be int"),
    ("train.zero_stage=4", "train.zero_stage must be one of"),
    ("task=segmentation", "task must be one of"),
    ("train.global_batch=0", "train.global_batch must be >= 1"),
    ("toe.enabled=yes please", "toe.enabled must be bool"),
    ("novalue", "must look like key.sub=value"),
])
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
    conflicting.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
                                       "train_micro_batch_size_per_gpu": 32}))
    cfg = load_config(str(ROOT / "configs/deit_small.yaml"), [f"train.ds_config={conflicting}"])
    with pytest.raises(ConfigError, match="set it in the recipe only"):
        deepspeed_config(cfg, world_size=8)
    cfg = load_config(str(ROOT / "configs/deit_small.yaml"), ["train.zero_stage=2", "train.ds_config=ds_configs/zero1_bf16.json"])
    with pytest.raises(ConfigError, match="ZeRO stage 1"):
        deepspeed_config(cfg, world_size=8)


@pytest.mark.parametrize("override", ["detection.max_size=32", "detection.num_det_tokens=0", "detection.scales=[]",
                                      "detection.crop_size=[40]"])
def test_bad_detection_settings_are_refused_at_start_up(override):
    """torchvision refuses max_size == a scale only inside a DataLoader worker: catch it up front."""
    with pytest.raises(ConfigError, match="detection:"):
        load_config(str(ROOT / "configs/yolos_ti_cpu.yaml"), [override])
