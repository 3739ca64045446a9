"""Typed configuration: dataclasses filled from YAML files plus ``a.b=value`` overrides.

- Every config is a (nested) dataclass; YAML supplies any subset of its fields.
- An unknown key, in a file or an override, is a :class:`ConfigError` naming the dotted key and
  suggesting the closest valid one.
- Values are checked against the annotated type (bool, int, float, str, tuples, Optional, Literal,
  nested dataclasses); YAML lists become tuples.
- :func:`save_config` writes the fully resolved config, which every command puts next to its output.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from occdistill.errors import ConfigError
from occdistill.io import atomic_write_text

T = TypeVar("T")


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; ``where`` is the dotted key for errors."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {where!r}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key {where!r}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {where!r}: {value!r} is not one of {list(args)}{_suggest(str(value), [str(a) for a in args])}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {where!r}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"config key {where!r}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {where!r}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {where!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept any spelling Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {where!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {where!r}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config key {where!r}: unsupported annotation {tp!r}")  # our bug, not the user's


def _from_dict(cls: type[T], data: dict, prefix: str = "", base: T | None = None) -> T:
    """Build ``cls`` from ``data``; keys absent from ``data`` keep ``base``'s values if given."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {where!r}{_suggest(str(key), list(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            # A partial section overlays the parent's value for it, which may differ from the
            # section class's own defaults (e.g. a preset's backbone).
            parent = getattr(base, key) if base is not None else _field_default(fields[key])
            kwargs[key] = _from_dict(tp, value, where, parent if dataclasses.is_dataclass(parent) else None)
        else:
            kwargs[key] = _coerce(value, tp, where)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except TypeError as exc:  # a required field without a value
        raise ConfigError(f"config {prefix or cls.__name__}: {exc}") from exc
    except ValueError as exc:  # __post_init__ validation
        raise ConfigError(f"config {prefix or cls.__name__}: {exc}") from exc


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain dict with lists (YAML/JSON friendly)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def _set_path(data: dict, cls: type, path: list[str], value: Any) -> None:
    """Set a nested key, checking every component against the dataclass before creating it."""
    node, tp = data, cls
    for depth, part in enumerate(path):
        where = ".".join(path[: depth + 1])
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        if part not in names:
            raise ConfigError(f"unknown config key {where!r}{_suggest(part, names)}")
        if depth == len(path) - 1:
            node[part] = value
            return
        sub = typing.get_type_hints(tp)[part]
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"config key {where!r} is a value, not a section")
        node = node.setdefault(part, {})
        tp = sub


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides (later wins)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(data, cls, keys, value)
    return _from_dict(cls, data)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    return atomic_write_text(path, dump_config(cfg))
