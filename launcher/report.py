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
import json
import logging
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

__all__ = ["ReportError", "Run", "Group", "load_run", "group_runs", "methods_of", "write_report", "main"]

log = logging.getLogger("launcher.report")
SEED_SUFFIX = re.compile(r"[_-](s|seed)\d+$")
IGNORED_FOR_RECIPE = (("train", "seed"), ("name",), ("out_dir",))  # what may differ between seeds of one recipe


class ReportError(ValueError):
    """A folder that cannot be reported on; the message names it."""


@dataclass
class Segment:
    """One process lifetime of a run: from its start event to its last record."""
    start_step: int
    start_time: Optional[float]
    end_time: Optional[float]
    world_size: Optional[int] = None

    @property
    def duration(self) -> Optional[float]:
        if self.start_time is None or self.end_time is None:
            return None
        return max(0.0, self.end_time - self.start_time)


@dataclass
class Run:
    path: Path
    config: dict
    final: Optional[dict]
    train: dict[int, dict]  # step -> the last train record of that step (steps redone after a resume replace it)
    evals: dict[int, dict]  # step (optimizer steps done) -> the last eval record; each carries "_elapsed"
    segments: list[Segment]
    step_flops: dict[int, float]  # step -> theoretical training FLOPs of that step (whole global batch)
    warnings: list[str] = field(default_factory=list)
    diverged: Optional[str] = None  # the guard's verdict when the last segment stopped on a non-finite value
    recipe_changes: list[dict] = field(default_factory=list)  # RUN/recipe_changes.jsonl: what a resume changed

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def seed(self):
        return (self.config.get("train") or {}).get("seed")

    @property
    def task(self) -> str:
        return self.config.get("task", "classification")

    @property
    def finished(self) -> bool:
        return self.final is not None

    @property
    def steps(self) -> int:
        """Optimizer steps done: final.json's step when the run ended, else one past the last logged step."""
        if self.final is not None and "step" in self.final:
            return int(self.final["step"])
        return max(self.train) + 1 if self.train else 0

    @property
    def wall_clock(self) -> Optional[float]:
        """Seconds spent training: the sum of the segments (None for a log without times)."""
        durations = [s.duration for s in self.segments]
        if not durations or any(d is None for d in durations):
            return None
        return sum(durations)

    @property
    def total_flops(self) -> Optional[float]:
        return sum(self.step_flops.values()) if self.step_flops else None

    def flops_before(self, step: int) -> Optional[float]:
        """Training FLOPs of steps 0 .. step-1 (what was spent when the eval at ``step`` ran)."""
        if not self.step_flops:
            return None
        return sum(f for s, f in self.step_flops.items() if s < step)

    def metric_keys(self) -> list[str]:
        """The eval keys reported: top-1 (classification) or AP / AP50 (detection), EMA variants if logged."""
        base = ["AP", "AP50"] if self.task == "detection" else ["top1"]
        logged = {k[5:] for r in self.evals.values() for k in r if k.startswith("eval/")} | set(self.final or {})
        return [k for k in base + [f"ema_{b}" for b in base] if k in logged]

    def eval_curve(self, key: str) -> list[tuple[int, Optional[float], Optional[float], float]]:
        """``(step, elapsed seconds, training FLOPs so far, value)`` of every eval that has ``key``."""
        out = []
        for step in sorted(self.evals):
            record = self.evals[step]
            value = record.get(f"eval/{key}")
            if isinstance(value, (int, float)):
                out.append((step, record.get("_elapsed"), self.flops_before(step), float(value)))
        return out

    def final_metric(self, key: str) -> Optional[float]:
        """final.json's value, else (a run in progress) the last eval so far."""
        if self.final is not None and isinstance(self.final.get(key), (int, float)):
            return float(self.final[key])
        curve = self.eval_curve(key)
        return curve[-1][3] if curve else None

    def best_metric(self, key: str) -> Optional[float]:
        values = [v for *_, v in self.eval_curve(key)]
        if self.final is not None and isinstance(self.final.get(key), (int, float)):
            values.append(float(self.final[key]))
        return max(values) if values else None

    def img_per_s_by_stage(self) -> dict:
        """Mean logged ``img_per_s`` per ToE stage (key None: runs without ToE)."""
        by_stage: dict = {}
        for record in self.train.values():
            if isinstance(record.get("img_per_s"), (int, float)):
                by_stage.setdefault(record.get("toe/stage"), []).append(float(record["img_per_s"]))
        return {stage: statistics.fmean(values) for stage, values in sorted(by_stage.items(), key=_stage_order)}

    def stage_boundaries(self) -> list[int]:
        """Steps where ``toe/stage`` changes: the first step of the record (a log window, when it covers
        ``steps`` > 1) whose stage differs from the previous record's, so exact to one log window."""
        out, previous = [], None
        for step in sorted(self.train):
            record = self.train[step]
            stage = record.get("toe/stage")
            if stage is not None and previous is not None and stage != previous:
                out.append(step - max(1, int(record.get("steps", 1))) + 1)
            previous = stage if stage is not None else previous
        return out


    def stage_key(self) -> Optional[str]:
        """The run's stage metric, found in the log: the first ``<method>/stage`` key of its records."""
        for record in self.train.values():
            for key in record:
                if key.endswith("/stage"):
                    return key
        return None

    def time_breakdown(self) -> dict:
        """``{stage: {"steps": n, "<phase>": seconds, ...}}`` summed over the log windows (``time/...`` keys of
        ``launcher.step_timer``), per stage of the run's stage metric (key None: one stage, or none logged)."""
        key, out = self.stage_key(), {}
        for record in self.train.values():
            phases = {k[5:]: float(v) for k, v in record.items()
                      if k.startswith("time/") and k not in ("time/window", "time/data_share")}
            if not phases:
                continue
            totals = out.setdefault(record.get(key) if key else None, {"steps": 0})
            totals["steps"] += max(1, int(record.get("steps", 1)))
            for phase, seconds in phases.items():
                totals[phase] = totals.get(phase, 0.0) + seconds
        return dict(sorted(out.items(), key=_stage_order))


