"""Pretrained weights for fine-tuning: read a local file, fit it to the recipe's model, refuse what does not fit.

``model.checkpoint`` (the one recipe key) names a local file, nothing is downloaded:

- a timm / DeiT ``.pth`` (``.pt``, ``.bin``): a bare state_dict or one under ``model`` / ``state_dict``
  / ``module`` (DeiT's training checkpoints, with their ``args`` namespace, load too);
- a ``.safetensors`` file (what timm and the Hugging Face hub publish);
- ``python -m launcher.export`` output (a plain state_dict ``.pth``);
- a run folder of this engine: the launcher reads its newest verified checkpoint through
  ``launcher.export`` and hands the state_dict here (``load_pretrained`` takes a mapping too).

Fitting uses timm's own helpers: ``timm.models.vision_transformer.checkpoint_filter_fn`` (key layouts,
the patch embedding through ``resample_patch_embed``, the position embeddings through
``resample_abs_pos_embed`` to the recipe's grid). Classifier heads (``head``, DeiT's ``head_dist``,
LV-ViT's ``aux_head``) whose class count differs keep the model's own fresh initialisation, drawn from
the run's seed. Anything else that differs (width, depth, another family) is refused with the first
keys and shapes that do not match. One log line per category: loaded, resampled, re-initialised, ignored.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

__all__ = ["PretrainedError", "NamedStateDict", "read_state_dict", "load_pretrained", "HEAD_PREFIXES"]

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("head.", "head_dist.", "aux_head.")  # class-count dependent: re-initialised when it differs
# the layout of the patch embedding and position table may change (timm resamples them); their width may not
_RESAMPLED = ("pos_embed", "patch_embed.proj.weight")
_WRAPPERS = ("model", "state_dict", "module")  # DeiT main.py saves {"model": ...}; others "state_dict"
_SHOWN = 3  # mismatched keys named in a refusal


class PretrainedError(ValueError):
    """A pretrained file that is missing, unreadable or does not fit the recipe's model; names it."""


class NamedStateDict(dict):
    """A state_dict read elsewhere (a run folder, by the launcher) with the name the log lines give it."""

    def __init__(self, state: Mapping[str, torch.Tensor], name: str) -> None:
        super().__init__(state)
        self.name = name


