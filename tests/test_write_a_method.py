"""The method of docs/write_a_method.md: the page shows the file as it is, its pure core, its refusals,
and a real run of the engine with it (loaded by ``method_modules``, as a user's own method is)."""

import json
import re

import pytest

from examples.annealed_patch_dropout import AnnealedPatchDropoutConfig, kept_patches, rate_at

from helpers import ROOT, records, train

PAGE = ROOT / "docs/write_a_method.md"
MODULE = ROOT / "examples/annealed_patch_dropout.py"


def test_the_page_shows_the_module_as_it_is():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert MODULE.read_text() in blocks, "docs/write_a_method.md must quote examples/annealed_patch_dropout.py whole"


def test_the_rate_falls_linearly_to_zero_and_stays_there():
    assert [rate_at(t, 100, 0.5, 0.8) for t in (0, 40, 80, 99)] == [0.5, 0.25, 0.0, 0.0]
    assert kept_patches(16, 0.5) == 8 and kept_patches(16, 0.99) == 1
    with pytest.raises(ValueError, match="start must be in"):
        AnnealedPatchDropoutConfig(start=1.0)


def test_the_registry_refuses_it_next_to_another_method_on_its_tokens():
    from launcher.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="both set the token count before block 0"):
        load_config(
            str(ROOT / "configs/deit_tiny_cpu.yaml"),
            [
                "method_modules=[examples.annealed_patch_dropout]",
                "methods.annealed_patch_dropout={}",
                "methods.patch_dropout={rate: 0.3}",
            ],
        )


@pytest.mark.slow
def test_the_engine_trains_with_it(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    train(
        run_dir,
        tiny_shards,
        "methods.toe=null",
        "method_modules=[examples.annealed_patch_dropout]",
        "methods.annealed_patch_dropout={start: 0.5}",
        "train.steps=10",
    )
    steps = records(run_dir)
    assert [steps[t]["annealed_patch_dropout/rate"] for t in (0, 4, 8, 9)] == pytest.approx([0.5, 0.25, 0.0, 0.0])
    # the cost model priced what the module dropped: half the 16 patches at step 0, all of them from step 8
    assert steps[0]["cost/flops_share"] < 0.6 and steps[9]["cost/flops_share"] == 1.0
    assert json.loads((run_dir / "final.json").read_text())["step"] == 10
