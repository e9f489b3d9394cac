"""The method registry: a recipe's ``methods:`` mapping -> validated configs -> their declarations ->
one plug-in stack.

A method registers once, at import of its module (``methods/__init__.py`` imports them all)::

    register("patch_dropout", PatchDropoutConfig, build_patch_dropout)

- the config is a dataclass whose ``__post_init__`` raises ``ValueError`` on a bad value (the
  recipe loader prefixes the key, ``methods.patch_dropout.rate``) and whose ``declare()`` returns
  the method's ``methods.base.Declaration`` (what it claims and refuses; nothing else is probed);
- the factory turns a config and the run's ``MethodContext`` into a ``TrainingPlugin``.

The engine never names a method: it asks this module for whatever the recipe lists, in the
recipe's order (the order the plug-ins' events fire in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from .base import Declaration, check_token_sites

__all__ = [
    "Method",
    "register",
    "registered",
    "method",
    "declarations",
    "check_combination",
    "check_pretrained",
    "grad_checkpointing_refusals",
    "recipe_refusals",
    "stream_fields",
    "progress_keys",
    "phase_key",
    "build_stack",
    "run_length",
    "initial_subset",
]


@dataclass(frozen=True)
class Method:
    name: str
    config: type  # a dataclass; its fields are the recipe's options, its declare() a Declaration
    factory: Callable[[Any, Any], Any]  # (config, MethodContext) -> TrainingPlugin


_METHODS: dict[str, Method] = {}


def register(name: str, config: type, factory: Callable[[Any, Any], Any]) -> None:
    if name in _METHODS and _METHODS[name].config is not config:
        raise ValueError(f"method {name!r} is registered twice")
    if not callable(getattr(config, "declare", None)):
        raise TypeError(f"method {name!r}: its config {config.__name__} has no declare() -> Declaration")
    _METHODS[name] = Method(name, config, factory)


def registered() -> list[str]:
    return sorted(_METHODS)


def method(name: str) -> Method:
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(registered()) or 'none'}")
    return _METHODS[name]


def declarations(configs: Mapping[str, Any]) -> dict[str, Declaration]:
    """``{method: its Declaration}`` for a recipe's validated configs, in the recipe's order."""
    found = {}
    for name, config in configs.items():
        declared = config.declare()
        if not isinstance(declared, Declaration):
            raise TypeError(
                f"methods.{name}: {type(config).__name__}.declare() returned {type(declared).__name__}, not a Declaration"
            )
        found[name] = declared
    return found


def check_combination(configs: Mapping[str, Any]) -> None:
    """Refuse methods that do not compose (``ValueError`` naming both): one that refuses the other by name;
    two that set the token count before the same block; two that set the input grid; one whose input
    grid is exclusive next to any other that sets a token count; two that own the loss."""
    declared = declarations(configs)
    for name, mine in declared.items():
        for other, theirs in declared.items():
            if other == name:
                continue
            if other in mine.refuses:
                raise ValueError(f"methods {name!r} and {other!r} do not compose: {mine.refuses[other]}")
            if mine.input_grid is not None and theirs.input_grid is not None:
                first, second = ((other, theirs), (name, mine)) if theirs.input_grid else ((name, mine), (other, theirs))
                raise ValueError(
                    f"methods {name!r} and {other!r} both set the input grid (the image size each step "
                    f"trains at): {_turn_off(*first)}, or drop {second[0]!r}"
                )
            if mine.exclusive_tokens and theirs.token_sites:
                raise ValueError(
                    f"methods {name!r} and {other!r} both set the token count: {name!r} sets the input "
                    f"grid (so every block's tokens); {_turn_off(name, mine)}, or drop {other!r}"
                )
    check_token_sites((name, d.token_sites) for name, d in declared.items())
    owners = [name for name, d in declared.items() if d.owns_loss]
    if len(owners) > 1:
        raise ValueError(f"methods {owners[0]!r} and {owners[1]!r} both replace the training loss: use one")


def _turn_off(name: str, declared: Declaration) -> str:
    switch = declared.input_grid
    return f"turn {name}'s input-grid part off with methods.{name}.{switch}: false" if switch else f"drop {name!r}"


def check_pretrained(configs: Mapping[str, Any]) -> None:
    """Refuse a method that cannot fine-tune from pretrained weights (``ValueError`` naming it and why)."""
    for name, declared in declarations(configs).items():
        if declared.refuses_pretrained:
            raise ValueError(f"methods.{name} cannot start from model.checkpoint: {declared.refuses_pretrained}")


def grad_checkpointing_refusals(configs: Mapping[str, Any]) -> dict[str, str]:
    """``{method: reason}`` for the methods that cannot run with the model's activation checkpointing."""
    return {name: d.refuses_grad_checkpointing for name, d in declarations(configs).items() if d.refuses_grad_checkpointing}


