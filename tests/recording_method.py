"""A method that records every event of the seam (not a test module).

Recipes load it with ``method_modules: [tests.recording_method]``; each rank
appends ``{"event", "step", ...}`` lines to ``RUN/events-rank{R}.jsonl``. It holds state (the
number of optimizer steps it saw), so a resumed run shows whether the state came back.
"""

import json
import os
from dataclasses import dataclass

from methods import Declaration, MethodContext, TrainingPlugin, register


@dataclass
class RecordingConfig:
    out_dir: str = "."

    def declare(self) -> Declaration:
        return Declaration()


class RecordingPlugin(TrainingPlugin):
    name = "recording"

    def __init__(self, out_dir: str, rank: int) -> None:
        self.path = os.path.join(out_dir, f"events-rank{rank}.jsonl")
        self.steps_seen = 0

    def _write(self, event: str, **fields) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps({"event": event, **fields}) + "\n")

    def attach(self, model):
        self._write("attach", training=model.training)

    def on_engine(self, engine, ema, stream):
        self._write("on_engine", zero_stage=engine.zero_optimization_stage(), ema=ema is not None, stream_epoch=stream.epoch)

    def on_epoch(self, epoch, stream):
        self._write("on_epoch", epoch=epoch, stream_epoch=stream.epoch)

    def on_step(self, step):
        self._write("on_step", step=step)
        return {"recording/steps_seen": float(self.steps_seen)}

    def on_batch(self, step, batch):
        self._write("on_batch", step=step, device=str(batch["image"].device), samples=len(batch["image"]))
        return batch

    def loss(self, step, batch, outputs):
        self._write("loss", step=step)
        return None  # the task's loss

    def after_forward(self, step, batch, outputs):
        self._write("after_forward", step=step, outputs=list(outputs.shape), ids=len(batch["sample_id"]))

    def after_step(self, step):
        self.steps_seen += 1
        self._write("after_step", step=step, steps_seen=self.steps_seen)

    def on_eval_batch(self, step, batch):
        self._write("on_eval_batch", step=step, device=str(batch["image"].device))
        return batch

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"]
        self._write("load_state_dict", steps_seen=self.steps_seen)


def build(config: RecordingConfig, context: MethodContext) -> RecordingPlugin:
    return RecordingPlugin(config.out_dir, context.rank)


register("recording", RecordingConfig, build)
