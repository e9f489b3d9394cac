"""The markdown tables of ``launcher.report``: one row per recipe (mean +- std over seeds), one per run,
the recipe changes made on resume and where each step's time goes; and the number formats they use."""

from __future__ import annotations

import statistics
from typing import Optional

from .runs import Group, Run, _stage_order


def _mean_std(values: list[Optional[float]]) -> Optional[tuple[float, float, int]]:
    known = [v for v in values if v is not None]
    if not known or len(known) < len(values):  # a statistic over some seeds only would mislead
        return None
    return statistics.fmean(known), (statistics.stdev(known) if len(known) > 1 else 0.0), len(known)


def _fmt(stat, fmt) -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    return fmt(mean) if n == 1 else f"{fmt(mean)} ± {fmt(std)}"


def fmt_duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"
    return f"{int(seconds // 3600)} h {(seconds % 3600) / 60:02.0f} min"


def _metric_fmt(key: str):
    if "top" in key:
        return lambda v: f"{100 * v:.2f}"
    return lambda v: f"{v:.3f}"


METRIC_TITLES = {
    "top1": "top-1 (%)",
    "ema_top1": "EMA top-1 (%)",
    "AP": "AP",
    "AP50": "AP50",
    "ema_AP": "EMA AP",
    "ema_AP50": "EMA AP50",
}

METRIC_SHORT = {
    "top1": "top-1 %",
    "ema_top1": "EMA top-1 %",
    "AP": "AP",
    "AP50": "AP50",
    "ema_AP": "EMA AP",
    "ema_AP50": "EMA AP50",
}


def _stages_text(group: Group) -> str:
    per_run = [r.img_per_s_by_stage() for r in group.runs]
    stages = sorted({s for d in per_run for s in d}, key=lambda s: _stage_order((s, None)))
    parts = []
    for stage in stages:
        stat = _mean_std([d.get(stage) for d in per_run])
        label = "all" if stage is None else f"{stage:g}"
        parts.append(f"{label}: {_fmt(stat, lambda v: f'{v:.0f}')}")
    return "; ".join(parts) if parts else "-"


def _status(run: Run) -> str:
    if run.diverged is not None:
        return "diverged"
    return "done" if run.finished else "in progress"


