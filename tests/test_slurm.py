"""slurm/ against a real SLURM (munged + slurmctld + slurmd on loopback, started here)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher.export import export

from slurm_cluster import LocalSlurm, missing_binaries, submit

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.kwargs={patch_size: 8, depth: 3, embed_dim: 48, num_heads: 2}",
    "data.workers=1",
    "train.global_batch=16",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.keep=10",
    "train.precision=fp32",
    "train.zero_stage=1",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        message = (
            f"SLURM TESTS SKIPPED: {missing} not installed; install the Debian packages slurmd slurmctld "
            f"slurm-client munge (install.sh does so as root)"
        )
        print(f"\n{'!' * 20} {message} {'!' * 20}", file=sys.stderr)
        pytest.skip(message)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as local:
        yield local


@pytest.fixture
def shards(tiny_shards):
    return tiny_shards


def launch(cluster, run_dir: Path, shards: Path, *overrides, dry_run=False) -> str:
    """``python -m launcher.submit`` for 2 CPU tasks on the local cluster; returns the job id."""
    command = [
        sys.executable,
        "-m",
        "launcher.submit",
        "--config",
        str(ROOT / "configs/deit_tiny_toe_cpu.yaml"),
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "30",
        f"out_dir={run_dir.parent}",
        f"name={run_dir.name}",
        f"data.path={shards}",
        *TINY,
        *overrides,
    ]
    if dry_run:
        command.append("--dry-run")
    env = {**cluster.env, "TOE_PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1].split()[-1].split(";")[0]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def wait_for(predicate, timeout=240, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise TimeoutError(what)


@pytest.mark.slow
def test_submit_validates_the_recipe_and_fills_the_template(tmp_path):
    command = [
        sys.executable,
        "-m",
        "launcher.submit",
        "--config",
        str(ROOT / "configs/deit_small_toe_r05.yaml"),
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--dry-run",
        f"out_dir={tmp_path}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--job-name=deit_small_toe_r05",
        "--signal=B:USR1@300",
        "slurm/train.sbatch",
        f"out_dir={tmp_path}",
    ):
        assert option in result.stdout
    bad = subprocess.run(command[:-1] + ["train.global_batch=1000"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not divisible by world size 32" in bad.stderr


@pytest.mark.slow
def test_sbatch_trains_on_two_ranks_and_checkpoints(cluster, shards, tmp_path):
    run = tmp_path / "run"
    job = launch(cluster, run, shards, "train.steps=6", "checkpoint.every=3")
    info = cluster.wait_job(job, timeout=300)
    log = next(run.glob("slurm-*.out")).read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "2 tasks" in log and "(run exit code: 0)" in log and "requeueing" not in log
    assert json.loads((run / "checkpoints/step-6/meta.json").read_text())["world_size"] == 2
    assert sorted(losses(run)) == list(range(6))


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes_to_the_same_weights(cluster, shards, tmp_path):
    common = ["train.steps=24", "checkpoint.every=4", "model.drop_path=0.1"]
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    job = launch(cluster, straight, shards, *common)
    assert cluster.wait_job(job, timeout=300)["JobState"] == "COMPLETED"
    job = launch(cluster, preempted, shards, *common)
    wait_for(lambda: (preempted / "metrics.jsonl").exists() and len(losses(preempted)) >= 6, what="step 6")
    cluster.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@300 does before the limit
    info = cluster.wait_job(job, timeout=400)
    log = next(preempted.glob("slurm-*.out")).read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log[-4000:]
    assert "requeueing job" in log and "restart 1" in log and "SLURM_RESTART_COUNT=1" in log
    assert losses(straight) == losses(preempted), "the resumed run retraces the uninterrupted one"
    a = torch.load(export(str(straight), str(tmp_path / "a.pth")), weights_only=True)
    b = torch.load(export(str(preempted), str(tmp_path / "b.pth")), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights equal the uninterrupted run's"


def rank_pid(run_name: str, rank: int) -> int:
    for pid in subprocess.run(["pgrep", "-f", f"name={run_name}"], capture_output=True, text=True).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_PROCID={rank}".encode() in environ and b"SLURM_STEP_ID=0" in environ:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"launcher.train" in cmdline and b"srun" not in cmdline:
                return int(pid)
    raise LookupError(f"rank {rank} of {run_name} not found")


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_within_bounded_time(cluster, shards, tmp_path):
    run = tmp_path / "victim"
    job = launch(cluster, run, shards, "train.steps=2000", "checkpoint.every=0", "train.collective_timeout_minutes=1")
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(losses(run)) >= 3, what="step 3")
    os.kill(rank_pid("victim", 1), signal.SIGKILL)
    killed = time.time()
    info = cluster.wait_job(job, timeout=180)
    elapsed = time.time() - killed
    print(f"job {job} failed {elapsed:.1f} s after rank 1 was killed")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert elapsed < 90, f"the job took {elapsed:.0f} s to fail after a rank died"
    assert "requeueing" not in next(run.glob("slurm-*.out")).read_text()


@pytest.mark.slow
def test_deepspeed_hostfile_from_the_allocation(cluster, tmp_path):
    hostfile, script = tmp_path / "hostfile", tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n{ROOT}/slurm/deepspeed_hostfile.sh {hostfile} 2\n")
    job = submit(cluster, ["-n", "1", f"--output={tmp_path}/out.txt", str(script)])
    assert cluster.wait_job(job, timeout=60)["JobState"] == "COMPLETED", (tmp_path / "out.txt").read_text()
    assert hostfile.read_text() == "localhost slots=2\n"


@pytest.mark.slow
def test_deepspeed_sbatch_template_runs_the_recipe(cluster, shards, tmp_path):
    run = tmp_path / "ds"
    before = {p.name for p in Path("/dev/shm").glob("deepspeed*")}
    env = {
        "SLOTS_PER_NODE": "2",
        "TOE_REPO": str(ROOT),
        "TOE_DEEPSPEED": str(Path(sys.executable).parent / "deepspeed"),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    args = [
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        f"--output={tmp_path}/ds-%j.out",
        str(ROOT / "slurm/train_deepspeed.sbatch"),
        str(ROOT / "configs/deit_tiny_toe_cpu.yaml"),
        f"out_dir={tmp_path}",
        "name=ds",
        f"data.path={shards}",
        *TINY,
        "train.steps=4",
        "checkpoint.every=0",
    ]
    try:
        job = submit(cluster, args, env)
        info = cluster.wait_job(job, timeout=300)
    finally:
        for name in {p.name for p in Path("/dev/shm").glob("deepspeed*")} - before:
            (Path("/dev/shm") / name).unlink(missing_ok=True)
    log = next(tmp_path.glob("ds-*.out")).read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert json.loads((run / "checkpoints/step-4/meta.json").read_text())["world_size"] == 2
