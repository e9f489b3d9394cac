"""Who am I in the job: rank, world size, local rank and the rendezvous, from any launcher.

Order: torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK); SLURM (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR = first host of the allocation); OpenMPI's mpirun
(OMPI_COMM_WORLD_*; MASTER_ADDR from the environment, else DeepSpeed's mpi4py discovery);
otherwise a single process on 127.0.0.1. DeepSpeed itself reads only the first set.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DistEnv", "discover", "init_distributed", "abort_and_exit", "exit_process"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        return hosts[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodes.split(",")[0].split("[")[0]


def discover() -> DistEnv:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from whatever launched us."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed/torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_ADDR", _slurm_master())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
    elif "OMPI_COMM_WORLD_RANK" in env:
        launcher = "mpirun"
        env["RANK"], env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        env.setdefault("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
        if "MASTER_ADDR" not in env:  # rank 0's address through mpi4py, as DeepSpeed's discovery does
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
            addr = comm.bcast(socket.gethostbyname(socket.gethostname()) if comm.rank == 0 else None, root=0)
            port = comm.bcast(_free_port() if comm.rank == 0 else None, root=0)
            env["MASTER_ADDR"] = addr
            env.setdefault("MASTER_PORT", str(port))
        env.setdefault("MASTER_PORT", "29500")
    else:
        launcher = "single"
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), launcher)


def init_distributed(timeout_minutes: float = 30.0) -> DistEnv:
    """Discover, then ``deepspeed.init_distributed`` (NCCL on GPUs, gloo on CPU) with a bounded
    collective timeout, so a dead rank fails the job instead of hanging it."""
    # DeepSpeed compiles a CPU comm op on first use: keep the build with the environment
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    dist_env = discover()
    import deepspeed
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    return dist_env


def abort_and_exit(code: int) -> None:
    """Leave the process now with ``code``, after the logs are out, waiting in no collective.

    NCCL: the process group is aborted first, so this rank's pending collectives end and the peers'
    next ones fail instead of waiting for the collective timeout. Gloo needs nothing: the peers'
    sockets close with the process. ``os._exit`` skips interpreter clean-up on purpose: atexit
    handlers and ``finally`` blocks of other frames may run collectives or join processes (the
    DataLoader's workers notice their parent is gone and end by themselves; ours are killed here)."""
    import torch.distributed as dist

    try:
        if dist.is_initialized() and dist.get_backend() == "nccl":
            from torch.distributed.distributed_c10d import _abort_process_group  # torch >= 2.3

            _abort_process_group()
    except Exception:  # noqa: BLE001 -- best effort: exiting matters more
        pass
    try:
        from data.stream import _end_live_workers  # the stream's own clean-up of suspended workers

        _end_live_workers()
    except Exception:  # noqa: BLE001
        pass
    exit_process(code)


def exit_process(code: int) -> None:
    """Leave the process with ``code`` once the logs and standard streams are out, skipping the
    interpreter's finalization.

    A finished rank is not safe to finalize: gloo's worker threads outlive ``destroy_process_group``
    (DeepSpeed keeps its groups), and one still destroying a finished collective's work (a barrier
    ends by dropping the all-gathers before it) decrefs Python tensors; during finalization taking
    the GIL ends that thread with ``pthread_exit``, whose unwinding through a ``noexcept`` frame calls
    ``std::terminate``: SIGABRT, exit 134 after a successful run (seen in this suite, 1 run in ~15:
    ``ProcessGroupGloo::runLoop`` > ``~AsyncBarrierWork`` > ``~AsyncAllgatherWork`` >
    ``decref_pyobject`` > ``take_gil`` > ``PyThread_exit_thread``). Files the run wrote are closed by
    then; atexit handlers do not run (ours only end DataLoader workers, which die with the process)."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)
