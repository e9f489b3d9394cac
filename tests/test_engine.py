"""launcher.train end to end: real DeepSpeed engines (gloo), real processes, real checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from data import write_shards
from launcher.train import lr_at
from toe import ToESchedule

from helpers import TINY, command, finish, free_port, kill_tree, module_state, records, start, train, wait_for_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def shards(tiny_shards):
    return tiny_shards


def test_lr_is_a_pure_function_of_the_step():
    kw = dict(peak=1e-3, warmup_steps=10, total_steps=110, warmup_lr=1e-6, min_lr=1e-5)
    assert lr_at(0, **kw) == 1e-6 and lr_at(10, **kw) == 1e-3
    assert abs(lr_at(110, **kw) - 1e-5) < 1e-12 and lr_at(60, **kw) == pytest.approx((1e-3 + 1e-5) / 2)


@pytest.mark.slow
def test_synthetic_shards_of_another_geometry_are_refused(tmp_path, shards):
    """``data.synthetic: true`` writes the shards only when missing; shards written for another image
    size (or object count) are not silently trained on: a start-up refusal (exit 2, issue 29 section 5)."""
    out = train(tmp_path / "other", shards, "model.img_size=48", expect=2)
    assert "holds synthetic shards with" in out and "'size': 48" in out


@pytest.mark.slow
def test_bad_recipe_fails_before_any_process_group(tmp_path, shards):
    out = train(tmp_path / "bad", shards, "train.batchsize=8", expect=2)
    assert "unknown key 'train.batchsize'" in out
    assert "init_distributed" not in out and "TorchBackend" not in out
    out = train(tmp_path / "bad2", shards, "methods.toe.r1=1.5", expect=2)
    assert "r1 must lie in (0, 1]" in out
    out = train(tmp_path / "bad3", shards, "train.ema=true", "train.zero_stage=3", expect=2)
    assert "train.ema with train.zero_stage=3 is not supported" in out
    assert not (tmp_path / "bad").exists(), "nothing is written for a bad recipe"


@pytest.mark.slow
def test_ema_is_evaluated_checkpoints_are_pruned_and_logs_written(tmp_path, shards):
    run = tmp_path / "ema"
    train(
        run,
        shards,
        "train.steps=4",
        "train.ema=true",
        "train.ema_decay=0.5",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        ranks=2,
    )
    final = json.loads((run / "final.json").read_text())
    assert {"top1", "top5", "ema_top1", "ema_top5"} <= set(final) and final["eval_samples"] == 48
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-3", "step-4"], "keep the last 2"
    assert any((run / "tensorboard").iterdir())
    assert "ema: true" in (run / "config.yaml").read_text()
    state = torch.load(run / "checkpoints/step-4/mp_rank_00_model_states.pt", weights_only=False)
    assert set(state["ema"]) == set(state["module"]), "the EMA travels in the checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize(
    "zero_stage,precision",
    [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "bf16"), (0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "fp32")],
)
@pytest.mark.slow
def test_trains_on_ranks_zero_stages_and_precisions(tmp_path, shards, ranks, zero_stage, precision):
    run = tmp_path / "run"
    train(
        run,
        shards,
        "train.steps=6",
        f"train.zero_stage={zero_stage}",
        f"train.precision={precision}",
        "checkpoint.every=3",
        ranks=ranks,
    )
    steps = records(run)
    assert sorted(steps) == list(range(6))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps.values())
    schedule = ToESchedule(r1=0.5, total_steps=6)
    assert [steps[t]["toe/stage"] for t in range(6)] == [schedule.stage(t) for t in range(6)]
    assert [steps[t]["toe/kept_tokens"] for t in range(6)] == [schedule.kept_tokens(16, schedule.stage(t)) for t in range(6)]
    final = json.loads((run / "final.json").read_text())
    assert final["eval_samples"] == 48 and 0 <= final["top1"] <= 1
    assert (run / "checkpoints" / "latest").read_text() == "step-6"
    assert json.loads((run / "checkpoints/step-6/meta.json").read_text()) == {
        "step": 6,
        "world_size": ranks,
        "zero_stage": zero_stage,
    }
    if (ranks, zero_stage) in ((1, 0), (2, 3)):  # export from unsharded and ZeRO-3-sharded checkpoints
        state = module_state(run, 6)
        plain = timm.create_model(
            "deit_tiny_patch16_224", num_classes=32, img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=2
        )
        plain.load_state_dict(state, strict=True)


@pytest.mark.slow
def test_sigkill_and_auto_resume_is_bit_identical(tmp_path, shards):
    total = 30
    common = [
        f"train.steps={total}",
        "checkpoint.every=4",
        "train.zero_stage=1",
        "train.precision=fp32",
        "model.drop_path=0.1",
    ]
    train(tmp_path / "straight", shards, *common, ranks=2)
    victim = tmp_path / "killed"
    process = start(victim, shards, *common, ranks=2)
    wait_for_step(victim, 6, process)
    kill_tree(process.pid, signal.SIGKILL)  # the whole job dies at once, as on a node failure
    process.wait()
    killed_at = max(records(victim))
    latest = int((victim / "checkpoints" / "latest").read_text().split("-")[1])
    assert 4 <= latest <= killed_at + 1 < total, "killed mid-run, after a checkpoint"
    out = train(victim, shards, *common, ranks=2)  # auto-resume from the run folder
    assert f"resumed at step {latest}" in out
    straight, resumed = records(tmp_path / "straight"), records(victim)
    assert [straight[t]["loss"] for t in range(total)] == [resumed[t]["loss"] for t in range(total)], "bit-identical losses"
    a, b = module_state(tmp_path / "straight", total), module_state(victim, total)
    assert all(torch.equal(a[k], b[k]) for k in a), "identical final weights"


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_with_75(tmp_path, shards):
    run = tmp_path / "run"
    process = start(run, shards, "train.steps=200", "checkpoint.every=0")
    wait_for_step(run, 3, process)
    os.killpg(process.pid, signal.SIGTERM)
    out = finish(process)
    assert process.returncode == 75, out[-3000:]
    tag = (run / "checkpoints" / "latest").read_text()
    step = int(tag.split("-")[1])
    assert step >= 4 and (run / "checkpoints" / tag / "meta.json").is_file()
    assert max(records(run)) == step - 1, "saved at the step boundary after the signal"


@pytest.mark.slow
def test_two_ranks_resume_on_one_through_a_universal_checkpoint(tmp_path, shards):
    run = tmp_path / "run"
    common = ["train.steps=8", "checkpoint.every=4", "train.zero_stage=2", "train.precision=fp32"]
    train(run, shards, *common, ranks=2)
    resumed = tmp_path / "resumed"
    out = train(resumed, shards, *common, ranks=1, extra=["--resume", str(run / "checkpoints" / "step-4")])
    assert "converting" in out and "resumed at step 4" in out
    steps = records(resumed)
    assert sorted(steps) == [4, 5, 6, 7]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps.values())
    assert json.loads((resumed / "final.json").read_text())["step"] == 8


def shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed*")} if Path("/dev/shm").is_dir() else set()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_deepspeed_launcher_and_mpirun_run_the_recipe(tmp_path, shards, launcher):
    port = free_port()
    bin_dir = Path(sys.executable).parent
    if launcher == "deepspeed":
        prefix = [
            str(bin_dir / "deepspeed"),
            "--num_accelerators",
            "2",
            "--master_port",
            str(port),
            "--module",
            "launcher.train",
        ]
        env_extra = {}
    else:
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            pytest.skip("OpenMPI's mpirun is not installed (install.sh installs it as root)")
        prefix = [
            mpirun,
            "-np",
            "2",
            "--bind-to",
            "none",
            "-x",
            "MASTER_ADDR=127.0.0.1",
            "-x",
            f"MASTER_PORT={port}",
            "-x",
            "PYTHONPATH",
            "-x",
            "OMP_NUM_THREADS",
            sys.executable,
            "-m",
            "launcher.train",
        ]
        env_extra = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    run = tmp_path / "run"
    before = shm_files()
    args = [
        *prefix,
        "--config",
        str(ROOT / "configs/deit_tiny_toe_cpu.yaml"),
        f"out_dir={run.parent}",
        f"name={run.name}",
        f"data.path={shards}",
        *TINY,
        "train.steps=4",
        "checkpoint.every=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env_extra}
    try:
        result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        for name in shm_files() - before:  # DeepSpeed's shared-memory comm buffers outlive the run
            (Path("/dev/shm") / name).unlink(missing_ok=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert json.loads((run / "checkpoints/step-4/meta.json").read_text())["world_size"] == 2
    assert sorted(records(run)) == [0, 1, 2, 3]


@pytest.mark.slow
def test_detection_trains_on_two_ranks_with_toe_and_resumes_exactly(tmp_path):
    shards = tmp_path / "det_shards"
    assert (
        write_shards.main(
            [
                "synthetic",
                str(shards),
                "--train",
                "128",
                "--val",
                "16",
                "--size",
                "64",
                "--objects",
                "3",
                "--shard-size",
                "32",
                "--no-progress",
            ]
        )
        == 0
    )
    common = [
        f"data.path={shards}",
        "model.kwargs={patch_size: 8, depth: 3, embed_dim: 48, num_heads: 2}",
        "data.workers=1",
        "train.global_batch=8",
        "train.log_every=1",
        "checkpoint.keep=5",
        "train.steps=8",
        "checkpoint.every=4",
        "methods.toe.warmup_steps=2",
        "model.drop_path=0.1",
        # three-object scenes with the full YOLOS augmentation (multi-scale, crop branch)
        "model.img_size=64",
        "data.synthetic_objects=3",
        "detection.num_det_tokens=10",
        "detection.scales=[56, 64, 72]",
        "detection.max_size=96",
        "detection.crop_scales=[48, 64]",
        "detection.crop_size=[40, 64]",
        "detection.init_pe_size=[48, 64]",
    ]  # a learned 6 x 8 table

    def run(name, *extra):
        args = [
            *command(2, free_port()),
            "--config",
            str(ROOT / "configs/yolos_ti_toe_cpu.yaml"),
            f"out_dir={tmp_path}",
            f"name={name}",
            *common,
            *extra,
        ]
        result = subprocess.run(
            args,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        return result.stdout + result.stderr

    run("straight")
    out = run("resumed", "--resume", str(tmp_path / "straight/checkpoints/step-4"))
    assert "resumed at step 4" in out
    straight, resumed = records(tmp_path / "straight"), records(tmp_path / "resumed")
    schedule = ToESchedule(r1=0.5, total_steps=8, warmup_steps=2)
    assert [straight[t]["toe/stage"] for t in range(8)] == [schedule.stage(t) for t in range(8)]
    assert [resumed[t]["loss"] for t in range(4, 8)] == [straight[t]["loss"] for t in range(4, 8)]
    final = json.loads((tmp_path / "straight/final.json").read_text())
    assert {"AP", "AP50", "AP75"} <= set(final) and final["eval_samples"] == 16
    from models.yolos import create_yolos

    state = module_state(tmp_path / "straight", 8)
    plain = create_yolos(
        num_classes=32,
        num_det_tokens=10,
        img_size=64,
        init_pe_size=[48, 64],
        mid_pos_embed=True,
        patch_size=8,
        depth=3,
        embed_dim=48,
        num_heads=2,
    )
    plain.load_state_dict(state, strict=True)


@pytest.mark.slow
def test_two_jobs_writing_the_embedded_shards_at_once_share_one_complete_copy(tmp_path):
    """``data.synthetic: true`` on an empty path, two jobs at once (it happened: one read a half-written
    folder and failed on a missing shards.json)."""
    code = (
        "import sys; from data.write_shards import write_synthetic_once; "
        "write_synthetic_once(sys.argv[1], size=32, objects=1)"
    )
    target = tmp_path / "shards"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(target)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"], "no private folder is left behind"
    index = json.loads((target / "shards.json").read_text())
    assert index["synthetic"] == {"seed": 0, "size": 32, "objects": 1}
    assert sum(s["samples"] for s in index["splits"]["train"]["shards"]) == 8192
    assert all((target / s["name"]).is_file() for split in index["splits"].values() for s in split["shards"])
    assert (target / "val_coco.json").is_file()
