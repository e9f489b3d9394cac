"""data/transforms.py: the configurable DeiT transform (train and eval) and Mixup/CutMix per rank."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torchvision import transforms as T

from data.synthetic import draw_sample
from data.transforms import DEIT_MEAN, DEIT_STD, StepMixup, build_transform
from launcher.config import ConfigError, DataConfig, load_config
from launcher.tasks import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/deit_tiny_cpu.yaml")


def find(transform, kind):
    return next(t for t in transform.transforms if isinstance(t, kind))


# -- Mixup / CutMix per rank -----------------------------------------------------------------------


def mixed(rank: int, step: int, images: torch.Tensor, labels: torch.Tensor, **alphas):
    mixup = StepMixup(num_classes=8, seed=1, label_smoothing=0.0, rank=rank, **alphas)
    out, targets = mixup(images.clone(), labels, step=step)
    # batch mode mixes sample i with sample B-1-i: the target weight on i's own class is the lambda
    return out, targets, float(targets[0, labels[0]])


MIXUP_ONLY, CUTMIX_ONLY = dict(mixup_alpha=0.8, cutmix_alpha=0.0), dict(mixup_alpha=0.0, cutmix_alpha=1.0)


@pytest.mark.parametrize("alphas", [MIXUP_ONLY, CUTMIX_ONLY, {}], ids=["mixup", "cutmix", "deit"])
def test_each_rank_draws_its_own_lambda_and_box_and_resumes_exactly(alphas):
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    for step in range(8):
        out0, _, lam0 = mixed(0, step, images, labels, **alphas)
        out1, targets1, lam1 = mixed(1, step, images, labels, **alphas)
        assert not torch.equal(out0, out1), f"step {step}: ranks mix alike"
        if alphas is MIXUP_ONLY:  # a CutMix lambda is the box's area share: boxes of equal area may differ
            assert lam0 != lam1, f"step {step}: ranks share one lambda"
        torch.manual_seed(100 + step)  # a resumed process: other global RNG states, a fresh object
        np.random.seed(7)
        again, targets_again, lam_again = mixed(1, step, images, labels, **alphas)
        assert lam_again == lam1 and torch.equal(again, out1) and torch.equal(targets_again, targets1)
    np.random.seed(3)
    before = np.random.get_state()[1].copy(), torch.get_rng_state()
    mixed(0, 0, images, labels, **alphas)
    assert np.array_equal(np.random.get_state()[1], before[0]) and torch.equal(torch.get_rng_state(), before[1]), (
        "the caller's RNGs are left as they were"
    )


def test_micro_steps_of_one_rank_draw_differently():
    """Gradient accumulation: the task keys Mixup by the micro step, so micro steps of a step differ too."""
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    assert len({mixed(0, micro, images, labels, **MIXUP_ONLY)[2] for micro in range(6)}) == 6


def test_the_task_gives_mixup_its_rank_and_both_transforms_the_recipe_options(tiny_shards):
    cfg = load_config(
        TINY,
        [
            f"data.path={tiny_shards}",
            "data.workers=0",
            "data.mixup=0.8",
            "data.cutmix=1.0",
            "data.interpolation=bilinear",
            "data.mean=[0.5, 0.4, 0.3]",
            "data.std=[0.2, 0.25, 0.3]",
            "data.scale=[0.5, 0.9]",
            "data.ratio=[0.9, 1.1]",
            "data.hflip=0.2",
            "data.vflip=0.1",
        ],
    )
    task = ClassificationTask(cfg)
    train, evaluation = task.build_streams(micro=4, rank=1, world=2, pin_memory=False)
    assert task.mixup.rank == 1 and task.mixup.seed == cfg.train.seed
    train_tf, eval_tf = train.codec.transform, evaluation.codec.transform
    crop = find(train_tf, RandomResizedCropAndInterpolation)
    assert crop.scale == (0.5, 0.9) and crop.ratio == (0.9, 1.1)
    assert find(train_tf, T.RandomHorizontalFlip).p == 0.2 and find(train_tf, T.RandomVerticalFlip).p == 0.1
    bilinear = str_to_interp_mode("bilinear")
    assert crop.interpolation == bilinear and find(eval_tf, T.Resize).interpolation == bilinear
    for transform in (train_tf, eval_tf):
        normalize = find(transform, T.Normalize)
        assert torch.allclose(torch.as_tensor(normalize.mean), torch.tensor([0.5, 0.4, 0.3]))
        assert torch.allclose(torch.as_tensor(normalize.std), torch.tensor([0.2, 0.25, 0.3]))


# -- the transform options --------------------------------------------------------------------------


def test_defaults_are_deits():
    d = DataConfig()
    assert (d.scale, d.ratio, d.hflip, d.vflip, d.interpolation) == ([0.08, 1.0], [3 / 4, 4 / 3], 0.5, 0.0, "bicubic")
    assert d.mean == list(IMAGENET_DEFAULT_MEAN) and d.std == list(IMAGENET_DEFAULT_STD)
    assert (DEIT_MEAN, DEIT_STD) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    crop = find(build_transform(True, 32), RandomResizedCropAndInterpolation)
    assert crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3)
    assert crop.interpolation == str_to_interp_mode("bicubic")


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.scale=[0.5]", "data.scale"),
        ("data.scale=[0.9, 0.5]", "data.scale"),
        ("data.scale=[0, 1]", "data.scale"),
        ("data.scale=[0.5, 1.2]", "data.scale"),
        ("data.ratio=[2, 1]", "data.ratio"),
        ("data.ratio=[0, 1]", "data.ratio"),
        ("data.hflip=1.5", "data.hflip"),
        ("data.vflip=-0.1", "data.vflip"),
        ("data.interpolation=cubic", "data.interpolation"),
        ("data.interpolation=random", "data.interpolation"),
        ("data.mean=[0.5, 0.5]", "data.mean"),
        ("data.mean=[a, b, c]", "data.mean"),
        ("data.std=[0.2, 0.2, 0]", "data.std"),
        ("data.std=0.2", "data.std"),
        ("data.re_prob=2", "data.re_prob"),
        ("data.crop_pct=0", "data.crop_pct"),
    ],
)
def test_bad_transform_options_are_refused_at_start_up_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, [override])


def test_the_tiny_recipes_crop_keeps_the_shape_in_the_image():
    """On the embedded 32 px shapes DeiT's crop (scale 0.08..1) often cuts the object out; the tiny
    recipes' crop keeps at least half of it in nearly every sample."""
    for recipe in ("deit_tiny_cpu.yaml", "deit_tiny_toe_cpu.yaml"):
        d = load_config(str(ROOT / "configs" / recipe)).data
        assert d.scale == [0.75, 1.0] and d.mean == list(IMAGENET_DEFAULT_MEAN), recipe

    def share_cut(scale, ratio, count=1000) -> float:
        random.seed(0)  # timm samples crop parameters from Python's RNG
        image = T.functional.to_pil_image(torch.zeros(3, 32, 32))
        cut = 0
        for index in range(count):
            x0, y0, x1, y1 = draw_sample(index).boxes[0]
            top, left, h, w = RandomResizedCropAndInterpolation.get_params(image, scale, ratio)
            inside = max(0, min(x1, left + w) - max(x0, left)) * max(0, min(y1, top + h) - max(y0, top))
            cut += inside < 0.5 * (x1 - x0) * (y1 - y0)
        return cut / count

    d = load_config(TINY).data
    assert share_cut(tuple(d.scale), tuple(d.ratio)) <= 0.01
    assert share_cut((0.08, 1.0), (3 / 4, 4 / 3)) >= 0.2
