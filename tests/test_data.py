"""data/: shard writing, the stream's ordering, equal batches, exact resume, bad samples."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import write_shards
from data.plan import buffer_order, epoch_items, split_slots
from data.shards import ShardIndex, check_key, read_samples
from data.stream import INLINE_BYTES, build_eval_stream, build_train_stream, inline_small_tensors
from data.transforms import StepMixup

from helpers import edit_shard, free_port

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "stream_job.py"
JOB_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # stream_job.py imports this checkout's packages


def synthetic_shards(out: Path, train: int = 77, val: int = 23, shard_size: int = 10) -> Path:
    assert (
        write_shards.main(
            [
                "synthetic",
                str(out),
                "--train",
                str(train),
                "--val",
                str(val),
                "--shard-size",
                str(shard_size),
                "--no-progress",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 77 samples in 8 shards (7 x 10 + 7): shards split unevenly over ranks and workers
    return synthetic_shards(tmp_path_factory.mktemp("synthetic"))


def stream_ids(stream) -> list[list[int]]:
    return [batch["sample_id"].tolist() for batch in stream]


# -- writing shards ------------------------------------------------------------------------------


def make_tree(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = {}
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            array = rng.integers(0, 255, (8 + i, 10, 3), dtype=np.uint8)
            name = f"{cls} photo.{i}.png" if i == 2 else f"{cls}_{i}.png"  # spaces and dots need a safe key
            Image.fromarray(array).save(root / cls / name)
            pixels[f"{cls}/{name}"] = array
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "dog" / "dog_3.jpg", quality=95)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "cat" / "notes.txt").write_text("not an image")
    return pixels


def test_imagefolder_round_trip(tmp_path, caplog):
    src, out = tmp_path / "src", tmp_path / "out"
    pixels = make_tree(src)
    with caplog.at_level("WARNING"):
        assert write_shards.main(["imagefolder", str(src), str(out), "--shard-size", "3", "--no-progress"]) == 0
    assert "skipped 1 unreadable images" in caplog.text and "broken.jpg" in caplog.text
    index = ShardIndex.load(str(out))
    assert index.classes() == ["cat", "dog"]
    meta = json.loads((out / "shards.json").read_text())
    assert [s["item"].endswith("broken.jpg") for s in meta["skipped"]] == [True]
    split = index.split("train")
    assert split.total == 7 and max(split.counts) <= 3  # --shard-size caps a shard; the broken image is left out
    sources = {write_shards.sample_key(src, path): path for path in src.rglob("*.*") if path.suffix != ".txt"}
    assert "cat/cat_0" in sources, "safe names keep their path as the key"
    assert sorted(k.split("-")[0] for k in sources if "photo" in k) == ["cat/cat_photo_2", "dog/dog_photo_2"], (
        "unsafe names ('cat photo.2.png') get a sanitised key with a hash suffix"
    )
    seen = {}
    for url, count in zip(split.urls, split.counts):
        for offset, sample in read_samples(url, list(range(count))):
            seen[sample["__key__"]] = sample
    assert set(seen) == set(sources) - {"dog/broken"}
    for key, sample in seen.items():
        check_key(key)
        source = sources[key]
        assert int(sample["cls"]) == (0 if source.parent.name == "cat" else 1)
        ext = "jpg" if source.suffix == ".jpg" else "png"
        assert sample[ext] == source.read_bytes(), "images are stored as they are"
        if ext == "png":
            decoded = np.asarray(Image.open(io.BytesIO(sample["png"])))
            assert np.array_equal(decoded, pixels[str(source.relative_to(src))])


def test_imagefolder_val_split_and_reproducible_bytes(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    for out in ("a", "b"):
        assert (
            write_shards.main(
                [
                    "imagefolder",
                    str(src),
                    str(tmp_path / out),
                    "--val-fraction",
                    "0.4",
                    "--shard-size",
                    "2",
                    "--workers",
                    "2",
                    "--no-progress",
                ]
            )
            == 0
        )
    index = ShardIndex.load(str(tmp_path / "a"))
    assert index.splits == ["train", "val"] and index.split("train").total + index.split("val").total == 7
    for tar in sorted((tmp_path / "a").glob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "b" / tar.name).read_bytes()


def test_writer_refuses_bad_input(tmp_path, caplog):
    assert write_shards.main(["imagefolder", str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "does not exist" in caplog.text
    (tmp_path / "empty").mkdir()
    assert write_shards.main(["imagefolder", str(tmp_path / "empty"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no class directories" in caplog.text
    out = synthetic_shards(tmp_path / "syn", train=5, val=0)
    before = (out / "train-000000.tar").read_bytes()
    assert write_shards.main(["synthetic", str(out), "--train", "6", "--val", "0", "--no-progress"]) == 2
    assert "already holds shards" in caplog.text
    assert (out / "train-000000.tar").read_bytes() == before, "no silent overwrite"
    assert write_shards.main(["synthetic", str(out), "--train", "6", "--val", "0", "--overwrite", "--no-progress"]) == 0
    assert ShardIndex.load(str(out)).split("train").total == 6


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../b", "a//b", "a.b", "a\\b", "", "a/./b", "x y"])
def test_keys_that_would_escape_or_split_are_refused(key):
    with pytest.raises(ValueError):
        check_key(key)


def test_synthetic_shards_carry_boxes_and_coco_ground_truth(shards):
    index = ShardIndex.load(str(shards))
    assert len(index.classes()) == 32
    _, sample = next(read_samples(index.split("val").urls[0], [0]))
    boxes = json.loads(sample["json"])
    assert len(boxes["boxes"]) == 1 and boxes["labels"] == [int(sample["cls"])]
    coco = json.loads((shards / "val_coco.json").read_text())
    assert len(coco["images"]) == 23 and len(coco["annotations"]) == 23 and len(coco["categories"]) == 32


# -- plan ----------------------------------------------------------------------------------------


def test_buffer_order_is_a_bounded_permutation():
    order = buffer_order(500, 16, np.random.default_rng(0))
    assert sorted(order) == list(range(500))
    assert all(order[j] < j + 16 for j in range(500)), "output j comes from the first j + buffer items"
    assert not np.array_equal(order, np.arange(500))


def test_shard_order_is_shuffled_before_the_rank_split(shards):
    split = ShardIndex.load(str(shards)).split("train")
    firsts = set()
    for epoch in range(6):
        items = epoch_items(split, seed=0, epoch=epoch, shuffle=True)
        slots, dropped = split_slots(items, world=2, workers=2, batch=4, pad=False)
        assert dropped == 77 - 4 * 16
        firsts.add(int(slots[0][0, 0]) // 10)  # the shard rank 0 starts with
    assert len(firsts) > 2, "rank 0 must not always read the same shards"


# -- the stream ----------------------------------------------------------------------------------


def test_two_ranks_two_workers_cover_the_epoch_once_with_equal_batches(shards):
    streams = [
        build_train_stream(
            str(shards), batch_size=4, rank=r, world_size=2, num_workers=2, seed=3, image_size=32, buffer_size=8
        )
        for r in range(2)
    ]
    for epoch in range(2):
        per_rank = [stream_ids(s) for s in streams]
        assert [len(b) for b in per_rank] == [len(streams[0])] * 2 == [8, 8], "equal batch counts on every rank"
        seen = [i for rank in per_rank for batch in rank for i in batch]
        assert len(seen) == len(set(seen)) == 64, "each sample at most once; remainder 77 - 64 dropped"
        assert all(s.epoch == epoch + 1 for s in streams)
    assert streams[0].dropped == 13


def test_small_tensors_cross_the_worker_pipe_by_value_and_arrive_equal():
    """A worker's small tensors go inside the batch's pickle (no shared-memory file descriptor each, fetched
    over a socket); large ones, and dtypes numpy has not, stay shared memory. What arrives is equal."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 (registers torch's shared-memory reductions on ForkingPickler)

    big = torch.arange(INLINE_BYTES // 4, dtype=torch.float32).reshape(-1, 4)  # exactly the limit: stays shared
    batch = {
        "image": big,
        "label": torch.tensor([3, 1, 4]),
        "valid": torch.tensor([True, False, True]),
        "half": torch.ones(2, dtype=torch.bfloat16),
        "targets": [{"boxes": torch.rand(2, 4), "image_id": torch.tensor(7)}, {"boxes": torch.rand(0, 4)}],
        "pair": (torch.tensor([1.5]), 2),
        "augment_step": 5,
    }
    packed = inline_small_tensors(batch)
    assert packed["image"] is big and packed["half"] is batch["half"]
    assert type(packed["label"]).__name__ == "_Inline" and type(packed["targets"][0]["boxes"]).__name__ == "_Inline"
    received = pickle.loads(bytes(ForkingPickler.dumps(packed)))

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    assert same(batch, received)
    received["label"][0] = 9  # a tensor of its own, writable
    assert batch["label"][0] == 3


def test_a_worker_batch_equals_the_in_process_batch(shards):
    """The same stream read by one DataLoader worker (small tensors sent by value) and in-process."""

    def batches(workers):
        stream = build_train_stream(str(shards), batch_size=4, num_workers=workers, seed=2, image_size=32, buffer_size=8)
        return list(stream)

    for a, b in zip(batches(0), batches(1), strict=True):
        assert a.keys() == b.keys()
        for key in ("image", "label", "sample_id", "valid"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_order_is_reproducible_and_changes_with_epoch(shards):
    def run(seed):
        stream = build_train_stream(str(shards), batch_size=4, num_workers=2, seed=seed, image_size=32, buffer_size=8)
        first = [b["image"] for b in stream]
        return first, stream_ids(stream)

    (images_a, epoch1_a), (images_b, epoch1_b) = run(5), run(5)
    assert all(torch.equal(x, y) for x, y in zip(images_a, images_b)), "same seed: same pixels, same augmentation"
    assert epoch1_a == epoch1_b
    again = build_train_stream(str(shards), batch_size=4, num_workers=2, seed=5, image_size=32, buffer_size=8)
    assert stream_ids(again) != epoch1_a, "epoch 1 differs from epoch 0"
    other = build_train_stream(str(shards), batch_size=4, num_workers=2, seed=6, image_size=32, buffer_size=8)
    assert stream_ids(other) != stream_ids(
        build_train_stream(str(shards), batch_size=4, num_workers=2, seed=5, image_size=32, buffer_size=8)
    )


def run_job(*args, timeout=120):
    result = subprocess.run(
        [sys.executable, str(JOB), *map(str, args)], env=JOB_ENV, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_exact_resume_in_a_new_process(shards, tmp_path):
    common = ["--workers", "3", "--batch", "4"]
    run_job(shards, tmp_path / "straight.pt", *common, "--take", "14")  # epoch 0 (12 batches) and into epoch 1
    straight = torch.load(tmp_path / "straight.pt", weights_only=False)["batches"]
    for k in (4, 5, 12):  # 4 and 5: the next batch from worker 1 and 2 of 3 (not a multiple); 12 ends epoch 0
        run_job(shards, tmp_path / f"head{k}.pt", *common, "--take", k, "--save-state", tmp_path / f"state{k}.pt")
        run_job(shards, tmp_path / f"tail{k}.pt", *common, "--state", tmp_path / f"state{k}.pt", "--take", 14 - k)
        head = torch.load(tmp_path / f"head{k}.pt", weights_only=False)["batches"]
        tail = torch.load(tmp_path / f"tail{k}.pt", weights_only=False)["batches"]
        assert len(head) + len(tail) == 14
        for expected, got in zip(straight, head + tail):
            assert torch.equal(expected["sample_id"], got["sample_id"]), k
            assert torch.equal(expected["image"], got["image"]), f"augmentation differs after resume at {k}"
            assert torch.equal(expected["label"], got["label"])


@pytest.mark.slow
def test_world_size_change_mid_epoch_sees_each_sample_once(shards, tmp_path):
    port = free_port()
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                str(JOB),
                str(shards),
                str(tmp_path / f"rank{r}.pt"),
                "--rank",
                str(r),
                "--world",
                "2",
                "--workers",
                "2",
                "--batch",
                "4",
                "--take",
                "3",
                "--save-state",
                str(tmp_path / "state.pt"),
                "--dist-port",
                str(port),
            ],
            env=JOB_ENV,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for job in jobs:
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err[-3000:]
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["phases"][0]["batches"] == [[2, 1], [2, 1]], "state holds both ranks' positions"
    run_job(
        shards, tmp_path / "single.pt", "--world", "1", "--workers", "2", "--batch", "4", "--state", tmp_path / "state.pt"
    )
    before = [
        i
        for r in range(2)
        for b in torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["batches"]
        for i in b["sample_id"].tolist()
    ]
    after = [i for b in torch.load(tmp_path / "single.pt", weights_only=False)["batches"] for i in b["sample_id"].tolist()]
    seen = before + after
    assert len(before) == 24
    assert len(seen) == len(set(seen)), "no sample repeated across the world-size change"
    assert 77 - len(seen) < 2 * 4, "only the new split's remainder (< workers x batch) is left out"


def corrupt_shards(tmp_path: Path) -> tuple[Path, str, str]:
    """Synthetic shards where the sample at position 13 has a broken PNG, the one at 17 has no .cls,
    and the last shard is truncated; returns the folder and those two samples' keys."""
    out = synthetic_shards(tmp_path / "bad", train=40, val=0, shard_size=10)
    tar_path = out / "train-000001.tar"  # positions 10..19

    def damage(position: int, ext: str, data: bytes):
        if position == 13 - 10 and ext == "png":
            return b"\x89PNG broken"
        return None if position == 17 - 10 and ext == "cls" else data

    keys = edit_shard(tar_path, damage)
    broken, unlabelled = keys[13 - 10], keys[17 - 10]
    last = out / "train-000003.tar"
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])  # truncated mid-shard
    return out, broken, unlabelled


