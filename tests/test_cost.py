"""The analytic cost model against torch's FLOP counter on real timm models."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from methods import PluginStack
from methods.toe import ToEPlugin
from models.cost import ViTShape, forward_flops
from toe import ToESchedule, expand_tokens


def counted_flops(fn, *args, **kwargs):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("deit_tiny_patch16_224", {}),
        ("deit_small_patch16_224", dict(img_size=96)),
        ("deit_tiny_distilled_patch16_224", dict(img_size=64, patch_size=8)),
    ],
)
@pytest.mark.slow
def test_cost_model_matches_flop_counter(name, kwargs):
    model = timm.create_model(name, num_classes=10, **kwargs)
    for block in model.blocks:  # the counter misses CPU's fused SDPA kernel: count the explicit matmuls
        block.attn.fused_attn = False
    schedule = ToESchedule(r1=0.5, total_steps=3)
    stack = PluginStack([ToEPlugin(schedule)])
    stack.attach(model)
    shape = stack.shape
    assert shape == ViTShape.from_model(model)
    batch = 2
    x = torch.randn(batch, 3, *model.patch_embed.img_size)
    model.eval()
    dense = counted_flops(model, x) / batch
    model.train()
    heads = 2 * shape.embed_dim * shape.num_classes * (shape.num_prefix - 1)  # distilled DeiT's second head
    assert abs(forward_flops(shape) + heads - dense) / dense < 1e-3
    tokens = torch.randn(batch, shape.num_tokens, shape.embed_dim)
    for step in range(3):
        stack.on_step(step)
        counts = schedule.kept_counts(shape.num_patches, schedule.stage(step))
        op = (
            counted_flops(expand_tokens, tokens, counts, num_prefix=shape.num_prefix, seed_stride=schedule.seed_stride)
            / batch
        )
        model_share = (counted_flops(model, x) / batch - op) / dense
        assert abs(stack.flops_share(step) - model_share) < 2e-3, (step, stack.flops_share(step), model_share)
        assert op / dense < 0.02, "the op's own matmuls stay a small share of a forward pass"
