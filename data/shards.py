"""WebDataset shards on disk: the ``shards.json`` index, safe sample keys, and reading samples by position.

A shard directory holds ``{split}-{n:06d}.tar`` files in the WebDataset layout (members
``KEY.EXT``, the members of one sample contiguous), ``classes.json`` and ``shards.json``::

    {"format": "toe-shards/1",
     "splits": {"train": {"shards": [{"name": "train-000000.tar", "samples": 1000}, ...], "total": 9000}},
     "classes": "classes.json", "shuffled": true, "shuffle_seed": 0}

``shuffled`` says whether the writer put the samples in a seeded random order across all shards
(``shuffle_seed``) or in folder order; an index without it was written before writers recorded it,
when they always wrote folder order (``ShardIndex.shuffled`` is then None, treated as folder order).

Readers learn the epoch length and every sample's global position from the index without
scanning a tar. ``read_samples`` reads the samples at given positions of one shard: members of
samples not asked for are skipped without being read (seek) when the shard is a local file, and
read but never decoded when it is a stream (``pipe:``, ``http``; opened through webdataset's
``gopen``). A local shard whose index records each sample's byte offset (every writer here since
issue 26) is read by ``read_indexed`` instead: one seek and one read per wanted sample.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from .remote import RemoteError, RemoteNotFound, RemoteOptions, RemoteReader, RetriesExhausted, is_remote, join, read_bytes

__all__ = [
    "INDEX_NAME",
    "ShardIndex",
    "ShardIndexError",
    "SplitIndex",
    "check_key",
    "check_num_classes",
    "read_samples",
    "ShardReadError",
    "ShardLostError",
    "StaleOffsetsError",
]

INDEX_NAME = "shards.json"
FORMAT = "toe-shards/1"
log = logging.getLogger(__name__)

_KEY_PART = re.compile(r"^[A-Za-z0-9_\-]+$")
_ORDER_WARNED: set = set()  # (index root, split) already warned about in this process
_STALE_WARNED: set = set()  # first shard URL of each split already warned about stale offsets in this process


def check_key(key: str) -> str:
    """A sample key that stays inside the tar when extracted and that WebDataset splits correctly.

    Allowed: ``/``-separated parts of letters, digits, ``_`` and ``-``. Refused: empty parts,
    ``..`` / absolute paths (they escape the extraction directory), dots (WebDataset splits a
    member name at the first dot of its base name), anything else.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"sample key {key!r} is an absolute path or holds \\ or NUL: it would escape the tar")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"sample key {key!r} has an empty, '.' or '..' part: it would escape the tar")
    bad = [part for part in parts if not _KEY_PART.match(part)]
    if bad:
        raise ValueError(f"sample key {key!r}: part {bad[0]!r} may only hold letters, digits, '_' and '-'")
    return key


