"""Helpers shared by the test modules (not a test module: pytest collects nothing here). Test modules import
from here and from no other test module; fixtures live in ``conftest.py``.

- ``free_port``: a free loopback port;
- ``launcher.train`` in real processes: ``TINY`` (the tiny model and batch every engine test adds),
  ``command`` / ``start`` / ``finish`` / ``train`` / ``finish_all``, the run folder's ``records`` and
  exported ``module_state``, ``kill_tree`` and ``wait_for_step``;
- ``probe``: a run under ``tests/sync_probe.py`` (host syncs and collectives counted);
- ``idx_folder``: MNIST-style IDX files;
- ``edit_shard``: damage a written shard's samples as if the writer had written them so;
- ``reference_toe``: Token Expansion as a per-sample float64 loop of Eq. 2-7 (TOE_SPEC "The op").
"""

import gzip
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from launcher.compare import launch_prefix

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (every test keeps its traffic on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- launcher.train in real processes ----------------------------------------------------------

TINY = [
    "model.kwargs={patch_size: 8, depth: 3, embed_dim: 48, num_heads: 2}",
    "data.workers=1",
    "train.global_batch=16",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.keep=5",
]


def command(ranks: int, port: int):
    return launch_prefix(ranks, port)


def start(run_dir: Path, shards: Path, *overrides, ranks=1, extra=()):
    args = [
        *command(ranks, free_port()),
        "--config",
        str(ROOT / "configs/deit_tiny_toe_cpu.yaml"),
        *extra,
        f"out_dir={run_dir.parent}",
        f"name={run_dir.name}",
        f"data.path={shards}",
        *TINY,
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(process, timeout=300) -> str:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return out


def train(run_dir, shards, *overrides, ranks=1, extra=(), expect=0) -> str:
    process = start(run_dir, shards, *overrides, ranks=ranks, extra=extra)
    out = finish(process)
    assert process.returncode == expect, out[-4000:]
    return out


def records(run_dir: Path) -> dict[int, dict]:
    """The last record of every step (a resumed run appends the steps it redoes)."""
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = record
    return by_step


def kill_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants (torchrun starts its workers in sessions of their own)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    for child in children:
        kill_tree(int(child), sig)


def wait_for_step(run_dir: Path, step: int, process, timeout=240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and step in records(run_dir):
            return
        assert process.poll() is None, "the run ended early"
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def module_state(run_dir: Path, step: int):
    from launcher.export import export

    out = export(str(run_dir / "checkpoints" / f"step-{step}"), str(run_dir / f"export-{step}.pth"))
    return torch.load(out, weights_only=True)


def finish_all(processes, timeout=240) -> list[str]:
    deadline = time.time() + timeout
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=max(1.0, deadline - time.time()))[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                kill_tree(p.pid, signal.SIGKILL)
            raise AssertionError(f"the job did not end within {timeout} s (a rank hangs in a collective)")
    return outputs


# -- tests/sync_probe.py -----------------------------------------------------------------------


def probe(tmp_path, shards, *overrides) -> list[dict]:
    out = tmp_path / "events.json"
    args = [
        sys.executable,
        str(ROOT / "tests/sync_probe.py"),
        str(out),
        "--config",
        str(ROOT / "configs/deit_tiny_toe_cpu.yaml"),
        f"out_dir={tmp_path}",
        "name=run",
        f"data.path={shards}",
        *TINY,
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


# -- IDX files (MNIST / Fashion-MNIST) ---------------------------------------------------------


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def edit_shard(tar_path: Path, edit: Callable[[int, str, bytes], Optional[bytes]]) -> list[str]:
    """Rewrite a written shard's members through ``edit(sample position in the shard, ext, bytes)`` (None
    drops the member) and record the rewritten shard's byte offsets in its ``shards.json``, as if the
    writer had written the edited samples (a shard changed after its index is refused by name instead:
    ``tests/test_shard_reader.py``). Returns the shard's sample keys in order."""
    from data.write_shards import sample_offsets

    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            key, ext = member.name.split(".", 1)
            edited = edit(keys.index(key), ext, data)
            if edited is not None:
                member.size = len(edited)
                tar.addfile(member, io.BytesIO(edited))
    index = tar_path.parent / "shards.json"
    meta = json.loads(index.read_text())
    for split in meta["splits"].values():
        for entry in split["shards"]:
            if entry["name"] == tar_path.name and "offsets" in entry:
                entry["offsets"], entry["bytes"] = sample_offsets(str(tar_path))
    index.write_text(json.dumps(meta))
    return keys


def idx_folder(root, train=12, val=6, compress=True):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", train), ("t10k", val)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        ext = ".gz" if compress else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, compress)
        arrays[prefix] = images, labels
    return arrays


# -- a straightforward Token Expansion reference: one sample, Python lists, float64 numpy (TOE_SPEC "The op") --


def reference_distances(patches: np.ndarray, distance: str) -> np.ndarray:
    n = patches.shape[0]
    dist = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            u, a = patches[i], patches[j]
            if distance == "cosine":
                dist[i, j] = 1.0 - u @ a / (max(np.linalg.norm(u), 1e-6) * max(np.linalg.norm(a), 1e-6))
            elif distance == "euclidean":
                dist[i, j] = np.sqrt(((u - a) ** 2).sum())
            else:
                dist[i, j] = np.abs(u - a).sum()
    return dist


def reference_toe(patches: np.ndarray, counts, k: int, stride: int, distance: str = "cosine", remainder: str = "last"):
    """Anchors (ascending) and merged tokens of one sample, following Eq. 2-7 literally."""
    num_patches = patches.shape[0]
    dist = reference_distances(patches, distance)
    anchors = [i * stride for i in range(counts[0])]  # Eq. 2, 0-based
    rest = [i for i in range(num_patches) if i not in anchors]
    for previous, current in zip(counts, counts[1:]):
        added = current - previous
        for repeat in range(k):
            if remainder == "last":  # the official token_select.py: the last repeat takes what // k leaves
                take = added // k + (added % k if repeat == k - 1 else 0)
            else:
                take = added // k + (1 if repeat < added % k else 0)
            nearest = {i: min(dist[i, a] for a in anchors) for i in rest}  # Eq. 3-4, recomputed each repeat
            chosen = sorted(rest, key=lambda i: (-nearest[i], i))[:take]  # Eq. 6
            anchors += chosen
            rest = [i for i in rest if i not in chosen]
    anchors = sorted(anchors)
    groups = {a: [a] for a in anchors}
    for i in rest:  # Eq. 7
        groups[min(anchors, key=lambda a: (dist[i, a], a))].append(i)
    merged = np.stack([patches[groups[a]].mean(axis=0) for a in anchors])
    return anchors, merged
