"""Token labelling: the loss, MixToken, the dense targets and their box order, the shard members and the
paired transform, the label job (LVVIT_SPEC.md test plan 3, 4, 5, 7)."""

import io
import json
import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import models  # noqa: F401  (registers lvvit_*)
from data.token_labels import (
    TokenLabelCodec,
    check_index,
    decode_maps,
    encode_maps,
    index_block,
    oracle_maps,
    smooth_targets,
    token_targets,
)
from methods.token_labelling import (
    TokenLabellingConfig,
    TokenLabellingPlugin,
    mix_token_box,
    soft_cross_entropy,
    token_label_loss,
)

from helpers import edit_shard

TINY = dict(num_classes=10, img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=2, stem_width=8)


# -- the loss -----------------------------------------------------------------------------------


def test_loss_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    cls_logits, aux_logits = torch.randn(4, 7, generator=g), torch.randn(4, 9, 7, generator=g)
    t_cls = torch.rand(4, 7, generator=g).softmax(-1)
    t_tok = torch.rand(4, 9, 7, generator=g).softmax(-1)
    loss, cls_term, dense_term = token_label_loss(cls_logits, aux_logits, t_cls, t_tok, w_cls=0.7, w_dense=0.3)
    direct_cls = sum(-(t_cls[b] * torch.log_softmax(cls_logits[b], -1)).sum() for b in range(4)) / 4
    direct_dense = (
        sum(-(t_tok[b, n] * torch.log_softmax(aux_logits[b, n], -1)).sum() for b in range(4) for n in range(9)) / 36
    )
    assert torch.allclose(cls_term, direct_cls) and torch.allclose(dense_term, direct_dense)
    assert torch.allclose(loss, 0.7 * direct_cls + 0.3 * direct_dense)
    # with one-hot targets it is the cross entropy
    labels = torch.tensor([1, 2, 3, 4])
    assert torch.allclose(
        soft_cross_entropy(cls_logits, torch.eye(7)[labels]).mean(), torch.nn.functional.cross_entropy(cls_logits, labels)
    )


def test_smoothing_sums_to_one_plus_s_over_k():
    p = torch.rand(3, 32).softmax(-1)
    t = smooth_targets(p, 0.1)
    assert torch.allclose(t.sum(-1), torch.full((3,), 1 + 0.1 / 32))
    assert torch.allclose(t, p * (1 - 0.1 + 0.1 / 32) + 0.1 / 32)


@pytest.mark.parametrize("bad", [{"w_dense": -1.0}, {"w_cls": 0.0, "w_dense": 0.0}, {"smoothing": 1.0}])
def test_config_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        TokenLabellingConfig(**bad)


# -- MixToken -----------------------------------------------------------------------------------


def test_mix_token_box_is_step_keyed_and_lam_is_the_swapped_area():
    boxes = {mix_token_box((14, 14), 0, step, 0, 0) for step in range(50)}
    assert mix_token_box((14, 14), 0, 3, 0, 0) == mix_token_box((14, 14), 0, 3, 0, 0)
    assert len(boxes) > 40  # different steps, different boxes
    assert mix_token_box((14, 14), 0, 3, 1, 0) != mix_token_box((14, 14), 0, 3, 0, 0)  # micro-batch
    assert mix_token_box((14, 14), 0, 3, 0, 1) != mix_token_box((14, 14), 0, 3, 0, 0)  # rank
    for (row0, row1, col0, col1), lam in boxes:
        assert 0 <= row0 <= row1 <= 14 and 0 <= col0 <= col1 <= 14
        assert lam == 1 - (row1 - row0) * (col1 - col0) / 196


def _batch(batch_size=4, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(batch_size, 3, 32, 32, generator=g),
        "label": torch.randint(0, num_classes, (batch_size,), generator=g),
        "token_logits": torch.randn(batch_size, 3, 8, 8, generator=g) * 3,
        "token_ids": torch.stack([torch.randperm(num_classes, generator=g)[:3] for _ in range(batch_size)])[:, :, None, None]
        .expand(-1, -1, 8, 8)
        .contiguous(),
        "token_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * batch_size),
    }