def read_state_dict(path: Union[str, Path], what: str = "model.checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a local weights file (``.safetensors``, or a ``torch.save`` file), unwrapped."""
    path = Path(path)
    if not path.exists():
        raise PretrainedError(f"{what} {path}: no such file or directory")
    if not path.is_file():
        raise PretrainedError(f"{what} {path} is not a file (a run folder of this engine is read by the launcher)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            # weights only: no code in the file runs; DeiT's training checkpoints also pickle their args
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- every reader error means the same to the user: name the file
        raise PretrainedError(
            f"{what} {path} cannot be read as a weights file: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    return _unwrap(state, f"{what} {path}")


def _unwrap(state: Any, where: str) -> dict[str, torch.Tensor]:
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[key] for key in _WRAPPERS if isinstance(state.get(key), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not state:
        raise PretrainedError(f"{where} holds no state_dict (looked at the top level and under {_WRAPPERS})")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise PretrainedError(f"{where} holds no tensors")
    if all(key.startswith("module.") for key in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {key[len("module.") :]: value for key, value in tensors.items()}
    return tensors


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def _grid(tokens: int) -> str:
    side = int(round(tokens**0.5))
    return f"{side}x{side}" if side * side == tokens else f"{tokens} positions"


def _grouped(ignored: dict[str, str]) -> str:
    """``det_token, class_embed.* (6 tensors): not part of the backbone; ...``: one entry per module and reason."""
    groups: dict[tuple[str, str], list[str]] = {}
    for key, why in ignored.items():
        groups.setdefault((key.split(".")[0], why), []).append(key)
    return "; ".join(
        f"{keys[0] if len(keys) == 1 else f'{name}.* ({len(keys)} tensors)'} ({why})" for (name, why), keys in groups.items()
    )


def load_pretrained(
    model: nn.Module,
    source: Union[str, Path, Mapping[str, torch.Tensor]],
    *,
    what: str = "model.checkpoint",
    where: Optional[str] = None,
    reinit_head: bool = False,
) -> dict[str, list[str]]:
    """Load ``source`` (a path, or a state_dict) into ``model`` (a timm ``VisionTransformer``: DeiT / ViT,
    a YOLOS backbone, LV-ViT) as fine-tuning starts from it; returns the keys per category (``loaded``,
    ``resampled``, ``reinitialised``, ``ignored``) and logs one line per category.

    ``reinit_head``: the heads keep the model's fresh initialisation even when the class count matches (a
    new label set of the same size, e.g. Fashion-MNIST classes 5-9 after pre-training on 0-4).

    Raises ``PretrainedError`` naming the file and the first mismatched keys and shapes when it does not
    fit (another width, depth or model family)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if isinstance(source, Mapping):
        where = where or getattr(source, "name", None) or f"{what} (a state_dict)"
        state = _unwrap(dict(source), where)
    else:
        where = where or f"{what} {source}"
        state = read_state_dict(source, what)
    own = model.state_dict()
    ignored: dict[str, str] = {}
    if "pos_embed" in own and "pos_embed" not in state and "backbone.pos_embed" in state:
        # a detector of this engine (YOLOS export): its backbone is the classifier; the detection parts are not
        ignored.update({key: "not part of the backbone" for key in state if not key.startswith("backbone.")})
        state = {key[len("backbone.") :]: value for key, value in state.items() if key.startswith("backbone.")}
    for key in state:
        if "pre_logits" in key:  # timm drops the representation layer of old ViT checkpoints too
            ignored[key] = "timm drops pre_logits"
    state = {key: value for key, value in state.items() if key not in ignored}

    heads = {key for key in own if key.startswith(HEAD_PREFIXES)}
    file_heads = {key for key in state if key.startswith(HEAD_PREFIXES)}
    missing = [key for key in own if key not in state and key not in heads]
    unexpected = [key for key in state if key not in own and key not in file_heads]
    mismatched = []
    for key in own:
        if key in heads or key not in state:
            continue
        got, want = state[key], own[key]
        if key in _RESAMPLED:  # the layout may differ (timm resamples it); the width and the channels may not
            fits = (
                got.ndim == want.ndim
                and got.shape[-1 if key == "pos_embed" else 0] == want.shape[-1 if key == "pos_embed" else 0]
                and (key == "pos_embed" or got.shape[1] == want.shape[1])
            )
        else:
            fits = got.shape == want.shape
        if not fits:
            mismatched.append(f"{key} {_shape(got)} in the file, {_shape(want)} in the model")
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(
                f"shapes differ: {'; '.join(mismatched[:_SHOWN])}"
                + (f" (and {len(mismatched) - _SHOWN} more)" if len(mismatched) > _SHOWN else "")
            )
        if missing:
            parts.append(
                f"the model has keys the file lacks: {', '.join(missing[:_SHOWN])}"
                + (f" (and {len(missing) - _SHOWN} more)" if len(missing) > _SHOWN else "")
            )
        if unexpected:
            parts.append(
                "the file has keys the model lacks: "
                + ", ".join(f"{key} {_shape(state[key])}" for key in unexpected[:_SHOWN])
                + (f" (and {len(unexpected) - _SHOWN} more)" if len(unexpected) > _SHOWN else "")
            )
        raise PretrainedError(
            f"{where} does not fit the recipe's model ({type(model).__name__}, width "
            f"{getattr(model, 'embed_dim', '?')}, depth {len(getattr(model, 'blocks', []))}): "
            + "; ".join(parts)
            + ". Another width, depth or model family cannot be fine-tuned "
            "from it: pick the matching model.name / model.kwargs"
        )

    reinitialised = sorted(key for key in heads if reinit_head or key not in state or state[key].shape != own[key].shape)
    for key in file_heads - heads:
        ignored[key] = "the model has no such head"
    body = {key: value for key, value in state.items() if key not in file_heads or key in heads and key not in reinitialised}
    try:  # timm's own fitting: position table to the model's grid, patch kernel to its size
        fitted = checkpoint_filter_fn(body, model)
    except Exception as err:  # noqa: BLE001 -- timm's resampling of an odd table: say which file
        raise PretrainedError(f"{where}: timm could not fit it to the model: {type(err).__name__}: {err}") from err
    resampled = []
    for key in _RESAMPLED:
        if key in body and key in fitted and fitted[key].shape != body[key].shape:
            if key == "pos_embed":
                prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
                resampled.append(
                    f"pos_embed from grid {_grid(body[key].shape[1] - prefix)} to "
                    f"{'x'.join(str(s) for s in model.patch_embed.grid_size)}"
                )
            else:
                resampled.append(
                    f"{key} from {'x'.join(map(str, body[key].shape[-2:]))} to {'x'.join(map(str, fitted[key].shape[-2:]))}"
                )
    result = model.load_state_dict(fitted, strict=False)
    if sorted(result.missing_keys) != reinitialised or result.unexpected_keys:  # the checks above missed a case
        raise PretrainedError(
            f"{where}: unexpected fit (missing {result.missing_keys[:_SHOWN]}, unexpected {result.unexpected_keys[:_SHOWN]})"
        )
    loaded = [key for key in fitted if key in own]
    heads_note = ""
    if reinitialised:
        file_classes = {int(state[k].shape[0]) for k in file_heads if k.endswith(".weight")}
        heads_note = (
            f" (the file has {', '.join(map(str, sorted(file_classes)))} classes, the recipe "
            f"{getattr(model, 'num_classes', '?')}{'; model.reinit_head' if reinit_head else ''})"
            if file_classes
            else " (the file has no classifier head)"
        )
    log.info("%s: loaded %d of the model's %d tensors", where, len(loaded), len(own))
    log.info("%s: resampled %s", where, "; ".join(resampled) if resampled else "nothing (same grid)")
    log.info("%s: re-initialised %s%s", where, ", ".join(reinitialised) if reinitialised else "nothing", heads_note)
    log.info("%s: ignored %s", where, _grouped(ignored) if ignored else "nothing")
    return {
        "loaded": loaded,
        "resampled": [line.split(" ", 1)[0] for line in resampled],
        "reinitialised": reinitialised,
        "ignored": sorted(ignored),
    }
