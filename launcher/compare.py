"""Run every recipe x seed on the same data and budget, then report on them (launcher.report).

    python -m launcher.compare --recipes configs/deit_tiny_cpu.yaml configs/deit_tiny_toe_cpu.yaml \\
        --seeds 3 --out comparisons/toe train.steps=512
    python -m launcher.compare --recipes ... --seeds 3 --out /shared/cmp --slurm --nodes 1 --gpus-per-node 8 \\
        --time 04:00:00 --partition gpu [--no-wait] data.path=/shared/shards/in1k

The overrides apply to every run; run K of a recipe also gets ``train.seed=K``, ``name=<recipe
name>_s<K>`` and ``out_dir=OUT/runs``. Runs go one after another on this machine through
``python -m launcher.train`` (``--ranks N``: torchrun with N processes), seed 0 of every recipe first so
that an interrupted comparison already compares, or as SLURM jobs through ``launcher.submit``.
A run whose ``final.json`` reaches its total steps is skipped; any other run folder resumes from its
latest checkpoint (launcher.train does that by itself). A run folder written under another config
is refused before anything runs.
The report (speed-ups against the first recipe) goes to ``OUT/report``. A method that arrives as a
plug-in is just another recipe here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .config import ConfigError, load_config, resolved
from .report import ReportError, fmt_duration, load_run, write_report

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class PlannedRun:
    recipe: Path
    seed: int
    name: str
    overrides: list[str]
    run_dir: Path
    config: dict  # the resolved config launcher.train will write
    total: Optional[int]  # optimizer steps; None when train.epochs is set and the shards can't be read
    exact_total: bool  # train.steps given (else an estimate from the shards index)


def estimate_total(cfg, world: int = 1) -> tuple[Optional[int], bool]:
    """Total optimizer steps: ``train.steps`` (exact), else the run's own count from the shard index
    (``launcher.run_plan``: a method's example subset and run length included), or ``None`` when the
    index cannot be read here."""
    if cfg.train.steps:
        return cfg.train.steps, True
    from .run_plan import plan_from_index

    try:
        planned = plan_from_index(cfg, world=world)
    except ConfigError:  # e.g. a budget the data cannot meet: launcher.train names it when the run starts
        return None, False
    return (planned.total_steps, False) if planned is not None else (None, False)


def _check_listed_once(recipes: list[str]) -> None:
    """The same recipe file listed twice (under any spelling of its path) would plan each of its runs twice."""
    seen: dict[Path, str] = {}
    for recipe in recipes:
        key = Path(recipe).resolve()
        if key in seen:
            same = "" if seen[key] == recipe else f" (as {seen[key]})"
            raise ConfigError(f"--recipes lists {recipe} twice{same}: list each recipe once (--seeds gives the repeats)")
        seen[key] = recipe


def plan(recipes: list[str], seeds: int, out: Path, overrides: list[str], world: int = 1) -> list[PlannedRun]:
    _check_listed_once(recipes)
    runs, names = [], {}
    for seed in range(seeds):  # seed 0 of every recipe first: a cut-short comparison still has one of each
        for recipe in recipes:
            base = load_config(recipe, overrides)
            name = f"{base.name}_s{seed}"
            if names.setdefault(name, recipe) != recipe:
                raise ConfigError(
                    f"{recipe} and {names[name]} both have name '{base.name}': give each recipe its "
                    f"own name (the run folders would collide)"
                )
            run_overrides = [*overrides, f"train.seed={seed}", f"name={name}", f"out_dir={out / 'runs'}"]
            cfg = load_config(recipe, run_overrides)
            total, exact = estimate_total(cfg, world)
            runs.append(
                PlannedRun(Path(recipe), seed, name, run_overrides, cfg.run_dir, yaml.safe_load(resolved(cfg)), total, exact)
            )
            check_folder(runs[-1])
    return runs


def check_folder(run: PlannedRun) -> None:
    """A run folder written under another config is refused: resuming or skipping it would report a
    run that was not trained as the recipe says (launcher.train rewrites config.yaml on every start)."""
    path = run.run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        found = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({err}): delete the run folder or use another --out") from err
    if not isinstance(found, dict) or not found:
        what = "is empty" if found is None or found == {} else f"holds a {type(found).__name__}, not a recipe mapping"
        raise ConfigError(
            f"{path} {what}: the run folder's config cannot be compared with the plan; delete the run "
            f"folder or use another --out"
        )
    from .config import recipe_changes

    changed = [key for key, _, _ in recipe_changes(found, run.config)]
    if changed:
        raise ConfigError(
            f"{run.run_dir} was trained with another config ({', '.join(changed[:5])} differ): "
            f"use another --out, the same overrides, or delete that run folder"
        )


def run_state(run: PlannedRun) -> str:
    """'done' (final.json at the total steps), 'resume' (a folder with a checkpoint) or 'new'."""
    final_path = run.run_dir / "final.json"
    if final_path.is_file():
        try:
            final = json.loads(final_path.read_text())
        except ValueError:
            final = {}
        # with train.epochs the total is an estimate; final.json is only written once the run reached its own
        if not run.exact_total or int(final.get("step", -1)) >= run.total:
            return "done"
    if (run.run_dir / "checkpoints" / "latest").is_file():
        return "resume"
    return "new"


class Progress:
    """Follows a run's metrics.jsonl as it grows: steps done and the rate of the current segment."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, ""
        self.steps = 0
        self.segment: Optional[tuple[int, float]] = None  # (first step, its time) of the current segment
        self.last_time = 0.0

    def update(self) -> None:
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except OSError:
            return
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()  # an incomplete last line is read again once it is complete
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "start":
                self.steps, self.segment = int(record.get("step", 0)), None
            elif "loss" in record and "step" in record:
                self.steps = int(record["step"]) + 1
                if self.segment is None and "time" in record:
                    self.segment = (self.steps, float(record["time"]))
                self.last_time = float(record.get("time", time.time()))

    def line(self, total: Optional[int], exact: bool) -> str:
        self.update()
        text = f"step {self.steps}/{'' if exact else '~'}{total if total else '?'}"
        if self.segment is None:
            return text + ", starting up"
        if total:
            text += f" ({100 * self.steps / total:.0f}%)"
        if self.segment is not None and self.steps > self.segment[0]:
            rate = (self.steps - self.segment[0]) / max(1e-9, self.last_time - self.segment[1])
            text += f", {rate:.2f} steps/s"
            if total:
                text += f", ETA {fmt_duration(max(0, total - self.steps) / rate)}"
        return text


def say(message: str) -> None:
    print(f"compare: {message}", flush=True)


def launch_prefix(ranks: int, port: Optional[int] = None) -> list[str]:
    """The command that starts ``launcher.train`` on this machine: the module itself for one rank,
    torchrun with ``ranks`` processes on loopback otherwise (``port``: the rendezvous port; default a
    free one, so two comparisons can share a machine)."""
    if ranks == 1:
        return [sys.executable, "-m", "launcher.train"]
    if port is None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "launcher.train",
    ]


