"""The method registry: a recipe's ``methods:`` mapping -> validated configs -> one plug-in stack.

A method registers once, at import of its module (``methods/__init__.py`` imports them all)::

    register("patch_dropout", PatchDropoutConfig, build_patch_dropout)

- the config is a dataclass whose ``__post_init__`` raises ``ValueError`` on a bad value (the
  recipe loader prefixes the key, ``methods.patch_dropout.rate``), and whose
  ``token_sites(depth)`` tells before which blocks the method sets the token count;
- the factory turns a config and the run's ``MethodContext`` into a ``TrainingPlugin``.

The engine never names a method: it asks ``build_stack`` for whatever the recipe lists, in the
recipe's order (the order the plug-ins' events fire in).

Optional config hooks:

- ``run_steps(steps_per_epoch, default_total, model) -> (steps, resolved config)``: a method that
  sets the run's length (Budgeted Training: the stage lengths that meet its budget). ``default_total``
  is the recipe's own run (``train.epochs`` x steps per epoch), ``model`` the recipe's model on the
  meta device (shapes only); the resolved config is what the factory gets. ``run_length`` asks every
  method at start-up and refuses two that both set it; an explicit ``train.steps`` still wins.
- ``initial_subset(num_samples, seed) -> Optional[np.ndarray]``: a method that trains on a subset of the
  training examples (Tri-Level E-ViT: a random 80%); a boolean mask over the split's sample positions,
  applied to the stream before the step count, so an epoch is a pass over the subset. Two methods that
  both set one are refused. Later changes of the subset are the plug-in's (``on_epoch``).
- ``sets_input_grid() -> bool`` (with a class attribute ``input_grid_switch``, the option that turns
  it off): the method sets the input grid, so the token count of every block; no other method may
  set a token count then (``check_combination``).
- ``grad_checkpointing_refusal`` (a class attribute, a sentence): the method cannot run with the model's
  activation checkpointing (``model.grad_checkpointing``); the recipe is refused at start-up with it.
- ``refuses(other_name, other_config) -> Optional[str]``: the method does not compose with another one
  the recipe lists; the reason (a sentence) is the error ``check_combination`` raises, naming both
  (Tri-Level's tokens / connections refuse ToE, whose pre-hook cannot take their attention mask).
- ``refuses_pretrained() -> Optional[str]``: the method cannot start from pretrained weights
  (``model.checkpoint``, fine-tuning); the reason is the start-up error ``check_pretrained`` raises
  (Budgeted Training re-draws or zeroes the slices it grows into, which would erase them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["Method", "register", "registered", "method", "check_combination", "check_pretrained", "build_stack",
           "run_length", "initial_subset"]


@dataclass(frozen=True)
class Method:
    name: str
    config: type  # a dataclass; its fields are the recipe's options
    factory: Callable[[Any, Any], Any]  # (config, MethodContext) -> TrainingPlugin


_METHODS: dict[str, Method] = {}


def register(name: str, config: type, factory: Callable[[Any, Any], Any]) -> None:
    if name in _METHODS and _METHODS[name].config is not config:
        raise ValueError(f"method {name!r} is registered twice")
    _METHODS[name] = Method(name, config, factory)


def registered() -> list[str]:
    return sorted(_METHODS)


def method(name: str) -> Method:
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(registered()) or 'none'}")
    return _METHODS[name]


def check_combination(configs: Mapping[str, Any]) -> None:
    """Refuse two methods that set the token count before the same block, or one that sets the input
    grid next to any other that sets a token count (``ValueError`` naming both)."""
    from .base import check_token_sites
    for name, config in configs.items():
        refuses = getattr(config, "refuses", None)
        for other, other_config in configs.items():
            if refuses is not None and other != name and (reason := refuses(other, other_config)):
                raise ValueError(f"methods {name!r} and {other!r} do not compose: {reason}")
        if getattr(config, "sets_input_grid", lambda: False)():
            for other, other_config in configs.items():
                if other != name and other_config.token_sites():
                    raise ValueError(f"methods {name!r} and {other!r} both set the token count: {name!r} sets the "
                                     f"input grid (so every block's tokens); turn its token part off with "
                                     f"methods.{name}.{config.input_grid_switch}: false, or drop {other!r}")
    check_token_sites((name, config.token_sites()) for name, config in configs.items())


def check_pretrained(configs: Mapping[str, Any]) -> None:
    """Refuse a method that cannot fine-tune from pretrained weights (``ValueError`` naming it and why)."""
    for name, config in configs.items():
        reason = getattr(config, "refuses_pretrained", lambda: None)()
        if reason:
            raise ValueError(f"methods.{name} cannot start from model.checkpoint: {reason}")


def run_length(configs: Mapping[str, Any], steps_per_epoch: int, default_total: int,
               model: Callable[[], Any]) -> tuple[int, dict[str, Any]]:
    """The run's optimizer steps and the configs resolved against it: ``default_total`` unless a
    method's config has ``run_steps`` (see the module docstring); ``model()`` builds the recipe's model
    for its shapes, once, only when some method asks. Two methods that both set it are refused."""
    resolved: dict[str, Any] = {}
    setters: list[tuple[str, int]] = []
    built: list = []
    for name, config in configs.items():
        hook = getattr(config, "run_steps", None)
        if hook is None:
            resolved[name] = config
            continue
        if not built:
            built.append(model())
        steps, resolved[name] = hook(steps_per_epoch, default_total, built[0])
        if steps is not None:
            setters.append((name, int(steps)))
    if len(setters) > 1:
        raise ValueError(f"methods {setters[0][0]!r} and {setters[1][0]!r} both set the run's length "
                         f"({setters[0][1]} and {setters[1][1]} steps): use one of them")
    return (setters[0][1] if setters else default_total), resolved


def initial_subset(configs: Mapping[str, Any], num_samples: int, seed: int):
    """The training examples the run starts on: the one method's ``initial_subset`` mask, or ``None``
    (all of them). Two methods that both set one are refused."""
    masks = [(name, mask) for name, config in configs.items()
             if (hook := getattr(config, "initial_subset", None)) is not None
             and (mask := hook(num_samples, seed)) is not None]
    if len(masks) > 1:
        raise ValueError(f"methods {masks[0][0]!r} and {masks[1][0]!r} both choose the training examples: use one")
    return masks[0][1] if masks else None


def grad_checkpointing_refusals(configs: Mapping[str, Any]) -> dict[str, str]:
    """``{method: reason}`` for the methods that cannot run with the model's activation checkpointing
    (``model.grad_checkpointing``): a config class attribute ``grad_checkpointing_refusal`` (a sentence)."""
    return {name: reason for name, config in configs.items()
            if (reason := getattr(config, "grad_checkpointing_refusal", None))}


def build_stack(configs: Mapping[str, Any], context: Any):
    """The ``PluginStack`` of a recipe's validated method configs, in the recipe's order."""
    from .base import PluginStack
    check_combination(configs)
    return PluginStack([method(name).factory(config, context) for name, config in configs.items()])