def _stage_order(item):
    stage = item[0]
    return (stage is not None, stage if stage is not None else 0)


def _read_records(path: Path, warnings: list[str]) -> list[dict]:
    """The JSON lines of ``path``; a cut-off line (a run killed mid-write, or being written now) is
    skipped with a warning, and a record appended right after such a cut is recovered."""
    records = []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = _recover_tail(line)
            where = "last line" if number == len(lines) else f"line {number}"
            message = f"{path}: {where} is not a complete JSON record (truncated write?): skipped"
            if record is not None:
                message += "; the complete record appended after it was kept"
            warnings.append(message)
            log.warning(message)
            if record is None:
                continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _recover_tail(line: str) -> Optional[dict]:
    # a killed writer leaves no newline, so the resumed run's next record is glued onto the cut one
    for i in range(1, len(line)):
        if line[i] == "{":
            try:
                record = json.loads(line[i:])
            except json.JSONDecodeError:
                continue
            return record if isinstance(record, dict) else None
    return None


def load_run(path) -> Run:
    """Parse one run folder. Raises ReportError when it is not a run (no config.yaml / metrics.jsonl)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a run folder: no such directory")
    for required in ("config.yaml", "metrics.jsonl"):
        if not (path / required).is_file():
            raise ReportError(f"{path} is not a run folder: it has no {required}")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError as err:
        raise ReportError(f"{path}/config.yaml is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise ReportError(f"{path}/config.yaml is not a mapping")
    final = None
    if (path / "final.json").is_file():
        try:
            final = json.loads((path / "final.json").read_text())
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}/final.json is not valid JSON: {err}") from err
    warnings: list[str] = []
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    step_flops: dict[int, float] = {}
    segments: list[Segment] = []
    diverged = None
    for record in _read_records(path / "metrics.jsonl", warnings):
        if "step" not in record:
            continue
        step, when = int(record["step"]), record.get("time")
        if record.get("event") == "diverged":
            diverged = str(record.get("error", f"at step {step}"))
            continue
        if record.get("event") == "start":
            diverged = None
            # steps from here on are redone: what the killed segment logged past its checkpoint is void
            train = {s: r for s, r in train.items() if s < step}
            evals = {s: r for s, r in evals.items() if s <= step}
            step_flops = {s: f for s, f in step_flops.items() if s < step}
            segments.append(Segment(step, when, when, record.get("world_size")))
            continue
        if not segments:  # a log written before start events existed: one segment of unknown start
            segments.append(Segment(0, when, when))
        segment = segments[-1]
        if when is None:
            segment.start_time = segment.end_time = None
            when_known = False
        else:
            when_known = segment.start_time is not None
            if when_known:
                segment.end_time = max(segment.end_time, float(when))
        if any(k.startswith("eval/") for k in record):
            done = sum(s.duration or 0.0 for s in segments[:-1])
            record = dict(record, _elapsed=(done + float(when) - segment.start_time)
                          if when_known and all(s.duration is not None for s in segments[:-1]) else None)
            evals[step] = record
        elif "loss" in record:
            train[step] = record
            if isinstance(record.get("flops"), (int, float)):
                covered = max(1, int(record.get("steps", 1)))  # a window record: flops is the window's total
                for s in range(step - covered + 1, step + 1):
                    step_flops[s] = float(record["flops"]) / covered
    changes = list(_read_records(path / "recipe_changes.jsonl", warnings)) if (
        path / "recipe_changes.jsonl").is_file() else []
    run = Run(path, config, final, train, evals, segments, step_flops, warnings, diverged, changes)
    if run.wall_clock is None and segments:
        message = f"{path}: metrics.jsonl has no times (written before the engine logged them): no wall-clock"
        warnings.append(message)
        log.warning(message)
    return run


# -- grouping ------------------------------------------------------------------------------------


def recipe_key(config: dict) -> str:
    """The resolved config without what differs between seeds of one recipe."""
    stripped = json.loads(json.dumps(config, default=str))
    for keys in IGNORED_FOR_RECIPE:
        node = stripped
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(keys[-1], None)
    return json.dumps(stripped, sort_keys=True)


def methods_of(config: dict) -> str:
    """Training methods of a run: the ``methods:`` mapping (plug-ins) and/or the ``toe:`` section."""
    parts = []
    methods = config.get("methods")
    if isinstance(methods, dict):
        for name, options in methods.items():
            if isinstance(options, dict):
                if options.get("enabled", True) is False:
                    continue
                defaults, always = _method_defaults(name)
                shown = [f"{k}={v}" for k, v in options.items() if k != "enabled" and _scalar(v) and
                         (k in always or k not in defaults or defaults[k] != v)]
                parts.append(f"{name} ({', '.join(shown)})" if shown else str(name))
            elif options not in (False, None):
                parts.append(str(name) if options is True else f"{name} ({options})")
    else:
        methods = {}
    toe = config.get("toe") or {}
    if toe.get("enabled") and "toe" not in methods:
        parts.append(f"toe (r1={toe.get('r1')})")
    return ", ".join(parts) if parts else "none"


def _method_defaults(name: str) -> tuple[dict, tuple]:
    """A registered method's default options and the options it is known by (``summary``): a run's
    config.yaml lists every option, the table shows those and the ones that differ from the defaults."""
    import dataclasses

    import methods
    try:
        config = methods.method(name).config
    except KeyError:  # a method of the user's own (method_modules) that this process has not imported
        return {}, ()
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    return defaults, tuple(getattr(config, "summary", ()))


def _scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


@dataclass
class Group:
    label: str
    runs: list[Run]

    @property
    def task(self) -> str:
        return self.runs[0].task

    @property
    def methods(self) -> str:
        return methods_of(self.runs[0].config)


def group_runs(runs: list[Run]) -> list[Group]:
    """One group per recipe, in the order the runs were given."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = recipe_key(run.config)
        if key not in groups:
            groups[key] = Group(SEED_SUFFIX.sub("", run.name), [])
        groups[key].runs.append(run)
    seen: dict[str, int] = {}
    for group in groups.values():  # two recipes whose names agree once the seed is cut off stay apart
        seen[group.label] = seen.get(group.label, 0) + 1
        if seen[group.label] > 1:
            group.label = f"{group.label} #{seen[group.label]}"
    return list(groups.values())


