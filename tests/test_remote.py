"""Shards from object storage and HTTP (issue 26), against real servers on 127.0.0.1 started here: a
SeaweedFS S3 store (``weed server -s3``) and an HTTP server with ranges and a request log
(tests/object_store.py). Same batches as local disk, exact resume with ranged reads, retries through
a server restart, a bounded stop when the server is gone, the node cache, start-up errors."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from data import write_shards
from data.remote import RemoteOptions, ShardCache
from data.shards import ShardIndex, ShardIndexError
from data.stream import ClassificationCodec, ShardStream, build_eval_stream, build_train_stream
from data.transforms import build_transform
from launcher.config import ConfigError, load_config

from helpers import finish, kill_tree, module_state, records, start, wait_for_step
from object_store import ACCESS_KEY, HttpServer, SeaweedS3

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests/stream_job.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
FAST = RemoteOptions(retries=2, backoff=0.1, backoff_max=0.2, timeout=5.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Synthetic shards: 160 train samples in 10 shards of 16, 24 val."""
    out = tmp_path_factory.mktemp("remote") / "shards"
    assert (
        write_shards.main(["synthetic", str(out), "--train", "160", "--val", "24", "--shard-size", "16", "--no-progress"])
        == 0
    )
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, shards, tiny_shards):
    """A SeaweedFS S3 store holding ``shards`` (uploaded by ``write_shards --upload``) and the engine
    tests' ``tiny_shards``; the process environment carries its credentials and endpoint as an AWS
    tool would read them."""
    s3 = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    saved = {key: os.environ.get(key) for key in s3.env}
    os.environ.update(s3.env)
    try:
        upload = tmp_path_factory.mktemp("upload") / "shards"
        assert (
            write_shards.main(
                [
                    "synthetic",
                    str(upload),
                    "--train",
                    "160",
                    "--val",
                    "24",
                    "--shard-size",
                    "16",
                    "--no-progress",
                    "--upload",
                    "s3://toe-shards/synthetic",
                ]
            )
            == 0
        )
        s3.upload(tiny_shards, "toe-shards", "tiny")
        yield s3
    finally:
        s3.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def http(tmp_path, shards):
    server = HttpServer(shards, tmp_path / "requests.log").start()
    yield server
    server.stop()


def epoch(url, *, world=2, workers=2, remote=None, **kw) -> list[list[dict]]:
    streams = [
        build_train_stream(
            str(url),
            batch_size=4,
            rank=r,
            world_size=world,
            num_workers=workers,
            seed=3,
            image_size=32,
            buffer_size=6,
            remote=remote,
            **kw,
        )
        for r in range(world)
    ]
    return [list(s) for s in streams]


def same(a: list[list[dict]], b: list[list[dict]]) -> bool:
    return [len(r) for r in a] == [len(r) for r in b] and all(
        torch.equal(x["image"], y["image"])
        and torch.equal(x["sample_id"], y["sample_id"])
        and torch.equal(x["label"], y["label"])
        for ra, rb in zip(a, b)
        for x, y in zip(ra, rb)
    )


def ids(batches) -> list[int]:
    return [i for b in batches for i in b["sample_id"].tolist()]


# -- the same batches as local disk ----------------------------------------------------------------


def test_writer_records_each_samples_byte_offset(shards):
    index = json.loads((shards / "shards.json").read_text())
    for shard in index["splits"]["train"]["shards"][:3]:
        path = shards / shard["name"]
        assert shard["bytes"] == path.stat().st_size and len(shard["offsets"]) == shard["samples"]
        with tarfile.open(path) as tar:
            firsts = {}
            for member in tar:
                firsts.setdefault(member.name.split(".")[0], member.offset)
        assert sorted(firsts.values()) == shard["offsets"]