def test_bad_samples_are_skipped_counted_and_do_not_shorten_the_epoch(tmp_path, caplog):
    out, broken, unlabelled = corrupt_shards(tmp_path)
    streams = [
        build_train_stream(str(out), batch_size=4, rank=r, world_size=2, num_workers=2, seed=0, image_size=32, buffer_size=4)
        for r in range(2)
    ]
    with caplog.at_level("WARNING"):
        per_rank = [stream_ids(s) for s in streams]
    assert [len(b) for b in per_rank] == [4, 4], "every rank still yields its full epoch"
    counters = sum((s.counters for s in streams), Counter())
    assert counters["corrupt_image"] == 1 and counters["missing_label"] == 1
    assert 1 <= counters["unreadable_shard"] <= 4, "reported once per worker that reads it"
    assert counters["unreadable_sample"] >= 1
    assert counters["refilled"] >= 2, "skipped samples were replaced to keep batches full"
    assert broken in caplog.text and unlabelled in caplog.text
    seen = [i for rank in per_rank for batch in rank for i in batch]
    assert 13 not in seen and 17 not in seen


def test_eval_stream_sees_every_sample_once_with_padding_marked(shards):
    streams = [
        build_eval_stream(str(shards), batch_size=4, rank=r, world_size=2, num_workers=2, image_size=32) for r in range(2)
    ]
    batches = [list(s) for s in streams]
    assert len(batches[0]) == len(batches[1]) == len(streams[0])
    valid = [i for rank in batches for b in rank for i in b["sample_id"][b["valid"]].tolist()]
    assert sorted(valid) == list(range(23))
    assert all(torch.all(b["label"][~b["valid"]] == -1) for rank in batches for b in rank)


