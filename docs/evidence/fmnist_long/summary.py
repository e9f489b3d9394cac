"""The four-epoch comparison's figures that `launcher.report` does not give: each recipe's difference from the
baseline (+- the standard error of the difference of two means), the per-seed differences between recipes,
the evaluations after every epoch, and a drift-robust, self-timed train-time speed-up.

Self-timed: a run's train time (the log windows' ``time/window`` less ``time/evaluation`` and
``time/checkpoint``) against the baseline's step count at the run's own full-cost pace (the mean step time
of its windows at ``cost/flops_share`` 1: ToE's last stage, Budgeted + ToE's last, every baseline step). Both
ends are timed in the same run, so the machine's speed drift between runs (13-25% within a session here)
cancels; the paired wall-clock ratios of `launcher.report` carry it.

    PYTHONPATH=. python docs/evidence/fmnist_long/summary.py RUNS_DIR > docs/evidence/fmnist_long/summary.md
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

from launcher.report.runs import load_run as load_report_run

BASELINE = "fmnist_deit_tiny"
RECIPES = {
    BASELINE: "baseline",
    "fmnist_deit_tiny_toe_r05": "ToE r1 = 0.5",
    "fmnist_deit_tiny_budgeted_toe": "Budgeted + ToE",
    "fmnist_deit_tiny_at_toe_flops": "baseline at ToE's FLOPs (2940 steps)",
}
EPOCH_STEPS = (937, 1874, 2811, 3748)
SEEDS = (0, 1, 2)


def load_run(folder: Path) -> dict:
    run = load_report_run(folder)  # launcher.report's reading: wall-clock over segments, train time, FLOPs
    windows = list(run.train.values())

    def train_time(r: dict) -> float:
        return r["time/window"] - r.get("time/evaluation", 0.0) - r.get("time/checkpoint", 0.0)

    full = [r for r in windows if r.get("cost/flops_share", 0.0) >= 0.999 and r["steps"] > 1]
    return {
        "final": 100 * run.final["top1"],
        "evals": {step: 100 * r["eval/top1"] for step, r in run.evals.items() if "eval/top1" in r},
        "wall": run.wall_clock,
        "train": run.train_time,
        "flops": run.total_flops,
        "full_step_s": sum(train_time(r) for r in full) / sum(r["steps"] for r in full),
    }


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def fmt(xs: list[float], digits: int = 2, unit: str = "") -> str:
    m, s = mean_std(xs)
    return f"{m:.{digits}f}{unit} +- {s:.{digits}f}"


def main(root: Path) -> None:
    runs = {
        (r, s): load_run(root / f"{r}_s{s}") for r in RECIPES for s in SEEDS if (root / f"{r}_s{s}" / "final.json").exists()
    }
    seeds = {r: [s for s in SEEDS if (r, s) in runs] for r in RECIPES}
    base_final = [runs[(BASELINE, s)]["final"] for s in seeds[BASELINE]]
    base_flops = statistics.mean(runs[(BASELINE, s)]["flops"] for s in seeds[BASELINE])
    base_steps = EPOCH_STEPS[-1]

    print("# Four epochs: the summary\n")
    print(f"Made by `summary.py` (its docstring says how) from the runs in `{root}`. Top-1 in %; mean +- sample std.\n")
    print(
        "| recipe | seeds | final top-1 (%) | vs baseline (+- s.e.) | FLOPs speed-up | wall-clock speed-up (paired) "
        "| train-time speed-up (paired) | train-time speed-up, self-timed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r, name in RECIPES.items():
        ss = seeds[r]
        if not ss:
            continue
        final = [runs[(r, s)]["final"] for s in ss]
        m, sd = mean_std(final)
        bm, bsd = mean_std(base_final)
        se = math.sqrt(sd**2 / len(final) + bsd**2 / len(base_final))
        flops = base_flops / statistics.mean(runs[(r, s)]["flops"] for s in ss)
        paired = [s for s in ss if (BASELINE, s) in runs]
        wall = [runs[(BASELINE, s)]["wall"] / runs[(r, s)]["wall"] for s in paired]
        train = [runs[(BASELINE, s)]["train"] / runs[(r, s)]["train"] for s in paired]
        self_timed = [runs[(r, s)]["full_step_s"] * base_steps / runs[(r, s)]["train"] for s in ss]
        is_base = r == BASELINE
        print(
            f"| {name} | {len(ss)} | {m:.2f} +- {sd:.2f} | {'-' if is_base else f'{m - bm:+.2f} +- {se:.2f}'} "
            f"| {flops:.2f}x | {'1.00x' if is_base else fmt(wall, unit='x')} "
            f"| {'1.00x' if is_base else fmt(train, unit='x')} "
            f"| {fmt(self_timed, unit='x')} |"
        )

    print("\n| eval top-1 (%) | epoch 1 (step 937) | epoch 2 (1874) | epoch 3 (2811) | epoch 4 (3748) | end |")
    print("|---|---|---|---|---|---|")
    for r, name in RECIPES.items():
        ss = seeds[r]
        if not ss:
            continue
        cells = []
        for step in EPOCH_STEPS:
            values = [runs[(r, s)]["evals"][step] for s in ss if step in runs[(r, s)]["evals"]]
            cells.append(fmt(values) if values else "-")
        last = max(runs[(r, ss[0])]["evals"])
        cells.append(f"{fmt([runs[(r, s)]['final'] for s in ss])} (step {last})")
        print(f"| {name} | " + " | ".join(cells) + " |")

    print("\n| per seed, final top-1 difference | seed 0 | seed 1 | seed 2 | mean |")
    print("|---|---|---|---|---|")
    base, toe, both, control = RECIPES
    for a, b in [(toe, base), (both, base), (toe, control), (both, control), (both, toe)]:
        diffs = {s: runs[(a, s)]["final"] - runs[(b, s)]["final"] for s in SEEDS if (a, s) in runs and (b, s) in runs}
        cells = [f"{diffs[s]:+.2f}" if s in diffs else "-" for s in SEEDS]
        print(f"| {RECIPES[a]} - {RECIPES[b]} | " + " | ".join(cells) + f" | {statistics.mean(diffs.values()):+.2f} |")

    print("\n| run | wall-clock (s) | train time (s) | full-cost step (ms) |")
    print("|---|---|---|---|")
    for (r, s), run in runs.items():
        print(f"| {r}_s{s} | {run['wall']:.0f} | {run['train']:.0f} | {1000 * run['full_step_s']:.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