def _recipe_changes(runs: list[Run]) -> list[str]:
    """The runs' timelines of recipe changes made on resume (empty when there are none)."""
    rows = [
        f"| `{run.path}` | {entry.get('step')} | `{change.get('key')}` | {change.get('old')!r} -> "
        f"{change.get('new')!r} | {entry.get('allowed', '-')} |"
        for run in runs
        for entry in run.recipe_changes
        for change in entry.get("changes", [])
    ]
    if not rows:
        return []
    return [
        "## Recipe changes on resume",
        "",
        "| run | at step | option | change | allowed by |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def _paired_ratios(baseline: list[Run], runs: list[Run], seconds) -> Optional[list[float]]:
    """Baseline time over this recipe's (``seconds(run)``: wall-clock or training time), seed by seed,
    when every run has a baseline run of its seed.

    ``launcher.compare`` runs seed K of every recipe before seed K + 1, so the two runs of a pair are
    timed close together: a machine whose speed drifts over a long comparison (or a comparison resumed
    in another session) moves both alike, and the ratio keeps what the method changed."""
    base = {r.seed: seconds(r) for r in baseline}
    pairs = [(base.get(r.seed), seconds(r)) for r in runs]
    if len(runs) < 2 or len(base) < len(baseline) or any(b is None or w is None or w <= 0 for b, w in pairs):
        return None
    return [b / w for b, w in pairs]


def speed_up(baseline: list[Run], runs: list[Run], seconds) -> Optional[tuple[float, Optional[float]]]:
    """``(mean, std)`` of the paired per-seed ratios where every seed has its baseline run, else
    ``(ratio of the mean times, None)``; None when the times are unknown."""
    ratios = _paired_ratios(baseline, runs, seconds)
    if ratios is not None:
        mean, std, _ = _mean_std(ratios)  # type: ignore[misc]
        return mean, std
    base, mine = _mean_std([seconds(r) for r in baseline]), _mean_std([seconds(r) for r in runs])
    return (base[0] / mine[0], None) if base and mine and mine[0] > 0 else None


def _time_speed_up(baseline: list[Run], runs: list[Run], seconds) -> str:
    """The paired speed-up (mean +- std of the per-seed ratios) where every seed has its baseline run,
    else the ratio of the mean times."""
    found = speed_up(baseline, runs, seconds)
    if found is None:
        return "-"
    mean, std = found
    return f"{mean:.2f}x" if std is None else f"{mean:.2f}x ± {std:.2f}x"


def _table(groups: list[Group], baseline: Group) -> list[str]:
    keys = [
        k
        for k in ("top1", "ema_top1", "AP", "AP50", "ema_AP", "ema_AP50")
        if any(k in r.metric_keys() for g in groups for r in g.runs)
    ]
    head = ["recipe", "seeds", "methods"]
    for key in keys:
        head += [f"final {METRIC_TITLES[key]}", f"best {METRIC_TITLES[key]}"]
    head += ["steps", "wall-clock", "train time", "img/s per stage", "train PFLOPs", "FLOPs speed-up"]
    head += ["wall-clock speed-up", "train-time speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_flops = _mean_std([r.total_flops for r in baseline.runs])
    for group in groups:
        runs = group.runs
        done = sum(r.finished for r in runs)
        seeds = f"{len(runs)}" + ("" if done == len(runs) else f" ({len(runs) - done} in progress)")
        row = [f"`{group.label}`" + (" (baseline)" if group is baseline else ""), seeds, group.methods]
        for key in keys:
            fmt = _metric_fmt(key)
            row += [
                _fmt(_mean_std([r.final_metric(key) for r in runs]), fmt),
                _fmt(_mean_std([r.best_metric(key) for r in runs]), fmt),
            ]
        flops = _mean_std([r.total_flops for r in runs])
        row += [
            _fmt(_mean_std([float(r.steps) for r in runs]), lambda v: f"{v:.0f}"),
            _fmt(_mean_std([r.wall_clock for r in runs]), fmt_duration),
            _fmt(_mean_std([r.train_time for r in runs]), fmt_duration),
            _stages_text(group),
            _fmt(flops, lambda v: f"{v / 1e15:.4g}"),
            f"{base_flops[0] / flops[0]:.2f}x" if base_flops and flops and flops[0] > 0 else "-",
            _time_speed_up(baseline.runs, runs, lambda r: r.wall_clock),
            _time_speed_up(baseline.runs, runs, lambda r: r.train_time),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _runs_table(runs: list[Run]) -> list[str]:
    lines = [
        "| run | seed | status | steps | segments | wall-clock | final | best | train PFLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        keys = run.metric_keys()
        key = keys[0] if keys else None
        fmt = _metric_fmt(key or "top1")
        final = run.final_metric(key) if key else None
        best = run.best_metric(key) if key else None
        lines.append(
            f"| `{run.path}` | {run.seed} | {_status(run)} | {run.steps} | {len(run.segments)} | "
            f"{fmt_duration(run.wall_clock) if run.wall_clock is not None else '-'} | "
            f"{f'{METRIC_SHORT[key]} {fmt(final)}' if final is not None else '-'} | "
            f"{fmt(best) if best is not None else '-'} | "
            f"{f'{run.total_flops / 1e15:.4g}' if run.total_flops is not None else '-'} |"
        )
    return lines


def _phases(breakdowns) -> list[str]:
    """The phases logged, in the step loop's order (``launcher.step_timer.PHASES``), unknown ones after."""
    from ..step_timer import PHASES

    seen = {p for b in breakdowns for totals in b.values() for p in totals if p != "steps"}
    return [p for p in PHASES if p in seen] + sorted(seen - set(PHASES))


def _breakdown_rows(runs: list[Run]) -> list[tuple[str, dict]]:
    """``(label, totals)`` per run and stage that logged a time breakdown."""
    rows = []
    for run in runs:
        key = run.stage_key()
        for stage, totals in run.time_breakdown().items():
            label = run.name + ("" if stage is None else f", {key.split('/')[0]} stage {stage:g}")
            rows.append((label, totals))
    return rows


def _breakdown_table(runs: list[Run]) -> list[str]:
    rows = _breakdown_rows(runs)
    if not rows:
        return []
    phases = _phases([{None: totals} for _, totals in rows])
    lines = [
        "## Where the time goes",
        "",
        "Milliseconds per optimizer step, from the `time/...` keys of every log window (`launcher.step_timer`: "
        "host timers on the CPU, CUDA events on a GPU); `between_steps` is the plug-ins' step end, the EMA and "
        "the run log; evaluation and checkpoints after a log step land in the next window (a log written "
        "before they were phases of their own counts them in `between_steps`).",
        "",
        "| run, stage | steps | " + " | ".join(phases) + " | total | waiting for data |",
        "|---|---|" + "---|" * (len(phases) + 2),
    ]
    for label, totals in rows:
        steps = totals["steps"]
        whole = sum(totals.get(p, 0.0) for p in phases)
        cells = [f"{1e3 * totals.get(p, 0.0) / steps:.1f}" for p in phases]
        share = f"{totals.get('data', 0.0) / whole:.1%}" if whole > 0 else "-"
        lines.append(f"| {label} | {steps} | " + " | ".join(cells) + f" | {1e3 * whole / steps:.1f} | {share} |")
    return lines + [""]
