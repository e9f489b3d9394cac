"""Reliability, round two (issue 29, sections 1-4): a NaN never becomes ``latest``, ranks agree before
they train, a resumed run keeps its recipe, a folder that claims progress it cannot show is not
overwritten, and refusals and signals are heard from every rank and every phase. Real processes,
real DeepSpeed engines (gloo), real checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data import write_shards
from launcher.checkpoint import MANIFEST, Checkpointer, file_record
from launcher.guard import DivergedError, NonFiniteGuard, first_nonfinite

from helpers import TINY, finish_all, free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/deit_tiny_toe_cpu.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
FAST = [*TINY, "train.zero_stage=0", "train.precision=fp32"]


def run(run_dir: Path, shards: Path, *overrides, extra=(), env=None, timeout=300):
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
        *FAST,
        *overrides,
    ]
    result = subprocess.run(args, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def start_ranks(per_rank: list[list[str]], *, cwd=None, env=None):
    """One process per rank (as srun starts them), each with its own extra arguments."""
    port, processes = free_port(), []
    for rank, args in enumerate(per_rank):
        rank_env = {
            **ENV,
            **(env or {}),
            "RANK": str(rank),
            "WORLD_SIZE": str(len(per_rank)),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "launcher.train", "--config", str(RECIPE), *args],
                cwd=(cwd or [ROOT] * len(per_rank))[rank],
                env=rank_env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return processes


def strict_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl read by a strict JSON reader (bare NaN / Infinity are errors)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- the non-finite guard -------------------------------------------------------------------------


def test_guard_counts_on_the_device_and_names_the_first_bad_step():
    guard = NonFiniteGuard(torch.device("cpu"), loss_scaling=False)
    for step, value in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0]):
        guard.observe(step, torch.tensor(value))
    assert int(guard.window_count()) == 2
    with pytest.raises(DivergedError, match="the loss is not finite at step 2"):
        guard.take(2, step=4)
    scaled = NonFiniteGuard(torch.device("cpu"), loss_scaling=True)  # fp16: the loss scaler skips such steps
    scaled.observe(0, torch.tensor(float("inf")))
    assert scaled.take(1, step=0) == 1 and int(scaled.window_count()) == 0


def test_guard_refuses_a_checkpoint_of_non_finite_weights():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    guard = NonFiniteGuard(torch.device("cpu"), loss_scaling=True)
    guard.check(3, {"": model})  # finite: no error
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    with pytest.raises(DivergedError, match=r"weights are not finite after step 2 \(ema\.1\.bias"):
        guard.check(3, {"ema.": model})
    assert first_nonfinite([("a", torch.ones(2)), ("b", torch.tensor([1.0, float("inf")]))]) == "b"


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_and_never_replaces_the_last_finite_checkpoint(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    code, out = run(run_dir, tiny_shards, "train.steps=4", "checkpoint.every=2")
    assert code == 0, out[-3000:]
    exit_file = tmp_path / "exit"
    code, out = run(
        run_dir,
        tiny_shards,
        "train.steps=12",
        "checkpoint.every=2",
        "optim.lr=1e8",
        "optim.warmup_epochs=0",
        extra=["--allow-recipe-change"],
        env={"TOE_EXIT_FILE": str(exit_file)},
    )
    assert code == 3 and exit_file.read_text().strip() == "3", out[-3000:]
    assert "diverged: the loss is not finite at step" in out and "Traceback" not in out
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-4", "latest still names the last finite checkpoint"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step-")) == ["step-2", "step-4"]
    records = strict_records(run_dir)
    windows = [r for r in records if "loss" in r]
    assert any(r["loss"] is None and r["nonfinite/loss_steps"] >= 1 for r in windows)
    assert records[-1]["event"] == "diverged" and "not finite" in records[-1]["error"]
    assert not (run_dir / "final.json").exists()
    from launcher.report import _status, load_run

    assert _status(load_run(run_dir)) == "diverged"
    from launcher.export import export

    exported = torch.load(export(str(run_dir), str(tmp_path / "model.pth")), weights_only=True)
    assert first_nonfinite(exported.items()) is None

    # a checkpoint due before any log step: the weights are checked there
    fresh = tmp_path / "fresh"
    code, out = run(
        fresh,
        tiny_shards,
        "train.steps=8",
        "train.log_every=100",
        "checkpoint.every=3",
        "optim.lr=1e8",
        "optim.warmup_epochs=0",
    )
    assert code == 3 and "diverged:" in out and "not finite" in out, out[-3000:]
    assert not (fresh / "checkpoints" / "latest").exists(), "no checkpoint of non-finite weights"

    # export refuses non-finite weights in a checkpoint written before the guard existed
    poisoned = run_dir / "checkpoints" / "step-4"
    states = poisoned / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=False)
    next(iter(state["module"].values())).fill_(float("nan"))
    torch.save(state, states)
    manifest = json.loads((poisoned / MANIFEST).read_text())
    manifest["files"][states.name] = file_record(states)
    (poisoned / MANIFEST).write_text(json.dumps(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "launcher.export", str(poisoned), str(tmp_path / "bad.pth")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "holds non-finite weights" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "bad.pth").exists()


# -- the ranks agree before they train ------------------------------------------------------------


@pytest.mark.slow
def test_ranks_with_different_data_stop_within_seconds_naming_the_rank(tmp_path, tiny_shards):
    other = tmp_path / "other_shards"
    assert (
        write_shards.main(["synthetic", str(other), "--train", "64", "--val", "48", "--shard-size", "32", "--no-progress"])
        == 0
    )
    common = [f"out_dir={tmp_path}", "name=run", *FAST, "train.steps=4"]
    began = time.time()
    outputs = finish_all(start_ranks([[*common, f"data.path={tiny_shards}"], [*common, f"data.path={other}"]]), timeout=240)
    assert "refused: the ranks disagree before training" in outputs[0], outputs[0][-3000:]
    assert f"rank 1's recipe differs from rank 0's: data.path: '{other}'" in outputs[0]
    assert "shard index differs" in outputs[0] and "step plan differs" in outputs[0]
    assert all("Traceback" not in out for out in outputs)
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "nothing was trained"
    print(f"ended {time.time() - began:.1f} s after the start")


@pytest.mark.slow
def test_node_local_run_folders_and_a_refusal_on_rank_1_are_named(tmp_path, tiny_shards):
    """Relative paths resolved in two working directories stand for node-local storage: the same
    ``out_dir`` string is two folders, and ``data.path`` is a broken index on rank 1's node only."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    os.symlink(tiny_shards, nodes[0] / "shards")
    broken = nodes[1] / "shards"
    broken.mkdir()
    (broken / "shards.json").write_text('{"format": "toe-shards/1", "splits": oops}')
    args = ["out_dir=runs", "name=run", "data.path=shards", *FAST, "train.steps=4"]
    outputs = finish_all(start_ranks([args, args], cwd=nodes), timeout=240)
    assert "not valid JSON" in outputs[1] and "rank 1 of 2 refused" in outputs[1], outputs[1][-3000:]
    assert "rank 1 refused:" in outputs[0] and "shards.json is not valid JSON" in outputs[0], outputs[0][-3000:]

    shared_data = [tmp_path / "node2", tmp_path / "node3"]  # the data everywhere, the run folder node-local
    for node in shared_data:
        node.mkdir()
        os.symlink(tiny_shards, node / "shards")
    outputs = finish_all(start_ranks([args, args], cwd=shared_data), timeout=240)
    assert "rank 1's run folder (token rank 0 wrote at this start) differs from rank 0's" in outputs[0], outputs[0][-3000:]
    assert "out_dir on storage all nodes share" in outputs[0]


