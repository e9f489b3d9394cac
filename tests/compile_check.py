"""Test helper for every method: its model compiles to whole graphs, one per stage (not a test module).

    from compile_check import assert_compiles
    graphs = assert_compiles(model, stack, steps=[0, 10, 20], image_size=32)

The model (with the stack attached) runs a training forward and backward at each step through the
stack's events (``on_step``, ``on_batch``), then one evaluation forward, with its ``forward``
compiled as the engine compiles it (``launcher.perf``: ``dynamic=False``, ``fullgraph=True``, so a
graph break raises with Dynamo's reason). Returns the number of graphs Dynamo compiled (a stage it
revisits must not add one) and checks that no graph break was recorded.
"""

from __future__ import annotations

from typing import Iterable


def assert_compiles(
    model, stack, steps: Iterable[int], image_size: int, batch: int = 2, backend: str = "aot_eager", evaluate: bool = True
) -> int:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend=backend, dynamic=False, fullgraph=True)
    try:
        model.train()
        for step in steps:
            stack.on_step(step)
            images = stack.on_batch(
                step, {"image": torch.randn(batch, 3, image_size, image_size), "label": torch.zeros(batch, dtype=torch.long)}
            )["image"]
            out = model(images)
            (out if isinstance(out, torch.Tensor) else out["pred_logits"]).float().sum().backward()
        if evaluate:
            model.eval()
            with torch.no_grad():
                model(torch.randn(batch, 3, image_size, image_size))
    finally:
        model.forward = eager_forward
    breaks = dict(counters["graph_break"])
    assert not breaks, f"graph breaks: {breaks}"
    return int(counters["stats"]["unique_graphs"])
