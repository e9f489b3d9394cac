"""The ranks agree on what they are about to train before the first step, in one collective.

Each rank states its facts: the resolved recipe, the shard index it read, the step plan it computed,
the run folder as it sees it (a token rank 0 writes into it at every start, and the checkpoints
there), or the refusal it met while preparing (a broken ``shards.json`` on its node). One
``all_gather_object`` brings every rank's facts to every rank, so all of them reach the same verdict
and stop within seconds, naming the rank and the difference, instead of training on different data
or hanging in a collective until the timeout (different step counts: the rank with fewer steps
leaves while the others wait in an all-reduce).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist
import yaml

from .config import ConfigError, recipe_changes

__all__ = ["RUN_TOKEN", "DisagreementError", "write_run_token", "read_run_token", "digest", "agree"]

RUN_TOKEN = ".run-token"
log = logging.getLogger(__name__)


def write_run_token(run_dir: Path) -> str:
    """Rank 0, at every start: a fresh token in the run folder (temporary name, then renamed)."""
    token = f"{uuid.uuid4().hex} {os.uname().nodename}"
    tmp = Path(run_dir) / f"{RUN_TOKEN}.tmp"
    tmp.write_text(token)
    os.replace(tmp, Path(run_dir) / RUN_TOKEN)
    return token


def read_run_token(run_dir: Path) -> str:
    try:
        return (Path(run_dir) / RUN_TOKEN).read_text()
    except OSError:
        return f"(none: {Path(run_dir) / RUN_TOKEN} is not there)"


def digest(value: Any) -> str:
    """A short, stable digest of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


_WHAT = {
    "recipe": "resolved recipe",
    "shards": "shard index",
    "plan": "step plan",
    "run_folder": "run folder (token rank 0 wrote at this start)",
    "checkpoints": "checkpoints in the run folder",
}


class DisagreementError(ConfigError):
    """The ranks do not agree on what to train (or some of them refused): every rank raises it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, collective=True)


def agree(facts: dict[str, str], *, recipe: str, rank: int, world: int, error: Optional[BaseException] = None) -> None:
    """Collective. ``facts``: this rank's ``{name: short text}``; ``recipe``: its resolved recipe
    (YAML), compared key by key only when the digests differ; ``error``: the refusal this rank met
    while preparing (its facts are then ignored). Raises on every rank alike: the refusal itself when
    every rank met the same one (reported once, by rank 0), else ``DisagreementError`` naming each
    rank that refused or differs from rank 0."""
    if world == 1 or not dist.is_initialized():
        if error is not None:
            raise error
        return
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"error": str(error)} if error is not None else facts)
    errors = {r: f["error"] for r, f in enumerate(gathered) if "error" in f}
    if error is not None and len(errors) == world and len(set(errors.values())) == 1:
        error.collective = True  # type: ignore[attr-defined]  # met alike by every rank: one line, from rank 0
        raise error
    if rank in errors:  # this rank's own log says why it refused (rank 0's names every rank)
        log.error("rank %d of %d refused: %s", rank, world, errors[rank])
    problems = [f"rank {r} refused: {e}" for r, e in errors.items()]
    if not problems:
        reference = gathered[0]
        for r, other in enumerate(gathered[1:], start=1):
            for name in reference:
                if other.get(name) != reference[name] and name != "recipe":
                    problems.append(
                        f"rank {r}'s {_WHAT.get(name, name)} differs from rank 0's: {other.get(name)} vs {reference[name]}"
                    )
        if any(f.get("recipe") != reference.get("recipe") for f in gathered):
            problems = _recipe_problems(recipe, rank, world) + problems  # the error path only: name the keys
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise DisagreementError(
            "the ranks disagree before training: "
            + "; ".join(problems[:4])
            + more
            + ". Every rank must run the same recipe on the same data and see the same run "
            "folder (out_dir on storage all nodes share)"
        )


def _recipe_problems(recipe: str, rank: int, world: int) -> list[str]:
    reference: list = [recipe if rank == 0 else None]
    dist.broadcast_object_list(reference, src=0)
    mine: Optional[str] = None
    if rank:
        changes = recipe_changes(yaml.safe_load(reference[0]), yaml.safe_load(recipe))
        if changes:
            listed = ", ".join(f"{key}: {new!r} (rank 0: {old!r})" for key, old, new in changes[:3])
            mine = f"rank {rank}'s recipe differs from rank 0's: {listed}"
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    return [text for text in gathered if text]
