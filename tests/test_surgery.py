"""ToE inserted into real timm ViTs: token counts per block, training/eval behaviour, state_dict."""

import copy

import pytest
import timm
import torch

from methods import PluginStack
from methods.toe import ToEPlugin
from toe import ToESchedule, TokenExpansion, apply_token_expansion, gather_kept, remove_token_expansion, restore_tokens


def make(name="deit_tiny_patch16_224", **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs)


def record_tokens(model):
    """Token count each block receives, in order, per forward."""
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("block", [0, 1, 3])
def test_deit_tiny_trains_at_every_stage_with_reduced_tokens(block):
    model = make()
    schedule = ToESchedule(r1=0.5, total_steps=30, block=block)
    toe_module = apply_token_expansion(model, schedule)
    seen = record_tokens(model)  # registered after ToE's hook, so blocks[block] reports the reduced count
    x = torch.randn(2, 3, 224, 224)
    for step, kept in ((0, 98), (10, 147), (20, 196)):
        seen.clear()
        toe_module.set_step(step)
        logits = model(x)
        logits.sum().backward()
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        assert seen == [197] * block + [1 + kept] * (12 - block)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.zero_grad()


def test_distilled_deit_keeps_both_prefix_tokens():
    model = make("deit_tiny_distilled_patch16_224")
    module = apply_token_expansion(model, ToESchedule(r1=0.5, total_steps=3))
    assert module.num_prefix == 2
    seen = record_tokens(model)
    captured = {}
    model.blocks[1].register_forward_pre_hook(lambda m, args: captured.update(tokens=args[0]))  # returns None
    inputs = {}
    model.blocks[0].register_forward_hook(lambda m, args, out: inputs.update(tokens=out))
    module.set_step(0)
    model(torch.randn(2, 3, 224, 224)).sum().backward()
    assert seen == [198] + [2 + 98] * 11
    assert torch.equal(captured["tokens"][:, :2], inputs["tokens"][:, :2]), "class and distillation tokens untouched"


@pytest.mark.parametrize("img_size,patch_size,num_patches", [(64, 8, 64), (96, 16, 36), (48, 4, 144)])
def test_any_patch_and_image_size(img_size, patch_size, num_patches):
    model = make(img_size=img_size, patch_size=patch_size)
    schedule = ToESchedule(r1=0.4, total_steps=3)
    module = apply_token_expansion(model, schedule)
    seen = record_tokens(model)
    module.set_step(1)
    model(torch.randn(2, 3, img_size, img_size)).mean().backward()
    assert seen[-1] == 1 + schedule.kept_tokens(num_patches, 2)


def test_eval_is_the_plain_timm_model():
    model = make()
    plain = make()
    plain.load_state_dict(model.state_dict())
    module = apply_token_expansion(model, ToESchedule(r1=0.5, total_steps=3))
    module.set_step(0)
    model.eval()
    plain.eval()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert module.keep_index is None


def test_sparse_eval_uses_the_current_stage():
    model = make()
    module = apply_token_expansion(model, ToESchedule(r1=0.5, total_steps=3), sparse_eval=True)
    seen = record_tokens(model)
    module.set_step(0)
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert seen[-1] == 1 + 98


def test_state_dict_loads_strict_into_plain_timm_and_back():
    model = make()
    apply_token_expansion(model, ToESchedule(total_steps=3))
    plain = timm.create_model("deit_tiny_patch16_224", num_classes=10)
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(plain.state_dict(), strict=True)
    assert sum(p.numel() for p in model.token_expansion.parameters()) == 0


def test_ema_copy_evaluates_with_all_tokens_and_owns_its_module():
    model = make()
    module = apply_token_expansion(model, ToESchedule(r1=0.5, total_steps=3))
    module.set_step(0)
    ema = copy.deepcopy(model).eval()
    assert ema.token_expansion is not module
    plain = make()
    plain.load_state_dict(ema.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ema(x), plain.eval()(x))
        model(x)  # training forward of the original touches only the original's module
    assert module.keep_index is not None and ema.token_expansion.keep_index is None
    ema.train()
    with torch.no_grad():
        ema(x)  # the copy's hook is bound to the copy's module
    assert ema.token_expansion.keep_index is not None


def test_training_forward_without_step_is_refused():
    model = make()
    apply_token_expansion(model, ToESchedule(total_steps=3))
    with pytest.raises(RuntimeError, match="set_step"):
        model(torch.randn(1, 3, 224, 224))


def test_warmup_stage_uses_all_tokens():
    model = make()
    module = apply_token_expansion(model, ToESchedule(total_steps=40, warmup_steps=10))
    seen = record_tokens(model)
    assert module.set_step(0) is True
    model(torch.randn(1, 3, 224, 224))
    assert seen == [197] * 12
    assert module.set_step(9) is False and module.set_step(10) is True


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 224, 224)
    grads = []
    for checkpointing in (False, True):
        model = make()
        model.set_grad_checkpointing(checkpointing)
        apply_token_expansion(model, ToESchedule(r1=0.5, total_steps=3)).set_step(0)
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


