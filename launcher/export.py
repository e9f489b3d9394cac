"""Export a run or checkpoint to a plain timm state_dict.

    python -m launcher.export runs/deit_tiny_toe_cpu model.pth        # the run's latest checkpoint
    python -m launcher.export runs/deit_tiny_toe_cpu/checkpoints/step-128 model.pth

The result loads with ``timm.create_model(name, num_classes=..., img_size=...).load_state_dict(sd,
strict=True)`` (detection runs: ``models.yolos.create_yolos(...)``), checked before writing: ToE adds
nothing to the state_dict. ZeRO 1-3 shards are
merged to fp32 with DeepSpeed's ``zero_to_fp32``; ZeRO-0 reads the module from the model states.

The checkpoint is verified first, as training verifies it (``launcher.checkpoint``): a ``step-N``
folder whose files do not match its manifest is an error naming the file (exit 2); a run folder
exports its newest checkpoint that verifies, and the ``.json`` written beside the weights names it.
During training: export holds a reader's lock on ``RUN/checkpoints/.readers.lock`` from choosing the
checkpoint to loading it, and the run's checkpoint rotation leaves old checkpoints for its next save
while a reader holds it (``launcher.runlock``), so the checkpoint is not deleted under the export.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from .checkpoint import checkpoint_state_dict, checkpoints_folder  # noqa: F401 (re-exported)


def plain_model(config_path: Path) -> torch.nn.Module:
    """The run's model as its task builds it (no plug-ins, no pretrained file: the weights come next)."""
    from .config import load_config
    from .tasks import make_task

    cfg = load_config(str(config_path))
    return make_task(cfg).build_model(pretrained=False)[0]


def export(source: str, out: str) -> Path:
    state, point = checkpoint_state_dict(source)
    folder = point.folder
    run_dir = folder.parent.parent
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    plain = plain_model(run_dir / "config.yaml")
    plain.load_state_dict(state, strict=True)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(plain.state_dict(), out_path)
    out_path.with_suffix(".json").write_text(
        json.dumps({"model": config["model"], "step": point.step, "source": str(folder)}, indent=2)
    )
    return out_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run folder or checkpoint folder")
    parser.add_argument("out", help="output .pth")
    args = parser.parse_args(argv)
    try:
        path = export(args.source, args.out)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} (plain timm state_dict, strict load checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
