"""Typed configs from YAML recipes and CLI overrides.

Each method has a config dataclass; `from_dict` builds it from a mapping and checks
every field's type, naming the file and the dotted field path on error:

    recipes/dcr.yaml: field 'stage1.layer': expected an integer, got 'six'

Field choices are declared with `field(metadata={"choices": (...)})`, lower bounds with
`metadata={"min": 1}` (plus `"except": {-1: "what -1 means"}` for a documented sentinel) and
help text with `metadata={"help": ...}`, so the same dataclass documents the recipe keys.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from tactful.errors import UserError
from tactful.io import read_text_file

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "<config>", path: str = "") -> T:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(f"field {path or '<root>'!r}: expected a mapping, got {type(data).__name__}", where=where)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = _close(str(key), fields)
            raise UserError(f"unknown field {dotted!r}" + (f" (did you mean {close!r}?)" if close else "")
                            + f"; allowed: {', '.join(fields)}", where=where)
        f = fields[key]
        kwargs[key] = _coerce(hints[key], value, where=where, path=dotted)
        choices = f.metadata.get("choices")
        if choices and kwargs[key] not in choices and kwargs[key] is not None:
            raise UserError(f"field {dotted!r}: {kwargs[key]!r} is not one of {', '.join(map(str, choices))}",
                            where=where)
        _check_min(f, kwargs[key], where=where, path=dotted)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field missing
        raise UserError(f"{path or 'config'}: {e}", where=where) from None


def _check_min(f: dataclasses.Field, value: Any, *, where: str, path: str) -> None:
    """A value below the field's declared minimum is an error (never quietly reinterpreted),
    except the sentinels the field documents (max_steps=-1: no step limit)."""
    lo = f.metadata.get("min")
    sentinels = f.metadata.get("except", {})
    if lo is None or value is None or value >= lo or value in sentinels:
        return
    allowed = "".join(f", or {k} ({v})" for k, v in sentinels.items())
    raise UserError(f"field {path!r}: must be at least {lo}{allowed}, got {value!r}", where=where)


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _close(key: str, options: Mapping[str, Any]) -> str | None:
    import difflib

    hits = difflib.get_close_matches(key, list(options), n=1)
    return hits[0] if hits else None


def _coerce(tp: Any, value: Any, *, where: str, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where=where, path=path)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where, path=path)
    if origin in (list, tuple, typing.Sequence):
        if isinstance(value, str) and get_args(tp) and get_args(tp)[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"field {path!r}: expected a list, got {type(value).__name__}", where=where)
        inner = get_args(tp)[0] if get_args(tp) else Any
        return [_coerce(inner, v, where=where, path=f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"field {path!r}: expected a mapping, got {type(value).__name__}", where=where)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"field {path!r}: expected true/false, got {value!r}", where=where)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"field {path!r}: expected an integer, got {value!r}", where=where)
        try:
            return int(value)
        except ValueError:
            raise UserError(f"field {path!r}: expected an integer, got {value!r}", where=where) from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"field {path!r}: expected a number, got {value!r}", where=where)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"field {path!r}: expected a number, got {value!r}", where=where) from None
        if not math.isfinite(number):  # YAML .nan / .inf parse as floats; no setting means them
            raise UserError(f"field {path!r}: expected a finite number, got {value!r}", where=where)
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"field {path!r}: expected a string, got {type(value).__name__}", where=where)
        return str(value)
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(read_text_file(path, "recipe"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"malformed YAML ({getattr(e, 'problem', e)})",
                        where=f"{path}:{mark.line + 1}" if mark else str(path)) from None
    if not isinstance(data, dict):
        raise UserError("a recipe must be a YAML mapping", where=str(path))
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], *, where: str = "--set") -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML scalars) to a recipe mapping."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value (e.g. training.learning_rate=1e-4)",
                            where=where)
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {p!r} is not a section", where=where)
        node[parts[-1]] = value
    return data
