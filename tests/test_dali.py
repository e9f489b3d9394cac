"""data/dali/: the DALI data path through the real shard stream, on the CPU (the GPU variant differs
only by the decoder's and operators' device and is not run here)."""

import io
import math
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import write_shards
from data.dali import IDENTITY, RAND_OPS, DaliCodec, check_dali_options, dali_available
from data.stream import _decode_seeded, _sample_seed, build_eval_stream, build_train_stream

from helpers import edit_shard

pytestmark = pytest.mark.skipif(
    not dali_available(), reason="NVIDIA DALI is not installed (pip install -r requirements-dali.txt; install.sh does it)"
)
if dali_available():
    from data import dali

SIZE = 32
DEIT = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, color_jitter=0.3, interpolation="bicubic")


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory) -> Path:
    """48 JPEGs (quality 90, 56-72 x 42-54 px, smooth colour fields: they decode to real images) in 4 classes."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(48):
        w, h = int(rng.integers(56, 72)), int(rng.integers(42, 54))
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 255, 3)
        image = (
            (
                base
                + 80 * np.sin(xx[..., None] / rng.uniform(3, 9) + yy[..., None] / rng.uniform(3, 9) + rng.uniform(0, 6, 3))
            )
            .clip(0, 255)
            .astype(np.uint8)
        )
        folder = root / "src" / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"i{i:03d}.jpg", quality=90)
    out = root / "shards"
    assert write_shards.main(["imagefolder", str(root / "src"), str(out), "--shard-size", "12", "--no-progress"]) == 0
    return out


def dali_train(path, **kw):
    args = dict(batch_size=4, num_workers=2, seed=5, image_size=SIZE, buffer_size=8, num_threads=1, device="cpu", **DEIT)
    return dali.build_train_stream(str(path), **{**args, **kw})


def test_train_batches_are_the_pil_streams_in_order_shape_and_scale(jpeg_shards):
    ours = list(dali_train(jpeg_shards))
    pil = list(
        build_train_stream(str(jpeg_shards), batch_size=4, num_workers=2, seed=5, image_size=SIZE, buffer_size=8, **DEIT)
    )
    assert len(ours) == len(pil) == 48 // 8 * 2
    for a, b in zip(ours, pil):
        assert torch.equal(a["sample_id"], b["sample_id"]) and torch.equal(a["label"], b["label"])
        assert a["image"].shape == b["image"].shape == (4, 3, SIZE, SIZE) and a["image"].dtype == b["image"].dtype
        assert a["valid"].all()
    images, reference = torch.cat([b["image"] for b in ours]), torch.cat([b["image"] for b in pil])
    # the same crops, flips, RandAugment draws and erased boxes; DALI's pixel arithmetic, not PIL's
    means, ref_means = images.mean((0, 2, 3)), reference.mean((0, 2, 3))
    stds, ref_stds = images.std((0, 2, 3)), reference.std((0, 2, 3))
    print(f"per-channel mean DALI {means.tolist()} PIL {ref_means.tolist()}; std {stds.tolist()} {ref_stds.tolist()}")
    assert torch.allclose(means, ref_means, atol=0.15) and torch.allclose(stds, ref_stds, rtol=0.15)
    close = (images - reference).abs().flatten(1).median(1).values
    assert (close < 0.1).float().mean() > 0.5, "most images nearly equal pixel for pixel (same crop and ops)"


def test_eval_stream_matches_the_pil_eval_transform(jpeg_shards, tmp_path):
    ours = list(
        dali.build_eval_stream(
            str(jpeg_shards),
            batch_size=5,
            num_workers=2,
            image_size=SIZE,
            split="train",
            num_threads=1,
            device="cpu",
            crop_pct=0.875,
        )
    )
    pil = list(
        build_eval_stream(str(jpeg_shards), batch_size=5, num_workers=2, image_size=SIZE, split="train", crop_pct=0.875)
    )
    valid = [i for b in ours for i in b["sample_id"][b["valid"]].tolist()]
    assert sorted(valid) == list(range(48)), "every sample once, the padding marked"
    for a, b in zip(ours, pil):
        assert torch.equal(a["sample_id"], b["sample_id"]) and torch.equal(a["valid"], b["valid"])
        difference = (a["image"] - b["image"])[a["valid"]].abs().mean().item()
        # DALI's and PIL's antialiased bicubic differ on these 3-9 px stripes (~3 grey levels; 0.003 on smooth images)
        assert difference < 0.1, f"resize + centre crop + normalise as timm's: mean |diff| {difference:.3f}"


def timm_arg(name: str, level_args: tuple) -> list[float]:
    """What ``level_to_arg`` should give, from the arguments timm's op was called with."""
    if name == "PosterizeIncreasing":
        return [float((0xFF << (8 - level_args[0])) & 0xFF), 0.0]
    if name in ("TranslateXRel", "TranslateYRel"):
        level_args = (level_args[0] * SIZE,)
    if name in ("ShearY", "TranslateYRel"):
        return [0.0, float(level_args[0])]
    return [float(level_args[0]), 0.0] if level_args else [0.0, 0.0]