def test_a_checkpoint_missing_another_ranks_files_is_refused_before_latest_moves(tmp_path):
    target = tmp_path / "step-4"
    target.mkdir()
    (target / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    gathered = [
        {"mp_rank_00_model_states.pt": {"size": 10, "crc32": "0"}},
        {"zero_pp_rank_1_mp_rank_00_optim_states.pt": {"size": 20, "crc32": "0"}},
    ]
    message = Checkpointer._check_shared(target, gathered)
    assert "rank 1 wrote zero_pp_rank_1_mp_rank_00_optim_states.pt, but on rank 0 it is missing there" in message
    assert "storage that every node shares" in message
    (target / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"y" * 20)
    assert Checkpointer._check_shared(target, gathered) is None


# -- a resumed run keeps its recipe ----------------------------------------------------------------


@pytest.mark.slow
def test_a_resume_refuses_a_changed_recipe_and_records_allowed_changes(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    code, out = run(run_dir, tiny_shards, "train.steps=2")
    assert code == 0, out[-3000:]
    original = (run_dir / "config.yaml").read_text()

    code, out = run(run_dir, tiny_shards, "train.steps=2", "methods.toe.r1=0.25", "train.global_batch=32")
    assert code == 2, out[-3000:]
    assert "was trained with another recipe: methods.toe.r1: 0.5 -> 0.25; train.global_batch: 16 -> 32" in out
    assert "Traceback" not in out and (run_dir / "config.yaml").read_text() == original

    code, out = run(run_dir, tiny_shards, "train.steps=2", "train.log_every=2")  # a resumable option
    assert code == 0 and "recipe change at step 2: train.log_every 1 -> 2 (resumable)" in out, out[-3000:]

    code, out = run(
        run_dir, tiny_shards, "train.steps=2", "train.log_every=2", "methods.toe.r1=0.25", extra=["--allow-recipe-change"]
    )
    assert code == 0, out[-3000:]
    history = [json.loads(line) for line in (run_dir / "recipe_changes.jsonl").read_text().splitlines()]
    assert [(h["step"], h["allowed"], [c["key"] for c in h["changes"]]) for h in history] == [
        (2, "resumable", ["train.log_every"]),
        (2, "--allow-recipe-change", ["methods.toe.r1"]),
    ]
    assert "r1: 0.25" in (run_dir / "config.yaml").read_text()
    from launcher.report import write_report  # noqa: I001
    from launcher.report import load_run

    report = write_report([load_run(run_dir)], tmp_path / "report").read_text()
    assert "## Recipe changes on resume" in report and "`methods.toe.r1` | 0.5 -> 0.25 | --allow-recipe-change" in report


def test_latest_naming_a_missing_checkpoint_is_not_overwritten(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step-999")
    code, out = run(run_dir, tiny_shards, "train.steps=2")
    assert code == 2, out[-3000:]
    assert "latest names 'step-999', but" in out and "holds no complete checkpoint" in out and "--no-resume" in out
    assert not (run_dir / "metrics.jsonl").exists(), "nothing was trained from step 0"


# -- signals during start-up, ENOSPC ---------------------------------------------------------------


@pytest.mark.parametrize("sig,delay", [(signal.SIGTERM, 1.0), (signal.SIGUSR1, None)])
def test_a_signal_during_start_up_exits_75_and_writes_the_exit_file(tmp_path, tiny_shards, sig, delay):
    exit_file = tmp_path / "exit"
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "launcher.train",
        "--config",
        str(RECIPE),
        f"out_dir={tmp_path}",
        "name=run",
        f"data.path={tiny_shards}",
        *FAST,
        "train.steps=400",
    ]
    process = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**ENV, "TOE_EXIT_FILE": str(exit_file)},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if delay is not None:  # during the imports
        time.sleep(delay)
    else:  # once the process group is up and the data prepared: model build, DeepSpeed set-up
        deadline = time.time() + 180
        while not (run_dir / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.05)
    process.send_signal(sig)
    out = process.communicate(timeout=180)[0]
    assert process.returncode == 75, out[-3000:]
    assert exit_file.read_text().strip() == "75"


def test_disk_full_while_checkpointing_names_enospc_and_the_path(tmp_path, tiny_shards):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        code, out = run(mount / "run", tiny_shards, "train.steps=2")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    assert code == 1, out[-3000:]
    assert "no space left on the device (ENOSPC) writing checkpoint" in out and str(mount / "run") in out, out[-3000:]


def test_recipe_changes_read_an_older_run_folder_by_what_its_absent_options_meant():
    import yaml

    from launcher.config import load_config, recipe_changes, resolved

    current = yaml.safe_load(resolved(load_config(str(RECIPE))))
    older = yaml.safe_load(resolved(load_config(str(RECIPE))))
    del older["train"]["signal_check_every"]  # added later, left at its default: the same run
    del older["methods"]["toe"]["counting"]  # added later with a new default: the older run counted by rates
    assert recipe_changes(older, current) == [("methods.toe.counting", "rates", "paper")]
    assert recipe_changes(older, yaml.safe_load(resolved(load_config(str(RECIPE), ["methods.toe.counting=rates"])))) == []
    changed = yaml.safe_load(resolved(load_config(str(RECIPE), ["train.seed=3", "train.log_every=7"])))
    assert [key for key, _, _ in recipe_changes(current, changed)] == ["train.log_every", "train.seed"]


EXITING = """
import atexit, logging, sys
from launcher.distributed import exit_process
atexit.register(print, "atexit ran")
logging.basicConfig(stream=sys.stderr)
logging.getLogger("run").warning("the last log line")
print("the last result", end="")
exit_process(3)
"""


def test_a_finished_rank_exits_with_its_code_after_its_output_without_finalizing():
    """launcher.train's way out (launcher.distributed.exit_process): the code, every buffered line,
    and no interpreter finalization (where gloo's worker threads can abort a finished rank)."""
    done = subprocess.run([sys.executable, "-c", EXITING], capture_output=True, text=True, timeout=60, cwd=ROOT, env=ENV)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == "the last result" and "the last log line" in done.stderr
    assert "atexit ran" not in done.stdout + done.stderr