def _plugin(model, **options):
    plugin = TokenLabellingPlugin(TokenLabellingConfig(**options), seed=0, rank=0)
    plugin.attach(model)
    return plugin


def test_mix_token_swaps_tokens_and_swaps_aux_logits_back():
    """With zeroed residual branches every token is the stem's plus its position embedding, so after the
    swap-back the aux logits of sample i equal those of an unmixed forward of sample i at every
    position (LVVIT_SPEC test plan 3); the class target is mixed with lam'."""
    torch.manual_seed(0)
    model = timm.create_model("lvvit_s", **TINY).train()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_(), block.attn.proj.bias.zero_()
            block.mlp.fc2.weight.zero_(), block.mlp.fc2.bias.zero_()
    model.patch_embed.eval()  # BatchNorm on running statistics: a sample's tokens do not depend on the batch
    plugin = _plugin(model)
    step = next(s for s in range(100) if 0 < mix_token_box((8, 8), 0, s, 0, 0)[1] < 0.9)
    plugin.on_step(step)
    batch = plugin.on_batch(step, _batch())
    assert model.mix_mask.sum() > 0
    (row0, row1, col0, col1), lam = mix_token_box((8, 8), 0, step, 0, 0)
    assert int(model.mix_mask.sum()) == (row1 - row0) * (col1 - col0)
    with torch.no_grad():
        mixed_cls, mixed_aux = model(batch["image"])
        features = model.forward_features(batch["image"])  # mixed tokens: before the swap-back
        model.mix_mask.zero_()
        plain_cls, plain_aux = model(batch["image"])
    assert torch.allclose(mixed_aux, plain_aux, atol=1e-5)
    box = torch.tensor([r * 8 + c for r in range(row0, row1) for c in range(col0, col1)])
    outside = torch.ones(64, dtype=torch.bool)
    outside[box] = False
    unswapped = model.aux_head(features[:, 1:])  # what the mixed tokens predict before the swap-back
    assert torch.allclose(unswapped[:, box], plain_aux.flip(0)[:, box], atol=1e-5)  # the flipped batch's tokens
    assert torch.allclose(unswapped[:, outside], plain_aux[:, outside], atol=1e-5)
    t_cls, _ = token_targets(batch["token_logits"], batch["token_ids"], batch["token_box"], 10, (8, 8))
    assert torch.allclose(batch["cls_target"], smooth_targets(lam * t_cls + (1 - lam) * t_cls.flip(0), 0.1))


def test_mix_token_off_and_odd_batches():
    model = timm.create_model("lvvit_s", **TINY)
    plugin = _plugin(model, mix_token=False)
    plugin.on_step(0)
    batch = plugin.on_batch(0, _batch())
    assert not model.mix_mask.any()
    t_cls, t_tok = token_targets(batch["token_logits"], batch["token_ids"], batch["token_box"], 10, (8, 8))
    assert torch.allclose(batch["cls_target"], smooth_targets(t_cls, 0.1))
    with pytest.raises(ValueError, match="even micro-batch"):
        _plugin(model).on_batch(0, _batch(batch_size=3))
    with pytest.raises(TypeError, match="lvvit"):
        _plugin(timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=1))


# -- dense targets ------------------------------------------------------------------------------


def _marker_map(num_classes=4):
    """A 4 x 4 map: class 1 in the top-right cell, class 2 in the bottom-left, class 0 elsewhere."""
    logits = np.zeros((1, 4, 4), np.float32) + 8
    ids = np.zeros((1, 4, 4), np.int64)
    ids[0, 0, 3] = 1
    ids[0, 3, 0] = 2
    return torch.from_numpy(logits)[None], torch.from_numpy(ids)[None]