@pytest.mark.slow
def test_two_ranks_from_s3_and_http_give_the_local_batches_bit_for_bit(store, shards, http, tmp_path):
    local = epoch(shards)
    assert same(epoch("s3://toe-shards/synthetic"), local), "s3:// (uploaded by write_shards --upload)"
    assert same(epoch(http.url), local), "http:// with ranges"
    plain = HttpServer(shards, tmp_path / "plain.log", ranges=False).start()
    try:
        assert same(epoch(plain.url), local), "an HTTP server that ignores Range: the head is read and skipped"
    finally:
        plain.stop()
    assert same(epoch(f"pipe:cat {shards}", world=1), epoch(shards, world=1)), "pipe:"
    evals = [
        list(build_eval_stream(u, batch_size=4, rank=1, world_size=2, num_workers=1, image_size=32))
        for u in (str(shards), "s3://toe-shards/synthetic")
    ]
    assert len(evals[0]) and all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["valid"], y["valid"]) for x, y in zip(*evals)
    )
    # slot boundaries fall inside shards: those reads are ranged at the recorded offsets, not from byte 0
    offsets = {
        s["name"]: s["offsets"] for s in json.loads((shards / "shards.json").read_text())["splits"]["train"]["shards"]
    }
    ranged = [row for row in http.requests(r"\.tar$") if row[2] != "-"]
    assert ranged, "some reads are ranged"
    for _, path, header, status, _ in ranged:
        start = int(header[len("bytes=") :].split("-")[0])
        assert status == "206" and start in offsets[path.lstrip("/")] + [0]


def resume_run(url, resume_url=None, take=3):
    """One rank, 2 workers: ``take`` batches from ``url``, the state, then the rest from ``resume_url``
    (default ``url``) in a new stream."""
    first = build_train_stream(url, batch_size=4, num_workers=2, seed=5, image_size=32, buffer_size=6)
    iterator, before = iter(first), []
    for batch in iterator:
        before.append(batch)
        if len(before) == take:
            break
    iterator.close()
    state = first.state_dict()
    second = build_train_stream(resume_url or url, batch_size=4, num_workers=2, seed=5, image_size=32, buffer_size=6)
    second.load_state_dict(state)
    return before, list(second)


def test_mid_epoch_resume_from_the_store_is_exact_and_starts_at_the_recorded_offsets(store, shards, http, tmp_path):
    straight = list(build_train_stream(str(shards), batch_size=4, num_workers=2, seed=5, image_size=32, buffer_size=6))
    before, after = resume_run("s3://toe-shards/synthetic", take=7)
    assert same([before + after], [straight]), "s3://"
    resumed = HttpServer(shards, tmp_path / "resumed.log").start()  # the resumed stream's requests apart
    try:
        before, after = resume_run(http.url, resumed.url, take=7)
    finally:
        resumed.stop()
    assert same([before + after], [straight]), "http://"
    # the resumed reads start at recorded sample offsets past what was consumed: fewer bytes than their shards
    shards_meta = json.loads((shards / "shards.json").read_text())["splits"]["train"]["shards"]
    offsets = {s["name"]: s["offsets"] for s in shards_meta}
    sizes = {s["name"]: s["bytes"] for s in shards_meta}
    rows = resumed.requests(r"\.tar$")
    starts = [int(r[2][len("bytes=") :].split("-")[0]) for r in rows if r[2] != "-"]
    assert any(s > 0 for s in starts), f"the resumed reads skip the consumed head of their shard: {rows}"
    assert all(int(r[2][len("bytes=") :].split("-")[0]) in offsets[r[1].lstrip("/")] for r in rows if r[2] != "-")
    assert sum(int(r[4]) for r in rows) < sum(sizes[r[1].lstrip("/")] for r in rows)


@pytest.mark.slow
def test_server_restarted_within_the_retry_window_loses_and_repeats_no_sample(shards, tmp_path):
    expected = torch.load(run_job(shards, tmp_path / "local.pt"), weights_only=False)["batches"]
    server = HttpServer(shards, tmp_path / "requests.log", rate=400_000).start()  # ~0.25 s per shard
    progress = tmp_path / "progress"
    job = subprocess.Popen(
        [
            sys.executable,
            str(JOB),
            server.url,
            str(tmp_path / "remote.pt"),
            "--workers",
            "2",
            "--batch",
            "4",
            "--remote-retries",
            "8",
            "--remote-backoff",
            "0.5",
            "--progress",
            str(progress),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: progress.exists() and len(progress.read_text().split()) >= 3, job, "3 batches")
        server.kill()  # mid-epoch, mid-transfer (the link is slow)
        time.sleep(2.0)
        server = HttpServer(shards, tmp_path / "requests.log", port=server.port, rate=400_000).start()
        out, _ = job.communicate(timeout=180)
    finally:
        kill_tree(job.pid, signal.SIGKILL)
        server.stop()
    assert job.returncode == 0, out[-3000:]
    result = torch.load(tmp_path / "remote.pt", weights_only=False)
    assert result["counters"].get("remote_retry", 0) >= 1, "the outage was met and retried"
    assert "unreadable_shard" not in result["counters"] and "lost_shard" not in result["counters"]
    assert ids(result["batches"]) == ids(expected), "every sample once, in the uninterrupted order"
    assert len(set(ids(expected))) == len(ids(expected))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(result["batches"], expected))


