"""No host sync and no collective of the project's own between log steps (issue: GPU speed).

``tests/sync_probe.py`` runs the real ``launcher.train`` in one process with ``Tensor.item`` /
``tolist`` / ``__bool__`` / ``cpu`` / ``numpy`` and the ``torch.distributed`` collectives counted,
each attributed to its caller (this project, DeepSpeed, the DataLoader) and to the context it ran in.
On a GPU each host read waits for the device; here the calls themselves are counted.
"""

import collections
from pathlib import Path

import pytest

from helpers import probe

ROOT = Path(__file__).resolve().parents[1]


def totals(events, **match) -> collections.Counter:
    counted = collections.Counter()
    for event in events:
        if all(event[key] == value for key, value in match.items()):
            counted[event["kind"]] += event["count"]
    return counted


@pytest.mark.slow
def test_the_step_code_has_no_host_sync_between_log_steps(tmp_path, tiny_shards):
    steps, log_every, check_every = 12, 5, 4
    events = probe(
        tmp_path,
        tiny_shards,
        f"train.steps={steps}",
        f"train.log_every={log_every}",
        f"train.signal_check_every={check_every}",
        "checkpoint.every=0",
    )
    mine = [e for e in events if e["owner"] == "project" and e["context"] == "step"]
    assert not mine, f"host syncs / collectives in the project's step code between log steps: {mine}"
    # the stop-signal agreement: one all-reduce and one read every `check_every` steps, not every step
    assert totals(events, owner="project", context="signal") == {
        "all_reduce": steps // check_every,
        "item": steps // check_every,
    }
    # the run log: one all-reduce and one read of the window per log step (steps 5, 10 and the last)
    log_steps = len({*range(log_every, steps + 1, log_every), steps})
    assert totals(events, owner="project", context="log") == {
        "all_reduce": log_steps,
        "item": log_steps,
        "tolist": log_steps,
    }
    # DeepSpeed's own, every step (ZeRO-1, fp32, one rank, unclipped: compute_grad_norm off): the gradient
    # all-reduce (one bucket at this size) and torch AdamW's reads of its CPU step counters (two parameter
    # groups; host memory, no device sync); no norm all-reduce, no bool() of a device flag
    deepspeed = totals(events, owner="deepspeed", context="step")
    assert deepspeed == {"all_reduce": steps, "item": 2 * steps}


def test_unclipped_zero_1_2_recipes_skip_deepspeeds_per_step_gradient_norm():
    from launcher.config import deepspeed_config, load_config

    recipe = str(ROOT / "configs/deit_tiny_toe_cpu.yaml")
    for stage in (1, 2):
        ds = deepspeed_config(load_config(recipe, [f"train.zero_stage={stage}"]), 1)
        assert ds["zero_optimization"]["compute_grad_norm"] is False
    clipped = deepspeed_config(load_config(recipe, ["optim.clip_grad=1.0"]), 1)
    assert "compute_grad_norm" not in clipped["zero_optimization"]  # clipping needs the norm
    assert "compute_grad_norm" not in deepspeed_config(load_config(recipe, ["train.zero_stage=3"]), 1)["zero_optimization"]


def test_the_stop_signal_is_agreed_every_n_steps_only(monkeypatch):
    import torch.distributed as dist

    from launcher.train import StopSignal

    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: calls.append(int(tensor.item())))
    monkeypatch.setattr("signal.signal", lambda sig, handler: None)
    stop = StopSignal(__import__("torch").device("cpu"), every=3)
    stop.signum = 15
    assert [stop.requested(step) for step in range(1, 8)] == [0, 0, 15, 0, 0, 15, 0]
    assert calls == [15, 15]
