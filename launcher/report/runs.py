"""Run folders for ``launcher.report``: ``load_run`` reads one (``config.yaml``, ``metrics.jsonl``,
``final.json``, ``recipe_changes.jsonl``) into a ``Run``; ``group_runs`` groups runs by recipe (the
resolved config except ``train.seed``, ``name`` and ``out_dir``)."""

from __future__ import annotations

import json
import logging
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

__all__ = ["ReportError", "Segment", "Run", "Group", "load_run", "recipe_key", "methods_of", "group_runs"]

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
    def train_time(self) -> Optional[float]:
        """Seconds in the step loop with evaluation and checkpoints left out: the log windows'
        ``time/window`` less their ``time/evaluation`` and ``time/checkpoint`` (``launcher.step_timer``).
        None for a log whose windows do not split evaluation out (written before the split, when it
        counted in ``time/between_steps``): its training time is not known."""
        if not self.train or any("time/window" not in r or "time/evaluation" not in r for r in self.train.values()):
            return None
        return sum(
            float(r["time/window"]) - float(r["time/evaluation"]) - float(r.get("time/checkpoint", 0.0))
            for r in self.train.values()
        )

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

    def phase_key(self) -> Optional[str]:
        """The metric whose value names the run's phase: what its methods declare (``Declaration.phase``, e.g.
        ToE's stage), or, for a run folder written before the method registry (no ``methods:`` mapping),
        the first ``<method>/stage`` key of its log; ``None``: one phase."""
        listed = self.config.get("methods")
        return _declared_phase(listed) if isinstance(listed, dict) else self.stage_key()

    def img_per_s_by_stage(self) -> dict:
        """Mean logged ``img_per_s`` per phase of the run (``phase_key``; key None: a run of one phase)."""
        key, by_stage = self.phase_key(), {}
        for record in self.train.values():
            if isinstance(record.get("img_per_s"), (int, float)):
                by_stage.setdefault(record.get(key) if key else None, []).append(float(record["img_per_s"]))
        return {stage: statistics.fmean(values) for stage, values in sorted(by_stage.items(), key=_stage_order)}

    def stage_boundaries(self) -> list[int]:
        """Steps where the run's phase (``phase_key``) changes: the first step of the record (a log window, when
        it covers ``steps`` > 1) whose phase differs from the previous record's, so exact to one log window."""
        out, previous, key = [], None, self.phase_key()
        if key is None:
            return out
        for step in sorted(self.train):
            record = self.train[step]
            stage = record.get(key)
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
            phases = {
                k[5:]: float(v)
                for k, v in record.items()
                if k.startswith("time/") and k not in ("time/window", "time/data_share")
            }
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
            record = dict(
                record,
                _elapsed=(done + float(when) - segment.start_time)
                if when_known and all(s.duration is not None for s in segments[:-1])
                else None,
            )
            evals[step] = record
        elif "loss" in record:
            train[step] = record
            if isinstance(record.get("flops"), (int, float)):
                covered = max(1, int(record.get("steps", 1)))  # a window record: flops is the window's total
                for s in range(step - covered + 1, step + 1):
                    step_flops[s] = float(record["flops"]) / covered
    changes = (
        list(_read_records(path / "recipe_changes.jsonl", warnings)) if (path / "recipe_changes.jsonl").is_file() else []
    )
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


def _declared_phase(listed: dict) -> Optional[str]:
    """The phase metric the methods of a run's ``methods:`` mapping declare (``methods.registry.phase_key``);
    a method this process does not know, or options it refuses, declare nothing."""
    import methods
    from methods.registry import phase_key

    configs = {}
    for name, options in listed.items():
        if isinstance(options, dict):
            try:
                configs[name] = methods.method(name).config(**options)
            except (KeyError, TypeError, ValueError):
                continue
    return phase_key(configs)


def methods_of(config: dict) -> str:
    """Training methods of a run: the ``methods:`` mapping (plug-ins), after any top-level section named after
    a method with ``enabled: true`` (run folders written before the registry: ``toe:``)."""
    import methods as registry

    listed = config.get("methods") if isinstance(config.get("methods"), dict) else {}
    legacy = {
        name: config[name]
        for name in registry.registered()
        if isinstance(config.get(name), dict) and config[name].get("enabled") and name not in listed
    }
    parts = []
    for name, options in {**legacy, **listed}.items():
        if isinstance(options, dict):
            if options.get("enabled", True) is False:
                continue
            defaults, always = _method_defaults(name)
            shown = [
                f"{k}={v}"
                for k, v in options.items()
                if k != "enabled" and _scalar(v) and (k in always or k not in defaults or defaults[k] != v)
            ]
            parts.append(f"{name} ({', '.join(shown)})" if shown else str(name))
        elif options not in (False, None):
            parts.append(str(name) if options is True else f"{name} ({options})")
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
