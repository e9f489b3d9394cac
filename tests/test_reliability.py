"""Failure behaviour (issue 19): a failing rank ends the job at once, one job per run folder, verified
checkpoints with fall-back, exit codes wrappers can trust, validation that names the bad value, and
bad samples counted once. Real processes, real DeepSpeed engines (gloo), real checkpoints."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from data import write_shards
from data.shards import ShardIndex, ShardIndexError
from data.stream import build_train_stream
from launcher import config as config_module
from launcher.checkpoint import MANIFEST, Checkpointer, CheckpointError, ResumePoint, select_resume_point
from launcher.config import ConfigError, RunConfig, load_config
from launcher.runlock import RunLock, RunLockedError

from helpers import TINY, edit_shard, finish, finish_all, free_port, kill_tree, module_state, start, wait_for_step

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/deit_tiny_toe_cpu.yaml"
ZERO1 = ["train.zero_stage=1", "train.precision=fp32", "checkpoint.every=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def start_ranks(run_dir: Path, shards: Path, *overrides, world=2, extra=(), env=None):
    """One process per rank, started by hand (as srun would): each rank's exit code and output apart."""
    port = free_port()
    processes = []
    for rank in range(world):
        rank_env = {
            **ENV,
            **(env or {}),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        args = [
            sys.executable,
            "-m",
            "launcher.train",
            "--config",
            str(RECIPE),
            *extra,
            f"out_dir={run_dir.parent}",
            f"name={run_dir.name}",
            f"data.path={shards}",
            *TINY,
            *overrides,
        ]
        processes.append(
            subprocess.Popen(
                args,
                cwd=ROOT,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    return processes


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in run_dir.rglob("*")
        if p.is_file() and p.name != ".lock"
    }


# -- validation (fast) --------------------------------------------------------------------------


def test_every_numeric_option_has_a_range():
    """A numeric option added to a config dataclass without a line in ``RANGES`` fails here."""
    numeric = set()
    for section in dataclasses.fields(RunConfig):
        if not dataclasses.is_dataclass(
            section.type if not isinstance(section.type, str) else typing.get_type_hints(RunConfig)[section.name]
        ):
            continue
        cls = typing.get_type_hints(RunConfig)[section.name]
        for name, hint in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if args[0] in (int, float):
                numeric.add(f"{section.name}.{name}")
    ranges = set(config_module.RANGES)
    numeric -= set(config_module.CHOICES)  # e.g. train.zero_stage: one of a list, checked there
    assert numeric - ranges == set(), "numeric options without a range in launcher/config.py RANGES"
    assert ranges - numeric <= {"optim.betas"}, "RANGES names options that do not exist"


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=-0.001", "optim.lr must be > 0, got -0.001"),
        ("optim.base_lr=0", "optim.base_lr must be > 0, got 0.0"),
        ("optim.weight_decay=-1", "optim.weight_decay must be >= 0, got -1.0"),
        ("train.ema_decay=2", "train.ema_decay must be in [0, 1), got 2.0"),
        ("train.collective_timeout_minutes=0", "train.collective_timeout_minutes must be > 0, got 0.0"),
        ("optim.betas=[0.9, 1.5]", "optim.betas must be a list of numbers, each in [0, 1), got [0.9, 1.5]"),
        ("optim.eps=0", "optim.eps must be > 0"),
        ("optim.min_lr=-1e-5", "optim.min_lr must be >= 0"),
        ("data.hflip=1.5", "data.hflip must be in [0, 1], got 1.5"),
        ("train.seed=-1", "train.seed must be in [0, 4294967295], got -1"),
    ],
)
def test_numeric_options_out_of_range_name_key_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(str(RECIPE), [override])
    assert str(err.value) == message or str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(f"base: {RECIPE}\ntrain:\n  steps: 4\n   log_every: [1\n")
    with pytest.raises(ConfigError, match=rf"recipe {recipe}: YAML syntax error at line 4, column"):
        load_config(str(recipe))
    with pytest.raises(ConfigError, match=r"override 'train.steps=\[4': YAML syntax error at line 1"):
        load_config(str(RECIPE), ["train.steps=[4"])