def test_box_order_pins_x1_y1_x2_y2():
    """The top-right quadrant (x in [0.5, 1], y in [0, 0.5]) holds the class-1 marker; the official
    (y1, x1, y2, x2) order reads the bottom-left quadrant instead (LVVIT_SPEC "Transposed crop")."""
    logits, ids = _marker_map()
    box = torch.tensor([[0.5, 0.0, 1.0, 0.5]])
    t_cls, t_tok = token_targets(logits, ids, box, 4, (2, 2))
    assert t_tok[0, 1].argmax() == 1 and t_tok[0, 1, 1] > 0.9  # top-right token of the crop
    assert t_cls[0, 1] > t_cls[0, 2]
    _, official = token_targets(logits, ids, box, 4, (2, 2), official_box_order=True)
    assert official[0, :, 1].max() < 0.5 and official[0, 2].argmax() == 2  # the mirrored quadrant's marker


def test_missing_classes_stay_at_logit_zero():
    logits = torch.full((1, 1, 2, 2), 2.0)
    ids = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    t_cls, _ = token_targets(logits, ids, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 5, (1, 1))
    expected = torch.tensor([2.0, 0, 0, 0, 0]).softmax(-1)
    assert torch.allclose(t_cls[0], expected, atol=1e-6)


# -- the paired transform -----------------------------------------------------------------------


def _mask_sample(region: np.ndarray, label: int, num_classes: int, grid: int):
    """A raw sample whose image is its object's region (white on black) and whose maps are the oracle's."""
    png = io.BytesIO()
    Image.fromarray((region * 255).astype(np.uint8)).convert("RGB").save(png, format="PNG")
    return {
        "__key__": "x",
        "png": png.getvalue(),
        "cls": str(label).encode(),
        **encode_maps(*oracle_maps(region, label, num_classes, grid, 3)),
    }


