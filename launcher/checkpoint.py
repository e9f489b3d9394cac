"""Sharded DeepSpeed checkpoints in ``RUN/checkpoints/step-N``, valid only when complete.

Every rank calls ``save``; DeepSpeed writes its shards; each rank adds its RNG states; after a
barrier rank 0 writes ``meta.json`` (step, world size, ZeRO stage) into the folder and only then
moves the ``latest`` pointer (atomic rename). Folders without ``meta.json`` are incomplete and
never resumed from. The last ``keep`` complete checkpoints are kept.

Resuming with another world size goes through DeepSpeed's universal checkpoint: rank 0 converts
``step-N`` to ``step-N_universal`` (``python -m deepspeed.checkpoint.ds_to_universal
--inject_missing_state``) and the engine loads that with ``checkpoint.load_universal``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Checkpointer", "ResumePoint", "find_resume_point"]

log = logging.getLogger(__name__)
_STEP = re.compile(r"^step-(\d+)$")


class ResumePoint:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def needs_universal(self, world_size: int, zero_stage: int) -> bool:
        """Whether the optimizer shards must be re-split (another data-parallel world size)."""
        return self.meta["world_size"] != world_size and max(zero_stage, self.meta["zero_stage"]) > 0


def find_resume_point(path: Path) -> Optional[ResumePoint]:
    """``path``: a run folder (its latest complete checkpoint), a checkpoints folder, or one ``step-N``."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return ResumePoint(path)
    if _STEP.match(path.name):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no meta.json)")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = folder / "latest"
    if not latest.is_file():
        return None
    target = folder / latest.read_text().strip()
    if not (target / "meta.json").is_file():
        raise FileNotFoundError(f"{latest} points at {target}, which is not a complete checkpoint")
    return ResumePoint(target)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, run_dir: Path, engine, *, rank: int, world_size: int, zero_stage: int, keep: int) -> None:
        self.folder = Path(run_dir) / "checkpoints"
        self.engine, self.rank, self.world_size = engine, rank, world_size
        self.zero_stage, self.keep = zero_stage, keep

    def save(self, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank must call it."""
        tag = f"step-{step}"
        target = self.folder / tag
        if self.rank == 0 and target.exists():  # an incomplete or older save of the same step
            shutil.rmtree(target)
        dist.barrier()
        self.engine.save_checkpoint(str(self.folder), tag=tag, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), target / f"rng-rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world_size, "zero_stage": self.zero_stage}
            (target / "meta.json").write_text(json.dumps(meta))
            pointer = self.folder / "latest.tmp"
            pointer.write_text(tag)
            os.replace(pointer, self.folder / "latest")
            self._prune()
        dist.barrier()
        log.info("saved checkpoint %s", target)
        return target

    def _prune(self) -> None:
        complete = sorted((int(m.group(1)), p) for p in self.folder.iterdir()
                          if (m := _STEP.match(p.name)) and (p / "meta.json").is_file())
        for _, path in complete[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path.with_name(path.name + "_universal"), ignore_errors=True)

    @staticmethod
    def prepare_universal(point: ResumePoint, rank: int) -> str:
        """Convert ``point`` to a universal checkpoint (rank 0; the others wait); returns the tag to load."""
        universal = point.folder.with_name(point.folder.name + "_universal")
        if rank == 0 and not (universal / "done").is_file():
            shutil.rmtree(universal, ignore_errors=True)
            log.info("world size changed (%d -> %d): converting %s to a universal checkpoint",
                     point.meta["world_size"], dist.get_world_size(), point.folder)
            command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                       str(point.folder), "--output_folder", str(universal), "--inject_missing_state"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"universal conversion failed:\n{result.stderr[-3000:]}")
            shutil.copy(point.folder / "meta.json", universal / "meta.json")
            (universal / "done").write_text("")
        dist.barrier()
        return universal.name

    def load(self, point: ResumePoint, *, universal: bool) -> dict[str, Any]:
        """Load engine state (all ranks) and this rank's RNG states when the world size is unchanged."""
        tag = self.prepare_universal(point, self.rank) if universal else point.folder.name
        path, client_state = self.engine.load_checkpoint(str(point.folder.parent), tag=tag,
                                                         load_module_strict=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {point.folder.parent / tag}")
        rng_file = point.folder / f"rng-rank{self.rank}.pt"
        if point.meta["world_size"] == self.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:  # a new world: derive each rank's RNG from the step so the run stays reproducible
            seed = hash((client_state.get("seed", 0), point.step, self.rank)) % 2**31
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        log.info("resumed from %s (step %d)", point.folder, point.step)
        return client_state
