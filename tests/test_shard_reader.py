"""data.shards.read_indexed: a local shard read at the byte offsets its index recorded equals the
tarfile reader sample for sample; a truncated shard gives what precedes the damage and is refused by
name; a shard newer than its index (other size, other bytes at the offsets) is read through tarfile
with one warning, the same samples."""

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from webdataset import TarWriter

from data import write_shards
from data.shards import ShardIndex, ShardReadError, StaleOffsetsError, read_indexed, read_samples


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
    with pytest.raises(StaleOffsetsError, match=f"holds {cut} bytes, its index recorded {int(split.sizes[0])}"):
        list(read_indexed(str(copy), offsets, *_ranges(split, 0, offsets), size=int(split.sizes[0])))


def test_a_stale_index_reads_the_same_samples_through_tarfile(shards, tmp_path, caplog):
    # what launcher.label did before it recorded the grown samples' offsets: every sample gains a member,
    # shards.json keeps the old offsets and sizes
    stale = tmp_path / "stale"
    shutil.copytree(shards, stale)
    index = (stale / "shards.json").read_text()
    split = ShardIndex.load(str(stale)).split("train")
    for url in split.urls:
        with tarfile.open(url) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        with TarWriter(url, encoder=False) as writer:
            keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))
            for key in keys:
                sample = {m.name.split(".", 1)[1]: data for m, data in members if m.name.split(".", 1)[0] == key}
                writer.write({"__key__": key, **sample, "extra.npy": b"m" * 1500})
    assert (stale / "shards.json").read_text() == index
    offsets = [0, 3, 9]
    expected = list(read_samples(split.urls[0], offsets))
    assert all("extra.npy" in s for _, s in expected)
    with pytest.raises(StaleOffsetsError, match="index recorded"):  # the size gives it away before any read
        list(read_indexed(split.urls[0], offsets, *_ranges(split, 0, offsets), size=int(split.sizes[0])))
    with pytest.raises(StaleOffsetsError, match="the index is older than the shard|runs past"):
        list(read_indexed(split.urls[0], offsets, *_ranges(split, 0, offsets)))  # unchecked size: the bytes do
    with caplog.at_level("WARNING"):
        assert list(split.read(0, offsets)) == expected
        assert list(split.read(1, [2])) == list(read_samples(split.urls[1], [2]))
    assert len([r for r in caplog.records if "through tarfile" in r.getMessage()]) == 1, "one warning per split"


def test_shard_rewritten_after_its_index_is_refused(shards, tmp_path):
    split = ShardIndex.load(str(shards)).split("train")
    other = tmp_path / "other.tar"
    with TarWriter(str(other), encoder=False) as writer:  # same sample count, other sizes: offsets fall elsewhere
        for n in range(int(split.counts[0])):
            writer.write({"__key__": f"s{n}", "cls": b"1", "txt": b"y" * (300 + 37 * n)})
    offsets = [3]
    with pytest.raises(StaleOffsetsError, match="the index is older than the shard|runs past"):
        list(read_indexed(str(other), offsets, *_ranges(split, 0, offsets)))
    with pytest.raises(ShardReadError, match="cannot open"):
        list(read_indexed(str(tmp_path / "missing.tar"), offsets, *_ranges(split, 0, offsets)))