def test_remove_and_double_apply():
    model = make()
    apply_token_expansion(model, ToESchedule(total_steps=3))
    with pytest.raises(ValueError, match="already applied"):
        apply_token_expansion(model, ToESchedule(total_steps=3))
    remove_token_expansion(model)
    seen = record_tokens(model)
    model(torch.randn(1, 3, 224, 224))
    assert seen == [197] * 12
    with pytest.raises(ValueError, match="not applied"):
        remove_token_expansion(model)


def test_bad_surgery_is_refused():
    with pytest.raises(ValueError, match="block=12"):
        apply_token_expansion(make(), ToESchedule(total_steps=3, block=12))
    with pytest.raises(TypeError, match="not a timm VisionTransformer"):
        apply_token_expansion(torch.nn.Linear(2, 2), ToESchedule(total_steps=3))
    with pytest.raises(ValueError, match="distance must be one of"):
        apply_token_expansion(make(), ToESchedule(total_steps=3), distance="cos")


def test_yolos_and_lvvit_seams_follow_keep_index():
    prefix, suffix, num_patches, channels = 1, 3, 36, 8
    x = torch.randn(2, prefix + num_patches + suffix, channels)
    module = TokenExpansion(ToESchedule(r1=0.5, total_steps=3), num_prefix=prefix, num_suffix=suffix)
    module.set_step(0)
    out = module(x)
    keep_index = module.keep_index
    # mid position embeddings (one per token, shared by the batch) gathered like the tokens
    pos = torch.randn(1, prefix + num_patches + suffix, channels)
    gathered = module.gather_kept(pos)
    assert gathered.shape == out.shape
    for b in range(2):
        assert torch.equal(gathered[b, prefix : prefix + 18], pos[0, prefix + keep_index[b]])
    assert torch.equal(gathered[:, :prefix], pos[:, :prefix].expand(2, -1, -1))
    assert torch.equal(gathered[:, -suffix:], pos[:, -suffix:].expand(2, -1, -1))
    # zero-pad restore to the original positions
    restored = module.restore(out)
    assert restored.shape == x.shape
    assert torch.equal(gather_kept(restored, keep_index, prefix, suffix), out)
    dropped = torch.ones(2, num_patches, dtype=torch.bool).scatter_(1, keep_index, False)
    assert torch.all(restored[:, prefix : prefix + num_patches][dropped] == 0)
    with pytest.raises(ValueError, match="tokens"):
        restore_tokens(x, keep_index, num_patches, prefix, suffix)


def test_plugin_stack_steps_logs_and_costs(caplog):
    model = make()
    schedule = ToESchedule(r1=0.5, total_steps=30)
    stack = PluginStack([ToEPlugin(schedule)])
    stack.attach(model)
    with caplog.at_level("INFO", logger="methods.toe"):
        metrics = [stack.on_step(step) for step in range(30)]
    assert [m["toe/stage"] for m in metrics] == [schedule.stage(t) for t in range(30)]
    assert [m["toe/kept_tokens"] for m in metrics[::10]] == [98, 147, 196]
    changes = [r.getMessage() for r in caplog.records if "ToE stage" in r.getMessage()]
    assert len(changes) == 3 and "at step 10" in changes[1] and "at step 20" in changes[2]
    shares = [stack.flops_share(t) for t in (0, 10, 20)]
    assert shares[0] < shares[1] < shares[2] == 1.0
    assert stack.state_dict() == {"toe": {}}
    stack.load_state_dict({"toe": {}})
    with pytest.raises(ValueError, match="does not use"):
        stack.load_state_dict({"tri_level": {}})
    with pytest.raises(ValueError, match="holds no state"):
        stack.load_state_dict({"toe": {"stage": 2}})
    with pytest.raises(ValueError, match="unique"):
        PluginStack([ToEPlugin(schedule), ToEPlugin(schedule)])


@pytest.mark.parametrize("seed_stride,expected", [(None, 5), (4, 4)])
def test_the_forward_seeds_with_the_schedule_stride(monkeypatch, seed_stride, expected):
    import toe.surgery
    from toe import expand_tokens

    used = []

    def recording(*args, **kwargs):
        used.append(kwargs["seed_stride"])
        return expand_tokens(*args, **kwargs)

    monkeypatch.setattr(toe.surgery, "expand_tokens", recording)
    model = make()
    module = apply_token_expansion(model, ToESchedule(r1=0.4, total_steps=3, seed_stride=seed_stride))
    module.set_step(0)
    model(torch.randn(2, 3, 224, 224))
    assert used == [expected]
