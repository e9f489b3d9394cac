"""``bench/gpu_check.sh --dry-run``: every step of the GPU check runs on the CPU at tiny sizes and the table
has every row, so the script a GPU holder runs first cannot rot unseen."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_dry_run_runs_every_step_and_writes_its_table(tmp_path):
    import sys

    from bench.gpu_check_table import FIGURES  # bench/ through pytest's pythonpath (the rootdir)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = {p.name: p.read_text()[-1500:] for p in (tmp_path / "logs").glob("*.log")}
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:] + json.dumps(logs, indent=1)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True
    assert [r["figure"] for r in result["rows"]] == [f[1] for f in FIGURES] + ["GPU-only tests"]
    assert all(r["status"] == "ok" for r in result["rows"]), result["rows"]
    # the figures a CPU has (speed ratios); MFU and GPU memory have no CPU value
    values = {r["figure"]: r["value"] for r in result["rows"]}
    assert values["DeiT-S: ToE last stage / engine without methods"] > 0
    assert values["DALI images/s (decode + DeiT augmentation)"] > 0
    assert values["DeiT-S: MFU, engine, all tokens"] is None
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(FIGURES) + 2 and "dry run" in table