def recipe_refusals(configs: Mapping[str, Any], recipe: Any) -> dict[str, str]:
    """``{method: reason}`` for the methods whose ``recipe_check`` refuses the rest of the recipe (token
    labelling: Mixup / CutMix off, the PIL path, a model with a dense head)."""
    return {
        name: reason
        for name, d in declarations(configs).items()
        if d.recipe_check is not None and (reason := d.recipe_check(recipe))
    }


def stream_fields(configs: Mapping[str, Any]) -> frozenset[str]:
    """The extra per-sample fields the recipe's methods need the training stream to read."""
    return frozenset().union(*(d.stream_fields for d in declarations(configs).values()))


def progress_keys(configs: Mapping[str, Any]) -> tuple[str, ...]:
    """The metric keys the recipe's methods want in the progress bar, in the recipe's order."""
    return tuple(key for d in declarations(configs).values() for key in d.progress)


def phase_key(configs: Mapping[str, Any]) -> Optional[str]:
    """The metric that names the run's phases (the first method that declares one), or ``None``."""
    return next((d.phase for d in declarations(configs).values() if d.phase), None)


def run_length(
    configs: Mapping[str, Any], steps_per_epoch: int, default_total: int, model: Callable[[], Any]
) -> tuple[int, dict[str, Any]]:
    """The run's optimizer steps and the configs resolved against it: ``default_total`` unless a method
    declares ``run_steps`` (Budgeted Training: the stage lengths that meet its budget); ``model()``
    builds the recipe's model for its shapes, once, only when some method asks. Two methods that both
    set it are refused."""
    resolved: dict[str, Any] = {}
    setters: list[tuple[str, int]] = []
    built: list = []
    for name, declared in declarations(configs).items():
        if declared.run_steps is None:
            resolved[name] = configs[name]
            continue
        if not built:
            built.append(model())
        steps, resolved[name] = declared.run_steps(steps_per_epoch, default_total, built[0])
        if steps is not None:
            setters.append((name, int(steps)))
    if len(setters) > 1:
        raise ValueError(
            f"methods {setters[0][0]!r} and {setters[1][0]!r} both set the run's length "
            f"({setters[0][1]} and {setters[1][1]} steps): use one of them"
        )
    return (setters[0][1] if setters else default_total), resolved


def initial_subset(configs: Mapping[str, Any], num_samples: int, seed: int):
    """The training examples the run starts on: the one method's declared ``initial_subset`` mask, or
    ``None`` (all of them). Two methods that both set one are refused."""
    masks = [
        (name, mask)
        for name, d in declarations(configs).items()
        if d.initial_subset is not None and (mask := d.initial_subset(num_samples, seed)) is not None
    ]
    if len(masks) > 1:
        raise ValueError(f"methods {masks[0][0]!r} and {masks[1][0]!r} both choose the training examples: use one")
    return masks[0][1] if masks else None


def build_stack(configs: Mapping[str, Any], context: Any):
    """The ``PluginStack`` of a recipe's validated method configs, in the recipe's order."""
    from .base import PluginStack

    check_combination(configs)
    return PluginStack([method(name).factory(config, context) for name, config in configs.items()])