# -- formatting ----------------------------------------------------------------------------------


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


METRIC_TITLES = {"top1": "top-1 (%)", "ema_top1": "EMA top-1 (%)", "AP": "AP", "AP50": "AP50",
                 "ema_AP": "EMA AP", "ema_AP50": "EMA AP50"}

METRIC_SHORT = {"top1": "top-1 %", "ema_top1": "EMA top-1 %", "AP": "AP", "AP50": "AP50", "ema_AP": "EMA AP",
                "ema_AP50": "EMA AP50"}


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
    rows = [f"| `{run.path}` | {entry.get('step')} | `{change.get('key')}` | {change.get('old')!r} -> "
            f"{change.get('new')!r} | {entry.get('allowed', '-')} |"
            for run in runs for entry in run.recipe_changes for change in entry.get("changes", [])]
    if not rows:
        return []
    return ["## Recipe changes on resume", "", "| run | at step | option | change | allowed by |",
            "|---|---|---|---|---|", *rows, ""]


def _table(groups: list[Group], baseline: Group) -> list[str]:
    keys = [k for k in ("top1", "ema_top1", "AP", "AP50", "ema_AP", "ema_AP50")
            if any(k in r.metric_keys() for g in groups for r in g.runs)]
    head = ["recipe", "seeds", "methods"]
    for key in keys:
        head += [f"final {METRIC_TITLES[key]}", f"best {METRIC_TITLES[key]}"]
    head += ["steps", "wall-clock", "img/s per ToE stage", "train PFLOPs", "FLOPs speed-up", "wall-clock speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_flops = _mean_std([r.total_flops for r in baseline.runs])
    base_wall = _mean_std([r.wall_clock for r in baseline.runs])
    for group in groups:
        runs = group.runs
        done = sum(r.finished for r in runs)
        seeds = f"{len(runs)}" + ("" if done == len(runs) else f" ({len(runs) - done} in progress)")
        row = [f"`{group.label}`" + (" (baseline)" if group is baseline else ""), seeds, group.methods]
        for key in keys:
            fmt = _metric_fmt(key)
            row += [_fmt(_mean_std([r.final_metric(key) for r in runs]), fmt),
                    _fmt(_mean_std([r.best_metric(key) for r in runs]), fmt)]
        flops, wall = _mean_std([r.total_flops for r in runs]), _mean_std([r.wall_clock for r in runs])
        row += [_fmt(_mean_std([float(r.steps) for r in runs]), lambda v: f"{v:.0f}"),
                _fmt(wall, fmt_duration), _stages_text(group), _fmt(flops, lambda v: f"{v / 1e15:.4g}"),
                f"{base_flops[0] / flops[0]:.2f}x" if base_flops and flops and flops[0] > 0 else "-",
                f"{base_wall[0] / wall[0]:.2f}x" if base_wall and wall and wall[0] > 0 else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _runs_table(runs: list[Run]) -> list[str]:
    lines = ["| run | seed | status | steps | segments | wall-clock | final | best | train PFLOPs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        keys = run.metric_keys()
        key = keys[0] if keys else None
        fmt = _metric_fmt(key or "top1")
        final = run.final_metric(key) if key else None
        best = run.best_metric(key) if key else None
        lines.append(f"| `{run.path}` | {run.seed} | {_status(run)} | {run.steps} | {len(run.segments)} | "
                     f"{fmt_duration(run.wall_clock) if run.wall_clock is not None else '-'} | "
                     f"{f'{METRIC_SHORT[key]} {fmt(final)}' if final is not None else '-'} | "
                     f"{fmt(best) if best is not None else '-'} | "
                     f"{f'{run.total_flops / 1e15:.4g}' if run.total_flops is not None else '-'} |")
    return lines


# -- plots ---------------------------------------------------------------------------------------


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


def _save(fig, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    written.append(path)


def _metric_plots(plt, groups: list[Group], key: str, out: Path, written: list[Path]) -> list[str]:
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    title, percent = METRIC_TITLES[key], 100.0 if "top" in key else 1.0
    notes = []
    for axis, index in (("wallclock", 1), ("flops", 2)):
        lines = []  # (group index, label, xs, ys, std, seeds)
        for i, group in enumerate(groups):
            curves = []
            for run in group.runs:
                curve = run.eval_curve(key)
                if curve and any(point[index] is None for point in curve):
                    notes.append(f"{run.path}: no {'times' if axis == 'wallclock' else 'per-step flops'} in "
                                 f"metrics.jsonl: left off the {title} against "
                                 f"{'wall-clock' if axis == 'wallclock' else 'FLOPs'} plot")
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
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], color=colour,
                                alpha=0.2, label=f"{label}: ± 1 std over seeds")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(title)
        ax.set_title(heading)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        _save(fig, out / f"{key.lower()}_vs_{axis}.png", written)
        plt.close(fig)
    return notes


def _binned(steps: list[int], values: list[float], bins: int = 2000):
    """At most ``bins`` points (means of consecutive steps): a 300-epoch log has ~10^5 steps."""
    if len(steps) <= bins:
        return steps, values
    size = math.ceil(len(steps) / bins)
    return ([statistics.fmean(steps[i:i + size]) for i in range(0, len(steps), size)],
            [statistics.fmean(values[i:i + size]) for i in range(0, len(values), size)])


def _step_plot(plt, groups: list[Group], metric: str, ylabel: str, title: str, path: Path, written: list[Path],
               boundaries: bool, drawstyle: str = "default") -> None:
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for i, group in enumerate(groups):
        colour = colours[i % len(colours)]
        for j, run in enumerate(group.runs):
            points = [(s, float(r[metric])) for s, r in sorted(run.train.items())
                      if isinstance(r.get(metric), (int, float))]
            if not points:
                continue
            xs, ys = _binned([p[0] for p in points], [p[1] for p in points])
            ax.plot(xs, ys, color=colour, linewidth=1, alpha=1.0 if j == 0 else 0.5, drawstyle=drawstyle,
                    label=f"{group.label}" + (f" (seed {run.seed})" if len(group.runs) > 1 else ""))
            drawn = True
        if boundaries and group.runs:
            for k, step in enumerate(group.runs[0].stage_boundaries()):
                ax.axvline(step, color=colour, linestyle="--", linewidth=1,
                           label=f"{group.label}: ToE stage boundary" if k == 0 else None)
    if not drawn:
        plt.close(fig)
        return
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path, written)
    plt.close(fig)


def _phases(breakdowns) -> list[str]:
    """The phases logged, in the step loop's order (``launcher.step_timer.PHASES``), unknown ones after."""
    from .step_timer import PHASES
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
    lines = ["## Where the time goes", "",
             "Milliseconds per optimizer step, from the `time/...` keys of every log window (`launcher.step_timer`: "
             "host timers on the CPU, CUDA events on a GPU); evaluation and checkpoints count in `between_steps`.",
             "", "| run, stage | steps | " + " | ".join(phases) + " | total | waiting for data |",
             "|---|---|" + "---|" * (len(phases) + 2)]
    for label, totals in rows:
        steps = totals["steps"]
        whole = sum(totals.get(p, 0.0) for p in phases)
        cells = [f"{1e3 * totals.get(p, 0.0) / steps:.1f}" for p in phases]
        share = f"{totals.get('data', 0.0) / whole:.1%}" if whole > 0 else "-"
        lines.append(f"| {label} | {steps} | " + " | ".join(cells) + f" | {1e3 * whole / steps:.1f} | {share} |")
    return lines + [""]


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


def write_plots(groups: list[Group], out: Path) -> tuple[list[Path], list[str]]:
    plt = _pyplot()
    written: list[Path] = []
    notes: list[str] = []
    runs = [r for g in groups for r in g.runs]
    keys = []
    for key in ("top1", "AP"):
        if any(key in r.metric_keys() for r in runs):
            keys.append(key)
    for key in keys:
        notes += _metric_plots(plt, [g for g in groups if any(key in r.metric_keys() for r in g.runs)], key, out,
                               written)
    _step_plot(plt, groups, "loss", "train loss (per step)", "Train loss against step", out / "loss.png",
               written, boundaries=False)
    _step_plot(plt, groups, "toe/kept_tokens", "kept patch tokens per sample (after the ToE block)",
               "ToE kept tokens against step (stage boundaries dashed)", out / "kept_tokens.png", written,
               boundaries=True, drawstyle="steps-post")  # a stage holds its count until the next boundary
    _step_plot(plt, groups, "img_per_s", "training throughput (images / s, all ranks)",
               "Throughput against step (ToE stage boundaries dashed)", out / "img_per_s.png", written,
               boundaries=True)
    _breakdown_plot(plt, runs, out / "time_breakdown.png", written)
    return written, notes


# -- the report ----------------------------------------------------------------------------------


def write_report(runs: list[Run], out, baseline: Optional[Run] = None) -> Path:
    """Write ``report.md`` and the PNG plots to ``out``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not runs:
        raise ReportError("no runs to report on")
    groups = group_runs(runs)
    baseline = baseline or runs[0]
    base_group = next(g for g in groups if any(r is baseline for r in g.runs))
    plots, notes = write_plots(groups, out)
    for note in notes:
        log.warning(note)
    lines = ["# Training report", "",
             f"{len(runs)} run(s), {len(groups)} recipe(s). Mean ± std (sample std) over seeds when a recipe has "
             f"several; speed-ups against `{base_group.label}`. Wall-clock sums the run's segments (resumes "
             f"counted without the gaps between them). Top-1 in %.", ""]
    for task in dict.fromkeys(g.task for g in groups):
        task_groups = [g for g in groups if g.task == task]
        if len({g.task for g in groups}) > 1:
            lines += [f"## {task}", ""]
        lines += _table(task_groups, base_group if base_group.task == task else task_groups[0]) + [""]
    lines += ["## Runs", ""] + _runs_table(runs) + [""]
    lines += _recipe_changes(runs)
    lines += [f"- `{run.path}` diverged: {run.diverged}" for run in runs if run.diverged] + (
        [""] if any(run.diverged for run in runs) else [])
    lines += _breakdown_table(runs)
    titles = {"top1_vs_wallclock": "Eval top-1 against wall-clock", "top1_vs_flops": "Eval top-1 against training FLOPs",
              "ap_vs_wallclock": "Eval AP against wall-clock", "ap_vs_flops": "Eval AP against training FLOPs",
              "loss": "Train loss", "kept_tokens": "ToE kept tokens", "img_per_s": "Throughput",
              "time_breakdown": "Where each step's time goes"}
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


if __name__ == "__main__":
    sys.exit(main())
