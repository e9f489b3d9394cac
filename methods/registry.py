"""The method registry: a recipe's ``methods:`` mapping -> validated configs -> one plug-in stack.

A method registers once, at import of its module (``methods/__init__.py`` imports them all)::

    register("patch_dropout", PatchDropoutConfig, build_patch_dropout)

- the config is a dataclass whose ``__post_init__`` raises ``ValueError`` on a bad value (the
  recipe loader prefixes the key, ``methods.patch_dropout.rate``), and whose
  ``token_sites(depth)`` tells before which blocks the method sets the token count;
- the factory turns a config and the run's ``MethodContext`` into a ``TrainingPlugin``.

The engine never names a method: it asks ``build_stack`` for whatever the recipe lists, in the
recipe's order (the order the plug-ins' events fire in).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["Method", "register", "registered", "method", "check_combination", "build_stack"]


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
    """Refuse two methods that set the token count before the same block (``ValueError`` naming both)."""
    from .base import check_token_sites
    check_token_sites((name, config.token_sites()) for name, config in configs.items())


def build_stack(configs: Mapping[str, Any], context: Any):
    """The ``PluginStack`` of a recipe's validated method configs, in the recipe's order."""
    from .base import PluginStack
    check_combination(configs)
    return PluginStack([method(name).factory(config, context) for name, config in configs.items()])
