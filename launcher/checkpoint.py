"""Sharded DeepSpeed checkpoints in ``RUN/checkpoints/step-N``, valid only when complete and intact.

Every rank calls ``save``; DeepSpeed writes its shards; each rank adds its RNG states; after a
barrier each rank records the size and CRC-32 of every file it wrote, rank 0 gathers them into
``manifest.json``, then writes ``meta.json`` (step, world size, ZeRO stage) and only then moves the
``latest`` pointer (atomic rename). Folders without ``meta.json`` are incomplete and never resumed
from. The last ``keep`` complete checkpoints are kept.

Before anything is loaded, every file of the chosen checkpoint is checked against its manifest
(size, then CRC-32; the ranks share the reading). A resume from a run folder takes the newest
checkpoint that verifies and logs, for each newer one it passes over, which file failed and why;
``--resume step-N`` (one checkpoint) is that checkpoint or a ``CheckpointError`` naming it and the
file. Checkpoints written before manifests existed are loaded unverified, with a warning.

Resuming with another world size goes through DeepSpeed's universal checkpoint: rank 0 converts
``step-N`` to ``step-N_universal`` (``python -m deepspeed.checkpoint.ds_to_universal
--inject_missing_state``) and the engine loads that with ``checkpoint.load_universal``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "ResumePoint",
    "find_resume_point",
    "select_resume_point",
    "verify_checkpoint",
    "file_record",
    "MANIFEST",
    "checkpoint_state_dict",
    "checkpoints_folder",
]

log = logging.getLogger(__name__)
_STEP = re.compile(r"^step-(\d+)$")
_WRITER = re.compile(r"(?:zero_pp_rank_|rng-rank)(\d+)")  # who wrote a file: its rank is in its name
MANIFEST = "manifest.json"
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the checkpoint and the file.

    ``collective``: every rank reached the same verdict (verification is agreed through an
    all-gather), so rank 0 alone reports it."""

    def __init__(self, message: str, *, collective: bool = False) -> None:
        super().__init__(message)
        self.collective = collective


def file_record(path: Path) -> dict[str, Any]:
    """Size and CRC-32 of a file, read in chunks (``zlib.crc32`` releases the GIL on large buffers)."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"size": size, "crc32": f"{crc:08x}"}


def _writer(name: str) -> int:
    """The rank that wrote a checkpoint file: the rank in its name, else rank 0 (DeepSpeed's shared
    model states are written by data-parallel rank 0)."""
    match = _WRITER.search(name)
    return int(match.group(1)) if match else 0


def _gather(problems: list[str]) -> list[str]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, problems)
        problems = [p for part in gathered for p in part]
    return sorted(problems)


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or ``CheckpointError`` saying what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def verify_checkpoint(folder: Path, *, rank: int = 0, world: int = 1) -> tuple[list[str], bool]:
    """``(problems, verified)`` for a checkpoint folder: one line per bad file (missing, wrong size,
    wrong checksum, unreadable), empty if it is intact; ``verified`` is False for a checkpoint
    without a manifest (written before manifests existed), which is then only checked for
    ``meta.json``. Collective when a process group is up: rank ``r`` reads every ``world``-th file and
    all ranks get the same answer."""
    folder = Path(folder)
    problems: list[str] = []
    verified = False
    try:
        _read_json(folder / "meta.json")
        if (folder / MANIFEST).is_file():
            verified = True
            files = _read_json(folder / MANIFEST).get("files", {})
            for name in sorted(files)[rank::world]:
                path, want = folder / name, files[name]
                if not path.is_file():
                    problems.append(f"{path} is missing")
                    continue
                size = path.stat().st_size
                if size != want["size"]:
                    problems.append(f"{path} has {size} bytes, the manifest says {want['size']} (truncated or overwritten)")
                    continue
                got = file_record(path)["crc32"]
                if got != want["crc32"]:
                    problems.append(f"{path} has CRC-32 {got}, the manifest says {want['crc32']} (corrupted)")
    except CheckpointError as err:
        problems.append(str(err) if rank == 0 else "")  # every rank reads meta / manifest: report it once
    except OSError as err:
        problems.append(f"{folder}: {err}")
    return [p for p in _gather(problems) if p], verified


class ResumePoint:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.meta = _read_json(self.folder / "meta.json")

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def needs_universal(self, world_size: int, zero_stage: int) -> bool:
        """Whether the optimizer shards must be re-split (another data-parallel world size)."""
        return self.meta["world_size"] != world_size and max(zero_stage, self.meta["zero_stage"]) > 0


def _complete(folder: Path) -> list[Path]:
    """The complete ``step-N`` folders of a checkpoints folder, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found, reverse=True)]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run folder's complete checkpoints (``meta.json`` written), newest first."""
    return _complete(Path(run_dir) / "checkpoints")