@dataclass(frozen=True)
class SplitIndex:
    """The shards of one split and where each shard's samples sit in the split's global order."""

    urls: tuple[str, ...]
    counts: np.ndarray  # samples per shard
    starts: np.ndarray  # global position of each shard's first sample
    byte_starts: Optional[np.ndarray] = None  # per global position: byte offset of the sample in its tar
    sizes: Optional[np.ndarray] = None  # per shard: its size in bytes when the index was written (with byte_starts)
    remote: Optional[RemoteOptions] = None  # how remote shards are read (None: webdataset's gopen)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def max_lost_share(self) -> float:
        return self.remote.max_lost_share if self.remote is not None else 0.0

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (shard index, offset inside the shard)."""
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        return shard, positions - self.starts[shard]

    def read(
        self, shard: int, offsets: Sequence[int], counters: Optional[Counter] = None
    ) -> Iterator[tuple[int, dict[str, bytes]]]:
        """``read_samples`` of shard ``shard``: remote shards through ``data.remote`` (retries, ranged
        reads from the offsets recorded at write time, the node cache); ``counters`` gets its counts."""
        url = self.urls[shard]
        path = local_path(url)
        if path is not None and self.byte_starts is not None and len(offsets):
            return self._read_indexed(shard, path, offsets)
        if self.remote is None or not is_remote(url) or not len(offsets):
            return read_samples(url, offsets)
        return read_samples(url, offsets, opener=lambda: self._open_remote(shard, offsets, counters))

    def _read_indexed(self, shard: int, path: str, offsets: Sequence[int]) -> Iterator[tuple[int, dict[str, bytes]]]:
        """``read_indexed`` at the recorded offsets. A shard whose size or bytes are not what the index
        recorded (an index older than its shard: shards labelled by ``launcher.label`` before it recorded
        the grown samples' offsets, a shard rewritten or cut) is read through ``tarfile`` from its start
        instead, as with an index without offsets: the same samples, or the same ``ShardReadError`` after
        what is readable. One warning per split and process."""
        base, count = int(self.starts[shard]), int(self.counts[shard])
        starts = [int(self.byte_starts[base + o]) for o in offsets]  # type: ignore[index]
        ends = [int(self.byte_starts[base + o + 1]) if o + 1 < count else None for o in offsets]  # type: ignore[index]
        size = int(self.sizes[shard]) if self.sizes is not None else None
        given = 0
        try:
            for item in read_indexed(path, offsets, starts, ends, size):
                yield item
                given += 1
        except StaleOffsetsError as err:
            if self.urls[0] not in _STALE_WARNED:
                _STALE_WARNED.add(self.urls[0])
                log.warning(
                    "%s; reading such shards of this split through tarfile from their start (same samples, more "
                    "CPU per sample). Writing the index again (data.write_shards, launcher.label) records the offsets",
                    err,
                )
            yield from read_samples(self.urls[shard], offsets[given:])

    def _open_remote(self, shard: int, offsets: Sequence[int], counters: Optional[Counter]):
        """``(file object, samples before its first byte, seekable)`` for a remote shard."""
        counters = counters if counters is not None else Counter()
        url, options = self.urls[shard], self.remote
        if options.cache_dir:
            from .remote import ShardCache

            handle = ShardCache(options.cache_dir, options.cache_bytes).open(url, options, counters)
            return handle, 0, not isinstance(handle, RemoteReader)
        first, last, start, end = int(offsets[0]), int(offsets[-1]), 0, None
        if self.byte_starts is not None:  # a ranged read: from the first wanted sample to the end of the last
            base = int(self.starts[shard])
            start = int(self.byte_starts[base + first])
            if last + 1 < int(self.counts[shard]):
                end = int(self.byte_starts[base + last + 1])
        else:
            first = 0
        return RemoteReader(url, options, start=start, end=end, counters=counters), first, False


class ShardIndexError(ValueError):
    """A ``shards.json`` that cannot be used; the message names the file (and the line, for JSON errors)."""


class ShardIndex:
    """``shards.json`` of a shard directory (or of any URL prefix the shards are served from)."""

    def __init__(self, root: str, meta: dict, base: Optional[str] = None, remote: Optional[RemoteOptions] = None) -> None:
        self.root = root
        self.meta = meta
        self.base = (base or root).rstrip("/")
        self.remote = remote if remote is not None or not is_remote(self.base) else RemoteOptions()

    @classmethod
    def load(cls, path: str, base: Optional[str] = None, remote: Optional[RemoteOptions] = None) -> "ShardIndex":
        """``path``: a shard directory or its ``shards.json``, local or remote (``s3://bucket/prefix``,
        ``http(s)://host/prefix``, ``pipe:CMD``: the index is read from the same place, through
        ``data.remote`` with ``remote``'s retries); ``base``: where the tars are served from if not
        beside the index (a URL prefix such as ``pipe:curl -s https://host/shards``).

        A remote index that cannot be read is a ``ShardIndexError`` that names the URL and the
        cause (missing object or bucket, refused credentials, unreachable endpoint)."""
        if is_remote(path):
            remote = remote or RemoteOptions()
            root = path.rstrip("/")
            if root.endswith("/" + INDEX_NAME):
                root = root[: -len(INDEX_NAME) - 1]
            index_url = join(root, INDEX_NAME)
            try:
                text = read_bytes(index_url, remote).decode()
            except RemoteError as err:
                missing = isinstance(err, RemoteNotFound) and "NoSuchBucket" not in err.cause
                what = "no shard index at" if missing else "cannot read the shard index"
                raise ShardIndexError(f"{what} {index_url}: {err.cause}") from None
            return cls(root, cls._parse(text, index_url), base, remote)
        index_path = Path(path)
        if index_path.is_dir():
            index_path = index_path / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"no shard index at {index_path} (write shards with `python -m data.write_shards`)")
        return cls(str(index_path.parent), cls._parse(index_path.read_text(), str(index_path)), base, remote)

    @staticmethod
    def _parse(text: str, index_path: str) -> dict:
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as err:
            raise ShardIndexError(
                f"{index_path} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            meta = meta if isinstance(meta, dict) else {}
            raise ShardIndexError(f"{index_path}: format {meta.get('format')!r} is not {FORMAT!r}")
        for name, split in meta.get("splits", {}).items():
            counts = [s.get("samples") for s in split.get("shards", [])]
            if not counts or any(not isinstance(c, int) or c < 0 for c in counts) or sum(counts) != split.get("total"):
                raise ShardIndexError(f"{index_path}: split {name!r} has bad shard sample counts or total")
            for shard in split["shards"]:
                offsets, size = shard.get("offsets"), shard.get("bytes")
                if offsets is None:
                    continue
                if (
                    not isinstance(offsets, list)
                    or len(offsets) != shard["samples"]
                    or not isinstance(size, int)
                    or any(not isinstance(o, int) for o in offsets)
                    or any(b <= a for a, b in zip(offsets, offsets[1:]))
                    or (offsets and not 0 <= offsets[0] <= offsets[-1] < size)
                ):
                    raise ShardIndexError(
                        f"{index_path}: shard {shard.get('name')!r} of split {name!r} has bad "
                        f"byte offsets (one ascending offset per sample, below 'bytes')"
                    )
        if not isinstance(meta.get("shuffled", False), bool):
            raise ShardIndexError(f"{index_path}: 'shuffled' must be true or false, got {meta['shuffled']!r}")
        return meta

    @property
    def splits(self) -> list[str]:
        return sorted(self.meta["splits"])

    def split(self, name: str) -> SplitIndex:
        if name not in self.meta["splits"]:
            raise ValueError(f"split {name!r} is not in {self.root}/{INDEX_NAME}; it has {self.splits}")
        shards = self.meta["splits"][name]["shards"]
        counts = np.asarray([s["samples"] for s in shards], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        byte_starts = sizes = None  # recorded by the writers since issue 26; ranged reads need every shard's
        if all("offsets" in s for s in shards):
            byte_starts = np.concatenate([np.asarray(s["offsets"], np.int64) for s in shards])
            sizes = np.asarray([s["bytes"] for s in shards], np.int64)
        urls = tuple(f"{self.base}/{s['name']}" for s in shards)
        return SplitIndex(urls, counts, starts, byte_starts=byte_starts, sizes=sizes, remote=self.remote)

    @property
    def shuffled(self) -> Optional[bool]:
        """True: written in a seeded random order across shards; False: folder order (``--no-shuffle``);
        None: not recorded (an index from before the writers shuffled, so folder order)."""
        return self.meta.get("shuffled")

    def order_warning(self, split: str, *, buffer_size: int, readers: int) -> Optional[str]:
        """Why ``split`` read by ``readers`` slots (ranks x DataLoader workers) through a shuffle buffer
        of ``buffer_size`` may give batches far from i.i.d., or None.

        The stream shuffles the shard order and then, inside each reader's contiguous run of
        ``total / readers`` samples, a buffer: a batch comes from about ``buffer_size + batch``
        neighbouring samples. Written in folder order (class after class), those are a few
        classes. No warning when the writer shuffled, when the buffer covers a reader's whole run
        (raising it would not help), or for the embedded synthetic data, whose class is drawn per
        sample from ``(seed, index)`` and so is random in index order too.
        """
        if self.shuffled or "synthetic" in self.meta:
            return None
        run = self.split(split).total // max(1, readers)
        if buffer_size >= run:
            return None
        how = (
            "says it was written unshuffled (--no-shuffle)"
            if self.shuffled is False
            else "does not record its write order (written before the writers shuffled, so in folder order)"
        )
        return (
            f"{self.root}/{INDEX_NAME} {how}: the stream shuffles only the shard order and a "
            f"{buffer_size}-sample buffer in each reader's run of {run} samples, so if the folders "
            f"are class-sorted a batch holds only a few classes. Rewrite the shards with "
            f"`python -m data.write_shards` (shuffled by default), or raise the shuffle buffer "
            f"(data.buffer_size, raw samples held in memory per reader) to {run}."
        )

    def warn_if_unshuffled(self, split: str, *, buffer_size: int, readers: int, rank: int = 0) -> Optional[str]:
        """Log ``order_warning`` once per process and index split, on rank 0 only; returns it."""
        message = self.order_warning(split, buffer_size=buffer_size, readers=readers)
        key = (self.root if is_remote(self.root) else str(Path(self.root).resolve()), split)
        if message and rank == 0 and key not in _ORDER_WARNED:
            _ORDER_WARNED.add(key)
            log.warning("%s", message)
        return message

    def classes(self) -> list[str]:
        """The class names of ``classes.json`` (label ``i`` is ``names[i]``); [] when the folder has none."""
        where = self.classes_location
        if is_remote(self.root):
            try:
                text = read_bytes(where, self.remote).decode()
            except RemoteError as err:
                if isinstance(err, RemoteNotFound):
                    return []
                raise ShardIndexError(f"cannot read {where}: {err.cause}") from None
        else:
            if not Path(where).is_file():
                return []
            text = Path(where).read_text()
        try:
            names = json.loads(text)["names"]
        except json.JSONDecodeError as err:
            raise ShardIndexError(f"{where} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}") from None
        except (KeyError, TypeError):
            raise ShardIndexError(f'{where} does not hold {{"names": [...]}}') from None
        if not isinstance(names, list):
            raise ShardIndexError(f"{where}: 'names' must be a list of class names")
        return names

    @property
    def classes_location(self) -> str:
        name = self.meta.get("classes", "classes.json")
        return join(self.root, name) if is_remote(self.root) else str(Path(self.root) / name)


def check_num_classes(
    path: str,
    num_classes: int,
    *,
    key: str = "model.num_classes",
    base: Optional[str] = None,
    remote: Optional[RemoteOptions] = None,
) -> int:
    """Refuse (``ShardIndexError``, a start-up refusal) a model with fewer outputs than the shard folder's
    ``classes.json`` has classes: the stream passes every label below the number of classes, so the first
    label >= ``num_classes`` would otherwise fail deep in the loss (``IndexError: Target 17 is out of
    bounds``). More outputs than classes are allowed (a head kept from another data set). Returns the
    number of classes (0 when the folder has no ``classes.json``: nothing to check against)."""
    index = ShardIndex.load(path, base, remote)
    count = len(index.classes())
    if count and num_classes < count:
        raise ShardIndexError(
            f"{key}={num_classes}, but {index.classes_location} lists {count} classes (labels "
            f"0..{count - 1}): set {key} to {count} or more, or point the data path at other shards"
        )
    return count


class ShardReadError(RuntimeError):
    """A shard could not be read to the end (missing, truncated, not a tar)."""


class StaleOffsetsError(ShardReadError):
    """The bytes at a sample's recorded offset are not that sample's members: the index is older than the shard."""


class ShardLostError(ShardReadError):
    """A remote shard whose reads kept failing (network, server) through every retry: lost to an
    outage rather than bad data; the stream stops the job when too many are (``data.max_lost_share``)."""


def read_samples(
    url: str, offsets: Sequence[int], opener: Optional[Callable[[], tuple[BinaryIO, int, bool]]] = None
) -> Iterator[tuple[int, dict[str, bytes]]]:
    """Yield ``(offset, {ext: bytes, "__key__": key})`` for the samples at ``offsets`` (ascending) of a shard.

    ``opener``: returns ``(file object, samples before its first byte, seekable)`` (a remote shard
    read from a recorded byte offset, ``SplitIndex.read``); by default a local path is opened and
    seeked, anything else streamed through webdataset's ``gopen``. Raises ``ShardReadError``
    (after yielding what was readable) if the shard is missing, truncated or not a tar, and
    ``ShardLostError`` if a remote read failed through all its retries.
    """
    wanted = iter(offsets)
    target = next(wanted, None)
    if target is None:
        return
    skipped = 0
    path = local_path(url)
    local = path is not None
    try:
        if opener is not None:
            stream, skipped, local = opener()
        else:
            stream = open(path, "rb") if path is not None else gopen(url, "rb")
    except RetriesExhausted as err:
        raise ShardLostError(f"{url}: {err.cause}") from err
    except OSError as err:
        raise ShardReadError(f"{url}: cannot open: {getattr(err, 'cause', err)}") from err
    offset, key, sample = skipped - 1, None, None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r:" if local else "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = base_plus_ext(member.name)
                if member_key is None:
                    continue
                if member_key != key:
                    if sample is not None:
                        yield offset, sample
                        target = next(wanted, None)
                        if target is None:
                            return
                    offset, key = offset + 1, member_key
                    sample = {"__key__": key} if offset == target else None
                if sample is not None:
                    sample[ext] = tar.extractfile(member).read()
            if sample is not None:
                yield offset, sample
                target = next(wanted, None)
    except RetriesExhausted as err:
        raise ShardLostError(f"{url}: lost after sample {offset}: {err.cause}") from err
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardReadError(f"{url}: unreadable after sample {offset}: {getattr(err, 'cause', err)}") from err
    if target is not None:
        raise ShardReadError(f"{url}: holds {offset + 1} samples, sample {target} was asked for")


def local_path(url: str) -> Optional[str]:
    """The file path of a local shard URL (a plain path or ``file:``), None for anything else."""
    if url.startswith("file:"):
        return url[len("file:") :]
    return None if re.match(r"^[a-z0-9]+:", url) else url


# member types whose meaning spans headers (pax extended headers, GNU long names, sparse files): a sample
# holding one is parsed by tarfile's own reader instead of header by header
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)
_MULTI_HEADER = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.GNUTYPE_SPARSE,
)


def read_indexed(
    path: str, offsets: Sequence[int], starts: Sequence[int], ends: Sequence[Optional[int]], size: Optional[int] = None
) -> Iterator[tuple[int, dict[str, bytes]]]:
    """``read_samples`` of a local shard whose index recorded each sample's byte offset at write time:
    one seek and one read per wanted sample (``starts[i]`` to ``ends[i]``, None: to the end of the
    file), its member headers parsed from those bytes with tarfile's own ``TarInfo.frombuf``, and no
    header of an unwanted sample read at all (``tarfile`` walks every header up to the last wanted
    sample and builds a member and a file object per member; ``bench/data_throughput.py`` prints both
    readers' CPU per sample). A sample with a pax / GNU long-name header goes through ``tarfile`` on
    its bytes. Raises ``ShardReadError`` (after yielding what was readable) when the file is missing
    or truncated; ``StaleOffsetsError`` (a ``ShardReadError``) when its size is not ``size`` (the size the
    index recorded; None: unchecked) or its bytes are not the samples the index says (an index older than
    the shard; ``SplitIndex.read`` then reads it through ``tarfile``)."""
    try:
        stream = open(path, "rb")
    except OSError as err:
        raise ShardReadError(f"{path}: cannot open: {err}") from err
    with stream:
        actual = os.fstat(stream.fileno()).st_size
        if size is not None and actual != size:
            raise StaleOffsetsError(f"{path} holds {actual} bytes, its index recorded {size}")
        for offset, start, end in zip(offsets, starts, ends):
            try:
                stream.seek(start)
                data = stream.read(-1 if end is None else end - start)
            except OSError as err:
                raise ShardReadError(f"{path}: unreadable at sample {offset}: {err}") from err
            if end is not None and len(data) < end - start:
                raise ShardReadError(f"{path}: truncated in sample {offset} (byte {start + len(data)} of {end})")
            yield offset, _sample_from_bytes(data, f"{path}: sample {offset} at byte {start}", end is None)


def _sample_from_bytes(data: bytes, where: str, to_end: bool) -> dict[str, bytes]:
    """One sample's ``{ext: bytes, "__key__": key}`` from the bytes of its members, headers included:
    exactly whole members, or (``to_end``: a shard's last sample) members up to the end-of-archive block."""
    members: list[tuple[str, bytes]] = []
    position, closed = 0, False
    try:
        while position + tarfile.BLOCKSIZE <= len(data):
            header = data[position : position + tarfile.BLOCKSIZE]
            if header == _ZERO_BLOCK:  # the end-of-archive blocks after a shard's last sample
                closed = True
                break
            info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
            if info.type in _MULTI_HEADER:
                members, closed = _members_by_tarfile(data), True
                break
            body = position + tarfile.BLOCKSIZE
            if body + info.size > len(data):  # past the end of the file, or (stale) past the next sample's start
                if to_end:
                    raise ShardReadError(f"{where}: truncated in member {info.name!r}")
                raise StaleOffsetsError(f"{where}: member {info.name!r} runs past the sample's recorded end")
            if info.isfile():
                members.append((info.name, data[body : body + info.size]))
            position = body + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    except tarfile.TarError as err:
        raise StaleOffsetsError(
            f"{where}: not a tar member header there ({err}): the index is older than the shard"
        ) from err
    if to_end and not closed:
        raise ShardReadError(f"{where}: truncated (the shard ends without its end-of-archive block)")
    if not to_end and not closed and position != len(data):
        raise StaleOffsetsError(
            f"{where}: the recorded bytes do not end at a member boundary: the index is older than the shard"
        )
    sample: dict[str, bytes] = {}
    for name, payload in members:
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        if sample.setdefault("__key__", key) != key:
            raise StaleOffsetsError(
                f"{where}: holds members of samples {sample['__key__']!r} and {key!r}: the index is older than the shard"
            )
        sample[ext] = payload
    if not sample:
        raise StaleOffsetsError(f"{where}: no sample member there: the index is older than the shard")
    return sample


def _members_by_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    import io

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]
