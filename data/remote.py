"""Shards and their index from object storage (``s3://``), web servers (``http(s)://``) and commands (``pipe:``).

What the stream needs from a remote shard is a byte stream of a tar, possibly starting at a sample
boundary recorded at write time (``shards.json``'s per-shard ``offsets``), that survives transient
network failures. ``RemoteReader`` is that stream: a file-like object that opens the object with a
ranged request (S3 ``GetObject`` with ``Range``, HTTP ``Range``; a server that ignores the range
is read from byte 0 and the head skipped; ``pipe:`` commands are always read from the start), and
that, on a transient failure (connection refused or reset, timeout, HTTP 5xx / 429, S3
throttling), waits with bounded exponential back-off and re-opens *at the byte it had reached*, so
a retried read yields exactly the bytes an uninterrupted read would have: no sample lost or
repeated. After ``retries`` consecutive failed attempts it raises ``RetriesExhausted`` naming the
URL and the last cause. Permanent failures (missing object, denied access, bad credentials) raise
``RemoteNotFound`` / ``RemoteDenied`` at once.

S3 goes through boto3 / botocore (credentials, profiles, ``AWS_ENDPOINT_URL``, signing and
checksums as every AWS tool takes them); botocore's own retries are switched off so that every
retry is ours, bounded and counted. HTTP goes through urllib3 (botocore's own HTTP library).

``ShardCache`` is the optional node-local cache (``data.cache_dir``): a shard is fetched once per
node into a temporary name and renamed into place under a per-shard ``flock`` (ranks of one node
wanting the same shard wait for the one fetching it), reused across epochs and ranks, and the
least recently used shards are evicted to keep the cache under its size bound.

Nothing here imports the rest of ``data``; ``data/shards.py`` calls it.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

__all__ = [
    "RemoteOptions",
    "RemoteReader",
    "ShardCache",
    "RemoteError",
    "RemoteNotFound",
    "RemoteDenied",
    "RetriesExhausted",
    "DataLostError",
    "check_lost_share",
    "is_remote",
    "join",
    "upload_folder",
    "read_bytes",
    "check_location",
    "SCHEMES",
]

log = logging.getLogger(__name__)
SCHEMES = ("s3://", "http://", "https://", "pipe:")
_S3_URL = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(/.*)?$")
# S3 error codes that mean "try again later" (throttling, a server having a bad moment)
_S3_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "ServiceUnavailable",
    "InternalError",
    "InternalServerError",
    "RequestLimitExceeded",
    "TooManyRequests",
    "BandwidthLimitExceeded",
}
_S3_DENIED = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AuthorizationHeaderMalformed",
}
_CHUNK = 1 << 20


def is_remote(url: str) -> bool:
    return url.startswith(SCHEMES)


def join(root: str, name: str) -> str:
    """``root/name`` for a URL prefix (``pipe:CMD`` prefixes too: the name ends the command's last word)."""
    return f"{root.rstrip('/')}/{name}"


def check_location(url: str) -> None:
    """``ValueError`` naming what is wrong with a shard location; local paths and the schemes of
    ``SCHEMES`` pass."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", url) and not is_remote(url) and not url.startswith("file://"):
        raise ValueError(
            f"{url!r}: unsupported scheme; shards are read from a local path, {', '.join(s + '...' for s in SCHEMES)}"
        )
    if url.startswith("s3://") and not _S3_URL.match(url.rstrip("/")):
        raise ValueError(
            f"{url!r} is not s3://BUCKET[/PREFIX] with a valid bucket name (3-63 characters: "
            f"lower-case letters, digits, '.', '-')"
        )
    if url.startswith("pipe:") and not url[5:].strip():
        raise ValueError("'pipe:' needs a command, e.g. 'pipe:curl -sf https://host/shards'")


class RemoteError(OSError):
    """A remote read failed; ``url`` and ``cause`` name what and why."""

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"{url}: {cause}")
        self.url, self.cause = url, cause


class RemoteNotFound(RemoteError):
    """The object (or its bucket) does not exist: permanent, not retried."""


class RemoteDenied(RemoteError):
    """Credentials refused or missing, access denied: permanent, not retried."""


class RetriesExhausted(RemoteError):
    """Transient failures went on through every retry."""


class DataLostError(RuntimeError):
    """More of an epoch's shards were lost to outages than ``data.max_lost_share`` allows."""


def check_lost_share(error: Exception, lost: int, shards: int, max_share: float) -> None:
    """Raise ``DataLostError`` when ``lost`` of a reader's ``shards`` exceed ``max_share`` of them.

    Checked by each reader (rank x DataLoader worker) over the shards of its own slot, where the
    loss is met, so the job stops within one retry window of an outage. If no reader loses more
    than the share, the epoch as a whole does not either."""
    if lost > max_share * shards:
        raise DataLostError(
            f"{error} -- {lost} of the {shards} shards this reader reads this epoch lost after "
            f"every retry, more than data.max_lost_share={max_share:g}: stopping rather than "
            f"training on part of the data (raise data.remote_retries / data.remote_backoff_max "
            f"to ride out longer outages)"
        )


class _Transient(Exception):
    """Internal: a failure worth retrying."""


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are read (the recipe's ``data.*`` keys of the same meaning).

    ``retries``: attempts after the first one fails, per read (consecutive failures: progress resets
    the count); the wait before retry ``k`` (0-based) is ``min(backoff_max, backoff * 2**k)`` times a
    random factor in [0.5, 1] (jitter, so that many readers do not come back in step).
    ``timeout``: seconds to connect and between bytes. ``max_lost_share``: the share of a reader's
    shards that may be lost to failures outlasting the retries before the job stops (0: none).
    ``cache_dir`` / ``cache_bytes``: the node-local cache and its bound (None: no cache).
    """

    s3_endpoint: Optional[str] = None
    retries: int = 6
    backoff: float = 1.0
    backoff_max: float = 30.0
    timeout: float = 60.0
    max_lost_share: float = 0.0
    cache_dir: Optional[str] = None
    cache_bytes: int = 100 * 2**30

    def wait(self, attempt: int) -> float:
        """The longest wait before retry ``attempt`` (0-based)."""
        return min(self.backoff_max, self.backoff * 2.0**attempt)

    def worst_case_seconds(self) -> float:
        """How long one read may keep retrying before it gives up: every wait at its longest, every
        attempt running into the timeout."""
        return sum(self.wait(a) for a in range(self.retries)) + (self.retries + 1) * self.timeout


# -- clients (one per process: DataLoader workers fork, and a client must not cross a fork) --------

_CLIENTS: dict = {}
_CLIENTS_LOCK = threading.Lock()


def _s3_client(options: RemoteOptions):
    key = (os.getpid(), options.s3_endpoint, options.timeout)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=options.timeout,
                read_timeout=options.timeout,
                retries={"total_max_attempts": 1},
                max_pool_connections=16,
            )
            # endpoint: the recipe's, else botocore's own resolution (AWS_ENDPOINT_URL[_S3], the profile's
            # endpoint_url, then AWS); credentials: botocore's chain (environment, profile, instance role)
            _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=options.s3_endpoint or None, config=config)
        return _CLIENTS[key]


def _http_pool(options: RemoteOptions):
    key = (os.getpid(), "http", options.timeout)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            import urllib3

            _CLIENTS[key] = urllib3.PoolManager(
                retries=False, timeout=urllib3.Timeout(connect=options.timeout, read=options.timeout)
            )
        return _CLIENTS[key]


def s3_endpoint_of(options: RemoteOptions) -> str:
    """Where ``s3://`` requests go (for messages)."""
    try:
        return _s3_client(options).meta.endpoint_url
    except Exception:  # noqa: BLE001 -- only for a message
        return options.s3_endpoint or "the default AWS endpoint"


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key


def _credential_hint(options: RemoteOptions) -> str:
    try:
        import boto3

        credentials = boto3.session.Session().get_credentials()  # the chain the client resolved
        if credentials is None:
            return "no credentials found"
        return f"access key {credentials.access_key[:4]}... from {getattr(credentials, 'method', '?')}"
    except Exception:  # noqa: BLE001 -- only for a message
        return "credentials unknown"


# -- one attempt to open an object at a byte position ----------------------------------------------


def _open_s3(url: str, start: int, end: Optional[int], options: RemoteOptions):
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    bucket, key = _split_s3(url)
    kwargs = {}
    if start or end is not None:
        kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    try:
        response = _s3_client(options).get_object(Bucket=bucket, Key=key, **kwargs)
    except (NoCredentialsError, PartialCredentialsError) as err:
        raise RemoteDenied(url, f"{err} (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = err.response.get("Error", {}).get("Message", "")
        cause = f"{code or status}: {message} (endpoint {s3_endpoint_of(options)})"
        if code in _S3_TRANSIENT or status >= 500 or status == 429:
            raise _Transient(cause) from None
        if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
            raise RemoteNotFound(url, f"{cause}" + (f" (bucket {bucket!r})" if code == "NoSuchBucket" else ""))
        if code in _S3_DENIED or status in (401, 403):
            raise RemoteDenied(url, f"{cause}; {_credential_hint(options)}") from None
        raise RemoteError(url, cause) from None
    except BotoCoreError as err:  # connection refused / reset, timeouts, DNS
        raise _Transient(f"{type(err).__name__}: {err}") from None
    body = response["Body"]
    return body, int(response.get("ContentLength", 0)), start


def _open_http(url: str, start: int, end: Optional[int], options: RemoteOptions):
    import urllib3

    headers = {}
    if start or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    try:
        response = _http_pool(options).request("GET", url, headers=headers, preload_content=False)
    except urllib3.exceptions.HTTPError as err:
        raise _Transient(f"{type(err).__name__}: {err}") from None
    status = response.status
    if status in (200, 206):
        length = int(response.headers.get("Content-Length", 0) or 0)
        # 200 to a ranged request: the server ignores ranges; the caller skips the head
        return response, length, start if status == 206 else 0
    response.drain_conn()  # read the (error) body so that the pooled connection can carry the next request
    cause = f"HTTP {status} {response.reason or ''}".strip()
    if status >= 500 or status in (408, 429):
        raise _Transient(cause)
    if status == 404 or status == 410:
        raise RemoteNotFound(url, cause)
    if status in (401, 403):
        raise RemoteDenied(url, cause)
    raise RemoteError(url, cause)


def _open_pipe(url: str, start: int, end: Optional[int], options: RemoteOptions):
    from webdataset.gopen import gopen

    try:
        return gopen(url, "rb"), 0, 0
    except OSError as err:
        raise _Transient(f"{type(err).__name__}: {err}") from None


def _opener(url: str):
    if url.startswith("s3://"):
        return _open_s3
    if url.startswith(("http://", "https://")):
        return _open_http
    if url.startswith("pipe:"):
        return _open_pipe
    raise ValueError(f"{url!r} is not a remote URL ({', '.join(SCHEMES)})")


def _transient_read_errors() -> tuple:
    """Exceptions a body read raises when the connection drops or stalls."""
    errors: list = [OSError, EOFError]
    try:
        import urllib3

        errors.append(urllib3.exceptions.HTTPError)
    except ImportError:
        pass
    try:
        from botocore.exceptions import BotoCoreError

        errors.append(BotoCoreError)
    except ImportError:
        pass
    return tuple(errors)


class RemoteReader(io.RawIOBase):
    """The bytes ``[start, end)`` of a remote object (``end=None``: to its end) as a read-only
    stream that retries transient failures, re-opening at the byte reached (module docstring).
    ``counters["remote_retry"]`` counts the retries."""

    def __init__(
        self,
        url: str,
        options: RemoteOptions,
        *,
        start: int = 0,
        end: Optional[int] = None,
        counters: Optional[Counter] = None,
    ) -> None:
        super().__init__()
        self.url, self.options, self.position, self.end = url, options, start, end
        self.counters = counters if counters is not None else Counter()
        self._open_at = _opener(url)
        self._body = None
        self._remaining: Optional[int] = None  # bytes the open response still owes (None: unknown)
        self._failures = 0
        self._first_failure = 0.0
        self._rng = random.Random()  # jitter only; the global generators belong to the augmentation

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed RemoteReader")
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        if self.end is not None:
            size = min(size, self.end - self.position)
        if size <= 0:
            return b""
        transient = _transient_read_errors()
        while True:
            try:
                if self._body is None:
                    self._connect()
                data = self._body.read(size)
                if not data and self._remaining:  # the response ended short of what it announced
                    raise _Transient(f"connection closed {self._remaining} bytes early")
                if not data and self.end is not None:
                    raise _Transient(
                        f"object ended at byte {self.position}, {self.end - self.position} bytes "
                        f"short of the range asked for"
                    )
                self.position += len(data)
                if self._remaining is not None:
                    self._remaining -= len(data)
                if data:
                    self._failures = 0
                return data
            except _Transient as err:
                self._retry(str(err))
            except RemoteError:
                raise
            except transient as err:
                self._retry(f"{type(err).__name__}: {err}")

    def _connect(self) -> None:
        body, length, served_from = self._open_at(self.url, self.position, self.end, self.options)
        skip = self.position - served_from  # a server that ignored the range, or a pipe: read the head away
        self._body = body
        self._remaining = (length - skip) if length else None
        while skip > 0:
            data = body.read(min(skip, _CHUNK))
            if not data:
                raise _Transient(f"stream ended while skipping to byte {self.position}")
            skip -= len(data)

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 -- a broken connection may fail to close; it is dropped anyway
                pass

    def _retry(self, cause: str) -> None:
        self._drop()
        if self._failures == 0:
            self._first_failure = time.monotonic()
        if self._failures >= self.options.retries:
            raise RetriesExhausted(
                self.url,
                f"{cause} (gave up after {self._failures} retries over {time.monotonic() - self._first_failure:.1f} s)",
            )
        wait = self.options.wait(self._failures) * self._rng.uniform(0.5, 1.0)
        self._failures += 1
        self.counters["remote_retry"] += 1
        log.warning(
            "%s at byte %d: %s; retry %d of %d in %.1f s",
            self.url,
            self.position,
            cause,
            self._failures,
            self.options.retries,
            wait,
        )
        time.sleep(wait)

    def close(self) -> None:
        self._drop()
        super().close()


def read_bytes(url: str, options: RemoteOptions, counters: Optional[Counter] = None) -> bytes:
    """A whole (small) remote object, e.g. ``shards.json``, with the same retries."""
    with RemoteReader(url, options, counters=counters) as reader:
        return reader.read()


def upload_folder(folder: str, url: str, options: Optional[RemoteOptions] = None) -> list[str]:
    """Every file of a written shard folder to ``s3://bucket/prefix/``: the tars first and
    ``shards.json`` last, so that a reader never finds an index whose shards are not all there.
    boto3's managed transfer (multipart for large files, its own retries). Returns the keys."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    if not url.startswith("s3://"):
        raise ValueError(f"--upload takes s3://BUCKET/PREFIX, got {url!r} (for HTTP, copy the folder to the server)")
    check_location(url)
    options = options or RemoteOptions()
    bucket, prefix = _split_s3(url.rstrip("/"))
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", endpoint_url=options.s3_endpoint or None, config=Config(retries={"max_attempts": 8, "mode": "standard"})
    )
    files = sorted((p for p in Path(folder).iterdir() if p.is_file()), key=lambda p: (p.name == "shards.json", p.name))
    keys = []
    for path in files:
        key = f"{prefix}/{path.name}" if prefix else path.name
        try:
            client.upload_file(str(path), bucket, key, Config=TransferConfig(multipart_threshold=64 * 2**20))
        except (BotoCoreError, ClientError) as err:
            raise RemoteError(f"s3://{bucket}/{key}", f"upload failed: {err}") from None
        keys.append(key)
        log.info("uploaded %s to s3://%s/%s", path.name, bucket, key)
    return keys


# -- the node-local cache ----------------------------------------------------------------------------


class ShardCache:
    """Whole shards on a node-local disk, bounded by ``max_bytes`` with least-recently-used eviction.

    A cached shard is ``ROOT/<hash of its URL>-<file name>``; its last use is its mtime (touched on
    every hit). Fetches write ``ROOT/.tmp/<name>.<pid>`` and rename it into place while holding
    ``ROOT/.locks/<name>`` (``flock``), so of several processes of one node that want a shard, one
    fetches it and the others wait and then read that copy. Eviction and insertion hold
    ``ROOT/.locks/.evict``: the completed files never exceed ``max_bytes``. A process reading a shard
    holds it open, so evicting it meanwhile is harmless (POSIX keeps the data until it is closed).
    """

    def __init__(self, root: str, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(root), int(max_bytes)
        (self.root / ".tmp").mkdir(parents=True, exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)

    def path_for(self, url: str) -> Path:
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
        return self.root / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{name}"

    def _lock(self, name: str):
        handle = open(self.root / ".locks" / name, "a+b")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def _hit(self, target: Path, counters: Counter) -> Optional[BinaryIO]:
        try:
            handle = open(target, "rb")
        except FileNotFoundError:
            return None
        try:
            os.utime(handle.fileno())  # the last use, for LRU
        except OSError:
            pass
        counters["cache_hit"] += 1
        return handle

    def open(self, url: str, options: RemoteOptions, counters: Counter, size: Optional[int] = None) -> BinaryIO:
        """The shard at ``url`` as an open local file: from the cache, or fetched into it (once per
        node). A shard larger than the whole cache (``size`` when known, else once fetched) is not
        kept: streamed, or read from its deleted temporary file (``cache_bypass``)."""
        target = self.path_for(url)
        handle = self._hit(target, counters)
        if handle is not None:
            return handle
        if size is not None and size > self.max_bytes:
            counters["cache_bypass"] += 1
            return RemoteReader(url, options, counters=counters)
        lock = self._lock(target.name)
        try:
            handle = self._hit(target, counters)  # fetched by another process while this one waited
            if handle is not None:
                return handle
            temporary = self.root / ".tmp" / f"{target.name}.{os.getpid()}"
            try:
                with RemoteReader(url, options, counters=counters) as reader, open(temporary, "wb") as out:
                    for chunk in iter(lambda: reader.read(_CHUNK), b""):
                        out.write(chunk)
                handle = open(temporary, "rb")
                fetched = os.fstat(handle.fileno()).st_size
                if fetched > self.max_bytes:
                    counters["cache_bypass"] += 1
                    return handle  # read from the unlinked temporary file (finally below)
                self._insert(temporary, target, fetched)
                counters["cache_fetch"] += 1
                return handle
            finally:
                temporary.unlink(missing_ok=True)
        finally:
            lock.close()  # releases the flock

    def _insert(self, temporary: Path, target: Path, size: int) -> None:
        """Evict least recently used shards until ``size`` more bytes fit, then rename ``temporary``
        to ``target``, all under the eviction lock (two inserts cannot both count the same room)."""
        lock = self._lock(".evict")
        try:
            files = []
            for path in self.root.iterdir():
                if path.is_file() and path != target:
                    try:
                        stat = path.stat()
                    except FileNotFoundError:
                        continue
                    files.append((stat.st_mtime_ns, stat.st_size, path))
            used = sum(f[1] for f in files)
            for _, file_size, path in sorted(files):
                if used + size <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                used -= file_size
                log.info("cache %s: evicted %s (least recently used)", self.root, path.name)
            os.replace(temporary, target)
        finally:
            lock.close()

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())