def select_resume_point(path: Path, *, rank: int = 0, world: int = 1, required: bool = False) -> Optional[ResumePoint]:
    """The checkpoint to resume from, verified; collective when a process group is up.

    ``path``: one checkpoint (``step-N``: that one, intact, or ``CheckpointError``), or a run folder
    / checkpoints folder (the newest complete checkpoint that verifies; damaged newer ones are
    logged and passed over; ``None`` if there is none at all, or ``CheckpointError`` when
    ``required``, or when every one of them is damaged)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such file or directory", collective=True)
    single = (path / "meta.json").is_file() or _STEP.match(path.name) is not None
    if single:
        if not (path / "meta.json").is_file():
            raise CheckpointError(
                f"{path} is not a complete checkpoint (no meta.json: its save did not finish)", collective=True
            )
        candidates = [path]
    else:
        candidates = _complete(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
    damaged = []
    for folder in candidates:
        problems, verified = verify_checkpoint(folder, rank=rank, world=world)
        if not problems:
            if not verified and rank == 0:
                log.warning(
                    "%s has no %s (written before checkpoints recorded checksums): loading it unverified", folder, MANIFEST
                )
            if damaged and rank == 0:
                log.warning("resuming from %s, the newest checkpoint that verifies", folder)
            return ResumePoint(folder)
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        if single:
            raise CheckpointError(f"checkpoint {folder} fails verification: {problems[0]}{more}", collective=True)
        damaged.append(folder)
        if rank == 0:
            for problem in problems:
                log.error("checkpoint %s is damaged: %s", folder, problem)
            log.warning("passing over %s; trying the previous checkpoint", folder)
    if damaged:
        raise CheckpointError(
            f"no checkpoint under {path} verifies (damaged: {', '.join(p.name for p in damaged)}); "
            f"repair or remove them, or start afresh with --no-resume",
            collective=True,
        )
    claimed = _claimed_latest(path)
    if claimed is not None:  # the folder says it has progress it cannot show: never start over silently
        raise CheckpointError(claimed, collective=True)
    if required:
        raise CheckpointError(f"--resume {path} holds no complete checkpoint", collective=True)
    return None


def _claimed_latest(run: Path) -> Optional[str]:
    """When a run or checkpoints folder with no complete checkpoint has a ``latest`` pointer (a wrong
    mount, a deleted or unsynced folder): the message that says what it points at and what is there."""
    folder = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    try:
        tag = pointer.read_text().strip()
    except OSError as err:
        tag = f"<unreadable: {err}>"
    found = sorted(p.name for p in folder.iterdir() if p.name != "latest")
    return (
        f"{pointer} names {tag!r}, but {folder} holds no complete checkpoint (found: "
        f"{', '.join(found[:8]) or 'nothing'}{' ...' if len(found) > 8 else ''}): is this the right folder "
        f"(a mount missing, a folder deleted or not synced)? Pass --no-resume to start this run afresh"
    )


def find_resume_point(path: Path) -> Optional[ResumePoint]:
    """``select_resume_point`` in one process (no process group): export and tools."""
    return select_resume_point(path, required=True)


def checkpoints_folder(source: Path) -> Path:
    """The ``checkpoints`` folder a run folder or a ``step-N`` checkpoint folder belongs to."""
    source = Path(source)
    if (source / "meta.json").is_file() or re.match(r"^step-\d+$", source.name):
        return source.parent
    return source / "checkpoints" if (source / "checkpoints").is_dir() else source


def checkpoint_state_dict(source: str):
    """``(state_dict, point)``: the fp32 module weights of a run folder's newest checkpoint that verifies (or
    of one ``step-N`` folder, which must verify); also what ``model.checkpoint`` reads from a run folder
    (``launcher.tasks.pretrained_source``) and what ``launcher.export`` writes out."""
    from .guard import first_nonfinite
    from .runlock import checkpoint_readers

    # a run training meanwhile keeps this checkpoint from its verification to its load (rotation is deferred)
    with checkpoint_readers(checkpoints_folder(Path(source))):
        point = find_resume_point(Path(source))
        if point is None:
            raise FileNotFoundError(f"no complete checkpoint under {source}")
        folder = point.folder
        if point.meta["zero_stage"] > 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        else:
            state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    bad = first_nonfinite(state.items())
    if bad is not None:  # written before the non-finite guard existed: never hand such weights on
        raise RuntimeError(
            f"{folder} holds non-finite weights ({bad} has NaN or inf): not exporting it; export an "
            f"earlier checkpoint (RUN/checkpoints/step-N)"
        )
    return state, point


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


@contextlib.contextmanager
def _naming_write_errors(target: Path):
    """A failed checkpoint write names the folder and the cause: a full disk surfaces from torch's zip
    writer as ``unexpected pos N vs M``, which says neither (``latest`` still names the previous
    checkpoint: it moves only after a complete save)."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if isinstance(err, CheckpointError):
            raise
        free = _free_bytes(target)
        full = (
            getattr(err, "errno", None) == errno.ENOSPC
            or "unexpected pos" in str(err)
            or (free is not None and free < 1 << 20)
        )
        if full:
            raise CheckpointError(
                f"no space left on the device (ENOSPC) writing checkpoint {target} "
                f"({_size(free)} free there): free space or point out_dir elsewhere; 'latest' "
                f"still names the previous checkpoint"
            ) from err
        raise CheckpointError(f"writing checkpoint {target} failed: {type(err).__name__}: {err}") from err