def test_parameters_are_timms_draws_for_the_sample(jpeg_shards):
    """Under the stream's per-sample seeding the codec makes the calls timm's transform makes: the
    same crop box, flip, RandAugment ops and op arguments as the PIL path for every sample."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp

    codec = DaliCodec(True, SIZE, **DEIT)
    raw = {"__key__": "k", "cls": b"1", "jpg": _first_jpeg(jpeg_shards)}
    width, height = Image.open(io.BytesIO(raw["jpg"])).size
    applied = []

    def recorder(name):
        def record(img, *args, **kwargs):
            applied.append((name, args))
            return img

        return record

    ra = rand_augment_transform(
        "rand-m9-mstd0.5-inc1",
        {"translate_const": 14, "img_mean": (124, 116, 104), "interpolation": str_to_pil_interp("bicubic")},
    )
    for op in ra.ops:
        op.aug_fn = recorder(op.name)

    def timm_draws(_):  # timm transforms_imagenet_train's order: crop, hflip, RandAugment
        image = Image.new("RGB", (width, height))
        box = RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
        flip = bool(torch.rand(1) < 0.5)
        ra(image)
        return box, flip

    seen = Counter()
    for position in range(300):
        seed = _sample_seed(5, 0, position, 0, 0)
        (_, params), label = _decode_seeded(codec, raw, seed)
        applied.clear()
        box, flip = _decode_seeded(type("Timm", (), {"decode": staticmethod(timm_draws)}), raw, seed)
        assert list(params["crop"]) == [box[1], box[0], box[3], box[2]] and bool(params["flip"][0]) == flip
        kept = params["ops"] != IDENTITY
        assert [RAND_OPS[o] for o in params["ops"][kept]] == [name for name, _ in applied]
        for arg, (name, level_args) in zip(params["args"][kept], applied):
            assert np.allclose(arg, timm_arg(name, level_args), rtol=1e-6, atol=1e-4), (name, arg, level_args)
            seen[name] += 1
    assert sum(seen.values()) > 200 and len(seen) == len(RAND_OPS), seen  # ~300 applied ops: every kind


def test_each_randaugment_op_matches_timms_pil_op():
    """Every op at magnitude 9 on a test image, DALI against timm's PIL op with the same argument."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug.core._select import select
    from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP

    size, fill = 48, 115
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([(xx * 5) % 256, (yy * 4 + 30) % 256, ((xx + 2 * yy) * 3) % 256], -1).astype(np.uint8)
    image[5:20, 8:30] = [250, 20, 40]
    suite = dali._rand_ops(fill)

    @pipeline_def(
        batch_size=1, num_threads=1, device_id=None, enable_conditionals=True, exec_dynamic=True, prefetch_queue_depth=1
    )
    def one_op():
        data = fn.external_source(name="image", layout="HWC", dtype=types.UINT8)
        op = fn.external_source(name="op", dtype=types.INT32)
        return select(suite, op, data, fn.external_source(name="arg", dtype=types.FLOAT))

    pipe = one_op()
    pipe.build()
    report = {}
    for index, name in enumerate(RAND_OPS):
        random.seed(1)  # the same sign on both sides
        arg = dali.level_to_arg(name, 9.0, size)
        random.seed(1)
        level_args = LEVEL_TO_ARG[name](9.0, {"translate_pct": 0.45}) if LEVEL_TO_ARG[name] else ()
        expected = np.asarray(
            NAME_TO_OP[name](Image.fromarray(image), *level_args, fillcolor=(fill,) * 3, resample=Image.BILINEAR)
        ).astype(int)
        pipe.feed_input("image", [image])
        pipe.feed_input("op", [np.array(index, np.int32)])
        pipe.feed_input("arg", [np.array(arg, np.float32)])
        got = np.array(pipe.run()[0][0]).astype(int)
        report[name] = (np.abs(got - expected).mean(), np.abs(image.astype(int) - expected).mean())
    print({name: f"{d:.2f} (op's own effect {e:.1f})" for name, (d, e) in report.items()})
    for name, (difference, effect) in report.items():
        if name == "Equalize":  # OpenCV's formula, not PIL's (DALI's note): documented, not matched
            continue
        assert difference < 1.5 and (effect < 2 or difference < effect / 10), name


