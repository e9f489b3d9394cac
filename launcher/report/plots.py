"""The PNG plots of ``launcher.report`` (matplotlib, Agg backend): eval metric against wall-clock and
against training FLOPs (mean +- std over seeds), train loss, ToE kept tokens and throughput against step,
and where each step's time goes."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

from .runs import Group, Run
from .tables import METRIC_TITLES, _breakdown_rows, _mean_std, _phases, speed_up


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _spread(curves: list[list[tuple[float, float, float]]]):
    """Per step (union over seeds): mean x, mean y and std y over the seeds that have that step."""
    by_step: dict = {}
    for curve in curves:
        for step, x, y in curve:
            by_step.setdefault(step, []).append((x, y))
    steps = sorted(by_step)
    xs = [statistics.fmean(x for x, _ in by_step[s]) for s in steps]
    ys = [statistics.fmean(y for _, y in by_step[s]) for s in steps]
    sd = [statistics.stdev([y for _, y in by_step[s]]) if len(by_step[s]) > 1 else 0.0 for s in steps]
    return xs, ys, sd


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 3 * 3600:
        return 3600.0, "h"
    return (60.0, "min") if seconds >= 180 else (1.0, "s")


def _colours(plt, n: int) -> list:
    """The default cycle (10 colours), or tab20's 20 when more recipes share a plot."""
    return list(plt.rcParams["axes.prop_cycle"].by_key()["color"] if n <= 10 else plt.get_cmap("tab20").colors)


def _legend(fig, ax, extra: tuple = ()) -> None:
    """The axes' labelled artists (and ``extra`` handles) inside the axes for a few entries; beside
    them, on a wider figure, for more (a comparison of every method has 11 recipes: a legend inside
    would cover the curves)."""
    handles = ax.get_legend_handles_labels()[0] + list(extra)
    if len(handles) <= 6:
        ax.legend(handles=handles, fontsize="small")
        return
    width, height = fig.get_size_inches()
    fig.set_size_inches(width + 3.6, height)
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    written.append(path)


def _metric_plots(plt, groups: list[Group], key: str, out: Path, written: list[Path]) -> list[str]:
    from matplotlib.patches import Patch

    colours = _colours(plt, len(groups))
    title, percent = METRIC_TITLES[key], 100.0 if "top" in key else 1.0
    notes = []
    for axis, index in (("wallclock", 1), ("flops", 2)):
        lines = []  # (group index, label, xs, ys, std, seeds)
        for i, group in enumerate(groups):
            curves = []
            for run in group.runs:
                curve = run.eval_curve(key)
                if curve and any(point[index] is None for point in curve):
                    notes.append(
                        f"{run.path}: no {'times' if axis == 'wallclock' else 'per-step flops'} in "
                        f"metrics.jsonl: left off the {title} against "
                        f"{'wall-clock' if axis == 'wallclock' else 'FLOPs'} plot"
                    )
                elif curve:
                    curves.append([(p[0], p[index], p[3] * percent) for p in curve])
            if curves:
                lines.append((i, group.label, *_spread(curves), len(curves)))
        if not lines:
            continue
        if axis == "wallclock":
            unit, unit_name = _time_unit(max(max(xs) for _, _, xs, *_ in lines))
            xlabel = f"wall-clock, segments summed ({unit_name})"
            heading = f"Eval {title} against wall-clock"
        else:
            unit, xlabel, heading = 1e15, "theoretical training compute (PFLOPs)", f"Eval {title} against training FLOPs"
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, label, xs, ys, sd, seeds in lines:
            colour = colours[i % len(colours)]
            xs = [x / unit for x in xs]
            ax.plot(xs, ys, marker="o", markersize=3, color=colour, label=f"{label} ({seeds} seed{'s' * (seeds > 1)})")
            if seeds > 1:
                ax.fill_between(
                    xs,
                    [y - s for y, s in zip(ys, sd)],
                    [y + s for y, s in zip(ys, sd)],
                    color=colour,
                    alpha=0.2,
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(title)
        ax.set_title(heading)
        ax.grid(alpha=0.3)
        bands = any(seeds > 1 for *_, seeds in lines)  # one legend entry says what every band is
        _legend(fig, ax, (Patch(color="grey", alpha=0.3, label="± 1 std over seeds"),) if bands else ())
        _save(fig, out / f"{key.lower()}_vs_{axis}.png", written)
        plt.close(fig)
    return notes


def _speed_up_plot(plt, groups: list[Group], baseline: Group, key: str, out: Path, written: list[Path]) -> None:
    """One point per recipe: its final eval metric against its wall-clock speed-up (left) and its
    train-time speed-up (right), mean ± std over seeds as error bars (speed-ups paired by seed where
    every seed has its baseline run: ``tables.speed_up``); the baseline's ± 1 std as a band. The plot
    a user picks a method from."""
    title, percent = METRIC_TITLES[key], 100.0 if "top" in key else 1.0

    def final(runs) -> Optional[tuple[float, float, int]]:
        return _mean_std([None if (v := r.final_metric(key)) is None else v * percent for r in runs])

    points = []
    for group in groups:
        if (stat := final(group.runs)) is None:
            continue
        y, y_sd, _ = stat
        times = [
            speed_up(baseline.runs, group.runs, lambda r: r.wall_clock),
            speed_up(baseline.runs, group.runs, lambda r: r.train_time),
        ]
        points.append((group, y, y_sd, times))
    if not any(t is not None for *_, times in points for t in times):
        return
    band = final(baseline.runs)  # the baseline's spread, drawn in both panels
    colours, markers = _colours(plt, len(points)), "osD^v<>pP*XhH8d"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, index, xlabel in (
        (axes[0], 0, "wall-clock speed-up"),
        (axes[1], 1, "train-time speed-up (evaluation, checkpoints out)"),
    ):
        for i, (group, y, y_sd, times) in enumerate(points):
            if times[index] is None:
                continue
            x, x_sd = times[index]
            seeds = len(group.runs)
            ax.errorbar(
                x,
                y,
                xerr=x_sd or None,
                yerr=y_sd if seeds > 1 else None,
                fmt=markers[i % len(markers)],
                color=colours[i % len(colours)],
                capsize=3,
                label=f"{group.label} ({seeds} seed{'s' * (seeds > 1)})" if index == 0 else None,
            )
        if band is not None and band[2] > 1:
            mean, sd, _ = band
            ax.axhspan(mean - sd, mean + sd, color="grey", alpha=0.2, label="baseline ± 1 std" if index == 0 else None)
        ax.axvline(1.0, color="grey", linewidth=1, linestyle="--")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"final {title}")
    fig.suptitle(f"Final {title} against speed-up over `{baseline.label}` (mean ± std over seeds)")
    _legend(fig, axes[1], tuple(axes[0].get_legend_handles_labels()[0]))
    _save(fig, out / f"{key.lower()}_vs_speedup.png", written)
    plt.close(fig)


