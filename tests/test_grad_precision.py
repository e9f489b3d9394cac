"""bf16 runs accumulate and all-reduce their gradients in fp32 by default (``train.grad_precision``), as DeiT's
AMP keeps fp32 gradients; ``bf16`` is the cheaper switch. Checked on what the DeepSpeed engine does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config import ConfigError, deepspeed_config, grad_precision, load_config

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
CPU = str(ROOT / "configs/deit_tiny_cpu.yaml")
BF16 = ["train.precision=bf16", "train.global_batch=8"]


def test_bf16_recipes_get_fp32_gradients_by_default_and_bf16_on_request():
    for recipe in ("deit_tiny.yaml", "deit_small_toe_r05.yaml", "deit_base.yaml"):
        cfg = load_config(str(ROOT / "configs" / recipe))
        ds = deepspeed_config(cfg, world_size=8)
        assert grad_precision(cfg) == "fp32"
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
        # ZeRO-1 + bf16 weights + fp32 gradients is DeepSpeed's BF16_Optimizer: it needs the gradient norm
        assert "compute_grad_norm" not in ds["zero_optimization"]
    cheap = deepspeed_config(load_config(CPU, BF16 + ["train.grad_precision=bf16"]), 1)
    assert "data_types" not in cheap and "communication_data_type" not in cheap
    assert cheap["zero_optimization"]["compute_grad_norm"] is False
    zero2 = deepspeed_config(load_config(CPU, BF16 + ["train.zero_stage=2"]), 1)
    assert zero2["data_types"] == {"grad_accum_dtype": "fp32"} and zero2["zero_optimization"]["compute_grad_norm"] is False
    # ZeRO-0: DeepSpeed has no fp32 accumulation for bf16 weights; the default follows it, an explicit fp32 is refused
    assert grad_precision(load_config(CPU, BF16 + ["train.zero_stage=0"])) == "bf16"
    assert "data_types" not in deepspeed_config(load_config(CPU, BF16 + ["train.zero_stage=0"]), 1)
    assert grad_precision(load_config(CPU)) is None  # fp32 runs: fp32 everything, nothing to set
    # a bf16 recipe that names fp32 gradients still runs when an override makes it fp32 throughout
    assert grad_precision(load_config(CPU, ["train.grad_precision=fp32"])) is None


@pytest.mark.parametrize(
    "override,message",
    [
        (
            BF16 + ["train.zero_stage=0", "train.grad_precision=fp32"],
            "train.grad_precision=fp32 .* needs train.zero_stage 1-3",
        ),
        (["train.grad_precision=bf16"], "train.grad_precision=bf16 is for train.precision=bf16"),
        (["train.precision=fp16", "train.grad_precision=fp32"], "train.grad_precision=fp32 is for train.precision=bf16"),
        (BF16 + ["train.grad_precision=fp16"], r"train.grad_precision must be one of \('fp32', 'bf16'\)"),
    ],
)
def test_bad_gradient_precisions_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CPU, override)


def test_a_json_that_sets_another_gradient_dtype_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "bf16"}}
        )
    )
    with pytest.raises(ConfigError, match="data_types=.* train.grad_precision=bf16"):
        deepspeed_config(load_config(CPU, BF16 + [f"train.ds_config={path}"]), 1)


# Two micro-batches whose gradients are 1/2 and 1/1024 (after the engine's 1/accumulation scaling): in bf16
# (8-bit mantissa) their sum rounds back to 1/2, in fp32 it is 0.5009765625. SGD with lr 1 from w = 0 writes
# minus that sum into the fp32 master weight, which the test reads from the engine's optimizer.
ENGINE = """
import json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, torch
deepspeed.init_distributed("gloo")
out = {}
for name, ds in json.loads(sys.argv[2]).items():
    ds = {**ds, "zero_allow_untested_optimizer": True}
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=ds)
    for x in (1.0, 1 / 512):
        engine.backward(engine(torch.full((1, 1), x, dtype=torch.bfloat16)).float().sum())
        engine.step()
    master = [p for group in engine.optimizer.optimizer.param_groups for p in group["params"]]
    out[name] = {"optimizer": type(engine.optimizer).__name__, "accum": str(engine.get_data_types()[1]),
                 "comm": str(engine.communication_data_type), "master": float(master[0].flatten()[0])}
print("ENGINE", json.dumps(out))
from launcher.distributed import exit_process
exit_process(0)  # as launcher.train ends
"""


@pytest.mark.slow
def test_the_engine_accumulates_in_the_recipes_gradient_precision():
    configs = {}
    for stage in (1, 2):
        for grads in ("fp32", "bf16"):
            cfg = load_config(
                CPU,
                [
                    "train.precision=bf16",
                    "train.global_batch=2",
                    "train.grad_accum=2",
                    f"train.zero_stage={stage}",
                    f"train.grad_precision={grads}",
                ],
            )
            configs[f"{stage}-{grads}"] = deepspeed_config(cfg, 1)
    result = subprocess.run(
        [sys.executable, "-c", ENGINE, str(free_port()), json.dumps(configs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    line = next((text for text in result.stdout.splitlines() if text.startswith("ENGINE ")), None)
    assert line is not None, result.stdout[-2000:] + result.stderr[-3000:]
    used = json.loads(line.removeprefix("ENGINE "))
    for stage in (1, 2):
        fp32, bf16 = used[f"{stage}-fp32"], used[f"{stage}-bf16"]
        assert (fp32["accum"], fp32["comm"]) == ("torch.float32", "torch.float32")
        assert (bf16["accum"], bf16["comm"]) == ("torch.bfloat16", "torch.bfloat16")
        assert fp32["master"] == -(0.5 + 1 / 1024), f"ZeRO-{stage}: fp32 accumulation keeps the small micro-batch"
        assert bf16["master"] == -0.5, f"ZeRO-{stage}: bf16 accumulation rounds it away (what the default avoids)"
    assert used["1-fp32"]["optimizer"] == "BF16_Optimizer" and used["1-bf16"]["optimizer"] == "DeepSpeedZeroOptimizer"


@pytest.mark.slow
def test_a_bf16_gradient_checkpoint_resumes_under_the_fp32_default(tmp_path, tiny_shards):
    """Checkpoints hold fp32 master weights and optimizer moments, never gradients: the switch of DeepSpeed's
    ZeRO-1 optimizer (DeepSpeedZeroOptimizer for bf16 gradients, BF16_Optimizer for fp32) loads across."""
    from helpers import records, train

    run = tmp_path / "run"
    bf16 = ["train.precision=bf16", "train.zero_stage=1", "checkpoint.every=2"]
    train(run, tiny_shards, "train.steps=2", "train.grad_precision=bf16", *bf16, ranks=2)
    # the gradient dtype changes what the run computes: a resume takes it only when told (issue 29's recipe check)
    out = train(run, tiny_shards, "train.steps=4", *bf16, ranks=2, extra=("--allow-recipe-change",))
    assert "resumed at step 2" in out
    assert "trained with bf16 gradients (train.grad_precision), this run continues with fp32" in out
    assert sorted(records(run)) == [0, 1, 2, 3]
