"""Where each log window's time goes (``launcher/step_timer.py``) and what a real run logs of it."""

import json

import pytest
import torch

from launcher import step_timer
from launcher.step_timer import PHASES, StepTimer, peak_memory_gib

from helpers import records, train


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_mark_gets_the_time_since_the_previous_one(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(step_timer.time, "perf_counter", clock)
    timer = StepTimer(torch.device("cpu"))
    for data, compute, optim, between in ((0.5, 2.0, 0.25, 0.25), (1.5, 2.0, 0.25, 3.0)):
        for phase, seconds in zip(PHASES, (data, compute, optim, between)):
            clock.now += seconds
            timer.mark(phase)
    window = timer.window()
    assert {k: window[k] for k in ("time/data", "time/forward_backward", "time/optimizer", "time/between_steps")} == {
        "time/data": 2.0,
        "time/forward_backward": 4.0,
        "time/optimizer": 0.5,
        "time/between_steps": 3.25,
    }
    assert window["time/window"] == 9.75 and window["time/data_share"] == pytest.approx(2.0 / 9.75)
    assert window["memory/peak_gib"] > 0
    clock.now += 1.0  # the next window starts at the read: only what comes after it counts
    timer.mark("data")
    second = timer.window()
    assert second["time/data"] == 1.0 and second["time/window"] == 1.0 and second["time/data_share"] == 1.0
    assert second["time/optimizer"] == 0.0, "every phase is in every window, 0 when it did not run"
    assert set(second) >= {f"time/{phase}" for phase in PHASES}


def test_cpu_peak_memory_is_the_process_peak_rss():
    before = peak_memory_gib(torch.device("cpu"))
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB touched
    after = peak_memory_gib(torch.device("cpu"))
    del block
    assert after >= before and after > 0.05


@pytest.mark.slow
def test_a_run_logs_its_time_breakdown_and_peak_memory(tmp_path, tiny_shards):
    run = tmp_path / "run"
    train(run, tiny_shards, "train.steps=6", "train.log_every=3", "train.eval_every=3", "checkpoint.every=3")
    windows = records(run)
    assert sorted(windows) == [2, 5]
    for record in windows.values():
        parts = [record[f"time/{phase}"] for phase in PHASES if f"time/{phase}" in record]
        assert all(p >= 0 for p in parts) and sum(parts) == pytest.approx(record["time/window"])
        assert 0 <= record["time/data_share"] <= 1 and record["memory/peak_gib"] > 0
        assert record["time/forward_backward"] > 0 and record["time/optimizer"] > 0
    first, second = windows[2], windows[5]
    # the evaluation and the checkpoint after step 3 fall between the windows: the second window holds them
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    eval_time = next(r["time"] for r in lines if "eval/top1" in r and r["step"] == 3)
    assert first["time/evaluation"] == 0.0 and first["time/checkpoint"] == 0.0
    assert second["time/evaluation"] > 0 and second["time/checkpoint"] > 0
    assert second["time/window"] <= second["time"] - first["time"] + 0.5
    assert eval_time <= second["time"]
