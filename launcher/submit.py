"""Submit a recipe to SLURM with ``slurm/train.sbatch`` (or print the sbatch command).

    python -m launcher.submit --config configs/deit_small_toe_r05.yaml --nodes 4 --gpus-per-node 8 \\
        --time 24:00:00 --partition gpu out_dir=/shared/runs data.path=/shared/shards/in1k

One task per GPU (``--gpus-per-node``; ``--tasks-per-node`` for CPU partitions). The recipe and
its overrides are validated first, the global batch must split over the tasks, the job is named
after the run, and its log goes into the run folder (put ``out_dir`` on shared storage: every
node writes checkpoints there, and the requeued job resumes from it). A run folder that a live job
holds (its ``.lock``) is refused here already.

Relative paths in the recipe and its overrides (``out_dir``, ``data.path``, ``data.eval_path``,
``model.checkpoint``, ``train.ds_config``) are relative to the repository root, the folder the job runs in
(``slurm/train.sbatch`` changes to it) and the one ``launcher.compare`` runs its local runs in, wherever
this command is run from. The job is given them absolute (as overrides), and ``--output`` and the
run-folder lock check use the same absolute run folder. ``--config`` itself is an ordinary file argument
(relative to the current folder).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from .config import ConfigError, deepspeed_config, load_config
from .runlock import RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT  # what relative paths of the recipe and its overrides are relative to (module docstring)
PATH_KEYS = ("out_dir", "data.path", "data.eval_path", "model.checkpoint", "train.ds_config")


def check_geometry(args: argparse.Namespace) -> int:
    """Tasks per node, or ``ConfigError`` naming the option: counts that would divide by zero or make an
    empty job are refused here."""
    for flag, value, low in (
        ("--nodes", args.nodes, 1),
        ("--gpus-per-node", args.gpus_per_node, 0),
        ("--tasks-per-node", args.tasks_per_node, 0),
        ("--cpus-per-task", args.cpus_per_task, 1),
        ("--signal-seconds", args.signal_seconds, 0),
    ):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    tasks = args.tasks_per_node or args.gpus_per_node
    if tasks < 1:
        raise ConfigError("give --gpus-per-node (one task per GPU) or --tasks-per-node for a CPU partition")
    return tasks


def _is_url(value: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", value) is not None  # pipe:..., s3://..., file:...


def anchored_overrides(config: str, overrides: list[str], base: Optional[Path] = None) -> list[str]:
    """``overrides`` plus ``KEY=ABSOLUTE`` for each of ``PATH_KEYS`` the recipe leaves relative, resolved
    against ``base``: the job then reads and writes the same folders whatever its working folder."""
    base = BASE if base is None else base
    cfg = load_config(config, overrides)
    extra = []
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if not isinstance(value, str) or not value or Path(value).is_absolute() or _is_url(value):
            continue
        if key == "train.ds_config" and not (base / value).exists():
            continue  # not there: launcher.config's own fall-back (the repository's ds_configs/) decides
        absolute = str((base / value).resolve())
        extra.append(f"{key}={absolute if yaml.safe_load(absolute) == absolute else json.dumps(absolute)}")
    return [*overrides, *extra]


def plan_job(args: argparse.Namespace) -> tuple[list[str], Path]:
    """The sbatch command and the run folder (absolute) it trains in."""
    tasks = check_geometry(args)
    overrides = anchored_overrides(args.config, list(args.overrides))
    cfg = load_config(args.config, overrides)
    deepspeed_config(cfg, args.nodes * tasks)  # the global batch must split over every task
    run_dir = Path(cfg.run_dir)
    options = [
        f"--job-name={cfg.name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={args.cpus_per_task}",
        f"--time={args.time}",
        f"--output={run_dir}/slurm-%j.out",
        f"--signal=B:USR1@{args.signal_seconds}",
    ]
    if args.gpus_per_node:
        options.append(f"--gpus-per-node={args.gpus_per_node}")
    for flag in ("partition", "account", "qos", "mem", "constraint"):
        value = getattr(args, flag)
        if value:
            options.append(f"--{flag}={value}")
    options += args.sbatch_option
    return ["sbatch", *options, str(ROOT / "slurm" / "train.sbatch"), str(Path(args.config).resolve()), *overrides], run_dir


def build_command(args: argparse.Namespace) -> list[str]:
    return plan_job(args)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--tasks-per-node", type=int, default=0, help="default: --gpus-per-node")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--signal-seconds", type=int, default=300, help="USR1 this long before the time limit")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--mem", help="memory per node, e.g. 0 (all) or 500G")
    parser.add_argument("--constraint")
    parser.add_argument("--sbatch-option", action="append", default=[], help="any other sbatch option, repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command only")
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        check_geometry(args)
    except ConfigError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 2
    try:
        command, run_dir = plan_job(args)
    except ConfigError as err:
        print(f"submit: bad recipe: {err}", file=sys.stderr)
        return 2
    print(shlex.join(command))
    if args.dry_run:
        return 0
    try:  # a job of this run that is alive still holds its folder (launcher/runlock.py): refuse now, not at start-up
        RunLock(run_dir).acquire().release()
    except RunLockedError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 2
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