@pytest.mark.slow
def test_s3_store_restarted_mid_epoch_within_the_retry_window_loses_and_repeats_no_sample(store, shards, tmp_path):
    expected = epoch(shards, world=1)[0]  # stream_job's geometry below: 1 rank, 2 workers, batch 4
    progress = tmp_path / "progress"
    job = subprocess.Popen(
        [
            sys.executable,
            str(JOB),
            "s3://toe-shards/synthetic",
            str(tmp_path / "s3.pt"),
            "--workers",
            "2",
            "--batch",
            "4",
            "--seed",
            "3",
            "--buffer",
            "6",
            "--remote-retries",
            "8",
            "--remote-backoff",
            "1.0",
            "--delay",
            "0.3",
            "--progress",
            str(progress),
        ],
        env={**ENV, **store.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: progress.exists() and len(progress.read_text().split()) >= 3, job, "3 batches")
        store.stop()
        time.sleep(1.0)
        store.start()  # the same ports and folder: the shards are still there
        out, _ = job.communicate(timeout=240)
    finally:
        kill_tree(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out[-3000:]
    result = torch.load(tmp_path / "s3.pt", weights_only=False)
    assert result["counters"].get("remote_retry", 0) >= 1, "the outage was met and retried"
    assert "unreadable_shard" not in result["counters"], result["counters"]
    assert ids(result["batches"]) == ids(expected)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(result["batches"], expected))


def run_job(url, out: Path, *args) -> Path:
    done = subprocess.run(
        [sys.executable, str(JOB), str(url), str(out), "--workers", "2", "--batch", "4", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


def wait_for(condition, process, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert process.poll() is None, f"ended before {what}: {process.stdout.read()[-3000:]}"
        time.sleep(0.05)
    raise TimeoutError(f"no {what} within {timeout} s")


@pytest.mark.slow
def test_server_gone_for_good_ends_the_job_within_the_retry_bound_naming_the_url(shards, tmp_path):
    server = HttpServer(shards, tmp_path / "requests.log", rate=400_000).start()
    progress = tmp_path / "progress"
    job = subprocess.Popen(
        [
            sys.executable,
            str(JOB),
            server.url,
            str(tmp_path / "out.pt"),
            "--workers",
            "2",
            "--batch",
            "4",
            "--remote-retries",
            "3",
            "--remote-backoff",
            "0.2",
            "--progress",
            str(progress),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: progress.exists() and len(progress.read_text().split()) >= 2, job, "2 batches")
        server.kill()
        gone = time.time()
        out, _ = job.communicate(timeout=120)
    finally:
        kill_tree(job.pid, signal.SIGKILL)
        server.stop()
    elapsed = time.time() - gone
    bound = RemoteOptions(retries=3, backoff=0.2, backoff_max=30.0, timeout=10.0)
    assert job.returncode != 0
    assert f"{server.url}/train-0000" in out and ".tar" in out, out[-3000:]
    assert "max_lost_share" in out and ("Connection refused" in out or "NewConnectionError" in out), out[-3000:]
    # the waits of one read's retries (0.2 + 0.4 + 0.8 s at most), not the whole epoch's shards one by one
    assert elapsed < sum(bound.wait(a) for a in range(3)) + 20, f"took {elapsed:.1f} s"


def test_http_503_is_retried_and_counted_a_missing_shard_is_skipped_without_retries(shards, tmp_path):
    local = epoch(shards, world=1)
    busy = HttpServer(shards, tmp_path / "busy.log", fail_first=3).start()
    try:
        stream = build_train_stream(
            busy.url,
            batch_size=4,
            num_workers=2,
            seed=3,
            image_size=32,
            buffer_size=6,
            remote=RemoteOptions(retries=4, backoff=0.05, backoff_max=0.1),
        )
        assert same([list(stream)], local), "the 503s cost nothing but time"
    finally:
        busy.stop()
    assert [row[3] for row in busy.requests(r"\.tar$")].count("503") == 3
    assert stream.counters["remote_retry"] == 3 and stream.counters["unreadable_shard"] == 0
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in shards.iterdir():
        if path.name != "train-000004.tar":
            shutil.copy(path, partial / path.name)
    server = HttpServer(partial, tmp_path / "partial.log").start()
    try:
        stream = build_train_stream(
            server.url,
            batch_size=4,
            num_workers=2,
            seed=3,
            image_size=32,
            buffer_size=6,
            remote=RemoteOptions(retries=4, backoff=0.05, backoff_max=0.1),
        )
        assert len(list(stream)) == len(stream), "the epoch keeps its length (refills)"
    finally:
        server.stop()
    assert stream.counters["unreadable_shard"] >= 1 and stream.counters["lost_shard"] == 0
    assert stream.counters["remote_retry"] == 0, "a 404 is not retried"
    assert [row[3] for row in server.requests(r"train-000004\.tar$")] and set(
        row[3] for row in server.requests(r"train-000004\.tar$")
    ) == {"404"}


def test_lost_shards_within_the_allowed_share_are_skipped_and_counted(shards, tmp_path):
    """``max_lost_share`` 1.0: every lost shard is skipped and counted (``lost_shard``) and the epoch
    keeps its length with refills, as for a corrupt local shard."""
    dead = HttpServer(shards, tmp_path / "requests.log")  # never started: connection refused
    index = ShardIndex.load(str(shards))
    index.base = dead.url  # shards.json here, the tars on a server that is down
    split = dataclasses.replace(index.split("train"), remote=dataclasses.replace(FAST, max_lost_share=1.0))
    stream = ShardStream(
        split,
        ClassificationCodec(build_transform(False, 32)),
        batch_size=4,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=0,
        shuffle=True,
        pad=False,
        buffer_size=4,
    )
    with pytest.raises(RuntimeError, match="no readable sample in a whole pass"):
        list(stream)
    strict = dataclasses.replace(split, remote=FAST)
    stream = ShardStream(
        strict,
        ClassificationCodec(build_transform(False, 32)),
        batch_size=4,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=0,
        shuffle=True,
        pad=False,
        buffer_size=4,
    )
    with pytest.raises(RuntimeError, match=rf"{dead.url}/train-\d+\.tar.*max_lost_share=0"):
        list(stream)


# -- the node cache ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cache_two_ranks_fetch_each_shard_once_and_the_next_epoch_reads_nothing(shards, http, tmp_path):
    cache = tmp_path / "cache"
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                str(JOB),
                http.url,
                str(tmp_path / f"rank{r}.pt"),
                "--rank",
                str(r),
                "--world",
                "2",
                "--workers",
                "2",
                "--batch",
                "4",
                "--cache-dir",
                str(cache),
            ],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [job.communicate(timeout=240)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    fetched = Counter(row[1] for row in http.requests(r"\.tar$"))
    assert fetched and set(fetched.values()) == {1}, f"each shard once per node: {fetched}"
    assert all(row[2] == "-" for row in http.requests(r"\.tar$")), "whole shards into the cache"
    counters = sum(
        (Counter(torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["counters"]) for r in range(2)), Counter()
    )
    assert counters["cache_fetch"] == len(fetched) and counters["cache_hit"] >= 1, counters
    local = [
        list(
            build_train_stream(
                str(shards), batch_size=4, rank=r, world_size=2, num_workers=2, seed=7, image_size=32, buffer_size=16
            )
        )
        for r in range(2)
    ]  # stream_job's defaults
    cached = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["batches"] for r in range(2)]
    assert same(cached, local)
    # the next epochs of a stream on that node: every shard from the cache, no request for a tar
    before = len(http.requests(r"\.tar$"))
    stream = build_train_stream(
        http.url,
        batch_size=4,
        num_workers=2,
        seed=7,
        image_size=32,
        buffer_size=16,
        remote=RemoteOptions(cache_dir=str(cache)),
    )
    for _ in range(2):
        assert len(list(stream)) == len(stream)
    assert len(http.requests(r"\.tar$")) == before
    assert stream.counters["cache_hit"] > 0 and stream.counters["cache_fetch"] == 0


def test_cache_size_bound_holds_and_evicts_the_least_recently_used(shards, http, tmp_path):
    sizes = sorted((p.stat().st_size for p in shards.glob("train-*.tar")), reverse=True)
    bound = sum(sizes[:3]) + 100  # three of the largest shards
    cache = ShardCache(str(tmp_path / "cache"), bound)
    options, counters = RemoteOptions(), Counter()
    names = [f"train-{n:06d}.tar" for n in range(4)]
    for name in names[:3]:
        cache.open(f"{http.url}/{name}", options, counters).close()
    time.sleep(0.01)
    cache.open(f"{http.url}/{names[0]}", options, counters).close()  # used again: now the most recent
    cache.open(f"{http.url}/{names[3]}", options, counters).close()
    kept = {p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir() if p.is_file()}
    assert names[1] not in kept and {names[0], names[2], names[3]} <= kept, kept
    assert cache.used_bytes() <= bound
    # a whole epoch through a cache of two shards: never above the bound, same batches
    small = RemoteOptions(cache_dir=str(tmp_path / "small"), cache_bytes=2 * sizes[0])
    streamed = epoch(http.url, world=1, workers=1, remote=small)
    assert same(streamed, epoch(shards, world=1, workers=1))
    assert ShardCache(small.cache_dir, small.cache_bytes).used_bytes() <= small.cache_bytes
    assert not list((tmp_path / "small" / ".tmp").iterdir()), "no temporary file left behind"


# -- start-up errors -----------------------------------------------------------------------------------


def test_wrong_credentials_missing_bucket_and_missing_index_fail_at_start_up_naming_them(store, monkeypatch):
    with pytest.raises(ShardIndexError, match="s3://no-such-bucket/x/shards.json.*NoSuchBucket.*'no-such-bucket'"):
        ShardIndex.load("s3://no-such-bucket/x", remote=FAST)
    with pytest.raises(ShardIndexError, match="no shard index at s3://toe-shards/nothing-here/shards.json.*NoSuchKey"):
        ShardIndex.load("s3://toe-shards/nothing-here", remote=FAST)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "WRONGKEY123")
    from data import remote

    monkeypatch.setattr(remote, "_CLIENTS", {})  # a new client reads the new environment
    with pytest.raises(
        ShardIndexError, match="s3://toe-shards/synthetic/shards.json.*InvalidAccessKeyId.*access key WRON... from env"
    ):
        build_train_stream("s3://toe-shards/synthetic", batch_size=4, image_size=32, remote=FAST)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    monkeypatch.setattr(remote, "_CLIENTS", {})
    with pytest.raises(ShardIndexError, match="SignatureDoesNotMatch"):
        ShardIndex.load("s3://toe-shards/synthetic", remote=FAST)
    monkeypatch.setattr(remote, "_CLIENTS", {})


def test_unreachable_endpoint_at_start_up_is_named_after_bounded_retries():
    started = time.time()
    with pytest.raises(
        ShardIndexError,
        match=r"cannot read the shard index http://127\.0\.0\.1:9/shards\.json.*"
        r"gave up after 2 retries",
    ):
        ShardIndex.load("http://127.0.0.1:9", remote=FAST)
    assert time.time() - started < 10


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.path=gs://bucket/x", "data.path: 'gs://bucket/x': unsupported scheme"),
        ("data.eval_path=s3://A_Bucket/x", "data.eval_path: 's3://A_Bucket/x' is not s3://BUCKET"),
        ("data.remote_backoff_max=0.5", "data.remote_backoff_max (0.5) must be >= data.remote_backoff (1.0)"),
        ("data.max_lost_share=1.5", "data.max_lost_share must be in [0, 1], got 1.5"),
        ("data.remote_timeout=0", "data.remote_timeout must be > 0"),
        ("data.s3_endpoint=localhost:9000", "data.s3_endpoint must be an http(s):// URL"),
    ],
)
def test_remote_options_are_validated_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(str(ROOT / "configs/deit_tiny_toe_cpu.yaml"), ["data.synthetic=false", override])
    with pytest.raises(ConfigError, match="data.synthetic writes the embedded shards to a local folder"):
        load_config(str(ROOT / "configs/deit_tiny_toe_cpu.yaml"), ["data.path=s3://toe-shards/x"])


# -- the engine: 2 ranks from the store, SIGKILL and automatic resume ---------------------------------


@pytest.mark.slow
def test_engine_from_the_store_equals_local_disk_and_resumes_exactly_after_sigkill(
    store, tiny_shards, tmp_path, monkeypatch
):
    total = 20  # 16 steps per epoch: the kill falls mid-epoch 0, the run ends in epoch 1
    common = [
        f"train.steps={total}",
        "checkpoint.every=4",
        "train.zero_stage=1",
        "train.precision=fp32",
        "data.synthetic=false",
        "data.remote_backoff=0.2",
    ]
    url = "s3://toe-shards/tiny"
    local = tmp_path / "local"
    assert_ok(start(local, tiny_shards, *common, ranks=2))
    remote = tmp_path / "remote"
    assert_ok(start(remote, url, *common, ranks=2))
    a, b = records(local), records(remote)
    assert [a[t]["loss"] for t in range(total)] == [b[t]["loss"] for t in range(total)], "bit-identical losses"
    weights = module_state(local, total)
    assert all(torch.equal(weights[k], v) for k, v in module_state(remote, total).items()), "identical weights"
    assert all(b[t]["data/unreadable_shard"] == 0 and b[t]["data/lost_shard"] == 0 for t in b)
    victim = tmp_path / "killed"
    process = start(victim, url, *common, ranks=2)
    wait_for_step(victim, 6, process)
    kill_tree(process.pid, signal.SIGKILL)
    process.wait()
    latest = int((victim / "checkpoints" / "latest").read_text().split("-")[1])
    assert 4 <= latest < 16, "killed mid-epoch 0, after a checkpoint"
    out = assert_ok(start(victim, url, *common, ranks=2))  # automatic resume from the run folder
    assert f"resumed at step {latest}" in out
    c = records(victim)
    assert [a[t]["loss"] for t in range(total)] == [c[t]["loss"] for t in range(total)]
    assert all(torch.equal(weights[k], v) for k, v in module_state(victim, total).items())


def assert_ok(process) -> str:
    out = finish(process, timeout=400)
    assert process.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_engine_start_up_errors_exit_2_and_a_store_gone_mid_run_ends_the_job_naming_the_url(
    store, tiny_shards, tmp_path, monkeypatch
):
    out = finish(
        start(
            tmp_path / "nobucket",
            "s3://no-such-bucket/tiny",
            "train.steps=4",
            "data.synthetic=false",
            "data.remote_retries=1",
            "data.remote_backoff=0.1",
            ranks=1,
        ),
        timeout=200,
    )
    assert "refused: cannot read the shard index s3://no-such-bucket/tiny/shards.json: NoSuchBucket" in out, out[-3000:]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    process = start(tmp_path / "badkey", "s3://toe-shards/tiny", "train.steps=4", "data.synthetic=false", ranks=1)
    out = finish(process, timeout=200)
    assert process.returncode == 2 and "SignatureDoesNotMatch" in out, out[-3000:]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store.env["AWS_SECRET_ACCESS_KEY"])
    run = tmp_path / "gone"
    process = start(
        run,
        "s3://toe-shards/tiny",
        "train.steps=400",
        "checkpoint.every=0",
        "data.synthetic=false",
        "data.remote_retries=3",
        "data.remote_backoff=0.2",
        "data.remote_timeout=5",
        ranks=2,
    )
    try:
        wait_for_step(run, 2, process)
        store.stop()  # for good (the last test of the module that needs it)
        gone = time.time()
        out = finish(process, timeout=200)
    finally:
        kill_tree(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert "s3://toe-shards/tiny/train-0000" in out and "max_lost_share" in out, out[-4000:]
    assert time.time() - gone < 90, "ends within the retry bound (0.2 + 0.4 + 0.8 s of waits per read)"
