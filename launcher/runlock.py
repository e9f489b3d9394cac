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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["RunLock", "RunLockedError", "LOCK_NAME", "READERS_LOCK", "checkpoint_readers", "rotation_lock"]

LOCK_NAME = ".lock"
READERS_LOCK = ".readers.lock"  # in RUN/checkpoints: readers (launcher.export) share it, rotation takes it alone
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
                log.warning(
                    "run folder %s is NOT locked against a second job: its filesystem refuses fcntl locks "
                    "(%s; NFS needs lockd, Lustre the 'flock' mount option)",
                    self.run_dir,
                    err,
                )
                return self
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RunLockedError(
                f"run folder {self.run_dir} is in use by another job ({self.holder()}); "
                f"wait for it to end, or give this run another name= or out_dir="
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
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


# -- checkpoint readers and rotation ----------------------------------------------------------------
# A process that reads checkpoints of a run while it trains (launcher.export) holds a shared POSIX lock on
# RUN/checkpoints/.readers.lock from choosing the checkpoint until its files are loaded; the trainer's
# rotation (launcher.checkpoint Checkpointer._prune) deletes old checkpoints only while it holds that lock
# exclusively, and otherwise leaves them for its next save: a reader never loses the files it verified,
# and training never waits for a reader. Locks are per process, so the two must be different processes
# (they are: export is its own command).


def _open_lock_file(path: Path, *, write: bool) -> Optional[int]:
    """A descriptor of ``path`` for a lock (created when ``write``), or None when the folder refuses it."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if write else os.open(path, os.O_RDONLY)
    except OSError:
        return None


@contextmanager
def checkpoint_readers(folder: Path) -> Iterator[bool]:
    """Hold a shared lock on ``folder/.readers.lock`` (``folder``: a run's ``checkpoints``) while reading its
    checkpoints; waits only while a rotation is deleting. Yields whether the lock is held: False (with a
    warning) when the folder does not exist or its filesystem has no POSIX locks or refuses the file."""
    folder = Path(folder)
    if not folder.is_dir():
        yield False
        return
    path = folder / READERS_LOCK
    fd = _open_lock_file(path, write=True)
    if fd is None:  # a read-only mount: lock the file if the trainer created it
        fd = _open_lock_file(path, write=False)
    if fd is None:
        log.warning(
            "reading checkpoints of %s without a reader's lock (cannot open %s): a training run's "
            "rotation may delete them meanwhile",
            folder,
            path,
        )
        yield False
        return
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH)
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
            log.warning(
                "reading checkpoints of %s without a reader's lock (%s): a training run's rotation may "
                "delete them meanwhile",
                folder,
                err,
            )
            yield False
            return
        yield True
    finally:
        os.close(fd)  # drops the lock


@contextmanager
def rotation_lock(folder: Path, wait: Optional[str] = None) -> Iterator[bool]:
    """Take ``folder/.readers.lock`` exclusively; yields True when no reader holds it (or locks are not
    available: rotation then goes on as before), False while a reader does. With ``wait`` (what the
    caller is about to do, for the log), it waits for the readers instead and yields True."""
    fd = _open_lock_file(Path(folder) / READERS_LOCK, write=True)
    if fd is None:
        yield True
        return
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN) and err.errno not in _NO_LOCKS:
                raise
            if err.errno in (errno.EACCES, errno.EAGAIN):
                if wait is None:
                    yield False
                    return
                log.info("waiting for the readers of %s (%s) to finish before %s", folder, READERS_LOCK, wait)
                fcntl.lockf(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)
