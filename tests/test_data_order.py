"""Write order: writers shuffle samples across shards (seeded, recorded), so class-sorted folders
still give i.i.d.-like batches; the stream warns about indexes written in folder order."""

import json
import logging
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import write_shards
from data.shards import ShardIndex, read_samples
from data.stream import build_train_stream

CLASSES, PER_CLASS, BATCH, RANKS, BUFFER = 100, 40, 64, 2, 100


def image_tree(root: Path, classes: int, per_class: int, size: int = 8) -> Path:
    """``root/cNNN/iNNN.png``: a class-sorted ImageNet-style tree of tiny random images."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:03d}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"c{c:03d}" / f"i{i:03d}.png")
    return root


def write(src: Path, out: Path, *extra: str, shard_size: int = 100) -> ShardIndex:
    assert (
        write_shards.main(["imagefolder", str(src), str(out), "--shard-size", str(shard_size), "--no-progress", *extra]) == 0
    )
    return ShardIndex.load(str(out))


def split_keys(out: Path, split: str = "train") -> list[str]:
    index = ShardIndex.load(str(out)).split(split)
    return [
        sample["__key__"]
        for url, count in zip(index.urls, index.counts)
        for _, sample in read_samples(url, list(range(count)))
    ]


def label_only(image):  # the order is under test, not the pixels: skip timm's transform
    return torch.zeros(1)


def mean_distinct_classes(out: Path, buffer: int) -> float:
    """Mean distinct labels per local batch over one epoch of both ranks' streams."""
    streams = [
        build_train_stream(
            str(out),
            batch_size=BATCH,
            rank=r,
            world_size=RANKS,
            num_workers=0,
            seed=0,
            transform=label_only,
            buffer_size=buffer,
        )
        for r in range(RANKS)
    ]
    counts = [len(set(batch["label"].tolist())) for stream in streams for batch in stream]
    assert len(counts) == RANKS * (CLASSES * PER_CLASS // RANKS // BATCH)
    return float(np.mean(counts))


def uniform_expectation(classes: int, per_class: int, batch: int) -> float:
    """E[distinct classes] in ``batch`` samples drawn without replacement from ``classes x per_class``:
    each class is absent with probability C(N - n, b) / C(N, b)."""
    total = classes * per_class
    return classes * (1 - comb(total - per_class, batch) / comb(total, batch))


@pytest.fixture(scope="module")
def sorted_tree(tmp_path_factory) -> Path:
    return image_tree(tmp_path_factory.mktemp("sorted") / "src", CLASSES, PER_CLASS)


@pytest.mark.slow
def test_class_sorted_folders_give_batches_like_a_random_permutation(sorted_tree, tmp_path, caplog):
    expected = uniform_expectation(CLASSES, PER_CLASS, BATCH)
    assert 40 < expected < 55  # ~47.3 for 100 x 40 images, batch 64
    shuffled = write(sorted_tree, tmp_path / "shuffled")
    assert shuffled.shuffled is True and shuffled.meta["shuffle_seed"] == 0
    folder = write(sorted_tree, tmp_path / "folder", "--no-shuffle")
    assert folder.shuffled is False and folder.meta["shuffle_seed"] is None
    with caplog.at_level(logging.WARNING, logger="data.shards"):
        got = mean_distinct_classes(tmp_path / "shuffled", BUFFER)
        assert "unshuffled" not in caplog.text
        unshuffled = mean_distinct_classes(tmp_path / "folder", BUFFER)
    print(
        f"distinct classes per local batch of {BATCH}: uniform permutation {expected:.2f}, "
        f"shuffled shards {got:.2f}, --no-shuffle with a {BUFFER}-sample buffer {unshuffled:.2f}"
    )
    assert abs(got - expected) <= 0.1 * expected
    assert abs(unshuffled - expected) > 0.1 * expected, "folder order through a small buffer: few classes a batch"
    warnings = [r for r in caplog.records if "unshuffled" in r.getMessage()]
    assert len(warnings) == 1, "warned once (rank 0), at start-up"
    assert "2000 samples" in warnings[0].getMessage() and "write_shards" in warnings[0].getMessage()


def test_write_order_is_seeded_recorded_and_reproducible(tmp_path):
    src = image_tree(tmp_path / "src", classes=4, per_class=6)
    folder_order = [f"c{c:03d}/i{i:03d}" for c in range(4) for i in range(6)]
    for name, extra in (("a", ["--workers", "2"]), ("b", []), ("other", ["--seed", "1"]), ("folder", ["--no-shuffle"])):
        write(src, tmp_path / name, *extra, shard_size=5)
    for tar in sorted((tmp_path / "a").glob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "b" / tar.name).read_bytes(), "same seed: same bytes"
    a, other, folder = (split_keys(tmp_path / n) for n in ("a", "other", "folder"))
    assert folder == folder_order, "--no-shuffle keeps folder order"
    assert sorted(a) == sorted(other) == sorted(folder_order)
    assert a != folder_order and a != other, "a seeded order across shards, another for another seed"
    assert {k.split("/")[0] for k in split_keys(tmp_path / "a")[:5]} != {"c000"}, "the first shard mixes classes"
    meta = json.loads((tmp_path / "other" / "shards.json").read_text())
    assert meta["shuffled"] is True and meta["shuffle_seed"] == 1


def test_synthetic_and_splits_are_shuffled_too(tmp_path):
    out = tmp_path / "syn"
    assert (
        write_shards.main(["synthetic", str(out), "--train", "30", "--val", "10", "--shard-size", "8", "--no-progress"]) == 0
    )
    keys = split_keys(out)
    assert sorted(keys) == [f"train_{i:08d}" for i in range(30)] and keys != sorted(keys)
    assert sorted(split_keys(out, "val")) == [f"val_{10**7 + i:08d}" for i in range(10)]
    assert ShardIndex.load(str(out)).shuffled is True


def test_an_old_index_without_the_record_loads_and_is_warned_about(tmp_path, caplog):
    src = image_tree(tmp_path / "src", classes=4, per_class=8)
    write(src, tmp_path / "old", "--no-shuffle", shard_size=8)
    path = tmp_path / "old" / "shards.json"
    meta = json.loads(path.read_text())
    del meta["shuffled"], meta["shuffle_seed"]  # what the writers wrote before they shuffled
    path.write_text(json.dumps(meta))
    index = ShardIndex.load(str(tmp_path / "old"))
    assert index.shuffled is None
    assert "does not record its write order" in index.order_warning("train", buffer_size=4, readers=2)
    assert index.order_warning("train", buffer_size=16, readers=2) is None, "a buffer over a reader's run: no warning"
    with caplog.at_level(logging.WARNING, logger="data.shards"):
        for rank in (1, 0, 0):
            build_train_stream(
                str(tmp_path / "old"),
                batch_size=4,
                rank=rank,
                world_size=2,
                num_workers=0,
                transform=label_only,
                buffer_size=4,
            )
    assert caplog.text.count("does not record its write order") == 1, "rank 0 only, once"
    meta["shuffled"] = "yes"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'shuffled' must be true or false"):
        ShardIndex.load(str(tmp_path / "old"))


def test_synthetic_data_is_never_warned_about(tmp_path):
    """Its classes are drawn per sample from (seed, index): index order is already a random class order."""
    out = tmp_path / "syn"
    assert write_shards.main(["synthetic", str(out), "--train", "40", "--val", "0", "--no-shuffle", "--no-progress"]) == 0
    index = ShardIndex.load(str(out))
    assert index.shuffled is False and index.order_warning("train", buffer_size=0, readers=1) is None
