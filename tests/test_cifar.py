"""``data.write_shards cifar`` on tiny CIFAR-10 / CIFAR-100 pickles written here in the downloaded layout,
and ``--keep-classes`` (cifar and idx): counts, labels, pixels, classes.json."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from data import write_shards


def batch(rng, count, labels_key, num_classes, coarse=False):
    data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, count).tolist()
    out = {
        b"batch_label": b"tiny",
        b"data": data,
        labels_key.encode(): labels,
        b"filenames": [f"img_{i}.png".encode() for i in range(count)],
    }
    if coarse:
        out[b"coarse_labels"] = [label // 5 for label in labels]
    return out


def dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the downloads are python 2 pickles: bytes keys


def cifar10(root, per_batch=7, test=9):
    rng = np.random.default_rng(0)
    src = root / "cifar-10-batches-py"
    src.mkdir()
    batches = {f"data_batch_{i}": batch(rng, per_batch, "labels", 10) for i in range(1, 6)}
    batches["test_batch"] = batch(rng, test, "labels", 10)
    for name, content in batches.items():
        dump(src / name, content)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump(src / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    return src, batches, names


def cifar100(root, train=30, test=12):
    rng = np.random.default_rng(1)
    src = root / "cifar-100-python"
    src.mkdir()
    batches = {
        "train": batch(rng, train, "fine_labels", 100, coarse=True),
        "test": batch(rng, test, "fine_labels", 100, coarse=True),
    }
    for name, content in batches.items():
        dump(src / name, content)
    fine = [f"fine{i:02d}" for i in range(100)]
    dump(
        src / "meta",
        {
            b"fine_label_names": [n.encode() for n in fine],
            b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)],
        },
    )
    return src, batches, fine


def read_shards(out, split):
    """``{key: (image array, label)}`` of a split, read back from the tar members."""
    index = json.loads((out / "shards.json").read_text())
    samples = {}
    for shard in index["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".png"):
                key = name[:-4]
                samples[key] = (np.array(Image.open(io.BytesIO(data))), int(members[key + ".cls"]))
    return index, samples


def expected(batches, files, labels_key):
    images = np.concatenate([batches[f][b"data"] for f in files]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = sum((batches[f][labels_key.encode()] for f in files), [])
    return images, labels


def test_cifar10_counts_labels_pixels_and_names(tmp_path):
    src, batches, names = cifar10(tmp_path)
    out = tmp_path / "shards"
    assert write_shards.main(["cifar", str(src), str(out), "--shard-size", "8", "--no-progress"]) == 0
    assert json.loads((out / "classes.json").read_text())["names"] == names
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("val", ["test_batch"])):
        index, samples = read_shards(out, split)
        images, labels = expected(batches, files, "labels")
        assert index["splits"][split]["total"] == len(samples) == len(labels)  # 35 train, 9 val
        for i in range(len(labels)):
            image, label = samples[f"{split}_{i:06d}"]
            assert label == labels[i] and image.shape == (32, 32, 3)
            assert np.array_equal(image, images[i]), "R, G, B planes of 1024 bytes each, row-major"
    assert index["splits"]["train"]["total"] == 35 and index["splits"]["val"]["total"] == 9


@pytest.mark.parametrize("label,count", [("fine", 100), ("coarse", 20)])
def test_cifar100_fine_and_coarse(tmp_path, label, count):
    src, batches, _ = cifar100(tmp_path)
    out = tmp_path / "shards"
    assert write_shards.main(["cifar", str(src), str(out), "--label", label, "--no-progress"]) == 0
    assert len(json.loads((out / "classes.json").read_text())["names"]) == count
    index, samples = read_shards(out, "train")
    _, labels = expected(batches, ["train"], f"{label}_labels")
    assert [samples[f"train_{i:06d}"][1] for i in range(30)] == labels
    assert index["source"]["label"] == label and index["splits"]["val"]["total"] == 12


def test_keep_classes_filters_and_relabels(tmp_path):
    src, batches, names = cifar10(tmp_path, per_batch=40, test=40)
    out = tmp_path / "shards"
    assert write_shards.main(["cifar", str(src), str(out), "--keep-classes", "7,2-3", "--no-progress"]) == 0
    assert json.loads((out / "classes.json").read_text())["names"] == ["horse", "bird", "cat"]
    index, samples = read_shards(out, "val")
    images, labels = expected(batches, ["test_batch"], "labels")
    kept = [i for i, label in enumerate(labels) if label in (7, 2, 3)]
    assert 0 < len(kept) < len(labels) and index["splits"]["val"]["total"] == len(kept)
    for i in kept:
        image, label = samples[f"val_{i:06d}"]
        assert label == {7: 0, 2: 1, 3: 2}[labels[i]] and np.array_equal(image, images[i])
    assert index["class_filter"]["kept_original_labels"] == [7, 2, 3]


def test_keep_classes_on_idx_splits_fashion_mnist_in_two(tmp_path):
    """Table 5's shape on Fashion-MNIST: classes 0-4 for pre-training, 5-9 for fine-tuning, disjoint."""
    from helpers import idx_folder

    src = tmp_path / "src"
    src.mkdir()
    arrays = idx_folder(src, train=60, val=30)
    totals = {}
    for part, labels in (("pre", "0-4"), ("fine", "5-9")):
        out = tmp_path / part
        assert write_shards.main(["idx", str(src), str(out), "--keep-classes", labels, "--no-progress"]) == 0
        index, samples = read_shards(out, "train")
        first = 0 if part == "pre" else 5
        wanted = [i for i, y in enumerate(arrays["train"][1]) if first <= y < first + 5]
        assert sorted(samples) == [f"train_{i:06d}" for i in wanted]
        assert all(samples[f"train_{i:06d}"][1] == arrays["train"][1][i] - first for i in wanted)
        names = json.loads((out / "classes.json").read_text())["names"]
        assert names == write_shards.IDX_CLASSES["fashion-mnist"][first : first + 5]
        totals[part] = index["splits"]["train"]["total"] + index["splits"]["val"]["total"]
    assert totals["pre"] + totals["fine"] == 90, "every sample in exactly one of the two parts"


