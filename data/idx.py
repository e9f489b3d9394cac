"""The IDX format of MNIST and Fashion-MNIST (``train-images-idx3-ubyte.gz`` ...), read with numpy.

An IDX file is a 4-byte magic (two zero bytes, the element type, the number of dimensions), one
big-endian uint32 per dimension, then the elements in row-major order (big-endian). Files may be
gzipped. Only what these data sets use is accepted: uint8 images ``[N, H, W]`` and labels ``[N]``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

__all__ = ["IdxError", "read_idx", "read_idx_pair"]

_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxError(ValueError):
    """A file that is not a (complete) IDX file; the message names it."""


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise IdxError(f"{path}: cannot read: {err}") from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _TYPES or raw[3] == 0:
        raise IdxError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_TYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise IdxError(f"{path}: {len(raw)} bytes, but its header {shape} of {dtype} needs {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def read_idx_pair(images: str | Path, labels: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, H, W]`` and int64 labels ``[N]`` of one split, checked against each other."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise IdxError(f"{images}: expected uint8 images [N, H, W], got {x.dtype} {list(x.shape)}")
    if y.ndim != 1 or y.dtype != np.uint8:
        raise IdxError(f"{labels}: expected uint8 labels [N], got {y.dtype} {list(y.shape)}")
    if len(x) != len(y):
        raise IdxError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    return x, y.astype(np.int64)
