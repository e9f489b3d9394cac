"""Run ``launcher.train`` in this process and count its host syncs and collectives, by step and owner.

    python tests/sync_probe.py OUT.json --config ... key=value ...   (not a test module)

Counted: ``Tensor.item`` / ``tolist`` / ``__bool__`` / ``cpu`` / ``numpy`` calls (each makes the
host wait for the device on a GPU) and ``torch.distributed`` collectives. Each is attributed to
the nearest caller outside torch: ``project`` (this repository), ``deepspeed``, or ``other``; and
to the context it ran in: ``log`` (a log step of the run log), ``eval``, ``checkpoint``, ``signal``
(a stop-signal agreement), ``setup`` (before the first step), ``end`` (after the last) or ``step``
(anything else, i.e. the step code between log steps, which must hold no project sync). Calls
made under the DataLoader (its seeds, its workers) are owned by ``dataloader``: host tensors. The JSON holds one entry
per event
kind, owner, context and step.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]  # the callers run this with PYTHONPATH=ROOT (tests/helpers.py probe)

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
    "reduce",
)
HOST_READS = ("item", "tolist", "__bool__", "cpu", "numpy")

state = {"step": -1, "context": "setup"}
events: collections.Counter = collections.Counter()
active = [True]  # off while an event is being attributed (its own tensor ops must not count)


def owner() -> str:
    torch_dir = os.path.dirname(torch.__file__)
    stack = traceback.extract_stack()[:-2]
    if any(frame.filename.startswith(os.path.join(torch_dir, "utils", "data")) for frame in stack):
        return "dataloader"  # the DataLoader's own seeds and its workers: host tensors by construction
    for frame in reversed(stack):
        path = frame.filename
        if path.startswith(torch_dir) or path == __file__:
            continue
        if "deepspeed" in path:
            return "deepspeed"
        if path.startswith(str(ROOT)) and "/.venv/" not in path:
            return "project"
        return "other"
    return "other"


def count(kind: str) -> None:
    if not active[0]:
        return
    active[0] = False
    try:
        who = owner()
        events[(kind, who, state["context"], state["step"])] += 1
        if os.environ.get("SYNC_PROBE_TRACE") == who and state["context"] == "step":  # e.g. project, deepspeed
            print(
                f"sync probe: {kind} at step {state['step']}:\n" + "".join(traceback.format_stack()[-8:-2]), file=sys.stderr
            )
    finally:
        active[0] = True


def wrap_method(cls, name: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def counted(self, *args, **kwargs):
        count(name)
        return original(self, *args, **kwargs)

    setattr(cls, name, counted)


def wrap_function(module, name: str) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def counted(*args, **kwargs):
        count(name)
        return original(*args, **kwargs)

    setattr(module, name, counted)


def in_context(cls, name: str, context: str, when=lambda *a: True) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def run(self, *args, **kwargs):
        previous = state["context"]
        if when(self, *args):
            state["context"] = context
        try:
            return original(self, *args, **kwargs)
        finally:
            state["context"] = previous

    setattr(cls, name, run)


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    for name in HOST_READS:
        wrap_method(torch.Tensor, name)
    for name in COLLECTIVES:
        wrap_function(dist, name)

    from launcher import checkpoint, run_log, train

    original_step = run_log.RunLog.step

    def step(self, step, loss, **kwargs):  # the run log's step: a log step is its own context
        is_log = (step + 1) % self.log_every == 0 or step + 1 == self.total_steps
        state["context"] = "log" if is_log else "step"
        try:
            return original_step(self, step, loss, **kwargs)
        finally:
            state["step"], state["context"] = step + 1, "step"

    run_log.RunLog.step = step
    original_start = run_log.RunLog.start

    def start(self, step):
        result = original_start(self, step)
        state["step"], state["context"] = step, "step"
        return result

    run_log.RunLog.start = start
    in_context(train.Trainer, "_evaluate", "eval")
    in_context(checkpoint.Checkpointer, "save", "checkpoint")
    in_context(train.StopSignal, "requested", "signal", when=lambda self, step: step % self.every == 0)
    in_context(train.Trainer, "_announce_exit", "end")
    original_loop = train.Trainer._loop

    def loop(self, step):
        try:
            return original_loop(self, step)
        finally:
            state["context"] = "end"  # the final evaluation, checkpoint and the exit barriers

    train.Trainer._loop = loop
    code = train.main(argv)
    if dist.is_initialized():
        dist.destroy_process_group()
    Path(out).write_text(
        json.dumps(
            [
                {"kind": k, "owner": o, "context": c, "step": s, "count": n}
                for (k, o, c, s), n in sorted(events.items(), key=str)
            ]
        )
    )
    return code


if __name__ == "__main__":
    from launcher.distributed import exit_process

    exit_process(main())  # as launcher.train ends: no finalization racing gloo's threads
