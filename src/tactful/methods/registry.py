"""The method registry behind `tactful train RECIPE`.

A recipe is a YAML mapping with `method: NAME`; the rest of it fills that method's
config dataclass. Each method module exposes `CONFIG_CLASS` and
`run(config, *, log) -> RunDir`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from tactful.config import apply_overrides, from_dict, read_yaml
from tactful.errors import UserError
from tactful.io import ensure_dir

METHODS = {
    "sft": "tactful.methods.sft",
    "dcr": "tactful.methods.dcr",
    "dpo": "tactful.methods.preference",
    "shapo": "tactful.methods.shapo",
    "trace": "tactful.methods.trace",
    "safemoe": "tactful.methods.safemoe",
    "refusal_guard": "tactful.methods.refusal_guard",
}


def method_module(name: str) -> Any:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    try:
        return importlib.import_module(METHODS[name])
    except ModuleNotFoundError as e:
        if e.name == METHODS[name]:
            raise UserError(f"method {name!r} is not available in this version of tactful") from None
        raise


def load_recipe(path: str, overrides: list[str] | None = None) -> tuple[str, Any]:
    """(method name, config object) from a recipe file plus `key=value` overrides."""
    data = read_yaml(path)
    data = apply_overrides(data, overrides or [])
    method = data.pop("method", None)
    if method is None:
        raise UserError("missing field 'method' (one of: " + ", ".join(METHODS) + ")", where=str(path))
    if not isinstance(method, str):
        raise UserError("field 'method' must be a string", where=str(path))
    if method not in METHODS:
        raise UserError(f"field 'method': unknown method {method!r}; known: {', '.join(METHODS)}", where=str(path))
    module = method_module(method)
    return method, from_dict(module.CONFIG_CLASS, data, where=str(path))


def train_recipe(path: str, overrides: list[str] | None = None, *, log: Callable[[str], None] = print) -> Any:
    from tactful.distributed import is_main_process, setup

    setup()  # launched with several processes: they form a group before any of them loads data
    if not is_main_process():
        log = _quiet  # the main process reports; N copies of every line would only be noise
    method, config = load_recipe(path, overrides)
    if getattr(config, "output_dir", None):
        # before the method loads a model and data: a bad output_dir should cost seconds, not minutes
        ensure_dir(config.output_dir, "output_dir")
    return method_module(method).run(config, log=log)


def _quiet(message: str) -> None:
    pass
