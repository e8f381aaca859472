"""YAML recipes and ``key.sub=value`` overrides onto typed config dataclasses.

A recipe is a mapping whose keys are the fields of a dataclass tree; the command line overrides
single leaves with ``section.field=value`` (the value parsed as YAML, so ``3``, ``1e-5``,
``true``, ``null`` and ``[a, b]`` mean what they say). Both go through the same checks: an
unknown key is an error naming it and the closest valid key, a value of the wrong type is an
error naming the field, the type it wants and what it got; then each dataclass's own
``__post_init__`` validates ranges. Nothing here knows which dataclasses exist: the owners
(training, data) compose them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["RecipeError", "apply_overrides", "build_dataclass", "read_recipe", "to_plain"]


class RecipeError(ValueError):
    """A recipe or override that does not fit the config schema (names the key)."""


def read_recipe(path: str | Path) -> dict:
    """The mapping in a YAML recipe file (an empty file is an empty recipe)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise RecipeError(f"recipe {path} must hold a mapping of sections, got "
                          f"{type(document).__name__}")
    return document


def apply_overrides(recipe: Mapping, overrides: Sequence[str]) -> dict:
    """A copy of ``recipe`` with each ``a.b.c=value`` override set (value parsed as YAML)."""
    import yaml

    out = _deep_copy(recipe)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override {item!r} must look like section.field=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is a value, "
                                  "not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(value):
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def build_dataclass(cls, values: Any, where: str = ""):
    """An instance of dataclass ``cls`` from the mapping ``values``, checked field by field.

    ``where`` is the dotted path of this section in the recipe, for messages. Missing required
    fields and the dataclass's own validation errors are reported with that path.
    """
    label = where or "recipe"
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise RecipeError(f"{label} must be a mapping of {cls.__name__} fields, got "
                          f"{values!r:.60}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise RecipeError(_unknown_key(key, fields, where))
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(hints[name], value, _join(where, name))
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{label} is missing required field(s) "
                          f"{', '.join(_join(where, m) for m in missing)}")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{label}: {err}") from None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _unknown_key(key: str, fields: Mapping, where: str) -> str:
    close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
    hint = f"; did you mean {_join(where, close[0])}?" if close else ""
    return (f"unknown key {_join(where, str(key))}{hint} (valid keys here: "
            f"{', '.join(sorted(fields))})")


_TYPE_NAMES = {int: "an int", float: "a number", bool: "true | false", str: "a string"}


def _convert(hint, value, where: str):
    """``value`` checked against the type ``hint`` (nested dataclasses built recursively)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except RecipeError as err:
                errors.append(err)
        wanted = " or ".join(_describe(o) for o in options)
        raise RecipeError(f"{where} must be {wanted}, got {value!r:.60}")
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if origin in (list, Sequence, tuple) or hint in (list, tuple):
        if isinstance(value, str):  # a lone path where a list is expected
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be a list, got {value!r:.60}")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        return [_convert(item_hint, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where} must be a mapping, got {value!r:.60}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true | false, got {value!r:.60}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an int, got {value!r:.60}")
        return value
    if hint is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-5 without a dot as a string; it means a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {value!r:.60}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r:.60}")
        return value
    return value


def _describe(hint) -> str:
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} mapping"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def to_plain(obj) -> Any:
    """A dataclass tree as plain dicts/lists (what a resolved recipe file holds)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
