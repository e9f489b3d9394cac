"""Reports over run folders: a markdown table per recipe (mean +- std over seeds) and PNG plots.

    python -m launcher.report runs/deit_tiny_cpu runs/deit_tiny_toe_cpu --out reports/demo [--baseline RUN]

Reads each run folder's ``config.yaml``, ``metrics.jsonl`` and ``final.json`` (when present: a run
still in progress reports what it has). Runs that share a resolved config except ``train.seed``,
``name`` and ``out_dir`` form one recipe row. Wall-clock is the sum of the run's segments (every
fresh start or resume writes a ``start`` event), so the gaps between a preempted job and its
requeue do not count. Training FLOPs are the sum of the per-step ``flops`` the engine logs. The
speed-ups are against the recipe of ``--baseline`` (default: the first run given).
Exit code 2 when a folder is not a run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from .plots import write_plots
from .runs import Group, ReportError, Run, Segment, group_runs, load_run, methods_of, recipe_key
from .tables import _breakdown_table, _recipe_changes, _runs_table, _status, _table, fmt_duration  # noqa: F401

# the package: runs.py (reading run folders, grouping them by recipe), tables.py (the markdown tables),
# plots.py (the PNG plots); this module writes the report from them and is the command line (__main__.py).
# Every name the single module had is importable from here (_status: tests/test_safety_net.py).
__all__ = [
    "ReportError",
    "Run",
    "Group",
    "Segment",
    "load_run",
    "recipe_key",
    "group_runs",
    "methods_of",
    "fmt_duration",
    "write_plots",
    "write_report",
    "main",
]

log = logging.getLogger("launcher.report")


def write_report(runs: list[Run], out, baseline: Optional[Run] = None) -> Path:
    """Write ``report.md`` and the PNG plots to ``out``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not runs:
        raise ReportError("no runs to report on")
    groups = group_runs(runs)
    baseline = baseline or runs[0]
    base_group = next(g for g in groups if any(r is baseline for r in g.runs))
    plots, notes = write_plots(groups, out, base_group)
    for note in notes:
        log.warning(note)
    lines = [
        "# Training report",
        "",
        f"{len(runs)} run(s), {len(groups)} recipe(s). Mean ± std (sample std) over seeds when a recipe has "
        f"several; speed-ups against `{base_group.label}`. Wall-clock sums the run's segments (resumes "
        f"counted without the gaps between them); train time is the step loop's time without evaluation "
        f"and checkpoints (the log windows' `time/window` less `time/evaluation` and `time/checkpoint`), "
        f"whose cost is the recipe's choice of how often, not the method's. A speed-up of a recipe whose "
        f"every seed has a baseline run of the same seed is the mean ± std of the per-seed ratios (each run "
        f"against the baseline run of its seed, timed beside it by `launcher.compare`); otherwise the ratio "
        f"of the means. Top-1 in %.",
        "",
    ]
    for task in dict.fromkeys(g.task for g in groups):
        task_groups = [g for g in groups if g.task == task]
        if len({g.task for g in groups}) > 1:
            lines += [f"## {task}", ""]
        lines += _table(task_groups, base_group if base_group.task == task else task_groups[0]) + [""]
    lines += ["## Runs", ""] + _runs_table(runs) + [""]
    lines += _recipe_changes(runs)
    lines += [f"- `{run.path}` diverged: {run.diverged}" for run in runs if run.diverged] + (
        [""] if any(run.diverged for run in runs) else []
    )
    lines += _breakdown_table(runs)
    titles = {
        "top1_vs_wallclock": "Eval top-1 against wall-clock",
        "top1_vs_flops": "Eval top-1 against training FLOPs",
        "ap_vs_wallclock": "Eval AP against wall-clock",
        "ap_vs_flops": "Eval AP against training FLOPs",
        "top1_vs_speedup": "Final top-1 against speed-up",
        "ap_vs_speedup": "Final AP against speed-up",
        "loss": "Train loss",
        "kept_tokens": "ToE kept tokens",
        "img_per_s": "Throughput",
        "time_breakdown": "Where each step's time goes",
    }
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            lines += [f"![{titles.get(plot.stem, plot.stem)}]({plot.name})", ""]
    warnings = [w for r in runs for w in r.warnings] + notes
    if not any(r.total_flops is not None for r in runs):
        warnings.append("no run logged per-step `flops`: training FLOPs and their speed-up are not reported")
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (each with config.yaml and metrics.jsonl)")
    parser.add_argument("--out", required=True, help="folder for report.md and the PNG plots")
    parser.add_argument("--baseline", help="the run the speed-ups are against (default: the first run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(levelname)s: %(message)s")
    try:
        runs = [load_run(p) for p in args.runs]
        baseline = None
        if args.baseline:
            wanted = Path(args.baseline).resolve()
            baseline = next((r for r in runs if r.path.resolve() == wanted), None)
            if baseline is None:  # a baseline not among the runs joins the report
                baseline = load_run(args.baseline)
                runs.insert(0, baseline)
        report = write_report(runs, args.out, baseline)
    except ReportError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    print(f"report: wrote {report}")
    return 0
