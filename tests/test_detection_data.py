"""Detection data: box-aware transforms, padded batches, the stream's guarantees, COCO AP end to end."""

import io
import json
from collections import Counter

import pytest
import torch

from data import write_shards
from data.detection import (
    DetectionCodec,
    build_detection_stream,
    build_detection_transform,
    coco_evaluate,
    postprocess,
    resized_size,
)
from data.shards import ShardIndex, read_samples

from helpers import edit_shard

SIZES = dict(scales=[48, 64, 80], max_size=120, crop_scales=[48, 64], crop_size=(32, 60), pad_multiple=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "shards"
    assert (
        write_shards.main(
            [
                "synthetic",
                str(out),
                "--train",
                "64",
                "--val",
                "20",
                "--size",
                "64",
                "--objects",
                "3",
                "--shard-size",
                "16",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def eval_batches(shards, **kwargs):
    stream = build_detection_stream(str(shards), train=False, batch_size=4, num_workers=0, **SIZES, **kwargs)
    return list(stream)


def test_eval_transform_scales_boxes_with_the_image(shards):
    batch = eval_batches(shards)[0]
    index = ShardIndex.load(str(shards)).split("val")
    _, raw = next(read_samples(index.urls[0], [0]))
    meta = json.loads(raw["json"])
    target = batch["targets"][0]
    assert target["size"].tolist() == [80, 80] and target["orig_size"].tolist() == [64, 64]
    height, width = batch["image"].shape[-2:]
    assert height % 8 == 0 and width % 8 == 0 and height >= 80 and width >= 80
    expected = torch.tensor(meta["boxes"]) * 80 / 64
    got = target["boxes"] * torch.tensor([80, 80, 80, 80])  # normalised by the unpadded image, as YOLOS
    got = torch.cat([got[:, :2] - got[:, 2:] / 2, got[:, :2] + got[:, 2:] / 2], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    assert target["labels"].tolist() == meta["labels"]


def test_train_stream_equal_batches_padded_and_boxes_valid(shards):
    streams = [
        build_detection_stream(
            str(shards), train=True, batch_size=4, rank=r, world_size=2, num_workers=2, seed=1, buffer_size=8, **SIZES
        )
        for r in range(2)
    ]
    counts = []
    for stream in streams:
        batches = list(stream)
        counts.append(len(batches))
        for batch in batches:
            assert batch["image"].shape[-1] % 8 == 0 and batch["image"].shape[-2] % 8 == 0
            for target in batch["targets"]:
                size_h, size_w = target["size"].tolist()  # YOLOS floors resized sides to the patch multiple
                assert size_h % 8 == 0 and size_w % 8 == 0 and max(size_h, size_w) <= SIZES["max_size"]
                boxes = target["boxes"]
                assert torch.all((boxes >= 0) & (boxes <= 1)) and torch.all(boxes[:, 2:] > 0)
                assert torch.all((target["labels"] >= 0) & (target["labels"] < 32))
    assert counts[0] == counts[1] == len(streams[0]) == 8


def test_bad_boxes_are_skipped_and_counted(shards, tmp_path):
    out = tmp_path / "bad"
    assert (
        write_shards.main(
            [
                "synthetic",
                str(out),
                "--train",
                "16",
                "--val",
                "0",
                "--size",
                "64",
                "--objects",
                "2",
                "--shard-size",
                "16",
                "--no-progress",
                "--no-shuffle",
            ]
        )
        == 0
    )  # position = index

    def damage(position: int, ext: str, data: bytes):
        if position == 3 and ext == "json":
            meta = json.loads(data)
            meta["boxes"][0] = [30, 30, 10, 10]  # x1 < x0
            return json.dumps(meta).encode()
        return None if position == 5 and ext == "json" else data

    assert edit_shard(out / "train-000000.tar", damage)[3] == "train_00000003"
    stream = build_detection_stream(str(out), train=True, batch_size=4, num_workers=0, buffer_size=4, **SIZES)
    batches = list(stream)
    assert len(batches) == 4
    assert stream.counters["bad_boxes"] == 1 and stream.counters["missing_boxes"] == 1
    assert {3, 5}.isdisjoint(i for b in batches for i in b["sample_id"].tolist())


@pytest.mark.parametrize(
    "height,width,size,max_size,expected",
    [
        (480, 640, 800, 1333, (800, 1056)),  # int(800 * 640 / 480) = 1066, floored to 16
        (427, 640, 608, 1013, (608, 896)),  # YOLOS-Ti's largest scale: int(608 * 640 / 427) = 911 -> 896
        (640, 427, 256, 1013, (368, 256)),  # portrait: int(256 * 640 / 427) = 383 -> 368
        (300, 1200, 800, 1333, (320, 1328)),  # the cap: size round(1333 * 300 / 1200) = 333 -> 333 x 1332 -> floored
        (512, 512, 512, 853, (512, 512)),  # already at size
    ],
)
def test_resize_follows_yolos_rule(height, width, size, max_size, expected):
    assert resized_size(height, width, size, max_size, 16) == expected


@pytest.mark.parametrize("seed", range(8))
def test_resized_sides_are_patch_multiples_within_the_cap(seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(50):
        height, width, size = (int(torch.randint(17, 2000, (), generator=gen)) for _ in range(3))
        max_size = size + int(torch.randint(1, 2000, (), generator=gen))
        out_h, out_w = resized_size(height, width, size, max_size, 16)
        # the cap holds up to YOLOS's rounding of the capped shorter side (half a pixel, times the aspect)
        aspect = max(height, width) / min(height, width)
        assert out_h % 16 == 0 and out_w % 16 == 0 and max(out_h, out_w) <= max_size + 0.5 * aspect + 1
        assert min(out_h, out_w) <= max(size, 16)
        # the aspect ratio survives up to the flooring
        assert abs(out_w / out_h - width / height) <= (width / height) * 16 * (1 / out_h + 1 / out_w) + 1e-9


def synthetic_sample(gen, height, width, boxes):
    from PIL import Image

    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    meta = {"boxes": boxes, "labels": list(range(len(boxes))), "image_id": 7, "width": width, "height": height}
    return {"png": buffer.getvalue(), "json": json.dumps(meta).encode()}


@pytest.mark.parametrize("seed", range(10))
def test_a_box_survives_the_round_trip_at_any_pad(seed):
    """Targets are normalised by the unpadded image, so the batch's padding does not move them, and
    postprocess maps a perfect prediction back onto the original box whatever the pad."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda low, high: int(torch.randint(low, high + 1, (), generator=gen))
    height, width = draw(24, 90), draw(24, 90)
    boxes = []
    for _ in range(draw(1, 3)):
        x0, y0 = draw(0, width - 8), draw(0, height - 8)
        boxes.append([x0, y0, draw(x0 + 4, width), draw(y0 + 4, height)])
    eval_size = draw(24, 96)
    transform = build_detection_transform(
        False, scales=[64], max_size=100, eval_size=eval_size, eval_max_size=eval_size + draw(1, 80), multiple=8
    )
    codec = DetectionCodec(transform, num_classes=8, pad_multiple=8)
    decoded = codec.decode(synthetic_sample(gen, height, width, boxes))
    size = decoded[1]["size"].tolist()
    alone = codec.collate([decoded], [0], [True])
    other = (torch.zeros(3, size[0] + draw(0, 6) * 8, size[1] + draw(1, 6) * 8), decoded[1])
    padded = codec.collate([other, decoded, None], [1, 0, 2], [True, True, False])
    assert padded["image"].shape[-1] > size[1], "the image is padded"
    torch.testing.assert_close(padded["targets"][1]["boxes"], alone["targets"][0]["boxes"], rtol=0, atol=0)
    boxes_out = padded["targets"][1]["boxes"]
    outputs = {"pred_logits": torch.full((3, len(boxes), 9), -10.0), "pred_boxes": torch.full((3, len(boxes), 4), 0.5)}
    outputs["pred_boxes"][1] = boxes_out
    outputs["pred_logits"][1, torch.arange(len(boxes)), torch.arange(len(boxes))] = 10.0
    results = postprocess(outputs, padded["targets"])
    assert len(results) == 2 * len(boxes), "two real images; the eval padding gives no results"
    got = torch.tensor([r["bbox"] for r in results[len(boxes) :]])  # slot 1: the confident, exact predictions
    want = torch.tensor(boxes, dtype=torch.float32)
    want[:, 2:] -= want[:, :2]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def perfect_outputs(batch, classes=32, queries=5):
    logits = torch.full((len(batch["targets"]), queries, classes + 1), -10.0)
    logits[..., -1] = 10.0
    boxes = torch.full((len(batch["targets"]), queries, 4), 0.5)
    for i, target in enumerate(batch["targets"]):
        n = len(target["labels"])
        boxes[i, :n] = target["boxes"]
        logits[i, :n] = -10.0
        logits[i, torch.arange(n), target["labels"]] = 10.0
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_coco_ap_is_one_for_perfect_predictions_and_drops_for_shifted_ones(shards):
    results, shifted = [], []
    for batch in eval_batches(shards):
        outputs = perfect_outputs(batch)
        results += postprocess(outputs, batch["targets"])
        outputs["pred_boxes"][..., :2] += 0.08
        shifted += postprocess(outputs, batch["targets"])
    gt = str(shards / "val_coco.json")
    perfect = coco_evaluate(results, gt)
    assert perfect["AP"] == pytest.approx(1.0, abs=1e-6) and perfect["AP50"] == pytest.approx(1.0, abs=1e-6)
    worse = coco_evaluate(shifted, gt)
    assert worse["AP"] < 0.5 * perfect["AP"]
    assert Counter(r["image_id"] for r in results) == Counter({i: 5 for i in range(10**7, 10**7 + 20)})


def test_coco_writer_keeps_ids_classes_and_crowd(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}]}
    for image_id in (7, 3, 12):
        Image.new("RGB", (40, 30), (image_id * 10, 0, 0)).save(images / f"{image_id}.jpg")
        coco["images"].append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 40, "height": 30})
    coco["annotations"] += [
        {"id": 1, "image_id": 7, "bbox": [2, 3, 10, 12], "category_id": 90, "iscrowd": 0},
        {"id": 2, "image_id": 7, "bbox": [5, 5, 20, 10], "category_id": 1, "iscrowd": 1},
        {"id": 3, "image_id": 3, "bbox": [1, 1, 5, 5], "category_id": 1, "iscrowd": 0},
    ]
    (images / "broken.jpg").write_bytes(b"nope")
    coco["images"].append({"id": 99, "file_name": "broken.jpg", "width": 40, "height": 30})
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(coco))
    out = tmp_path / "shards"
    assert write_shards.main(["coco", str(images), str(annotations), str(out), "--split", "val", "--no-progress"]) == 0
    index = ShardIndex.load(str(out))
    names = index.classes()
    assert len(names) == 91 and names[1] == "person" and names[90] == "toothbrush"
    split = index.split("val")
    samples = dict(read_samples(split.urls[0], list(range(split.total))))
    metas = {json.loads(s["json"])["image_id"]: json.loads(s["json"]) for s in samples.values()}
    assert sorted(metas) == [3, 7, 12], "the unreadable image is skipped"
    assert metas[7]["boxes"] == [[2, 3, 12, 15], [5, 5, 25, 15]] and metas[7]["labels"] == [90, 1]
    assert metas[7]["iscrowd"] == [0, 1] and metas[12]["boxes"] == []
    assert json.loads((out / "val_coco.json").read_text()) == coco
    stream = build_detection_stream(
        str(out), train=False, batch_size=3, num_workers=0, scales=[30], max_size=60, pad_multiple=8
    )
    targets = {int(t["image_id"]): t for b in stream for t in b["targets"] if int(t["image_id"]) >= 0}
    assert targets[7]["labels"].tolist() == [90], "crowd boxes are not training targets"
    assert (
        write_shards.main(["coco", str(images), str(tmp_path / "missing.json"), str(tmp_path / "o2"), "--no-progress"]) == 2
    )