def test_invalid_shards_json_names_file_and_line(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "shards.json").write_text('{"format": "toe-shards/1",\n "splits": {\n  "train": oops}}\n')
    with pytest.raises(ShardIndexError, match=rf"{folder}/shards.json is not valid JSON: line 3, column 12"):
        ShardIndex.load(str(folder))


def run_train(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.train", "--config", str(RECIPE), *args],
        cwd=ROOT,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_bad_value_and_missing_resume_path_exit_2_before_any_process_group(tmp_path, tiny_shards):
    common = [f"out_dir={tmp_path}", "name=run", f"data.path={tiny_shards}", *TINY]
    result = run_train(*common, "optim.lr=-0.001")
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "bad recipe: optim.lr must be > 0, got -0.001" in out
    assert "Traceback" not in out and "init_distributed" not in out
    missing = tmp_path / "no" / "such" / "step-8"
    result = run_train(*common, "--resume", str(missing))
    out = result.stdout + result.stderr
    assert result.returncode == 2 and f"--resume {missing}: no such file or directory" in out, out[-2000:]
    assert not (tmp_path / "run").exists(), "nothing was trained from step 0"


@pytest.mark.slow
def test_config_error_after_start_up_exits_2_with_one_line_on_rank_0(tmp_path, tiny_shards):
    """A global batch that does not split over the ranks is found only once the world size is known."""
    outputs = finish_all(start_ranks(tmp_path / "run", tiny_shards, "train.global_batch=15", "train.steps=2"), timeout=180)
    assert "bad recipe: train.global_batch=15 is not divisible by world size 2" in outputs[0], outputs[0][-3000:]
    assert "not divisible" not in outputs[1], "rank 0 alone reports an error every rank meets"
    assert all("Traceback" not in out for out in outputs)


def test_counters_count_each_bad_sample_once_whichever_pass_meets_it(tmp_path):
    """1 corrupt image + 2 bad labels at the front of a slot: the refill pass meets them again."""
    out = tmp_path / "shards"
    assert (
        write_shards.main(
            ["synthetic", str(out), "--train", "24", "--val", "8", "--shard-size", "24", "--size", "16", "--no-progress"]
        )
        == 0
    )

    def damage(position: int, ext: str, data: bytes):
        if position == 0 and ext != "cls":
            return b"\x89PNG broken"
        return b"not a label" if position in (1, 2) and ext == "cls" else data

    edit_shard(out / "train-000000.tar", damage)
    stream = build_train_stream(
        str(out), batch_size=4, num_workers=0, seed=0, image_size=16, buffer_size=0, auto_augment=None, re_prob=0.0
    )
    batches = list(stream)
    assert len(batches) == 6, "the epoch keeps its length"
    assert stream.counters["refilled"] == 3, "the refill pass read the front of the slot again"
    assert (stream.counters["corrupt_image"], stream.counters["bad_label"]) == (1, 2)


# -- the run folder lock (fast) ------------------------------------------------------------------


def test_run_lock_names_the_holder_and_is_released_when_the_holder_dies(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from launcher.runlock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
            str(run),
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError) as err:
            RunLock(run).acquire()
        assert str(run) in str(err.value) and f"PID {holder.pid}" in str(err.value) and "host " in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(run).acquire()  # the OS released the dead holder's lock: no stale lock
    lock.release()


# -- checkpoints -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_shards):
    """A 2-rank ZeRO-1 fp32 run of 6 steps with checkpoints at steps 2, 4, 6 and its final weights."""
    run = tmp_path_factory.mktemp("reliability") / "base"
    outputs = finish_all(start_ranks(run, tiny_shards, "train.steps=6", *ZERO1), timeout=300)
    assert (run / "final.json").is_file(), outputs[0][-3000:]
    return run, module_state(run, 6)


def copy_run(base: Path, target: Path) -> Path:
    shutil.copytree(base, target, ignore=shutil.ignore_patterns("export-*", ".lock"))
    (target / "final.json").unlink()
    return target


@pytest.mark.slow
def test_manifest_records_every_file_and_verification_picks_the_newest_intact(base_run, tmp_path):
    run = copy_run(base_run[0], tmp_path / "run")
    step6 = run / "checkpoints/step-6"
    manifest = json.loads((step6 / MANIFEST).read_text())["files"]
    assert set(manifest) == {p.name for p in step6.iterdir()} - {MANIFEST, "meta.json"}
    assert {"rng-rank0.pt", "rng-rank1.pt", "mp_rank_00_model_states.pt"} <= set(manifest)
    assert select_resume_point(run).folder == step6
    # one flipped byte, same size: the checksum catches it (also for a 1-rank resume of a 2-rank run)
    model = step6 / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    assert select_resume_point(run).folder == run / "checkpoints/step-4"
    with pytest.raises(CheckpointError, match=rf"checkpoint {step6} fails verification: {model} has CRC-32"):
        select_resume_point(step6)
    from launcher.export import main as export_main

    assert export_main([str(step6), str(tmp_path / "out.pth")]) == 2, "export verifies too"
    (run / "checkpoints/step-4/rng-rank1.pt").unlink()
    (run / "checkpoints/step-2/meta.json").write_text("{")
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies"):
        select_resume_point(run)


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_and_ends_with_the_uninterrupted_weights(base_run, tmp_path, tiny_shards):
    run = copy_run(base_run[0], tmp_path / "run")
    optim = run / "checkpoints/step-6/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])  # cut in half
    shutil.rmtree(run / "checkpoints/step-4")  # the fall-back goes two back
    outputs = finish_all(start_ranks(run, tiny_shards, "train.steps=6", *ZERO1), timeout=300)
    assert f"{optim} has" in outputs[0] and "truncated" in outputs[0], outputs[0][-3000:]
    assert "resumed at step 2" in outputs[0]
    final = module_state(run, 6)
    assert all(torch.equal(base_run[1][k], final[k]) for k in final), "bit-identical final weights (fp32)"


@pytest.mark.slow
def test_explicit_resume_of_a_damaged_checkpoint_is_an_error_naming_it(base_run, tmp_path, tiny_shards):
    run = copy_run(base_run[0], tmp_path / "run")
    step4 = run / "checkpoints/step-4"
    (step4 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    started = time.time()
    processes = start_ranks(tmp_path / "new", tiny_shards, "train.steps=6", *ZERO1, extra=["--resume", str(step4)])
    outputs = finish_all(processes, timeout=180)
    assert [p.returncode for p in processes] == [2, 2], outputs[0][-3000:]
    assert (
        f"bad checkpoint: checkpoint {step4} fails verification: "
        f"{step4}/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"
    ) in outputs[0]
    assert time.time() - started < 120


@pytest.mark.slow
def test_a_rank_failing_alone_ends_the_job_promptly_with_its_error(base_run, tmp_path, tiny_shards):
    """A checkpoint from before manifests (no manifest.json) that lacks rank 1's optimizer shard and
    rank 1's RNG file: rank 1 fails alone in its load while rank 0 goes on to the first all-reduce
    (on the old code the job hung for train.collective_timeout_minutes, 30 by default)."""
    run = copy_run(base_run[0], tmp_path / "run")
    step6 = run / "checkpoints/step-6"
    (step6 / MANIFEST).unlink()
    (step6 / "rng-rank1.pt").unlink()
    processes = start_ranks(run, tiny_shards, "train.steps=8", *ZERO1, extra=["--allow-recipe-change"])
    started = time.time()
    outputs = finish_all(processes, timeout=240)
    elapsed = time.time() - started
    assert processes[1].returncode == 1 and processes[0].returncode != 0
    assert (
        f"rank 1 of 2 failed: CheckpointError: cannot resume from {step6}: rank 1 needs {step6}/rng-rank1.pt" in outputs[1]
    ), outputs[1][-3000:]
    assert "rank 0 of 2 failed" in outputs[0]
    assert elapsed < 150, f"the job took {elapsed:.0f} s to end"
    # the shared model states: named before DeepSpeed would fail with a bare AssertionError (the check
    # runs before the engine is touched, so none is built here)
    (step6 / "mp_rank_00_model_states.pt").unlink()
    checkpointer = Checkpointer(run, None, rank=0, world_size=2, zero_stage=1, keep=5)
    with pytest.raises(CheckpointError, match=f"rank 0 needs {step6}/mp_rank_00_model_states.pt, which is missing"):
        checkpointer.load(ResumePoint(step6), universal=False)


@pytest.mark.slow
def test_a_killed_dataloader_worker_ends_the_job_promptly_naming_the_signal(tmp_path, tiny_shards):
    run = tmp_path / "run"
    processes = start_ranks(run, tiny_shards, "train.steps=400", "checkpoint.every=0")
    wait_for_step(run, 2, processes[0])
    workers = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(processes[1].pid)], capture_output=True, text=True
    ).stdout.split()
    assert workers, "rank 1 has a DataLoader worker"
    os.kill(int(workers[0]), signal.SIGKILL)  # as the OOM killer does
    killed = time.time()
    outputs = finish_all(processes, timeout=240)
    assert time.time() - killed < 90, "the job ends within seconds of the failure"
    assert processes[1].returncode == 1 and processes[0].returncode != 0
    # torch reports the dead worker by its signal, unless the tensor it was sending arrives broken first
    # (a ConnectionResetError from the worker's shared-memory handle: seen on a fresh CI machine)
    assert "rank 1 of 2 failed" in outputs[1] and (
        "killed by signal: Killed" in outputs[1] or "Connection reset by peer" in outputs[1]
    ), outputs[1][-3000:]