def test_state_dict_is_a_snapshot(shards):
    stream = build_train_stream(str(shards), batch_size=4, num_workers=2, seed=1, image_size=32, buffer_size=8)
    batches = iter(stream)
    next(batches)
    first = stream.state_dict()
    next(batches)
    second = stream.state_dict()
    assert first["phases"][0]["batches"] == [[1, 0]] and second["phases"][0]["batches"] == [[1, 1]]
    second["phases"][0]["cursors"][0][0] = 999
    next(batches)
    assert stream.state_dict()["phases"][0]["batches"] == [[2, 1]]
    assert stream.state_dict()["phases"][0]["cursors"][0][0] != 999


def test_stream_refuses_too_little_data_and_foreign_state(shards):
    with pytest.raises(ValueError, match="fewer than world_size x workers x batch"):
        build_train_stream(str(shards), batch_size=32, world_size=2, num_workers=2, image_size=32)
    stream = build_train_stream(str(shards), batch_size=4, num_workers=0, seed=1, image_size=32)
    state = stream.state_dict()
    other = build_train_stream(str(shards), batch_size=4, num_workers=0, seed=2, image_size=32)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(FileNotFoundError, match="no shard index"):
        build_train_stream(str(shards / "nope"), batch_size=4)


def test_subset_and_repeats(shards):
    mask = np.zeros(77, bool)
    mask[:40] = True
    stream = build_train_stream(str(shards), batch_size=4, num_workers=0, seed=0, image_size=32, buffer_size=0, repeats=2)
    stream.set_subset(mask)
    ids = [i for batch in stream_ids(stream) for i in batch]
    assert set(ids) <= set(range(40)) and len(ids) == 40, "the epoch keeps the subset's length"
    assert len(set(ids)) == 20 and all(c == 2 for c in Counter(ids).values()), "half the samples, each twice"