def test_train_per_class_keeps_the_first_n_of_each_class_and_the_whole_val_split(tmp_path, caplog):
    """A small class-balanced training set (long schedules on few samples), with and without a class filter."""
    from helpers import idx_folder

    src = tmp_path / "src"
    src.mkdir()
    arrays = idx_folder(src, train=60, val=30)
    y = [int(v) for v in arrays["train"][1]]
    counts = {label: y.count(label) for label in set(y)}
    n = min(counts.values())
    assert n >= 2 and max(counts.values()) > n, "the fixture's classes are uneven: the cut is visible"
    out = tmp_path / "balanced"
    assert write_shards.main(["idx", str(src), str(out), "--train-per-class", str(n), "--no-progress"]) == 0
    index, samples = read_shards(out, "train")
    wanted = [i for i, label in enumerate(y) if sum(1 for j in range(i) if y[j] == label) < n]
    assert sorted(samples) == [f"train_{i:06d}" for i in wanted] and len(wanted) == n * len(counts)
    assert all(samples[f"train_{i:06d}"][1] == y[i] for i in wanted), "labels unchanged without --keep-classes"
    assert index["splits"]["val"]["total"] == 30 and index["train_per_class"]["samples"] == n
    assert "class_filter" not in index
    # with a class filter: the first n of each kept class, relabelled
    out = tmp_path / "both"
    args = ["idx", str(src), str(out), "--keep-classes", "5-9", "--train-per-class", "1", "--no-progress"]
    assert write_shards.main(args) == 0
    _, samples = read_shards(out, "train")
    firsts = sorted(y.index(label) for label in range(5, 10) if label in counts)
    assert sorted(samples) == [f"train_{i:06d}" for i in firsts]
    assert all(samples[f"train_{i:06d}"][1] == y[i] - 5 for i in firsts)
    # a class with fewer samples than asked for is refused by name, before anything is written
    args = ["idx", str(src), str(tmp_path / "bad"), "--train-per-class", str(max(counts.values()) + 1), "--no-progress"]
    assert write_shards.main(args) == 2
    assert "training samples" in caplog.text and not (tmp_path / "bad").exists()
    assert write_shards.main(["idx", str(src), str(tmp_path / "zero"), "--train-per-class", "0", "--no-progress"]) == 2
    assert "must be >= 1" in caplog.text


@pytest.mark.parametrize(
    "keep,message",
    [
        ("0-10", "not below the data set's 10 classes"),
        ("4-2", "is empty"),
        ("1,1", "twice"),
        ("a", "not a label or a range"),
    ],
)
def test_bad_class_lists_are_refused(tmp_path, keep, message, caplog):
    src, _, _ = cifar10(tmp_path)
    assert write_shards.main(["cifar", str(src), str(tmp_path / "out"), "--keep-classes", keep, "--no-progress"]) == 2
    assert message in caplog.text and not (tmp_path / "out").exists()


def test_bad_folders_and_foreign_pickles_are_refused(tmp_path, caplog):
    assert write_shards.main(["cifar", str(tmp_path), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "neither cifar-10-batches-py" in caplog.text
    src, _, _ = cifar10(tmp_path)
    (src / "test_batch").write_bytes(pickle.dumps({b"data": __import__("os").getcwd}, protocol=2))
    assert write_shards.main(["cifar", str(src), str(tmp_path / "out2"), "--no-progress"]) == 2
    assert "names posix.getcwd: not a CIFAR batch" in caplog.text or "not a CIFAR batch" in caplog.text