@pytest.mark.slow
def test_second_job_is_refused_then_a_restart_after_sigkill_resumes_and_torchrun_signals_via_exit_file(
    tmp_path, tiny_shards, monkeypatch
):
    run, exit_file = tmp_path / "run", tmp_path / "exit-code"
    common = ["train.steps=400", "train.zero_stage=1", "train.precision=fp32", "checkpoint.every=2"]
    first = start(run, tiny_shards, *common, ranks=2)
    wait_for_step(run, 3, first)
    # a second job on the same folder: refused at start-up, naming the folder and the holder
    first_files = snapshot(run)
    second = start(run, tiny_shards, *common, ranks=1)
    out = finish(second, timeout=120)
    assert second.returncode == 2, out[-3000:]
    holder = json.loads((run / ".lock").read_text())
    assert f"refused: run folder {run} is in use by another job (host {holder['host']}, PID {holder['pid']}" in out
    after = snapshot(run)
    assert {
        k: v for k, v in after.items() if k in first_files and not k.startswith(("metrics", "tensorboard", "checkpoints"))
    } == {k: v for k, v in first_files.items() if not k.startswith(("metrics", "tensorboard", "checkpoints"))}, (
        "the refused job wrote nothing (config.yaml untouched)"
    )
    starts = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"event": "start"' in line]
    assert len(starts) == 1 and '"world_size": 2' in starts[0], "the refused job appended nothing"
    # the first job dies (node failure): its lock goes with it and a restart resumes
    kill_tree(first.pid, signal.SIGKILL)
    first.wait()
    latest = int((run / "checkpoints/latest").read_text().split("-")[1])
    monkeypatch.setenv("TOE_EXIT_FILE", str(exit_file))
    restarted = start(run, tiny_shards, *common, ranks=2)
    deadline = time.time() + 180  # the restarted job's own records: its start event, then a step after it
    while time.time() < deadline and restarted.poll() is None:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        segment = lines[max(i for i, line in enumerate(lines) if '"event": "start"' in line) :]
        if sum('"event": "start"' in line for line in lines) == 2 and any('"loss"' in line for line in segment):
            break
        time.sleep(0.5)
    ranks = subprocess.run(["ps", "-o", "pid=", "--ppid", str(restarted.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, "the restarted job trains on its two ranks"
    os.kill(int(ranks[1]), signal.SIGTERM)  # one rank only: every rank checkpoints and exits 75
    out = finish(restarted, timeout=180)
    assert f"resumed at step {latest}" in out
    assert restarted.returncode == 1, "torchrun turns a worker's 75 into 1 (ChildFailedError)"
    assert exit_file.read_text().strip() == "75", out[-3000:]
