"""data.shards.read_indexed: a local shard read at the byte offsets its index recorded equals the
tarfile reader sample for sample, and a shard that is truncated or no longer matches its index is
refused by name (after the samples before the damage)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from webdataset import TarWriter

from data import write_shards
from data.shards import ShardIndex, ShardReadError, read_indexed, read_samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reader")
    assert (
        write_shards.main(["synthetic", str(out), "--train", "25", "--val", "3", "--shard-size", "10", "--no-progress"]) == 0
    )
    return out


def _ranges(split, shard: int, offsets):
    base, count = int(split.starts[shard]), int(split.counts[shard])
    starts = [int(split.byte_starts[base + o]) for o in offsets]
    ends = [int(split.byte_starts[base + o + 1]) if o + 1 < count else None for o in offsets]
    return starts, ends


def test_indexed_reads_equal_tarfile_reads(shards):
    split = ShardIndex.load(str(shards)).split("train")
    assert split.byte_starts is not None, "the writers record every sample's byte offset"
    rng = np.random.default_rng(0)
    for shard, (url, count) in enumerate(zip(split.urls, split.counts)):
        for offsets in (list(range(count)), sorted(rng.choice(count, size=3, replace=False).tolist()), [count - 1]):
            expected = list(read_samples(url, offsets))
            assert list(read_indexed(url, offsets, *_ranges(split, shard, offsets))) == expected
            assert list(split.read(shard, offsets)) == expected, "SplitIndex.read takes the indexed path"
            assert [o for o, _ in expected] == offsets and all("cls" in s and "png" in s for _, s in expected)


def test_pax_headers_go_through_tarfile(tmp_path):
    # a key past tar's 100-character name field: tarfile writes a pax extended header before the member
    keys = ["short_0", "long/" + "k" * 120, "short_2"]
    path = tmp_path / "pax.tar"
    with TarWriter(str(path), encoder=False) as writer:
        for n, key in enumerate(keys):
            writer.write({"__key__": key, "cls": str(n).encode(), "txt": b"x" * (700 + n)})
    offsets, size = write_shards.sample_offsets(str(path))
    ends = [*offsets[1:], None]
    got = list(read_indexed(str(path), [0, 1, 2], offsets, ends))
    assert got == list(read_samples(str(path), [0, 1, 2]))
    assert [s["__key__"] for _, s in got] == keys and got[1][1]["txt"] == b"x" * 701


def test_truncated_shard_gives_what_precedes_then_refuses(shards, tmp_path):
    split = ShardIndex.load(str(shards)).split("train")
    copy = tmp_path / "cut.tar"
    shutil.copy(split.urls[0], copy)
    cut = int(split.byte_starts[5]) + 700  # inside sample 5
    with open(copy, "r+b") as f:
        f.truncate(cut)
    offsets = [1, 4, 5, 7]
    reader = read_indexed(str(copy), offsets, *_ranges(split, 0, offsets))
    assert [o for o, _ in (next(reader), next(reader))] == [1, 4]
    with pytest.raises(ShardReadError, match=r"cut\.tar: truncated in sample 5"):
        next(reader)
    last = [int(split.counts[0]) - 1]  # read to the end of the file: the cut is inside a member
    with pytest.raises(ShardReadError, match="truncated"):
        list(read_indexed(str(copy), last, *_ranges(split, 0, last)))


def test_shard_rewritten_after_its_index_is_refused(shards, tmp_path):
    split = ShardIndex.load(str(shards)).split("train")
    other = tmp_path / "other.tar"
    with TarWriter(str(other), encoder=False) as writer:  # same sample count, other sizes: offsets fall elsewhere
        for n in range(int(split.counts[0])):
            writer.write({"__key__": f"s{n}", "cls": b"1", "txt": b"y" * (300 + 37 * n)})
    offsets = [3]
    with pytest.raises(ShardReadError, match="rewritten after its index"):
        list(read_indexed(str(other), offsets, *_ranges(split, 0, offsets)))
    with pytest.raises(ShardReadError, match="cannot open"):
        list(read_indexed(str(tmp_path / "missing.tar"), offsets, *_ranges(split, 0, offsets)))
