"""Issue 29, section 5: the smaller faults of the reliability pass, each with the case that showed it.

num_classes against classes.json; the corrupt-image policy of the DALI path; the synthetic index read
by the index reader; launcher.compare's duplicate recipes and empty config.yaml; launcher.submit's
counts and its one base for relative paths; export against checkpoint rotation; one log line per
unreadable shard; per-split sample keys of a pre-split image folder; the tiny LV-ViT recipes writing
their own token-labelled shards.
"""

import contextlib
import io
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import write_shards
from data.shards import ShardIndexError
from data.stream import SkipSample, build_train_stream, decode_image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TINY = [
    "model.kwargs={patch_size: 8, depth: 3, embed_dim: 48, num_heads: 2}",
    "data.workers=1",
    "train.global_batch=16",
    "train.log_every=1",
    "train.eval_every=0",
    "train.precision=fp32",
    "train.zero_stage=1",
]


def run_train(recipe: str, *args, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.train", "--config", str(ROOT / recipe), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- 1. model.num_classes against classes.json ------------------------------------------------------


def test_num_classes_below_the_shards_classes_is_refused_at_start_up_naming_both(tmp_path, tiny_shards):
    from data.shards import check_num_classes

    with pytest.raises(ShardIndexError, match=r"model.num_classes=10, but .*classes.json lists 32 classes"):
        check_num_classes(str(tiny_shards), 10)
    assert check_num_classes(str(tiny_shards), 32) == 32 and check_num_classes(str(tiny_shards), 1000) == 32
    result = run_train(
        "configs/deit_tiny_cpu.yaml",
        f"out_dir={tmp_path}",
        "name=run",
        f"data.path={tiny_shards}",
        "data.synthetic=false",
        "model.num_classes=10",
        "train.steps=2",
        *TINY,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "model.num_classes=10, but" in out and "lists 32 classes (labels 0..31)" in out
    assert "IndexError" not in out and "Traceback" not in out


# -- 2. one corrupt-image policy for the PIL and DALI paths -------------------------------------------

KINDS = ("bytes", "marker", "zeros", "ff_run", "cut")


def _damaged(data: bytes, rng: random.Random, kind: str) -> bytes:
    """``data`` with its scan data damaged (headers and tables intact): random bytes replaced, a marker
    (``0xFF`` + a random code) or a run of zeros or of ``0xFF`` written into it, or its end cut off."""
    start = data.rfind(b"\xff\xda") + 16
    at = rng.randrange(start, len(data) - 2)
    if kind == "bytes":
        out = bytearray(data)
        for _ in range(rng.choice([1, 4, 16, 64])):
            out[rng.randrange(start, len(data) - 2)] = rng.randrange(256)
        return bytes(out)
    if kind == "marker":
        return data[:at] + bytes([0xFF, rng.randrange(0xC0, 0x100)]) + data[at:]
    if kind in ("zeros", "ff_run"):
        run = rng.randrange(8, 64)
        return data[:at] + (b"\0" if kind == "zeros" else b"\xff") * run + data[at + run :]
    return data[:at]


@pytest.fixture(scope="module")
def damaged_jpegs(tmp_path_factory) -> Path:
    """Shards of 4 intact JPEGs and 12 whose scan data is damaged (bytes, markers, zeros, 0xFF runs; the
    writer's ``verify`` lets them through: it reads headers only), in 2 classes."""
    root = tmp_path_factory.mktemp("damaged")
    rng, noise = random.Random(3), np.random.default_rng(3)
    for i in range(16):
        yy, xx = np.mgrid[0:48, 0:64]
        image = noise.integers(0, 255, 3) + 80 * np.sin(xx[..., None] / 5 + yy[..., None] / 7 + noise.uniform(0, 6, 3))
        buffer = io.BytesIO()
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        data = buffer.getvalue() if i < 4 else _damaged(buffer.getvalue(), rng, KINDS[i % 4])
        folder = root / "src" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"i{i:02d}.jpg").write_bytes(data)
    out = root / "shards"
    assert write_shards.main(["imagefolder", str(root / "src"), str(out), "--shard-size", "8", "--no-progress"]) == 0
    return out


def _samples(shards: Path) -> list[dict]:
    from data.shards import ShardIndex, read_samples

    split = ShardIndex.load(str(shards)).split("train")
    return [s for url, n in zip(split.urls, split.counts) for _, s in read_samples(url, list(range(int(n))))]


def _pil_skips(sample: dict) -> bool:
    try:
        decode_image(sample)
        return False
    except SkipSample as skip:
        assert str(skip) == "corrupt_image"
        return True


def test_the_dali_codec_skips_exactly_the_images_the_pil_path_skips(damaged_jpegs):
    from data.dali import DaliCodec

    samples = _samples(damaged_jpegs)
    pil = {s["__key__"] for s in samples if _pil_skips(s)}
    assert 0 < len(pil) < 12, f"the damage must split the 12 damaged files ({len(pil)} undecodable)"
    codec, dali = DaliCodec(True, 32, num_classes=2), set()
    for sample in samples:
        try:
            codec.decode(sample)
        except SkipSample as skip:
            assert str(skip) == "corrupt_image"
            dali.add(sample["__key__"])
    assert dali == pil


def test_the_reduced_decode_check_agrees_with_the_full_decode_on_random_damage():
    """``check_decodable`` decodes a JPEG at 1/8 scale: the same verdict as ``decode_image`` on 150 randomly
    damaged files (``_damaged``, every kind)."""
    from data.stream import check_decodable

    noise, rng = np.random.default_rng(0), random.Random(0)
    image = Image.fromarray((noise.random((120, 160, 3)) * 60 + np.linspace(0, 190, 160)[None, :, None]).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    verdicts = []
    for _ in range(150):
        data = _damaged(buffer.getvalue(), rng, rng.choice(KINDS))
        try:
            check_decodable(data)
            reduced = False
        except SkipSample:
            reduced = True
        verdicts.append((_pil_skips({"jpg": data}), reduced))
    assert all(full == reduced for full, reduced in verdicts)
    assert 5 < sum(full for full, _ in verdicts) < 145, "both verdicts occur"


@pytest.mark.skipif("not __import__('data.dali', fromlist=['x']).dali_available()", reason="NVIDIA DALI not installed")
def test_the_dali_stream_counts_the_pil_streams_corrupt_images(damaged_jpegs, caplog):
    from data import dali

    options = dict(
        batch_size=4, num_workers=0, seed=1, image_size=32, buffer_size=4, auto_augment=None, re_prob=0.0, color_jitter=0.0
    )
    with caplog.at_level(logging.WARNING, logger="data.stream"):
        pil = build_train_stream(str(damaged_jpegs), **options)
        list(pil)
        pil_lines = {
            r.getMessage().split(" (position")[0].split("skipped sample ")[1]
            for r in caplog.records
            if "skipped sample" in r.getMessage()
        }
        caplog.clear()
        ours = dali.build_train_stream(str(damaged_jpegs), num_threads=1, device="cpu", **options)
        batches = list(ours)
        dali_lines = {
            r.getMessage().split(" (position")[0].split("skipped sample ")[1]
            for r in caplog.records
            if "skipped sample" in r.getMessage()
        }
    assert len(batches) == len(ours)
    assert ours.counters["corrupt_image"] == pil.counters["corrupt_image"] > 0
    assert ours.counters["dali_failed"] == 0 and dali_lines == pil_lines


# -- 3. the synthetic index through the index reader ---------------------------------------------------


def test_a_broken_synthetic_index_is_a_named_refusal(tmp_path):
    from data.write_shards import synthetic_holds

    folder = tmp_path / "synthetic"
    folder.mkdir()
    (folder / "shards.json").write_text('{"format": "toe-shards/1",\n "synthetic": {oops}}\n')
    with pytest.raises(ShardIndexError, match=r"shards.json is not valid JSON: line 2"):
        synthetic_holds(str(folder), size=32, objects=1)
    result = run_train(
        "configs/deit_tiny_cpu.yaml", f"out_dir={tmp_path}", "name=run", f"data.path={folder}", "train.steps=2", *TINY
    )
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert f"{folder}/shards.json is not valid JSON: line 2, column" in out and "JSONDecodeError" not in out


# -- 4. launcher.compare: a recipe listed twice, an empty config.yaml -----------------------------------


def test_compare_refuses_a_recipe_listed_twice(tmp_path, monkeypatch):
    from launcher import compare

    recipe = "configs/deit_tiny_cpu.yaml"
    monkeypatch.chdir(ROOT)
    for twice in ([recipe, recipe], [recipe, "./" + recipe], [str(ROOT / recipe), recipe]):
        with pytest.raises(compare.ConfigError, match="lists .*deit_tiny_cpu.yaml twice"):
            compare.plan(twice, 1, tmp_path, ["train.steps=4"])
    assert compare.main(["--recipes", recipe, recipe, "--seeds", "1", "--out", str(tmp_path / "cmp"), "train.steps=4"]) == 2
    assert not (tmp_path / "cmp").exists(), "refused before anything runs"


@pytest.mark.parametrize(
    "content, what", [("", "is empty"), ("# nothing\n", "is empty"), ("{}\n", "is empty"), ("- a\n- b\n", "holds a list")]
)
def test_compare_refuses_an_empty_config_yaml_in_a_run_folder(tmp_path, content, what):
    from launcher import compare

    planned = compare.plan([str(ROOT / "configs/deit_tiny_cpu.yaml")], 1, tmp_path, ["train.steps=4"])[0]
    planned.run_dir.mkdir(parents=True)
    (planned.run_dir / "config.yaml").write_text(content)
    with pytest.raises(compare.ConfigError, match=f"config.yaml {what}"):
        compare.check_folder(planned)


# -- 5. launcher.submit: --nodes 0, and one base for relative paths -------------------------------------


def test_submit_refuses_counts_that_make_no_job(capsys):
    from launcher import compare, submit

    config = str(ROOT / "configs/deit_tiny_cpu.yaml")
    for flags, message in (
        (["--nodes", "0"], "--nodes must be >= 1, got 0"),
        (["--nodes", "-2"], "--nodes must be >= 1, got -2"),
        (["--cpus-per-task", "0"], "--cpus-per-task must be >= 1, got 0"),
        (["--tasks-per-node", "-1"], "--tasks-per-node must be >= 0, got -1"),
    ):
        assert submit.main(["--config", config, "--tasks-per-node", "1", *flags, "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        compare.parse_args(["--recipes", config, "--out", "x", "--slurm", "--tasks-per-node", "1", "--nodes", "0"])
    assert exit_info.value.code == 2 and "--nodes must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_submit_from_outside_the_repository_resolves_output_lock_and_data_against_the_repository(tmp_path):
    from launcher.runlock import RunLock

    bin_dir, elsewhere = tmp_path / "bin", tmp_path / "elsewhere" / "deeper"
    bin_dir.mkdir()
    elsewhere.mkdir(parents=True)
    calls = tmp_path / "sbatch_calls"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$(pwd) $@" >> {calls}\necho 42\n')
    (bin_dir / "sbatch").chmod(0o755)
    runs = tmp_path / "runs"
    out_dir = os.path.relpath(runs, ROOT)  # relative: it names another folder from `elsewhere`
    data = os.path.relpath(tmp_path / "shards", ROOT)
    command = [
        sys.executable,
        "-m",
        "launcher.submit",
        "--config",
        str(ROOT / "configs/deit_tiny_cpu.yaml"),
        "--tasks-per-node",
        "1",
        f"out_dir={out_dir}",
        "name=job",
        f"data.path={data}",
    ]
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    lock = RunLock(runs / "job").acquire()  # a live job of this run, in the folder the job would use
    try:
        held = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    finally:
        lock.release()
    assert held.returncode == 2 and f"run folder {runs / 'job'} is in use" in held.stderr, held.stderr[-2000:]
    assert not calls.exists(), "refused before sbatch"

    result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    cwd, *args = calls.read_text().split()
    assert cwd == str(ROOT), "sbatch runs in the repository: SLURM_SUBMIT_DIR, where the job runs"
    assert f"--output={runs / 'job'}/slurm-%j.out" in args
    assert f"out_dir={runs}" in args and f"data.path={tmp_path / 'shards'}" in args
    assert not (elsewhere / out_dir).exists() and not Path(elsewhere / out_dir).resolve().exists()


# -- 6. launcher.export against checkpoint rotation -----------------------------------------------------

HOLD = (
    "import sys; from launcher.runlock import checkpoint_readers\n"
    "with checkpoint_readers(sys.argv[1]) as held:\n"
    "    print('held' if held else 'not held', flush=True); sys.stdin.read()\n"
)


@contextlib.contextmanager
def _reader_holding(folder: Path):
    """A reader of ``folder``'s checkpoints (another process: POSIX locks are per process) holding its lock."""
    reader = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "held"
        yield
    finally:
        reader.communicate("", timeout=60)


def _fake_checkpoints(folder: Path, steps) -> None:
    for step in steps:
        (folder / f"step-{step}").mkdir(parents=True)
        (folder / f"step-{step}" / "meta.json").write_text(json.dumps({"step": step}))


def test_rotation_leaves_checkpoints_to_a_reader_and_catches_up_after(tmp_path, caplog):
    from launcher.checkpoint import Checkpointer

    folder = tmp_path / "checkpoints"
    _fake_checkpoints(folder, [1, 2, 3, 4])
    checkpointer = Checkpointer.__new__(Checkpointer)
    checkpointer.folder, checkpointer.keep = folder, 2
    with _reader_holding(folder):
        with caplog.at_level(logging.INFO, logger="launcher.checkpoint"):
            checkpointer._prune()
        assert sorted(p.name for p in folder.glob("step-*")) == ["step-1", "step-2", "step-3", "step-4"]
        assert "checkpoint rotation deferred to the next save: a reader holds" in caplog.text
    checkpointer._prune()
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-3", "step-4"]


def test_saving_a_step_again_waits_for_the_readers_of_the_old_one(tmp_path, caplog):
    """A run resumed from an older checkpoint saves step N again: the old step-N goes only after its
    readers are done (they verify it and then open its files by name: they would read the new ones)."""
    import threading

    from launcher.checkpoint import Checkpointer

    folder = tmp_path / "checkpoints"
    _fake_checkpoints(folder, [1, 2])
    checkpointer = Checkpointer.__new__(Checkpointer)
    checkpointer.folder = folder
    with _reader_holding(folder):
        with caplog.at_level(logging.INFO, logger="launcher.runlock"):
            replacing = threading.Thread(target=checkpointer._replace, args=(folder / "step-2",))
            replacing.start()
            replacing.join(timeout=1.0)
            assert replacing.is_alive() and (folder / "step-2" / "meta.json").is_file(), "kept while read"
            assert "waiting for the readers of" in caplog.text and "before replacing step-2" in caplog.text
    replacing.join(timeout=60)
    assert not replacing.is_alive() and sorted(p.name for p in folder.glob("step-*")) == ["step-1"]
    checkpointer._replace(folder / "step-1")  # no reader: at once
    assert not list(folder.glob("step-*"))


@pytest.mark.slow
def test_export_during_training_with_rotation_succeeds_every_time(tmp_path, tiny_shards):
    """A run that checkpoints every step and keeps one: exports while it trains, at least six and until one
    has overlapped a rotation (before: 4 of 6 exited 2, their checkpoint deleted between verification and
    load)."""
    from launcher.export import export

    run, log_path = tmp_path / "run", tmp_path / "train.log"
    args = [
        sys.executable,
        "-m",
        "launcher.train",
        "--config",
        str(ROOT / "configs/deit_tiny_cpu.yaml"),
        f"out_dir={tmp_path}",
        "name=run",
        f"data.path={tiny_shards}",
        "data.synthetic=false",
        *TINY,
        "train.steps=400",
        "checkpoint.every=1",
        "checkpoint.keep=1",
    ]
    deferred = "checkpoint rotation deferred to the next save"
    exported, failures = [], []
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 300
            while not (run / "checkpoints" / "latest").is_file() and process.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            while (
                process.poll() is None
                and len(exported) < 40
                and len(failures) < 6
                and (len(exported) < 6 or deferred not in log_path.read_text())
            ):
                try:
                    out = export(str(run), str(tmp_path / f"model{len(exported)}.pth"))
                    exported.append(json.loads(out.with_suffix(".json").read_text())["step"])
                except (FileNotFoundError, RuntimeError) as err:
                    failures.append(str(err))
        finally:
            process.kill()  # enough exports: the run need not finish
            process.wait(timeout=300)
    log = log_path.read_text()
    assert not failures, failures
    assert len(exported) >= 6 and exported == sorted(exported), (exported, log[-3000:])
    assert deferred in log, "an export overlapped a rotation"


# -- 7. one line per unreadable shard ------------------------------------------------------------------


def test_a_shard_holding_fewer_samples_than_its_index_claims_logs_one_line(tmp_path, caplog):
    out = tmp_path / "shards"
    assert (
        write_shards.main(
            [
                "synthetic",
                str(out),
                "--train",
                "200",
                "--val",
                "8",
                "--shard-size",
                "100",
                "--size",
                "16",
                "--no-progress",
                "--no-shuffle",
            ]
        )
        == 0
    )
    index = json.loads((out / "shards.json").read_text())
    shard = index["splits"]["train"]["shards"][0]
    shard["samples"] = 1000  # the tar holds 100
    for recorded in ("offsets", "bytes"):  # an index from before byte offsets (those would not match: refused)
        shard.pop(recorded, None)
    index["splits"]["train"]["total"] = 1100
    (out / "shards.json").write_text(json.dumps(index))
    stream = build_train_stream(
        str(out),
        batch_size=4,
        num_workers=0,
        image_size=16,
        buffer_size=16,
        auto_augment=None,
        re_prob=0.0,
        color_jitter=0.0,
    )
    with caplog.at_level(logging.WARNING, logger="data.stream"):
        batches = list(stream)
    assert len(batches) == len(stream) == 1100 // 4
    assert stream.counters["unreadable_sample"] == 900 and stream.counters["unreadable_shard"] == 1
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if "skipped sample" in line]
    shard_lines = [line for line in lines if "train-000000.tar" in line]
    assert len(shard_lines) == 1 and "900 of the 1000 samples wanted from it here are unreadable" in shard_lines[0]
    assert "holds 100 samples" in shard_lines[0]


# -- 8. a pre-split image folder whose splits reuse file names ------------------------------------------


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_a_presplit_tree_reusing_file_names_across_splits_is_written(tmp_path, caplog):
    src = tmp_path / "png"
    for split, count in (("train", 3), ("val", 2)):
        for label in ("3", "7"):
            for i in range(count):
                _png(src / split / label / f"{i:05d}.png", 10 * i + int(label))
    out = tmp_path / "shards"
    assert write_shards.main(["imagefolder", str(src), str(out), "--no-progress"]) == 0
    index = json.loads((out / "shards.json").read_text())
    assert index["splits"]["train"]["total"] == 6 and index["splits"]["val"]["total"] == 4
    keys = {split: sorted(s["__key__"] for s in _split_samples(out, split)) for split in ("train", "val")}
    assert keys["val"] == ["3/00000", "3/00001", "7/00000", "7/00001"] and set(keys["val"]) < set(keys["train"])

    _png(src / "train" / "3" / "00001.jpg", 5)  # the same key as train/3/00001.png, in the same split
    with caplog.at_level(logging.ERROR, logger="data.write_shards"):
        assert write_shards.main(["imagefolder", str(src), str(tmp_path / "again"), "--no-progress"]) == 2
    assert (
        f"{src / 'train/3/00001.jpg'} and {src / 'train/3/00001.png'}" in caplog.text
        or f"{src / 'train/3/00001.png'} and {src / 'train/3/00001.jpg'}" in caplog.text
    )
    assert "the same sample key '3/00001' in split 'train'" in caplog.text


def _split_samples(out: Path, split: str) -> list[dict]:
    from data.shards import ShardIndex, read_samples

    index = ShardIndex.load(str(out)).split(split)
    return [s for url, n in zip(index.urls, index.counts) for _, s in read_samples(url, list(range(int(n))))]


# -- 9. the tiny LV-ViT recipes write their token-labelled shards ----------------------------------------


def test_synthetic_token_labels_are_checked_against_the_folder(tmp_path, tiny_shards):
    from data.synthetic import synthetic_geometry
    from data.write_shards import synthetic_holds
    from launcher.config import ConfigError, load_config

    with pytest.raises(ShardIndexError, match="without token labels, but the recipe wants them"):
        synthetic_holds(str(tiny_shards), size=32, objects=1, token_labels=16)
    synthetic_holds(str(tiny_shards), size=32, objects=1)
    with pytest.raises(ShardIndexError, match="'size': 48"):
        synthetic_holds(str(tiny_shards), size=48, objects=1)
    cfg = load_config(str(ROOT / "configs/lvvit_tiny_cpu.yaml"))
    assert cfg.data.synthetic and cfg.data.synthetic_token_labels == 16
    assert synthetic_geometry(cfg.data, cfg.model.img_size) == {"size": 32, "objects": 1, "token_labels": 16}
    with pytest.raises(ConfigError, match="synthetic_token_labels=5 needs"):
        load_config(str(ROOT / "configs/lvvit_tiny_cpu.yaml"), ["data.synthetic_token_labels=5"])


@pytest.mark.slow
def test_the_tiny_lvvit_recipe_writes_its_token_labelled_shards_on_a_fresh_checkout(tmp_path):
    shards = tmp_path / "synthetic_tl"  # as data/shards/synthetic_tl on a fresh checkout: not there
    result = run_train(
        "configs/lvvit_tiny_cpu.yaml",
        f"out_dir={tmp_path}",
        "name=run",
        f"data.path={shards}",
        "train.steps=2",
        "data.workers=0",
        "train.global_batch=16",
        "train.eval_every=0",
        "model.kwargs={patch_size: 4, depth: 2, embed_dim: 48, num_heads: 2, stem_width: 8}",
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    index = json.loads((shards / "shards.json").read_text())
    assert index["synthetic"] == {"seed": 0, "size": 32, "objects": 1}
    labels = index["token_labels"]
    assert labels["teacher"] == "oracle" and (labels["h"], labels["w"]) == (16, 16)
    assert "no shard index" not in out and (tmp_path / "run" / "final.json").is_file()