def train_command(run: PlannedRun, ranks: int) -> list[str]:
    return [*launch_prefix(ranks), "--config", str(run.recipe.resolve()), *run.overrides]


def run_local(runs: list[PlannedRun], ranks: int, every: float) -> int:
    child: dict = {}

    def forward(signum, frame):  # the run checkpoints at the next step boundary and exits with 75
        if child.get("process") is not None and child["process"].poll() is None:
            child["process"].send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGUSR1, forward)
    for i, run in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {run.name}"
        state = run_state(run)
        if state == "done":
            say(f"{tag}: finished already ({run.run_dir / 'final.json'}): skipped")
            continue
        verb = {"resume": "resuming from its latest checkpoint", "new": "starting"}[state]
        run.run_dir.mkdir(parents=True, exist_ok=True)
        command = train_command(run, ranks)
        say(f"{tag}: {verb} (log: {run.run_dir / 'train.log'})")
        with open(run.run_dir / "train.log", "a") as log_file:
            log_file.write(f"\n$ {shlex.join(command)}\n")
            log_file.flush()
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                },
            )
            child["process"] = process
            progress, started, last = Progress(run.run_dir / "metrics.jsonl"), time.time(), time.time()
            while process.poll() is None:
                time.sleep(min(1.0, every))
                if time.time() - last >= every:
                    say(f"{tag}: {progress.line(run.total, run.exact_total)}")
                    last = time.time()
            child["process"] = None
        code = process.returncode
        if code != 0:
            tail = (run.run_dir / "train.log").read_text(errors="replace").splitlines()[-15:]
            say(
                f"{tag}: launcher.train exited with {code} after {fmt_duration(time.time() - started)}; the last "
                f"lines of {run.run_dir / 'train.log'}:\n" + "\n".join(tail)
            )
            say("run the same command again to resume from the checkpoints")
            return code
        say(f"{tag}: done, {progress.line(run.total, run.exact_total)}, {fmt_duration(time.time() - started)}")
    return 0


def _queued_job(name: str) -> Optional[str]:
    """A queued or running job of this user with the run's name (two jobs on one run folder would clash)."""
    result = subprocess.run(
        ["squeue", "-h", "-u", os.environ.get("USER", str(os.getuid())), "-n", name, "-o", "%i"],
        capture_output=True,
        text=True,
    )
    ids = result.stdout.split()
    return ids[0] if result.returncode == 0 and ids else None


def _live_jobs(ids: list[str]) -> set[str]:
    result = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True)
    if result.returncode != 0:  # squeue refuses ids that have left the queue altogether
        return set()
    return set(result.stdout.split()) & set(ids)