def _free_bytes(path: Path) -> Optional[int]:
    for folder in (path, *path.parents):
        try:
            stat = os.statvfs(folder)
            return stat.f_bavail * stat.f_frsize
        except OSError:
            continue
    return None


def _size(n: Optional[int]) -> str:
    return "unknown bytes" if n is None else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    def __init__(
        self,
        run_dir: Path,
        engine,
        *,
        rank: int,
        world_size: int,
        zero_stage: int,
        keep: int,
        before_save: Optional[Callable[[int], None]] = None,
    ) -> None:
        self.folder = Path(run_dir) / "checkpoints"
        self.engine, self.rank, self.world_size = engine, rank, world_size
        self.zero_stage, self.keep = zero_stage, keep
        self.before_save = before_save  # collective check that may refuse the save (launcher.guard: finite weights)

    def save(self, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank must call it."""
        if self.before_save is not None:
            self.before_save(step)
        tag = f"step-{step}"
        target = self.folder / tag
        if self.rank == 0 and target.exists():  # an incomplete or older save of the same step
            self._replace(target)
        dist.barrier()
        with _naming_write_errors(target):
            self.engine.save_checkpoint(str(self.folder), tag=tag, client_state=client_state, save_latest=False)
            torch.save(_rng_state(), target / f"rng-rank{self.rank}.pt")
        dist.barrier()  # every file is written and closed
        mine = {p.name: file_record(p) for p in sorted(target.iterdir()) if p.is_file() and _writer(p.name) == self.rank}
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        verdict = [self._check_shared(target, gathered) if self.rank == 0 else None]
        dist.broadcast_object_list(verdict, src=0)  # every rank leaves the same way
        if verdict[0]:
            raise CheckpointError(verdict[0], collective=True)
        if self.rank == 0:
            files = {name: record for part in gathered for name, record in part.items()}
            with _naming_write_errors(target):
                _write_atomic(target / MANIFEST, json.dumps({"checksum": "crc32", "files": files}, indent=1, sort_keys=True))
                meta = {"step": step, "world_size": self.world_size, "zero_stage": self.zero_stage}
                _write_atomic(target / "meta.json", json.dumps(meta))
                _write_atomic(self.folder / "latest", tag)
            self._prune()
        dist.barrier()
        log.info("saved checkpoint %s", target)
        return target

    @staticmethod
    def _check_shared(target: Path, gathered: list[dict]) -> Optional[str]:
        """Rank 0: every file another rank wrote is in rank 0's view of the folder, with its size; else
        the message (the run folder is not on storage all ranks share, or a write did not land)."""
        for rank, files in enumerate(gathered):
            for name, record in sorted(files.items()):
                path = target / name
                size = path.stat().st_size if path.is_file() else None
                if size != record["size"]:
                    seen = "is missing there" if size is None else f"has {size} bytes there, not {record['size']}"
                    return (
                        f"checkpoint {target} is incomplete: rank {rank} wrote {name}, but on rank 0 it {seen}. "
                        f"Is the run folder (out_dir) on storage that every node shares? Not moving "
                        f"'latest'; the checkpoint cannot be resumed from"
                    )
        return None

    def _replace(self, target: Path) -> None:
        """Rank 0: remove ``target`` (a ``step-N`` about to be saved again: an incomplete save, or a run
        resumed from an older checkpoint reaching the same step) once no reader holds the checkpoints:
        a reader (launcher.export, launcher.label, a fine-tuning run's ``model.checkpoint``) verifies a
        checkpoint and then opens its files by name, and would read the new save's files as the old's."""
        from .runlock import rotation_lock

        with rotation_lock(self.folder, wait=f"replacing {target.name}"):
            shutil.rmtree(target)

    def _prune(self) -> None:
        from .runlock import READERS_LOCK, rotation_lock

        with rotation_lock(self.folder) as free:  # a reader (launcher.export) keeps what it verified
            if not free:
                log.info("checkpoint rotation deferred to the next save: a reader holds %s", self.folder / READERS_LOCK)
                return
            for path in _complete(self.folder)[self.keep :]:
                shutil.rmtree(path, ignore_errors=True)
                shutil.rmtree(path.with_name(path.name + "_universal"), ignore_errors=True)

    @staticmethod
    def prepare_universal(point: ResumePoint, rank: int) -> str:
        """Convert ``point`` to a universal checkpoint (rank 0; the others wait); returns the tag to load."""
        universal = point.folder.with_name(point.folder.name + "_universal")
        if rank == 0 and not (universal / "done").is_file():
            shutil.rmtree(universal, ignore_errors=True)
            log.info(
                "world size changed (%d -> %d): converting %s to a universal checkpoint",
                point.meta["world_size"],
                dist.get_world_size(),
                point.folder,
            )
            command = [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(point.folder),
                "--output_folder",
                str(universal),
                "--inject_missing_state",
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"universal conversion of {point.folder} failed:\n{result.stderr[-3000:]}")
            shutil.copy(point.folder / "meta.json", universal / "meta.json")
            (universal / "done").write_text("")
        dist.barrier()
        return universal.name

    def _needed_files(self, point: ResumePoint) -> list[Path]:
        """What DeepSpeed reads on this rank from a checkpoint of the same world size (DeepSpeed's own
        names: ``deepspeed/runtime/engine.py`` ``_get_ckpt_name`` / ``_get_zero_ckpt_name``), so a
        missing one is named here instead of failing an assertion inside DeepSpeed."""
        folder, stage = point.folder, point.meta["zero_stage"]
        if stage == 3:
            needed = [folder / f"zero_pp_rank_{self.rank}_mp_rank_00_model_states.pt"]
        else:
            needed = [folder / "mp_rank_00_model_states.pt"]
        if stage > 0:
            optim = sorted(folder.glob(f"*zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"))
            needed.append(optim[0] if optim else folder / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt")
        return needed

    def load(self, point: ResumePoint, *, universal: bool) -> dict[str, Any]:
        """Load engine state (all ranks) and this rank's RNG states when the world size is unchanged."""
        same_world = point.meta["world_size"] == self.world_size
        rng_file = point.folder / f"rng-rank{self.rank}.pt"
        needed = ([] if universal else self._needed_files(point)) + ([rng_file] if same_world else [])
        for path in needed:
            if not path.is_file():
                raise CheckpointError(f"cannot resume from {point.folder}: rank {self.rank} needs {path}, which is missing")
        tag = self.prepare_universal(point, self.rank) if universal else point.folder.name
        try:
            path, client_state = self.engine.load_checkpoint(str(point.folder.parent), tag=tag, load_module_strict=True)
        except (AssertionError, FileNotFoundError, RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(
                f"rank {self.rank}: DeepSpeed could not load {point.folder.parent / tag}: {type(err).__name__}: {err}"
            ) from err
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {point.folder.parent / tag}")
        if same_world:
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:  # a new world: derive each rank's RNG from the step so the run stays reproducible
            seed = hash((client_state.get("seed", 0), point.step, self.rank)) % 2**31
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        log.info("resumed from %s (step %d)", point.folder, point.step)
        return client_state