def test_step_mixup_is_a_function_of_the_step():
    images, labels = torch.randn(8, 3, 8, 8), torch.arange(8)
    mixup = StepMixup(num_classes=10, seed=1)
    a, ta = mixup(images.clone(), labels, step=5)  # timm mixes in place
    torch.manual_seed(123)
    np.random.seed(9)
    b, tb = mixup(images.clone(), labels, step=5)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(a, images)
    c, _ = mixup(images.clone(), labels, step=6)
    assert not torch.equal(a, c)
    assert torch.allclose(ta.sum(-1), torch.ones(8))


FAILING_RUN = """
import sys
import time
from data.stream import build_train_stream
stream = build_train_stream(sys.argv[1], batch_size=4, num_workers=2, seed=0, image_size=32, buffer_size=8)
if sys.argv[2] == "worker":
    def broken(image):
        raise RuntimeError("the transform fails in a worker")
    stream.codec.transform = broken
def train():  # like the engine: the suspended stream lives in a frame of the traceback
    batches = iter(stream)
    next(batches)
    raise RuntimeError("the training step fails")
train()
"""


@pytest.mark.parametrize(
    "where,message", [("loop", "the training step fails"), ("worker", "the transform fails in a worker")]
)
@pytest.mark.slow
def test_a_failure_ends_the_process_instead_of_hanging_on_its_workers(shards, where, message):
    """Workers ignore SIGTERM (preemption safety), and multiprocessing's exit handler ends daemonic
    children with SIGTERM and then joins them: an exception anywhere used to hang the process."""
    run = subprocess.run(
        [sys.executable, "-c", FAILING_RUN, str(shards), where],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 1 and message in run.stderr, run.stderr[-2000:]


HELD_RUN = """
import sys, time
from data.stream import build_train_stream
stream = build_train_stream(sys.argv[1], batch_size=4, num_workers=2, seed=0, image_size=32, buffer_size=8)
batches = iter(stream)
next(batches)
import data.stream
print(" ".join(str(w.pid) for it in data.stream._LIVE_LOADERS for w in it._workers), flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")  # a zombie is gone
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_end_when_their_rank_is_killed(shards):
    """SIGKILL leaves a rank no chance to end its workers; the kernel does it for them (they ignore
    SIGTERM, and torch's worker, on noticing its parent gone, waits forever on its queue's feeder)."""
    run = subprocess.Popen(
        [sys.executable, "-c", HELD_RUN, str(shards)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        workers = [int(p) for p in run.stdout.readline().split()]
        assert len(workers) == 2 and not any(_gone(p) for p in workers)
    finally:
        run.kill()
        run.wait()
    deadline = time.monotonic() + 20
    while not all(_gone(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in workers if not _gone(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed rank"