def run_slurm(runs: list[PlannedRun], args: argparse.Namespace) -> int:
    from .submit import build_command

    jobs: dict[str, PlannedRun] = {}
    for i, run in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {run.name}"
        if run_state(run) == "done":
            say(f"{tag}: finished already: skipped")
            continue
        queued = _queued_job(run.name)
        if queued:
            say(f"{tag}: already queued as job {queued}: waiting on it")
            jobs[queued] = run
            continue
        submit_args = argparse.Namespace(**{**vars(args), "config": str(run.recipe.resolve()), "overrides": run.overrides})
        command = build_command(submit_args)
        command.insert(1, "--parsable")  # prints "jobid[;cluster]"
        run.run_dir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            say(f"{tag}: sbatch failed ({result.returncode}): {result.stderr.strip()}\n  {shlex.join(command)}")
            return result.returncode or 1
        job = result.stdout.strip().split(";")[0]
        say(f"{tag}: submitted as job {job} (log: {run.run_dir}/slurm-{job}.out)")
        jobs[job] = run
    if args.no_wait:
        return 0
    last = 0.0
    while jobs and (live := _live_jobs(list(jobs))):
        if time.time() - last >= args.progress_every:
            for job in sorted(live):
                run = jobs[job]
                say(f"job {job} {run.name}: {Progress(run.run_dir / 'metrics.jsonl').line(run.total, run.exact_total)}")
            last = time.time()
        time.sleep(min(args.progress_every, args.poll_seconds))
    unfinished = [r for r in jobs.values() if run_state(r) != "done"]
    for run in unfinished:
        say(f"{run.name} left the queue unfinished (see {run.run_dir}/slurm-*.out); run the same command again to resume it")
    return 1 if unfinished else 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", required=True, help="recipe YAMLs; the first is the baseline")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 of every recipe")
    parser.add_argument("--out", required=True, help="the comparison folder: runs/ and report/ go there")
    parser.add_argument("--ranks", type=int, default=1, help="processes per run on this machine (torchrun when > 1)")
    parser.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--slurm", action="store_true", help="submit every run through launcher.submit")
    parser.add_argument("--no-wait", action="store_true", help="with --slurm: submit and return")
    parser.add_argument("--poll-seconds", type=float, default=30.0, help=argparse.SUPPRESS)
    slurm = parser.add_argument_group("SLURM (with --slurm; as launcher.submit)")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=0)
    slurm.add_argument("--tasks-per-node", type=int, default=0)
    slurm.add_argument("--cpus-per-task", type=int, default=8)
    slurm.add_argument("--time", default="24:00:00")
    slurm.add_argument("--signal-seconds", type=int, default=300)
    for flag in ("--partition", "--account", "--qos", "--mem", "--constraint"):
        slurm.add_argument(flag)
    slurm.add_argument("--sbatch-option", action="append", default=[])
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides for every run")
    args = parser.parse_intermixed_args(argv)
    # --recipes takes every word up to the next option, so overrides written right after it land there
    args.overrides = [r for r in args.recipes if "=" in r and not Path(r).is_file()] + args.overrides
    args.recipes = [r for r in args.recipes if not ("=" in r and not Path(r).is_file())]
    if args.seeds < 1 or args.ranks < 1 or not args.recipes:
        parser.error("--seeds and --ranks must be >= 1 and --recipes needs at least one recipe")
    if args.no_wait and not args.slurm:
        parser.error("--no-wait goes with --slurm")
    if args.slurm:
        from .submit import check_geometry

        try:
            check_geometry(args)
        except ConfigError as err:
            parser.error(str(err))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(levelname)s: %(message)s")
    out = Path(args.out).resolve()
    try:
        world = args.nodes * max(1, args.tasks_per_node or args.gpus_per_node) if args.slurm else args.ranks
        runs = plan(args.recipes, args.seeds, out, args.overrides, world)
    except ConfigError as err:
        print(f"compare: bad recipe: {err}", file=sys.stderr)
        return 2
    say(f"{len(runs)} runs: {len(args.recipes)} recipe(s) x {args.seeds} seed(s) in {out / 'runs'}")
    code = run_slurm(runs, args) if args.slurm else run_local(runs, args.ranks, args.progress_every)
    if args.slurm and args.no_wait:
        return code
    present = [r for r in runs if (r.run_dir / "config.yaml").is_file() and (r.run_dir / "metrics.jsonl").is_file()]
    if not present:
        return code or 1
    try:
        report = write_report([load_run(r.run_dir) for r in present], out / "report")  # baseline: the first
    except ReportError as err:
        print(f"compare: report: {err}", file=sys.stderr)
        return code or 2
    say(f"report: {report}" + ("" if code == 0 else " (incomplete: some runs did not finish)"))
    return code


if __name__ == "__main__":
    sys.exit(main())