def _binned(steps: list[int], values: list[float], bins: int = 2000):
    """At most ``bins`` points (means of consecutive steps): a 300-epoch log has ~10^5 steps."""
    if len(steps) <= bins:
        return steps, values
    size = math.ceil(len(steps) / bins)
    return (
        [statistics.fmean(steps[i : i + size]) for i in range(0, len(steps), size)],
        [statistics.fmean(values[i : i + size]) for i in range(0, len(values), size)],
    )


def _step_plot(
    plt,
    groups: list[Group],
    metric: str,
    ylabel: str,
    title: str,
    path: Path,
    written: list[Path],
    boundaries: bool,
    drawstyle: str = "default",
) -> None:
    colours = _colours(plt, len(groups))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for i, group in enumerate(groups):
        colour = colours[i % len(colours)]
        labelled = False
        for run in group.runs:
            points = [(s, float(r[metric])) for s, r in sorted(run.train.items()) if isinstance(r.get(metric), (int, float))]
            if not points:
                continue
            xs, ys = _binned([p[0] for p in points], [p[1] for p in points])
            ax.plot(
                xs,
                ys,
                color=colour,
                linewidth=1,
                alpha=0.5 if labelled else 1.0,
                drawstyle=drawstyle,
                label=None if labelled else group.label + (f" ({len(group.runs)} seeds)" if len(group.runs) > 1 else ""),
            )
            drawn = labelled = True  # one legend entry per recipe: its other seeds are the paler lines
        if boundaries and group.runs:
            for k, step in enumerate(group.runs[0].stage_boundaries()):
                ax.axvline(
                    step,
                    color=colour,
                    linestyle="--",
                    linewidth=1,
                    label=f"{group.label}: stage boundary" if k == 0 else None,
                )
    if not drawn:
        plt.close(fig)
        return
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    _save(fig, path, written)
    plt.close(fig)


def _breakdown_plot(plt, runs: list[Run], path: Path, written: list[Path]) -> None:
    """Stacked horizontal bars: milliseconds per step in each phase, one bar per run and stage."""
    rows = _breakdown_rows(runs)
    if not rows:
        return
    phases = _phases([{None: totals} for _, totals in rows])
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)))
    left = [0.0] * len(rows)
    for phase in phases:
        widths = [1e3 * totals.get(phase, 0.0) / totals["steps"] for _, totals in rows]
        ax.barh(range(len(rows)), widths, left=left, label=phase.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per optimizer step")
    ax.set_title("Where each step's time goes (per run and stage)")
    ax.legend(fontsize="small", ncol=len(phases), loc="upper center", bbox_to_anchor=(0.5, -0.25 - 0.5 / len(rows)))
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path, written)
    plt.close(fig)


def write_plots(groups: list[Group], out: Path, baseline: Optional[Group] = None) -> tuple[list[Path], list[str]]:
    plt = _pyplot()
    written: list[Path] = []
    notes: list[str] = []
    runs = [r for g in groups for r in g.runs]
    keys = []
    for key in ("top1", "AP"):
        if any(key in r.metric_keys() for r in runs):
            keys.append(key)
    for key in keys:
        with_key = [g for g in groups if any(key in r.metric_keys() for r in g.runs)]
        notes += _metric_plots(plt, with_key, key, out, written)
        if baseline is not None and len(with_key) > 1:
            _speed_up_plot(plt, with_key, baseline, key, out, written)
    _step_plot(
        plt, groups, "loss", "train loss (per step)", "Train loss against step", out / "loss.png", written, boundaries=False
    )
    phased = {key.split("/")[0] for r in runs if (key := r.phase_key())}  # the method whose stages the plots mark
    kept = sorted(
        {k for r in runs for record in r.train.values() for k in record if k.endswith("/kept_tokens")},
        key=lambda k: (k.split("/")[0] not in phased, k),
    )
    if kept:  # a method's kept patch tokens (ToE's after its block): the phased method's first
        _step_plot(
            plt,
            groups,
            kept[0],
            f"kept patch tokens per sample ({kept[0]})",
            "Kept tokens against step (stage boundaries dashed)",
            out / "kept_tokens.png",
            written,
            boundaries=True,
            drawstyle="steps-post",
        )  # a stage holds its count until the next boundary
    _step_plot(
        plt,
        groups,
        "img_per_s",
        "training throughput (images / s, all ranks)",
        "Throughput against step (stage boundaries dashed)",
        out / "img_per_s.png",
        written,
        boundaries=True,
    )
    _breakdown_plot(plt, runs, out / "time_breakdown.png", written)
    return written, notes