def _codec(grid, **options):
    settings = dict(
        scale=(0.25, 0.6),
        ratio=(0.75, 1.333),
        hflip=0.5,
        auto_augment=None,
        re_prob=0.0,
        color_jitter=0.0,
        interpolation="bilinear",
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    return TokenLabelCodec(32, index_block("oracle", 32, 3, grid, grid), num_classes=6, **{**settings, **options})


def _cell_checks(t_tok, cover, label):
    """(fully covered cells, empty cells, cells where the target disagrees with the image)."""
    full, empty = cover > 0.97, cover < 0.03
    wrong = (t_tok[full].argmax(-1) != label).sum() + (t_tok[empty, label] >= 0.2).sum()
    return int(full.sum()), int(empty.sum()), int(wrong)


def test_targets_follow_the_cropped_and_flipped_image_cell_by_cell():
    """An asymmetric object (an L in the top-right) whose image is its own mask: after the codec's
    flip + crop + resize, a token cell the transformed image shows fully covered has the object's class
    as its target's argmax, and one it shows empty has a flat target (test plan 4). The official
    (y1, x1, y2, x2) box order fails the same check."""
    region = np.zeros((32, 32), bool)
    region[2:14, 18:30] = True
    region[6:14, 18:26] = False  # an L: asymmetric left-right and top-bottom
    # a map at pixel resolution: a coarser one blurs the object's edge by a map cell (roi_align is bilinear)
    codec, sample = _codec(32), _mask_sample(region, 4, 6, 32)
    totals, official_wrong = np.zeros(3, int), 0
    for seed in range(16):
        random.seed(seed)
        torch.manual_seed(seed)
        image, label, logits, ids, box = codec.decode(sample)
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        cover = image[0].reshape(8, 4, 8, 4).mean(dim=(1, 3)).flatten()  # the transformed image, per token cell
        _, t_tok = token_targets(logits[None], ids[None], box[None], 6, (8, 8))
        totals += _cell_checks(t_tok[0], cover, 4)
        _, t_official = token_targets(logits[None], ids[None], box[None], 6, (8, 8), official_box_order=True)
        official_wrong += _cell_checks(t_official[0], cover, 4)[2]
    full, empty, wrong = totals
    assert (full >= 20 and empty >= 300, wrong) == (True, 0), (full, empty, wrong)
    assert official_wrong > 20, official_wrong


def test_flip_moves_the_marker():
    region = np.zeros((32, 32), bool)
    region[0:8, 24:32] = True  # top-right
    full = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for hflip, column in ((0.0, 7), (1.0, 0)):
        image, _, logits, ids, box = _codec(8, hflip=hflip, **full).decode(_mask_sample(region, 2, 6, 8))
        assert torch.equal(box, torch.tensor([0.0, 0.0, 1.0, 1.0]))
        _, t_tok = token_targets(logits[None], ids[None], box[None], 6, (8, 8))
        assert t_tok[0].reshape(8, 8, 6)[0, column].argmax() == 2 and image[0, 0, column * 4] > 0.9


def test_maps_round_trip_and_bad_maps_are_refused():
    from data.stream import SkipSample

    logits = np.random.default_rng(0).normal(size=(5, 4, 4)).astype(np.float32)
    ids = np.arange(80).reshape(5, 4, 4) % 7
    sample = encode_maps(logits, ids)
    back_logits, back_ids = decode_maps(sample, {"k": 5, "h": 4, "w": 4})
    assert np.array_equal(back_logits, logits.astype(np.float16).astype(np.float32)) and np.array_equal(back_ids, ids)
    assert encode_maps(logits, ids) == sample  # byte-reproducible
    for broken, reason in (({}, "missing_token_label"), ({**sample, "tli.npy": b"xx"}, "bad_token_label")):
        with pytest.raises(SkipSample, match=reason):
            decode_maps(broken)
    with pytest.raises(SkipSample, match="bad_token_label"):
        decode_maps(sample, {"k": 5, "h": 8, "w": 8})
    with pytest.raises(SkipSample, match="bad_token_label"):
        decode_maps(sample, None, num_classes=5)  # ids up to 6
    from data.shards import ShardIndexError

    with pytest.raises(ShardIndexError, match="no 'token_labels' block"):
        check_index({}, "x/shards.json")
    with pytest.raises(ShardIndexError, match="token_labels.k"):
        check_index({"token_labels": {**index_block("t", 32, 5, 4, 4), "k": 0}}, "x/shards.json")


# -- shards, the stream, the label job ----------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory):
    from data import write_shards

    root = tmp_path_factory.mktemp("tl")
    assert (
        write_shards.main(
            ["synthetic", str(root / "plain"), "--train", "64", "--val", "16", "--shard-size", "16", "--no-progress"]
        )
        == 0
    )
    assert (
        write_shards.main(
            [
                "synthetic",
                str(root / "oracle"),
                "--train",
                "64",
                "--val",
                "16",
                "--shard-size",
                "16",
                "--no-progress",
                "--token-labels",
                "8",
                "--token-k",
                "3",
            ]
        )
        == 0
    )
    return root


def test_label_job_oracle_equals_the_writer(labelled_shards):
    from launcher import label

    out = labelled_shards / "job"
    assert (
        label.main(["--oracle", "--shards", str(labelled_shards / "plain"), "--out", str(out), "--grid", "8", "--k", "3"])
        == 0
    )
    written = json.loads((labelled_shards / "oracle" / "shards.json").read_text())
    made = json.loads((out / "shards.json").read_text())
    assert made["token_labels"]["map_top1"] == 1.0  # exact maps name the image's class
    assert {k: v for k, v in made["token_labels"].items() if k not in ("splits", "map_top1")} == written["token_labels"]
    for shard in written["splits"]["train"]["shards"]:
        assert (out / shard["name"]).read_bytes() == (labelled_shards / "oracle" / shard["name"]).read_bytes()
    assert made["splits"] == written["splits"], "the labelled shards' byte offsets are recorded anew"
    assert label.main(["--oracle", "--shards", str(labelled_shards / "plain"), "--out", str(out)]) == 2  # exists


def test_label_job_warns_when_the_maps_are_worse_than_their_teacher():
    from launcher.label import map_warning

    message = map_warning(0.5044, 0.8642)  # the Fashion-MNIST LV-ViT teacher of issue 27
    assert message is not None and "50.4%" in message and "86.4%" in message
    assert map_warning(0.85, 0.8642) is None and map_warning(None, 0.9) is None and map_warning(0.5, None) is None


def test_label_job_from_the_labels_gives_every_cell_the_class(labelled_shards):
    from data.shards import ShardIndex
    from data.token_labels import ORACLE_LOGIT, decode_maps
    from launcher import label

    out = labelled_shards / "labels"
    args = ["--labels", "--shards", str(labelled_shards / "plain"), "--out", str(out), "--grid", "8", "--k", "3"]
    assert label.main(args) == 0
    meta = json.loads((out / "shards.json").read_text())
    assert meta["token_labels"]["teacher"] == "labels" and meta["token_labels"]["map_top1"] == 1.0
    split = ShardIndex.load(str(out)).split("train")
    for shard, count in enumerate(split.counts):
        for _, sample in split.read(shard, list(range(int(count)))):  # the indexed reader, at the new offsets
            logits, ids = decode_maps(sample)
            assert logits.shape == ids.shape == (3, 8, 8)
            assert (ids[0] == int(sample["cls"])).all() and np.allclose(logits[0], ORACLE_LOGIT)
            assert (logits[1:] == 0).all()
    assert _stream(out).__len__() == 8


def _stream(path, **options):
    from data.stream import build_train_stream

    settings = dict(
        batch_size=8,
        num_workers=1,
        seed=3,
        image_size=32,
        buffer_size=16,
        auto_augment=None,
        re_prob=0.0,
        color_jitter=0.0,
        scale=(0.5, 1.0),
        token_labels=True,
    )
    return build_train_stream(str(path), **{**settings, **options})


def test_stream_reads_maps_and_resumes_bit_identically(labelled_shards):
    stream = _stream(labelled_shards / "oracle")
    batches = list(stream)
    assert len(batches) == 8
    first = batches[0]
    assert first["token_logits"].shape == (8, 3, 8, 8) and first["token_ids"].dtype == torch.long
    assert first["token_box"].shape == (8, 4)
    resumed = _stream(labelled_shards / "oracle")
    partial = iter(resumed)
    for _ in range(3):
        next(partial)
    state = resumed.state_dict()
    partial.close()
    again = _stream(labelled_shards / "oracle")
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == 5
    for mine, theirs in zip(rest, batches[3:]):
        for key in ("image", "label", "token_logits", "token_ids", "token_box", "sample_id"):
            assert torch.equal(mine[key], theirs[key]), key
    from data.shards import ShardIndexError

    with pytest.raises(ShardIndexError, match="token_labels"):
        _stream(labelled_shards / "plain")


def test_a_sample_without_maps_is_skipped_and_counted(labelled_shards, tmp_path):
    import shutil

    shutil.copytree(labelled_shards / "oracle", tmp_path / "holed")
    edit_shard(
        tmp_path / "holed" / "train-000000.tar",
        lambda position, ext, data: None if position == 0 and ext.endswith("tlv.npy") else data,
    )
    stream = _stream(tmp_path / "holed")
    batches = list(stream)
    assert stream.counters["missing_token_label"] == 1 and len(batches) == 8
    assert all(b["token_logits"].shape == (8, 3, 8, 8) for b in batches)


@pytest.mark.slow
def test_label_job_from_a_trained_run_of_this_engine(tmp_path, tiny_shards):
    """Train a 2-block DeiT for 4 steps, then label the shards with it: each sample's maps are the top-k
    of the head applied to every final-norm patch token of the whole image warped to the teacher's
    input; the labelled set feeds the token-labelling stream."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from data.shards import ShardIndex, read_samples
    from data.stream import decode_image
    from launcher import label

    root = Path(__file__).resolve().parents[1]
    args = [
        sys.executable,
        "-m",
        "launcher.train",
        "--config",
        str(root / "configs/deit_tiny_cpu.yaml"),
        f"out_dir={tmp_path}",
        "name=teacher",
        f"data.path={tiny_shards}",
        "data.workers=0",
        "train.steps=4",
        "train.global_batch=16",
        "model.kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 2}",
        "train.eval_every=0",
        "checkpoint.every=0",
    ]
    result = subprocess.run(
        args,
        cwd=root,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    out = tmp_path / "labelled"
    assert (
        label.main(
            [
                "--teacher",
                str(tmp_path / "teacher"),
                "--shards",
                str(tiny_shards),
                "--out",
                str(out),
                "--k",
                "4",
                "--splits",
                "train",
            ]
        )
        == 0
    )
    index = ShardIndex.load(str(out))
    block = index.meta["token_labels"]
    assert (block["k"], block["h"], block["w"], block["input_size"]) == (4, 4, 4, 32)
    assert 0 <= block["map_top1"] <= 1 and block["splits"] == ["train"]
    # one sample against a direct computation
    model, config = label.load_teacher(str(tmp_path / "teacher"))
    url = index.split("train").urls[0]
    ((_, sample),) = read_samples(url, [3])
    logits, ids = decode_maps(sample, block)
    with torch.no_grad():
        x = label.TeacherMaps(model, config, 4).prepare(decode_image(sample))[None]
        dense = model.head(model.forward_features(x)[:, 1:])[0].T.reshape(32, 4, 4)
    values, classes = dense.topk(4, dim=0)
    assert np.array_equal(ids, classes.numpy()) and np.allclose(logits, values.numpy(), atol=2e-2)
    # val was copied without maps; the train split streams with them
    ((_, val_sample),) = read_samples(index.split("val").urls[0], [0])
    assert "tlv.npy" not in val_sample
    batch = next(iter(_stream(out, batch_size=8)))
    assert batch["token_logits"].shape == (8, 4, 4, 4)


def test_rand_augment_leaves_out_the_geometric_ops():
    from data.token_labels import GEOMETRIC_OPS

    codec = _codec(8, auto_augment="rand-m9-mstd0.5-inc1")
    names = {op.name for op in codec.augment.ops}
    assert names and not names & set(GEOMETRIC_OPS) and "SolarizeIncreasing" in names
    region = np.zeros((32, 32), bool)
    region[4:12, 4:12] = True
    random.seed(0)
    image, *_ = codec.decode(_mask_sample(region, 1, 6, 8))
    assert image.shape == (3, 32, 32)


def test_recipes_refuse_what_token_labelling_cannot_do():
    from launcher.config import ConfigError, load_config
    from launcher.tasks import make_task

    assert make_task(load_config("configs/lvvit_tiny_cpu.yaml")).stream_fields == {"token_labels"}  # the declaration's
    assert make_task(load_config("configs/lvvit_tiny_plain_cpu.yaml")).stream_fields == set()
    for override, message in (
        ("data.mixup=0.8", "methods.token_labelling: it replaces Mixup / CutMix with MixToken"),
        ("model.name=deit_tiny_patch16_224", "aux head"),
        ("data.vflip=0.5", "vertical flip"),
        ("data.backend=dali", "PIL path"),
    ):
        with pytest.raises(ConfigError, match=message):  # refused at start-up, by the recipe loader
            load_config("configs/lvvit_tiny_cpu.yaml", [override])
    with pytest.raises(ConfigError, match="methods.token_labelling.w_dense"):
        load_config("configs/lvvit_tiny_cpu.yaml", ["methods.token_labelling.w_dense=-1"])
