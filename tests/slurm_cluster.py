"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd on loopback.

Everything lives in one temporary folder (config, munge key and socket, state, spool, logs),
on ports of its own; the daemons are stopped by PID when the context ends. Needs the Debian
packages slurmd, slurmctld, slurm-client and munge (install.sh installs them when run as root).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.processes: list[subprocess.Popen] = []
        self.env = dict(os.environ)

    def __enter__(self) -> "LocalSlurm":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        socket_path = r / "munge" / "munge.socket"
        self._spawn(
            [
                _binary("munged"),
                "-F",
                "-f",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={r / 'munge' / 'munged.pid'}",
                f"--log-file={r / 'log' / 'munged.log'}",
                f"--seed-file={r / 'munge' / 'munged.seed'}",
            ]
        )
        self._wait(lambda: socket_path.exists(), "munged socket")
        conf = r / "slurm.conf"
        conf.write_text(f"""ClusterName=toetest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path},cred_expire=10
CredType=cred/munge
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=10
JobRequeue=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        self.env["SLURM_CONF"] = str(conf)
        for key_name in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[key_name]  # a test run inside an allocation must not leak into ours
        self._spawn([_binary("slurmctld"), "-D", "-i", "-f", str(conf)])
        self._spawn([_binary("slurmd"), "-D", "-N", "localhost", "-f", str(conf)])
        self._wait(
            lambda: self.run("sinfo", "-h", "-o", "%T").strip() in ("idle", "idle*", "mixed"), "an idle node", timeout=60
        )

    def _spawn(self, command: list[str]) -> None:
        name = Path(command[0]).name
        log = open(self.root / "log" / f"{name}.out", "w")
        self.processes.append(
            subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def _wait(self, ready, what: str, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if ready():
                    return
            except subprocess.CalledProcessError:
                pass
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}; logs in {self.root / 'log'}")
            time.sleep(0.3)
        raise TimeoutError(f"no {what} after {timeout} s; logs in {self.root / 'log'}")

    def run(self, *command: str, check: bool = True) -> str:
        result = subprocess.run(
            [_binary(command[0]), *command[1:]], env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(
        self,
        job_id: str,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
        timeout: float = 600.0,
        release_requeued: bool = True,
    ) -> dict[str, str]:
        """Wait for a final state. A requeued job is held for a restart delay (~120 s by default);
        it is released early, but only once its old credential has expired (``cred_expire=10``):
        slurmctld kills a job restarted before that ("Job credential revoked")."""
        deadline, pending_since = time.time() + timeout, None
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if release_requeued and info.get("JobState") == "PENDING" and int(info.get("Restarts", "0")) > 0:
                pending_since = pending_since or time.time()
                if time.time() - pending_since > 12:
                    self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
            else:
                pending_since = None
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {self.job(job_id)}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        self.processes.clear()


def submit(cluster: LocalSlurm, args: list[str], env: Optional[dict] = None) -> str:
    result = subprocess.run(
        [_binary("sbatch"), "--parsable", *args],
        env={**cluster.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr}")
    return result.stdout.strip().split(";")[0]
