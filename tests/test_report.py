"""launcher.report on synthetic run folders (numbers checked against values computed here from the
JSONL written), and launcher.compare end to end on real tiny runs (one killed mid-run)."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from launcher import compare, report

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.kwargs={patch_size: 8, depth: 3, embed_dim: 48, num_heads: 2}",
    "data.workers=1",
    "train.global_batch=16",
    "train.log_every=4",
    "checkpoint.keep=5",
]


def config(name, seed=0, toe=True, task="classification", **extra):
    return {
        "name": name,
        "out_dir": "runs",
        "task": task,
        "toe": {"enabled": toe, "r1": 0.5, "num_stages": 3},
        "train": {"seed": seed, "steps": 8, "global_batch": 16},
        "data": {"path": "shards"},
        **extra,
    }


def write_run(path: Path, cfg: dict, records: list, final=None, tail: str = "") -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if final is not None:
        (path / "final.json").write_text(json.dumps(final))
    return path


def start(step, t):
    return {"event": "start", "step": step, "time": t, "world_size": 1}


def train(step, t, loss, stage, flops=1e13, img=None, **extra):
    record = {
        "step": step,
        "loss": loss,
        "lr": 1e-3,
        "time": t,
        "toe/stage": float(stage),
        "toe/kept_tokens": float(4 * (stage + 1)),
        "flops": flops,
        **extra,
    }
    if img is not None:
        record["img_per_s"] = img
    return record


def evaluation(step, t, top1, **extra):
    return {"step": step, "time": t, "eval/top1": top1, "eval/top5": 0.9, "eval/eval_samples": 48, **extra}


def resumed_run(path: Path, seed=0, top1_final=0.5, speed=1.0, flops=1e13, toe=True, name=None, **extra):
    """Two segments with a gap between them: the first is killed after step 5, the second resumes at the
    step-4 checkpoint and redoes steps 4 and 5 (with other losses). Times scale with 1 / speed."""
    segments = [
        (
            1000.0,
            [  # (start time, records)
                train(0, 1001, 3.0, 1, flops, img=100.0),
                train(1, 1002, 2.9, 1, flops),
                train(2, 1003, 2.8, 1, flops),
                train(3, 1004, 2.7, 1, flops, img=110.0),
                evaluation(4, 1004.5, 0.2),
                train(4, 1005, 9.9, 2, flops),
                train(5, 1006, 9.8, 2, flops, img=999.0),
            ],
        ),
        (
            5000.0,
            [
                train(4, 5001, 2.6, 2, flops),
                train(5, 5002, 2.5, 2, flops, img=120.0),
                train(6, 5003, 2.4, 3, flops),
                train(7, 5004, 2.3, 3, flops, img=130.0),
                evaluation(8, 5005, top1_final),
            ],
        ),
    ]
    records = []
    for begin, seg in segments:
        records.append(start(seg[0]["step"], begin / speed))
        records += [dict(r, time=r["time"] / speed) for r in seg]
    cfg = config(name or f"toe_s{seed}", seed=seed, toe=toe, **extra)
    return write_run(path, cfg, records, final={"step": 8, "top1": top1_final, "top5": 0.9}), segments


def table(md: str) -> dict[str, dict[str, str]]:
    """The first markdown table of report.md: recipe label -> {column: cell}."""
    lines = [line for line in md.split("## Runs")[0].splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].split("`")[1]] = dict(zip(head, cells))
    return rows


def test_a_resumed_run_sums_its_segments_and_keeps_the_last_record_of_a_redone_step(tmp_path):
    path, segments = resumed_run(tmp_path / "toe_s0")
    run = report.load_run(path)
    # expected values from the records written above, computed independently of the report's code
    wall = sum(max(r["time"] for r in seg) - begin for begin, seg in segments)
    assert wall == 6 + 5
    assert run.wall_clock == pytest.approx(wall), "the 3994 s gap between the segments does not count"
    assert run.steps == 8 and len(run.segments) == 2
    kept = {r["step"]: r for begin, seg in segments for r in seg if "loss" in r if begin == 5000 or r["step"] < 4}
    assert [run.train[s]["loss"] for s in range(8)] == [kept[s]["loss"] for s in range(8)]
    assert run.train[4]["loss"] == 2.6, "the redone step's record wins"
    assert run.total_flops == pytest.approx(8 * 1e13), "a redone step is counted once"
    curve = run.eval_curve("top1")
    assert [(s, e, f, v) for s, e, f, v in curve] == [(4, 4.5, 4e13, 0.2), (8, 6 + 5, 8e13, 0.5)]
    means = {1.0: statistics.fmean([100.0, 110.0]), 2.0: 120.0, 3.0: 130.0}  # 999 was logged by the void segment
    assert run.img_per_s_by_stage() == pytest.approx(means)
    assert run.stage_boundaries() == [4, 6]
    assert run.final_metric("top1") == 0.5 and run.best_metric("top1") == 0.5
    out = report.write_report([run], tmp_path / "report")
    row = table(out.read_text())["toe"]
    assert row["wall-clock"] == "11.0 s" and row["steps"] == "8" and row["train PFLOPs"] == "0.08"
    assert row["final top-1 (%)"] == "50.00" and row["best top-1 (%)"] == "50.00"
    assert row["img/s per stage"] == "1: 105; 2: 120; 3: 130"
    assert row["methods"] == "toe (r1=0.5)" and row["FLOPs speed-up"] == "1.00x"


def test_a_seed_pair_is_one_row_with_mean_and_std_and_speed_ups_against_the_baseline(tmp_path):
    base_a, _ = resumed_run(tmp_path / "base_s0", seed=0, top1_final=0.40, flops=2e13, toe=False, name="base_s0")
    base_b, _ = resumed_run(tmp_path / "base_s1", seed=1, top1_final=0.44, flops=2e13, toe=False, name="base_s1")
    toe_a, _ = resumed_run(tmp_path / "toe_s0", seed=0, top1_final=0.50, speed=2.0)
    toe_b, _ = resumed_run(tmp_path / "toe_s1", seed=1, top1_final=0.60, speed=2.0)
    runs = [report.load_run(p) for p in (base_a, toe_a, base_b, toe_b)]
    assert [len(g.runs) for g in report.group_runs(runs)] == [2, 2]
    rows = table(report.write_report(runs, tmp_path / "report").read_text())
    assert set(rows) == {"base", "toe"} and rows["base"]["seeds"] == "2" and rows["toe"]["seeds"] == "2"
    mean, std = statistics.fmean([50.0, 60.0]), statistics.stdev([50.0, 60.0])
    assert rows["toe"]["final top-1 (%)"] == f"{mean:.2f} ± {std:.2f}"
    assert rows["base"]["final top-1 (%)"] == f"{statistics.fmean([40.0, 44.0]):.2f} ± {statistics.stdev([40.0, 44.0]):.2f}"
    assert rows["base"]["methods"] == "none" and rows["toe"]["methods"] == "toe (r1=0.5)"
    assert rows["toe"]["FLOPs speed-up"] == "2.00x", "8 x 2e13 against 8 x 1e13"
    assert rows["toe"]["wall-clock speed-up"] == "2.00x ± 0.00x", "every time halved, seed by seed"
    assert rows["toe"]["wall-clock"] == "5.5 s ± 0.0 s" and rows["base"]["FLOPs speed-up"] == "1.00x"
    # --baseline picks another reference
    assert report.main([str(base_a), str(toe_a), "--out", str(tmp_path / "r2"), "--baseline", str(toe_a)]) == 0
    rows = table((tmp_path / "r2" / "report.md").read_text())
    assert rows["base"]["FLOPs speed-up"] == "0.50x" and "(baseline)" in (tmp_path / "r2/report.md").read_text()


def test_the_wall_clock_speed_up_pairs_each_seed_with_the_baseline_run_of_its_seed(tmp_path):
    # the machine ran seed 1 of both recipes at half speed (a drift between the seeds): pairs cancel it
    base = [
        resumed_run(tmp_path / f"base_s{s}", seed=s, toe=False, name=f"base_s{s}", speed=v)[0]
        for s, v in ((0, 1.0), (1, 0.5))
    ]
    toe = [resumed_run(tmp_path / f"toe_s{s}", seed=s, speed=v)[0] for s, v in ((0, 1.25), (1, 0.5))]
    runs = [report.load_run(p) for p in base + toe]
    ratios = [b.wall_clock / t.wall_clock for b, t in zip(runs[:2], runs[2:])]
    assert ratios == pytest.approx([1.25, 1.0])
    rows = table(report.write_report(runs, tmp_path / "report").read_text())
    assert rows["toe"]["wall-clock speed-up"] == f"{statistics.fmean(ratios):.2f}x ± {statistics.stdev(ratios):.2f}x"
    assert rows["base"]["wall-clock speed-up"] == "1.00x ± 0.00x"
    # a seed without a baseline run of its own: the ratio of the mean wall-clocks
    rows = table(report.write_report(runs[:1] + runs[2:], tmp_path / "r2").read_text())
    means = runs[0].wall_clock / statistics.fmean([r.wall_clock for r in runs[2:]])
    assert rows["toe"]["wall-clock speed-up"] == f"{means:.2f}x"


def timed_run(path: Path, seed: int, step_seconds: float, eval_seconds: float, toe: bool, name: str) -> Path:
    """Four 2-step windows of ``step_seconds`` per step; an evaluation of ``eval_seconds`` and a 0.5 s
    checkpoint after the second window (they land in the third window's ``time/...``, as the loop marks them)."""
    records, now = [start(0, 100.0)], 100.0
    for window in range(4):
        evaluation_, checkpoint = (eval_seconds, 0.5) if window == 2 else (0.0, 0.0)
        phases = {"data": 0.1, "forward_backward": 2 * step_seconds - 0.1, "optimizer": 0.0, "between_steps": 0.0}
        phases.update(evaluation=evaluation_, checkpoint=checkpoint)
        now += sum(phases.values())
        times = {f"time/{k}": v for k, v in phases.items()}
        records.append(train(2 * window + 1, now, 1.0, 1, steps=2, **times, **{"time/window": sum(phases.values())}))
    records.append(evaluation(8, now + eval_seconds, 0.5))
    return write_run(path, config(name, seed=seed, toe=toe), records, final={"step": 8, "top1": 0.5})


def test_train_time_leaves_evaluation_and_checkpoints_out_and_has_its_own_paired_speed_up(tmp_path):
    # ToE's steps take half the time, the evaluation (10 s) and checkpoint (0.5 s) cost both alike
    runs = [
        report.load_run(timed_run(tmp_path / f"{n}_s{s}", s, step, 10.0, n == "toe", f"{n}_s{s}"))
        for s in (0, 1)
        for n, step in (("base", 2.0 + s), ("toe", (2.0 + s) / 2))
    ]
    base0, toe0 = runs[0], runs[1]
    assert base0.train_time == pytest.approx(8 * 2.0), "8 steps of 2 s; the evaluation and checkpoint are out"
    assert toe0.train_time == pytest.approx(8 * 1.0)
    assert base0.wall_clock == pytest.approx(8 * 2.0 + 10.5 + 10.0), "two evaluations and a checkpoint are in"
    rows = table(report.write_report(runs, tmp_path / "report").read_text())
    assert rows["toe"]["train-time speed-up"] == "2.00x ± 0.00x"
    walls = [b.wall_clock / t.wall_clock for b, t in ((runs[0], runs[1]), (runs[2], runs[3]))]
    assert rows["toe"]["wall-clock speed-up"] == f"{statistics.fmean(walls):.2f}x ± {statistics.stdev(walls):.2f}x"
    assert max(walls) < 1.5, "the evaluations every recipe pays dilute the wall-clock speed-up"
    assert rows["base"]["train time"] == "20.0 s ± 5.7 s"  # 16 s and 24 s
    # a log written before evaluation was a phase of its own: its training time is unknown, not guessed
    old = tmp_path / "old_s0"
    records = [
        {k: v for k, v in r.items() if k not in ("time/evaluation", "time/checkpoint")}
        for r in map(json.loads, (runs[0].path / "metrics.jsonl").read_text().splitlines())
    ]
    old_run = report.load_run(write_run(old, config("old", toe=False), records, final={"step": 8, "top1": 0.5}))
    assert old_run.train_time is None and old_run.wall_clock == pytest.approx(base0.wall_clock)
    assert table(report.write_report([old_run], tmp_path / "r2").read_text())["old"]["train time"] == "-"


def test_plots_are_written_with_content(tmp_path):
    paths = [resumed_run(tmp_path / f"toe_s{s}", seed=s, top1_final=0.5 + 0.1 * s)[0] for s in range(2)]
    paths.append(resumed_run(tmp_path / "base_s0", toe=False, flops=2e13, name="base_s0")[0])
    assert report.main([*map(str, paths), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    for name in ("top1_vs_wallclock", "top1_vs_flops", "loss", "kept_tokens", "img_per_s"):
        assert f"({name}.png)" in md
        with Image.open(tmp_path / "report" / f"{name}.png") as image:
            assert image.format == "PNG" and image.size == (700, 450)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 50, f"{name}.png is blank"


def test_a_comparison_of_many_recipes_gets_a_plot_to_pick_from_and_legends_beside_the_curves(tmp_path):
    """Eight recipes x two seeds, as launcher.compare times them: one point per recipe against its
    paired speed-ups; the legends (one entry per recipe) move beside the axes on wider figures."""
    paths = [
        resumed_run(
            tmp_path / f"r{i}_s{seed}",
            seed=seed,
            top1_final=0.4 + 0.02 * i,
            speed=1 + i / 10,
            name=f"r{i}_s{seed}",
            variant=i,
        )[0]
        for seed in range(2)
        for i in range(8)
    ]
    assert report.main([*map(str, paths), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "(top1_vs_speedup.png)" in md and table(md)["r7"]["wall-clock speed-up"] == "1.70x ± 0.00x"
    for name, size in (("top1_vs_speedup", (1360, 450)), ("top1_vs_wallclock", (1060, 450)), ("loss", (1060, 450))):
        with Image.open(tmp_path / "report" / f"{name}.png") as image:
            assert image.size == size, name
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 50, f"{name}.png is blank"


def test_one_run_without_flops_or_times_still_reports(tmp_path, caplog):
    records = [{"step": s, "loss": 3.0 - s / 10, "lr": 1e-3} for s in range(4)] + [
        {"step": 4, "eval/top1": 0.25, "eval/top5": 0.5}
    ]  # a log from before times were written
    path = write_run(tmp_path / "old", config("old", toe=False), records, final={"step": 4, "top1": 0.25})
    run = report.load_run(path)
    assert run.wall_clock is None and run.total_flops is None and run.steps == 4
    out = report.write_report([run], tmp_path / "report")
    row = table(out.read_text())["old"]
    assert row["wall-clock"] == "-" and row["train PFLOPs"] == "-" and row["final top-1 (%)"] == "25.00"
    assert not (tmp_path / "report/top1_vs_wallclock.png").exists() and (tmp_path / "report/loss.png").exists()
    assert "left off the top-1 (%) against wall-clock plot" in caplog.text


def test_a_resumed_run_in_progress_drops_what_the_killed_segment_logged_past_its_checkpoint(tmp_path):
    records = [start(0, 0.0)] + [train(s, 1.0 + s, 3.0, 1) for s in range(6)] + [evaluation(5, 6.5, 0.3)]
    records += [start(4, 100.0), train(4, 101.0, 2.0, 1)]  # resumed at the step-4 checkpoint, now at step 4
    run = report.load_run(write_run(tmp_path / "r", config("r"), records))
    assert sorted(run.train) == [0, 1, 2, 3, 4] and run.steps == 5, "steps 5 (and its eval) will be redone"
    assert run.evals == {} and run.total_flops == pytest.approx(5e13)
    assert run.wall_clock == pytest.approx(6.5 + 1.0)


def test_window_records_carry_the_flops_of_the_steps_they_cover(tmp_path):
    records = [start(0, 0.0)] + [dict(train(s, 1.0 + s, 2.0, 1, flops=4 * 3e12), steps=4) for s in (3, 7, 11)]
    records += [start(8, 100.0), dict(train(11, 102.0, 1.9, 1, flops=4 * 5e12), steps=4)]  # redone 8..11
    run = report.load_run(write_run(tmp_path / "w", config("w"), records))
    assert run.total_flops == pytest.approx(8 * 3e12 + 4 * 5e12)
    assert run.wall_clock == pytest.approx(12.0 - 0.0 + 2.0) and not run.finished
    assert run.steps == 12 and sorted(run.train) == [3, 7, 11]
    stages = [start(0, 0.0)] + [dict(train(s, 1.0 + s, 2.0, s // 8 + 1), steps=4) for s in (3, 7, 11, 15)]
    assert report.load_run(write_run(tmp_path / "w2", config("w2"), stages)).stage_boundaries() == [8]


def test_a_truncated_last_line_is_skipped_and_a_run_in_progress_reports(tmp_path, caplog):
    records = [start(0, 10.0), train(0, 11, 3.0, 1), train(1, 12, 2.9, 1), evaluation(2, 12.5, 0.1), train(2, 13, 2.8, 1)]
    path = write_run(tmp_path / "live_s0", config("live_s0"), records, tail='{"step": 3, "loss": 2.')
    run = report.load_run(path)
    assert "last line is not a complete JSON record" in caplog.text and str(path) in caplog.text
    assert run.steps == 3 and run.final is None and run.wall_clock == pytest.approx(3.0)
    md = report.write_report([run], tmp_path / "report").read_text()
    row = table(md)["live"]
    assert row["seeds"] == "1 (1 in progress)" and row["final top-1 (%)"] == "10.00" and "in progress" in md
    assert "truncated write" in md


def test_a_record_glued_to_a_cut_line_is_recovered(tmp_path, caplog):
    """A killed writer leaves no newline: the resumed run's start event lands on the cut line."""
    lines = [
        json.dumps(start(0, 0.0)),
        json.dumps(train(0, 1, 3.0, 1)),
        json.dumps(train(1, 2, 2.9, 1)),
        '{"step": 2, "lo' + json.dumps(start(1, 50.0)),
        json.dumps(train(1, 51, 2.7, 1)),
    ]
    path = tmp_path / "glued"
    write_run(path, config("glued"), [])
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = report.load_run(path)
    assert len(run.segments) == 2 and run.train[1]["loss"] == 2.7 and run.wall_clock == pytest.approx(2 + 1)
    assert "line 4 is not a complete JSON record" in caplog.text


def test_a_folder_that_is_no_run_is_an_error_naming_it(tmp_path, capsys):
    good, _ = resumed_run(tmp_path / "toe_s0")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(good), str(empty), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{empty} is not a run folder: it has no config.yaml" in err
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text("name: half\n")
    assert report.main([str(half), "--out", str(tmp_path / "r")]) == 2
    assert "it has no metrics.jsonl" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "no such directory" in capsys.readouterr().err
    result = subprocess.run(
        [sys.executable, "-m", "launcher.report", str(empty), "--out", str(tmp_path / "r")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "empty is not a run folder" in result.stderr


def test_methods_come_from_a_methods_mapping_and_the_toe_section():
    assert report.methods_of(config("a", toe=False)) == "none"
    assert report.methods_of(config("a")) == "toe (r1=0.5)"
    cfg = config("a", toe=False, methods={"patchdrop": {"keep_rate": 0.5, "enabled": True}, "off": {"enabled": False}})
    assert report.methods_of(cfg) == "patchdrop (keep_rate=0.5)"
    assert report.methods_of(config("a", methods={"toe": {"r1": 0.4}})) == "toe (r1=0.4)", "listed once"


def test_detection_runs_report_ap(tmp_path):
    records = [
        start(0, 0.0),
        train(0, 1, 5.0, 1),
        train(1, 2, 4.0, 1),
        {"step": 2, "time": 3.0, "eval/AP": 0.12, "eval/AP50": 0.3, "eval/AP75": 0.1},
    ]
    path = write_run(tmp_path / "det", config("det", task="detection"), records, final={"step": 2, "AP": 0.12, "AP50": 0.3})
    out = report.write_report([report.load_run(path)], tmp_path / "report")
    row = table(out.read_text())["det"]
    assert row["final AP"] == "0.120" and row["final AP50"] == "0.300" and "final top-1 (%)" not in row
    assert (tmp_path / "report/ap_vs_wallclock.png").is_file()


def test_compare_refuses_a_run_folder_of_another_config(tmp_path, capsys):
    folder = tmp_path / "cmp" / "runs" / "deit_tiny_cpu_s0"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"name": "deit_tiny_cpu_s0", "train": {"steps": 3}}))
    code = compare.main(
        [
            "--recipes",
            str(ROOT / "configs/deit_tiny_cpu.yaml"),
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "cmp"),
            "train.steps=4",
        ]
    )
    assert code == 2 and "was trained with another config" in capsys.readouterr().err


def test_compare_accepts_a_run_folder_that_predates_an_option_left_at_its_default(tmp_path):
    from launcher.config import load_config, resolved

    out = tmp_path / "cmp"
    planned = compare.plan([str(ROOT / "configs/deit_tiny_cpu.yaml")], 1, out, ["train.steps=4"])[0]
    old = yaml.safe_load(resolved(load_config(str(ROOT / "configs/deit_tiny_cpu.yaml"), planned.overrides)))
    del old["train"]["signal_check_every"], old["optim"]["fused"]  # options added after the folder was written
    planned.run_dir.mkdir(parents=True)
    (planned.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    compare.check_folder(planned)  # accepted: trained as the recipe says, by an older engine
    old["train"]["steps"] = 5
    (planned.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(compare.ConfigError, match="train.steps"):
        compare.check_folder(planned)
    planned = compare.plan(
        [str(ROOT / "configs/deit_tiny_cpu.yaml")], 1, tmp_path / "b", ["train.steps=4", "train.signal_check_every=3"]
    )[0]
    del old["train"]["steps"]
    old["train"].update(steps=4)
    planned.run_dir.mkdir(parents=True)
    (planned.run_dir / "config.yaml").write_text(yaml.safe_dump({**old, "out_dir": str(tmp_path / "b" / "runs")}))
    with pytest.raises(compare.ConfigError, match="signal_check_every"):  # absent there, but not the default here
        compare.check_folder(planned)


def test_compare_submits_one_slurm_job_per_run(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 42$(wc -l < {calls})\n')
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")  # nothing queued
    for tool in ("sbatch", "squeue"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "cmp"
    code = compare.main(
        [
            "--recipes",
            str(ROOT / "configs/deit_tiny_cpu.yaml"),
            str(ROOT / "configs/deit_tiny_toe_cpu.yaml"),
            "train.steps=4",
            "--seeds",
            "2",
            "--out",
            str(out),
            "--slurm",
            "--tasks-per-node",
            "1",
            "--no-wait",
        ]
    )
    assert code == 0
    submitted = calls.read_text().splitlines()
    assert len(submitted) == 4 and all("--parsable" in s and "train.sbatch" in s for s in submitted)
    assert "train.seed=1 name=deit_tiny_toe_cpu_s1" in submitted[3] and f"out_dir={out / 'runs'}" in submitted[3]
    assert "train.steps=4" in submitted[0] and "submitted as job 421" in capsys.readouterr().out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_compare_skips_a_finished_run_and_resumes_a_killed_one(tmp_path, tiny_shards):
    out, total = tmp_path / "cmp", 120
    args = [
        sys.executable,
        "-m",
        "launcher.compare",
        "--recipes",
        str(ROOT / "configs/deit_tiny_cpu.yaml"),
        str(ROOT / "configs/deit_tiny_toe_cpu.yaml"),
        "--seeds",
        "1",
        "--out",
        str(out),
        "--progress-every",
        "1",
        f"data.path={tiny_shards}",
        *TINY,
        f"train.steps={total}",
        "checkpoint.every=20",
        "train.eval_every=60",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first, victim = out / "runs" / "deit_tiny_cpu_s0", out / "runs" / "deit_tiny_toe_cpu_s0"
    process = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )  # its own process group: the kill below takes the child too
    try:
        deadline = time.time() + 300
        while not (
            (victim / "metrics.jsonl").is_file()
            and max([r["step"] for r in metrics(victim) if "loss" in r], default=-1) >= 30
        ):
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.time() < deadline, "the second run did not reach step 30"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)  # compare and its launcher.train die at once
        killed_out = process.communicate()[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert (first / "final.json").is_file() and not (victim / "final.json").is_file()
    assert "deit_tiny_cpu_s0: done" in killed_out and "step " in killed_out, killed_out[-2000:]
    first_log = (first / "metrics.jsonl").read_bytes()

    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "deit_tiny_cpu_s0: finished already" in result.stdout and "deit_tiny_toe_cpu_s0: resuming" in result.stdout
    assert (first / "metrics.jsonl").read_bytes() == first_log, "the finished run was not run again"
    assert (first / "train.log").read_text().count("\n$ ") == 1, "launcher.train started once for it"
    assert (victim / "train.log").read_text().count("\n$ ") == 2
    starts = [r for r in metrics(victim) if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["step"] == 0 and starts[1]["step"] >= 20, starts
    assert json.loads((victim / "final.json").read_text())["step"] == total
    run = report.load_run(victim)
    assert run.steps == total and max(run.train) == total - 1 and len(run.segments) == 2
    rows = table((out / "report" / "report.md").read_text())
    assert set(rows) == {"deit_tiny_cpu", "deit_tiny_toe_cpu"} and rows["deit_tiny_cpu"]["steps"] == str(total)
    assert rows["deit_tiny_toe_cpu"]["methods"] == "toe (r1=0.5)"
    assert (out / "report" / "top1_vs_wallclock.png").is_file()


def test_the_time_breakdown_is_summed_per_run_and_per_stage_found_in_the_log(tmp_path):
    """Stages come from whatever ``<method>/stage`` key the log has (here EfficientTrain's ``et/stage``)."""

    def window(step, stage, data, compute, optimizer, between=0.0):
        return {
            "step": step,
            "steps": 2,
            "loss": 1.0,
            "lr": 1e-3,
            "time": 1000.0 + step,
            "et/stage": float(stage),
            "time/data": data,
            "time/forward_backward": compute,
            "time/optimizer": optimizer,
            "time/between_steps": between,
            "time/window": data + compute + optimizer + between,
        }

    records = [start(0, 999.0), window(1, 1, 0.2, 1.0, 0.2), window(3, 1, 0.0, 1.2, 0.2, 0.4), window(5, 2, 0.4, 2.0, 0.2)]
    cfg = config("et", toe=False)
    run = report.load_run(write_run(tmp_path / "et", cfg, records))
    assert run.stage_key() == "et/stage"
    breakdown = run.time_breakdown()
    assert breakdown[1] == pytest.approx(
        {"steps": 4, "data": 0.2, "forward_backward": 2.2, "optimizer": 0.4, "between_steps": 0.4}
    )
    assert breakdown[2] == pytest.approx(
        {"steps": 2, "data": 0.4, "forward_backward": 2.0, "optimizer": 0.2, "between_steps": 0.0}
    )
    plain = report.load_run(
        write_run(
            tmp_path / "plain",
            config("plain", toe=False),
            [start(0, 999.0), {k: v for k, v in window(1, 1, 0.5, 1.0, 0.5).items() if k != "et/stage"}],
        )
    )
    assert plain.stage_key() is None and list(plain.time_breakdown()) == [None]
    assert report.main([str(tmp_path / "et"), str(tmp_path / "plain"), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "(time_breakdown.png)" in md
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in md.split("## Where the time goes")[1].splitlines()
        if line.startswith("| ") and "steps |" not in line
    }
    # ms per step: data, forward_backward, optimizer, between_steps, total, share waiting for data
    assert rows["et, et stage 1"][1:] == ["4", "50.0", "550.0", "100.0", "100.0", "800.0", "6.2%"]
    assert rows["et, et stage 2"][1:] == ["2", "200.0", "1000.0", "100.0", "0.0", "1300.0", "15.4%"]
    assert rows["plain"][1:] == ["2", "250.0", "500.0", "250.0", "0.0", "1000.0", "25.0%"]
    with Image.open(tmp_path / "report" / "time_breakdown.png") as image:
        assert image.format == "PNG" and len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
