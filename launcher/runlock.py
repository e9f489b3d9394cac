"""One job per run folder: rank 0 holds an ``fcntl`` lock on ``RUN/.lock`` for the job's life.

The lock is a POSIX record lock (``fcntl.lockf``), so the kernel drops it when the holding process
ends, however it ends (SIGKILL, OOM killer, node reboot for local disks, lease expiry on NFS with
``lockd``): a dead job never leaves a stale lock, and a requeued job of the same run simply takes
it. Two properties of POSIX locks matter here: they are not inherited by forked children (a
DataLoader worker that outlives its rank does not keep the run locked), and closing *any* file
descriptor of the lock file in the holding process drops the lock, so the holder never opens the
file a second time. The file's content names the holder (host, PID, start time, SLURM job) for
the error message of the job that is refused; it is informational, the lock itself is the truth.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

__all__ = ["RunLock", "RunLockedError", "LOCK_NAME"]

LOCK_NAME = ".lock"
log = logging.getLogger(__name__)
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunLockedError(RuntimeError):
    """Another live job holds the run folder."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise ``RunLockedError`` naming the folder and the holder; never waits."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in _NO_LOCKS:  # availability over strictness, said loudly
                log.warning("run folder %s is NOT locked against a second job: its filesystem refuses fcntl locks "
                            "(%s; NFS needs lockd, Lustre the 'flock' mount option)", self.run_dir, err)
                return self
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RunLockedError(f"run folder {self.run_dir} is in use by another job ({self.holder()}); "
                                 f"wait for it to end, or give this run another name= or out_dir=") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "slurm_job": os.environ.get("SLURM_JOB_ID")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        """Who holds the lock, as its file says (read by a process that does not hold it)."""
        try:
            info = json.loads(self.path.read_text())
            text = f"host {info['host']}, PID {info['pid']}, since {info['since']}"
            return text + (f", SLURM job {info['slurm_job']}" if info.get("slurm_job") else "")
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown: the lock file names none"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None
