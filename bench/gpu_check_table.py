"""The table of ``bench/gpu_check.sh``: one row per figure from each step's JSON, with its target and the
step's exit code; writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` and prints the table.

    python bench/gpu_check_table.py DIR [--dry-run]

A step that failed or wrote no JSON still has its row (``failed (exit N)``), so the table always has the
same rows; ``--dry-run`` marks the table as CPU figures at tiny sizes (they check that every step runs,
not the speeds).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable, Optional

# (step, figure, target, how to read it from the step's JSON)
Reader = Callable[[dict], Any]


def _row(rows: list, config: str) -> dict:
    return next(r for r in rows if r["config"].startswith(config))


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return {"x": f"{value:.3f}", "pct": f"{value:.1%}", "n": f"{value:,.0f}", "gib": f"{value:.2f} GiB"}[kind]


FIGURES: list[tuple[str, str, str, str, Reader]] = [
    ("step_deit_s", "DeiT-S: engine / plain loop (speed)", ">= 1.2", "x", lambda j: _row(j["rows"], "(b) ")["vs_plain"]),
    ("step_deit_s", "DeiT-S: MFU, engine, all tokens", "-", "pct", lambda j: _row(j["rows"], "(b) ").get("mfu")),
    (
        "step_deit_s",
        "DeiT-S: ToE last stage / engine without methods",
        ">= 0.98",
        "x",
        lambda j: _row(j["rows"], "(b') ")["vs_no_method"],
    ),
    (
        "step_deit_s",
        "DeiT-S: ToE stage 1 measured / theoretical",
        ">= 0.98",
        "x",
        lambda j: _row(j["rows"], "(c) engine, ToE stage 1")["measured_over_theoretical"],
    ),
    (
        "step_deit_s",
        "DeiT-S: ToE stage 2 measured / theoretical",
        ">= 0.98",
        "x",
        lambda j: _row(j["rows"], "(c) engine, ToE stage 2")["measured_over_theoretical"],
    ),
    ("step_deit_b", "DeiT-B: MFU, engine, all tokens", ">= 50%", "pct", lambda j: _row(j["rows"], "(b) ").get("mfu")),
    ("step_deit_b", "DeiT-B: engine / plain loop (speed)", ">= 1.2", "x", lambda j: _row(j["rows"], "(b) ")["vs_plain"]),
    (
        "dali",
        "DALI images/s (decode + DeiT augmentation)",
        ">= 5,000",
        "n",
        lambda j: next(r for r in j["rows"] if r["loader"].startswith("DALI"))["per_s"],
    ),
    (
        "end_to_end",
        "End to end, ToE r1 0.5: measured / theoretical speed-up",
        ">= 0.98",
        "x",
        lambda j: j["measured_over_theoretical"],
    ),
    (
        "end_to_end",
        "End to end: share of time waiting for data, no ToE",
        "-",
        "pct",
        lambda j: j.get("data_share", {}).get("dense"),
    ),
    (
        "end_to_end",
        "End to end: share of time waiting for data, ToE",
        "-",
        "pct",
        lambda j: j.get("data_share", {}).get("toe"),
    ),
    ("trilevel_attention", "Tri-Level: SDPA with its mask / without (time)", "-", "x", lambda j: j["sdpa_mask_ratio"]),
    ("trilevel_attention", "Tri-Level: scoring share of the step", "< 2%", "pct", lambda j: j["scoring_share"]),
    (
        "trilevel_attention",
        "Tri-Level: practical / theoretical, all three levels",
        "-",
        "x",
        lambda j: j["phases"][-1]["practical_over_theoretical"],
    ),
    ("toe_overhead", "ToE op share of the stage-1 step", "<= 2%", "pct", lambda j: j["stages"][0]["op_share"]),
    (
        "grad_precision",
        "bf16: fp32 gradients / bf16 gradients (step time, ZeRO-1)",
        "-",
        "x",
        lambda j: j["rows"][0]["fp32_over_bf16_time"],
    ),
    (
        "grad_precision",
        "bf16: peak memory with fp32 gradients (ZeRO-1)",
        "-",
        "gib",
        lambda j: j["rows"][0]["fp32_grads_peak_gib"],
    ),
]


def _tests(path: Path) -> Optional[str]:
    if not path.is_file():
        return None
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.dir)
    steps = {}
    if (out / "steps.tsv").is_file():
        for line in (out / "steps.tsv").read_text().splitlines():
            name, rc, seconds = line.split("\t")
            steps[name] = {"exit": int(rc), "seconds": int(seconds)}
    rows = []
    for step, figure, target, kind, read in FIGURES:
        status, value = steps.get(step, {}).get("exit"), None
        source = out / f"{step}.json"
        if status == 0 and source.is_file():
            try:
                value = read(json.loads(source.read_text()))
            except (KeyError, IndexError, StopIteration, TypeError) as err:
                status = f"no figure ({type(err).__name__}: {err})"
        rows.append(
            {
                "step": step,
                "figure": figure,
                "value": value,
                "shown": _fmt(value, kind),
                "target": target,
                "status": "ok"
                if status == 0
                else "not run"
                if status is None
                else f"failed (exit {status})"
                if isinstance(status, int)
                else status,
            }
        )
    tests = _tests(out / "gpu_tests.xml")
    rows.append(
        {
            "step": "gpu_tests",
            "figure": "GPU-only tests",
            "value": tests,
            "shown": tests or "-",
            "target": "all pass",
            "status": "ok"
            if steps.get("gpu_tests", {}).get("exit") == 0
            else f"failed (exit {steps.get('gpu_tests', {}).get('exit')})",
        }
    )
    device = "CPU dry run (tiny sizes: checks that every step runs, not speeds)" if args.dry_run else "GPU"
    for step in ("step_deit_s", "dali"):
        source = out / f"{step}.json"
        if source.is_file():
            found = json.loads(source.read_text())
            device = f"{found.get('device') or found.get('gpu') or device}" + (" (dry run)" if args.dry_run else "")
            break
    lines = [
        f"GPU check on {device}; total {sum(s['seconds'] for s in steps.values())} s",
        "",
        "| step | figure | value | target | status |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['step']} | {r['figure']} | {r['shown']} | {r['target']} | {r['status']} |" for r in rows]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (out / "gpu_check.json").write_text(
        json.dumps(
            {"dry_run": args.dry_run, "device": device, "steps": steps, "rows": rows, "machine": platform.machine()},
            indent=2,
        )
    )
    print("\n".join(lines))
    failed = [r for r in rows if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
