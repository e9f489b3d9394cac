"""Submit a recipe to SLURM with ``slurm/train.sbatch`` (or print the sbatch command).

    python -m launcher.submit --config configs/deit_small_toe_r05.yaml --nodes 4 --gpus-per-node 8 \\
        --time 24:00:00 --partition gpu out_dir=/shared/runs data.path=/shared/shards/in1k

One task per GPU (``--gpus-per-node``; ``--tasks-per-node`` for CPU partitions). The recipe and
its overrides are validated first, the global batch must split over the tasks, the job is named
after the run, and its log goes into the run folder (put ``out_dir`` on shared storage: every
node writes checkpoints there, and the requeued job resumes from it). A run folder that a live job
holds (its ``.lock``) is refused here already.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from .config import ConfigError, deepspeed_config, load_config
from .runlock import RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]


def build_command(args: argparse.Namespace) -> list[str]:
    cfg = load_config(args.config, args.overrides)
    tasks = args.tasks_per_node or args.gpus_per_node
    if tasks < 1:
        raise ConfigError("give --gpus-per-node (one task per GPU) or --tasks-per-node for a CPU partition")
    deepspeed_config(cfg, args.nodes * tasks)  # the global batch must split over every task
    run_dir = Path(cfg.run_dir).resolve()
    options = [f"--job-name={cfg.name}", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}",
               f"--cpus-per-task={args.cpus_per_task}", f"--time={args.time}",
               f"--output={run_dir}/slurm-%j.out", f"--signal=B:USR1@{args.signal_seconds}"]
    if args.gpus_per_node:
        options.append(f"--gpus-per-node={args.gpus_per_node}")
    for flag in ("partition", "account", "qos", "mem", "constraint"):
        value = getattr(args, flag)
        if value:
            options.append(f"--{flag}={value}")
    options += args.sbatch_option
    return ["sbatch", *options, str(ROOT / "slurm" / "train.sbatch"), str(Path(args.config).resolve()),
            *args.overrides]


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
        command = build_command(args)
    except ConfigError as err:
        print(f"submit: bad recipe: {err}", file=sys.stderr)
        return 2
    print(shlex.join(command))
    if args.dry_run:
        return 0
    run_dir = Path(load_config(args.config, args.overrides).run_dir)
    try:  # a job of this run that is alive still holds its folder (launcher/runlock.py): refuse now, not at start-up
        RunLock(run_dir).acquire().release()
    except RunLockedError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 2
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
