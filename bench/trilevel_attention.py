"""Tri-Level E-ViT's token and connection levels (``methods/trilevel_tokens.py``): what the attention
mask costs, what the scoring costs, and the step time per phase against the cost model.

    python bench/trilevel_attention.py                       # DeiT-S, CPU (or the GPU if there is one)
    python bench/trilevel_attention.py --device cuda --batch 128 --dtype bf16 --compile

Cases (forward + backward unless said), all interleaved in one run (``bench.timing``), medians:

- ``sdpa`` / ``sdpa_mask``: ``F.scaled_dot_product_attention`` on one block's ``q, k, v`` at the tokens
  after the first location at ``r_T``, without and with the boolean connection mask ``[B, 1, N, N]``,
  SDPA choosing its kernel; ``sdpa_<backend>[_mask]``: each backend forced, where it takes the input
  (with a mask the GPU flash kernel refuses; a dense kernel with a mask saves no FLOPs).
- ``scoring``: the plug-in's extra work at the three locations, no gradient: the class row and the
  head-mean patch probabilities (a second ``q k^T`` and a softmax), the kept-token sort and the
  mask's sort, at the counts of ``r_T`` (the spec's budget: < 2% of the step).
- ``step_dense`` (plain timm), ``step_warmup`` (the plug-in at step 0: r = a = 1, timm's forward),
  ``step_tokens`` (r_T, connections off), ``step_tri`` (r_T and a_T): a training step each.

Prints a table and writes JSON (default ``bench/results/trilevel_attention.json``). The practical /
theoretical figure is (dense step / phase step) / (1 / the cost model's FLOPs share).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from methods import MethodContext, build_stack
from methods.trilevel_tokens import TriLevelTokensConfig, attention_scores, connection_mask, keep_index

from timing import add_device_options, device_options, interleaved_medians

TOTAL = 300  # a nominal run: warm-up below step 10, the targets from step 110
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")  # torch.nn.attention.SDPBackend
SCORING_TARGET = 0.02  # spec "Test plan" 12: statistics and scoring overhead < 2% of the step


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on GPU")
    parser.add_argument("--keep-ratio", type=float, default=0.9)
    parser.add_argument("--attn-ratio", type=float, default=0.1)
    parser.add_argument("--compile", action="store_true", help="torch.compile the models' forwards (as train.compile)")
    add_device_options(parser)
    parser.add_argument("--out", default="bench/results/trilevel_attention.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device, dtype, rounds = device_options(args)
    on_gpu = device.type == "cuda"
    batch = args.batch or (128 if on_gpu else 8)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    torch.manual_seed(0)

    dense = timm.create_model(args.model).to(device).train()
    context = MethodContext(total_steps=TOTAL, steps_per_epoch=10)
    models, stacks = {}, {}
    for name, options in (("tri", {}), ("tokens", dict(connections=False))):
        models[name] = copy.deepcopy(dense)
        stacks[name] = build_stack(
            {"trilevel_tokens": TriLevelTokensConfig(keep_ratio=args.keep_ratio, attn_ratio=args.attn_ratio, **options)},
            context,
        )
        stacks[name].attach(models[name])
        stacks[name].on_engine(None, None)
    plugin = stacks["tri"].plugins[0]
    shape = stacks["tri"].shape
    images = torch.randn(batch, 3, *dense.patch_embed.img_size, device=device)
    targets = torch.randint(0, shape.num_classes, (batch,), device=device)
    if args.compile:
        for model in (dense, *models.values()):
            model.forward = torch.compile(model.forward, dynamic=False, fullgraph=True)

    def train_step(model, stack=None, step=0):
        def fn():
            if stack is not None:
                stack.on_step(step)
                stack.on_batch(step, {"image": images})
            with autocast:
                loss = F.cross_entropy(model(images), targets)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return fn

    # one block's attention at the tokens after the first location at r_T, with and without the mask
    _, n_out, k = plugin.counts(shape.num_patches, args.keep_ratio, args.attn_ratio)
    heads = dense.blocks[0].attn.num_heads
    head_dim = shape.embed_dim // heads
    tokens = shape.num_prefix + n_out[0]
    qkv = [torch.randn(batch, heads, tokens, head_dim, device=device, requires_grad=True) for _ in range(3)]
    probs = torch.rand(batch, n_out[0], n_out[0], device=device)
    mask = connection_mask(probs, torch.tensor(k[0], device=device), shape.num_prefix)

    def sdpa(with_mask, backend=None):
        def fn():
            with autocast, sdpa_kernel(backend) if backend is not None else nullcontext():
                out = F.scaled_dot_product_attention(*qkv, attn_mask=mask if with_mask else None)
            out.float().sum().backward()
            for t in qkv:
                t.grad = None

        return fn

    kernels = {}  # each SDPA backend this device has, with and without the mask (None: it refuses that input)
    for name in BACKENDS:
        for with_mask in (False, True):
            case = sdpa(with_mask, getattr(SDPBackend, name))
            try:
                case()
            except RuntimeError:  # "No viable backend": e.g. the GPU flash kernel takes no arbitrary mask
                kernels[(name, with_mask)] = None
            else:
                kernels[(name, with_mask)] = case

    n_in = (shape.num_patches,) + n_out[:-1]
    location_qk = [
        (
            torch.randn(batch, heads, shape.num_prefix + n, head_dim, device=device),
            torch.randn(batch, heads, shape.num_prefix + n, head_dim, device=device),
        )
        for n in n_in
    ]
    k_tensors = [torch.tensor(kk, device=device) for kk in k]

    @torch.no_grad()
    def scoring():
        for (q, key), n, kk in zip(location_qk, n_out, k_tensors):
            with autocast:
                cls, patch = attention_scores(q, key, head_dim**-0.5, shape.num_prefix)
            index = keep_index(cls, n)
            patch = patch.gather(1, index.unsqueeze(-1).expand(-1, -1, patch.shape[-1]))
            patch = patch.gather(2, index.unsqueeze(1).expand(-1, n, -1))
            connection_mask(patch, kk, shape.num_prefix)

    kernel_cases = {
        f"sdpa_{name.lower()}{'_mask' if with_mask else ''}": case
        for (name, with_mask), case in kernels.items()
        if case is not None
    }
    cases = {
        "sdpa": sdpa(False),
        "sdpa_mask": sdpa(True),
        **kernel_cases,
        "scoring": scoring,
        "step_dense": train_step(dense),
        "step_warmup": train_step(models["tri"], stacks["tri"], 0),
        "step_tokens": train_step(models["tokens"], stacks["tokens"], TOTAL - 1),
        "step_tri": train_step(models["tri"], stacks["tri"], TOTAL - 1),
    }
    median, samples = interleaved_medians(cases, device=device, rounds=rounds, warmup=args.warmup)

    phases = []
    for name, stack, step in (
        ("warmup", stacks["tri"], 0),
        ("tokens", stacks["tokens"], TOTAL - 1),
        ("tri", stacks["tri"], TOTAL - 1),
    ):
        share = stack.flops_share(step)
        measured = median["step_dense"] / median[f"step_{name}"]
        phases.append(
            dict(
                phase=name,
                step=step,
                flops_share=share,
                step_ms=median[f"step_{name}"] * 1e3,
                measured_speedup=measured,
                theoretical_speedup=1 / share,
                practical_over_theoretical=measured * share,
            )
        )
    scoring_share = median["scoring"] / median["step_tri"]
    mask_ratio = median["sdpa_mask"] / median["sdpa"]

    device_name = (
        torch.cuda.get_device_name(device)
        if on_gpu
        else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    )
    print(
        f"Tri-Level tokens/connections: {args.model}, batch {batch}, {str(dtype).replace('torch.', '')}, "
        f"{device_name}, {'compiled, ' if args.compile else ''}{rounds} rounds (median); r_T {args.keep_ratio}, "
        f"a_T {args.attn_ratio}: kept {list(n_out)}, keys {list(k)}"
    )
    print(
        f"SDPA fwd+bwd at {tokens} tokens: {median['sdpa'] * 1e3:.2f} ms, with the mask "
        f"{median['sdpa_mask'] * 1e3:.2f} ms ({mask_ratio:.2f}x; a mask saves no FLOPs)"
    )
    for name in BACKENDS:
        plain, masked = (median.get(f"sdpa_{name.lower()}{suffix}") for suffix in ("", "_mask"))
        show = lambda v: "refused" if v is None else f"{v * 1e3:.2f} ms"  # noqa: E731
        print(f"  SDPA backend {name:<20} without mask {show(plain):>10}, with mask {show(masked):>10}")
    print(
        f"scoring at 3 locations: {median['scoring'] * 1e3:.2f} ms = {scoring_share:.2%} of the r_T step "
        f"(target < {SCORING_TARGET:.0%}){'' if scoring_share < SCORING_TARGET else '  OVER TARGET'}"
    )
    print(f"dense step {median['step_dense'] * 1e3:.1f} ms")
    print(f"{'phase':>7} {'share':>6} {'step ms':>9} {'speed-up':>9} {'theory':>7} {'prac/theory':>11}")
    for row in phases:
        print(
            f"{row['phase']:>7} {row['flops_share']:>6.3f} {row['step_ms']:>9.1f} {row['measured_speedup']:>8.3f}x "
            f"{row['theoretical_speedup']:>6.3f}x {row['practical_over_theoretical']:>11.3f}"
        )

    result = dict(
        model=args.model,
        batch=batch,
        dtype=str(dtype).replace("torch.", ""),
        device=device.type,
        device_name=device_name,
        torch=torch.__version__,
        compiled=args.compile,
        rounds=rounds,
        keep_ratio=args.keep_ratio,
        attn_ratio=args.attn_ratio,
        kept=list(n_out),
        keys=list(k),
        sdpa_ms=median["sdpa"] * 1e3,
        sdpa_mask_ms=median["sdpa_mask"] * 1e3,
        sdpa_mask_ratio=mask_ratio,
        sdpa_backends_ms={
            f"{name}{' mask' if with_mask else ''}": None
            if case is None
            else median[f"sdpa_{name.lower()}{'_mask' if with_mask else ''}"] * 1e3
            for (name, with_mask), case in kernels.items()
        },
        scoring_ms=median["scoring"] * 1e3,
        scoring_share=scoring_share,
        scoring_target=SCORING_TARGET,
        step_dense_ms=median["step_dense"] * 1e3,
        phases=phases,
        samples_ms={name: [v * 1e3 for v in values] for name, values in samples.items()},
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
