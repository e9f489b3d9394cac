"""IDX files (MNIST / Fashion-MNIST) -> shards -> the stream."""

import gzip
import json
import struct

import numpy as np
import pytest

from data import write_shards
from data.idx import IdxError, read_idx, read_idx_pair
from data.stream import build_eval_stream

from helpers import idx_folder


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip_through_shards_and_the_stream(tmp_path, compress):
    src = tmp_path / "src"
    src.mkdir()
    arrays = idx_folder(src, compress=compress)
    x, y = read_idx_pair(
        src / f"train-images-idx3-ubyte{'.gz' if compress else ''}",
        src / f"train-labels-idx1-ubyte{'.gz' if compress else ''}",
    )
    assert np.array_equal(x, arrays["train"][0]) and np.array_equal(y, arrays["train"][1])
    out = tmp_path / "shards"
    assert write_shards.main(["idx", str(src), str(out), "--shard-size", "5", "--no-progress"]) == 0
    meta = json.loads((out / "shards.json").read_text())
    assert meta["splits"]["train"]["total"] == 12 and meta["splits"]["val"]["total"] == 6 and meta["shuffled"]
    assert json.loads((out / "classes.json").read_text())["names"][9] == "Ankle boot"
    stream = build_eval_stream(
        str(out),
        batch_size=3,
        num_workers=0,
        image_size=28,
        crop_pct=1.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        interpolation="bilinear",
    )
    seen = {}
    for batch in stream:
        for image, label, valid, sid in zip(batch["image"], batch["label"], batch["valid"], batch["sample_id"]):
            if valid:
                seen[int(sid)] = (image, int(label))
    assert len(seen) == 6
    keys = sorted(arrays["t10k"][1].tolist())
    assert sorted(label for _, label in seen.values()) == keys
    for image, label in seen.values():  # grey stored losslessly, read back as three equal channels
        assert torch_equal_channels(image)
        matches = [i for i in range(6) if np.allclose(image[0].numpy() * 255, arrays["t10k"][0][i], atol=0.5)]
        assert len(matches) == 1 and arrays["t10k"][1][matches[0]] == label


def torch_equal_channels(image) -> bool:
    return bool((image[0] == image[1]).all() and (image[1] == image[2]).all())


def test_bad_idx_files_are_named(tmp_path):
    bad = tmp_path / "x-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 28, 28) + b"\x00" * 100)
    with pytest.raises(IdxError, match="x-images-idx3-ubyte: 116 bytes, but its header"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04")
    with pytest.raises(IdxError, match="not an IDX file"):
        read_idx(bad)
    src = tmp_path / "src"
    src.mkdir()
    idx_folder(src, train=4, val=3)
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + b"\x01\x02")
    )  # 3 images, 2 labels
    assert write_shards.main(["idx", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    assert not (tmp_path / "out").exists(), "nothing is written when an input is bad"
    (src / "train-images-idx3-ubyte.gz").unlink()
    assert write_shards.main(["idx", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
