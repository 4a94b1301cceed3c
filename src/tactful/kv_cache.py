"""The KV-cache keyword of a transformers model, across the 5.24 rename.

transformers 5.24 renamed the forward argument `past_key_values` to `cache` (and the output
field likewise); the old name still works but warns, and goes away in 5.40. tactful calls
models with a cache in its own decode loops and reads the cache in forward hooks, so it
asks the model which name it takes instead of assuming one.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

NEW, OLD = "cache", "past_key_values"


def _unwrap(model: Any) -> Any:
    """The transformers model under PEFT / DDP / accelerate wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and not hasattr(model, "config"):
            model = model.module
    return model


@lru_cache(maxsize=64)
def _kwarg_of(cls: type) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return OLD
    return NEW if NEW in params else OLD


def cache_kwarg(model: Any) -> str:
    """`cache` for models whose forward takes it (transformers >= 5.24), else `past_key_values`."""
    return _kwarg_of(type(_unwrap(model)))


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to `model`'s forward."""
    return {cache_kwarg(model): cache}


def returned_cache(output: Any) -> Any:
    """The cache a forward returned, under either field name (the new one first: the old warns)."""
    cache = output.get(NEW) if hasattr(output, "get") else getattr(output, NEW, None)
    if cache is None:
        cache = output.get(OLD) if hasattr(output, "get") else getattr(output, OLD, None)
    return cache


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The cache a (hooked) forward call received, under either keyword."""
    cache = kwargs.get(NEW)
    return kwargs.get(OLD) if cache is None else cache