def _first_jpeg(shards: Path) -> bytes:
    with tarfile.open(sorted(shards.glob("train-*.tar"))[0]) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        return tar.extractfile(member).read()


@pytest.mark.slow
def test_a_resumed_stream_gives_the_uninterrupted_batches(jpeg_shards):
    straight = dali_train(jpeg_shards)
    expected = list(straight) + [b for _, b in zip(range(3), straight)]  # epoch 0 and into epoch 1
    for k in (3, 12):  # 3: mid-epoch, not a multiple of the worker count; 12: the end of epoch 0
        head = dali_train(jpeg_shards)
        batches = iter(head)
        got = [next(batches) for _ in range(k)]
        state = head.state_dict()
        batches.close()
        tail = dali_train(jpeg_shards)
        tail.load_state_dict(state)
        rest = list(tail) if k < 12 else []
        got += rest + [b for _, b in zip(range(len(expected) - len(got) - len(rest)), tail)]
        assert len(got) == len(expected)
        for a, b in zip(expected, got):
            assert torch.equal(a["sample_id"], b["sample_id"]) and torch.equal(a["image"], b["image"]), k


def bad_shards(src: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The JPEG shards with one truncated JPEG, one of garbage bytes and one without its label."""
    out = tmp_path / "bad"
    out.mkdir()
    for item in src.iterdir():
        (out / item.name).write_bytes(item.read_bytes())
    tar_path = sorted(out.glob("train-*.tar"))[1]
    kinds = {1: "truncated", 4: "garbage", 7: "unlabelled"}

    def damage(position: int, ext: str, data: bytes):
        kind = kinds.get(position)
        if kind == "truncated" and ext == "jpg":
            return data[: len(data) * 4 // 5]  # past the header, short of the end
        if kind == "garbage" and ext == "jpg":
            return b"\xff\xd8\xff" + bytes(range(256)) * 4
        return None if kind == "unlabelled" and ext == "cls" else data

    keys = edit_shard(tar_path, damage)
    broken = {keys[position]: kind for position, kind in kinds.items()}
    return out, broken


def test_bad_samples_are_counted_and_skipped_in_the_worker(jpeg_shards, tmp_path, caplog):
    out, broken = bad_shards(jpeg_shards, tmp_path)
    stream = dali_train(out)
    with caplog.at_level("WARNING"):
        batches = list(stream)
    assert len(batches) == len(stream) == 12, "the epoch keeps its length (refilled)"
    assert stream.counters["corrupt_image"] == 2 and stream.counters["missing_label"] == 1
    assert stream.counters["dali_failed"] == 0, "caught before DALI"
    assert all(key in caplog.text for key in broken)
    assert all(b["valid"].all() and b["image"].shape == (4, 3, SIZE, SIZE) for b in batches)


def test_a_sample_that_fails_in_dali_is_counted_and_its_slot_filled(jpeg_shards, tmp_path, monkeypatch, caplog):
    """Without the worker's check the truncated JPEG reaches DALI, which refuses the batch: the stream
    decodes that batch sample by sample, counts the one that fails, and fills its slot (marked)."""
    out, broken = bad_shards(jpeg_shards, tmp_path)

    check = dali.check_encoded
    # the truncated JPEG passes when its end marker is not looked for; num_workers=0: the codec runs here
    monkeypatch.setattr(dali.codec, "check_encoded", lambda data: check(data + b"\xff\xd9"))
    stream = dali_train(out, num_workers=0)
    with caplog.at_level("WARNING"):
        batches = [b for b in stream]
    assert len(batches) == len(stream)
    assert stream.counters["dali_failed"] == 1 and stream.counters["corrupt_image"] == 1, "garbage: the header check"
    assert "decoding its samples one by one" in caplog.text and "DALI cannot decode it" in caplog.text
    invalid = [b for b in batches if not b["valid"].all()]
    assert len(invalid) == 1 and int((~invalid[0]["valid"]).sum()) == 1
    for b in invalid:
        hole = int(torch.nonzero(~b["valid"])[0])
        donor = next(i for i in range(4) if b["valid"][i] and b["sample_id"][i] == b["sample_id"][hole])
        assert torch.equal(b["image"][hole], b["image"][donor]) and b["label"][hole] == b["label"][donor]
    assert all(b["image"].shape == (4, 3, SIZE, SIZE) for b in batches)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the GPU pipeline (mixed decode, GPU ops) is not exercised here"
)
def test_the_gpu_pipeline_gives_the_cpu_pipelines_batches(jpeg_shards):
    """The same stream on the GPU: same samples, images on the device, close to the CPU pipeline's
    (nvJPEG and the GPU kernels round differently); exact resume holds there too."""
    cpu, gpu = dali_train(jpeg_shards), dali_train(jpeg_shards, device="gpu")
    batches = list(gpu)
    for a, b in zip(cpu, batches):
        assert b["image"].device.type == "cuda" and torch.equal(a["sample_id"], b["sample_id"])
        assert (a["image"] - b["image"].cpu()).abs().mean() < 0.05
    head = dali_train(jpeg_shards, device="gpu")
    first = iter(head)
    got = [next(first) for _ in range(5)]
    state = head.state_dict()
    first.close()
    tail = dali_train(jpeg_shards, device="gpu")
    tail.load_state_dict(state)
    for a, b in zip(batches, got + list(tail)):
        assert torch.equal(a["image"], b["image"])


def no_randaugment_ops_nor_erasing(step, options):  # a step-aware schedule (module level: picklable)
    return {**options, "auto_augment": "rand-m9-mstd0.5-inc1-p0", "re_prob": 0.0}


def test_a_step_aware_schedule_sets_the_draws_of_each_step(jpeg_shards):
    """``set_augmentation_schedule`` (data/stream.py) reaches the DALI codec: a schedule that turns every
    RandAugment op and the erasing off gives the batches of a stream built with those options."""
    scheduled = dali_train(jpeg_shards, num_workers=0)
    scheduled.set_augmentation_schedule(no_randaugment_ops_nor_erasing)
    plain = dali_train(jpeg_shards, num_workers=0, auto_augment="rand-m9-mstd0.5-inc1-p0", re_prob=0.0)
    deit = dali_train(jpeg_shards, num_workers=0)
    for a, b, c in zip(scheduled, plain, deit):
        assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])


def test_options_the_dali_path_does_not_implement_are_refused():
    check_dali_options("data.", **DEIT)
    for options, message in (
        (dict(interpolation="box"), "interpolation"),
        (dict(auto_augment="rand-m9-mstd0.5"), "increasing"),
        (dict(auto_augment="augmix-m5"), "RandAugment"),
        (dict(auto_augment=None, color_jitter=0.4), "color_jitter"),
    ):
        with pytest.raises(ValueError, match=message):
            check_dali_options("data.", **{**DEIT, **options})
    check_dali_options("data.", auto_augment=None, color_jitter=0.0)


@pytest.mark.slow
def test_launcher_train_runs_with_the_dali_backend(tiny_shards, tmp_path):
    from helpers import records, train

    run_dir = tmp_path / "dali"
    out = train(
        run_dir,
        tiny_shards,
        "data.backend=dali",
        "train.steps=3",
        "methods={}",
        "data.auto_augment=rand-m9-mstd0.5-inc1",
        "data.re_prob=0.25",
    )
    steps = records(run_dir)
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps.values()), out[-2000:]
    assert "DALI train pipeline built on the CPU" in out and "DALI eval pipeline built on the CPU" in out, out[-2000:]
