"""Run configs: typed dataclasses loaded from YAML files, presets or dicts, with CLI overrides.

Every key is checked against the dataclass: an unknown key anywhere (``train.lrr``) or a value of
the wrong type is an error naming the file and the dotted key, never silently skipped. Fields
missing from the source keep their defaults.

Supported field types: ``bool``, ``int``, ``float`` (ints accepted), ``str``, ``Path``,
``X | None``, unions, ``Literal[...]``, ``tuple[X, ...]`` / ``tuple[X, Y]`` (lists accepted),
``list[X]``, ``dict[str, X]``, ``Any`` and nested dataclasses (given as mappings).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

from kacli.errors import KacliError
from kacli.fsutil import load_yaml, write_yaml

T = TypeVar("T")


class ConfigValueError(KacliError):
    """A config value of the right type but out of range, raised by a dataclass's
    ``__post_init__``; the loader reports it under the field's dotted key."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field} {problem}")


# -- type checking -------------------------------------------------------------------------------


class _Bad(Exception):
    """A value that does not fit its field; ``key`` is the dotted path below the failing level."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.message = message
        self.key = key


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp).replace("typing.", "")


def _show(value) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value, tp, key: str):
    """Check ``value`` against type ``tp`` and return it converted (lists → tuples, ints → floats)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except _Bad as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise _Bad(f"{_show(value)} is not {' or '.join(_type_name(a) for a in args)}", key)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Bad(f"{_show(value)} is not one of {', '.join(repr(a) for a in args)}", key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Bad(f"{_show(value)} is not a list", key)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Bad(f"needs {len(args)} items, got {len(value)}", key)
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Bad(f"{_show(value)} is not a mapping", key)
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, key): _convert(v, vt, _join(key, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return copy.deepcopy(value)
        if not isinstance(value, Mapping):
            raise _Bad(f"{_show(value)} is not a mapping of {tp.__name__} fields", key)
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _Bad(f"{_show(value)} is not a finite number", key)
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, (str, Path)):
            return Path(value)
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"config field type {tp!r} is not supported")
    raise _Bad(f"{_show(value)} is not {_type_name(tp)}", key)


def _build(cls: type[T], data: Mapping, prefix: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    for k in data:
        if k not in fields:
            raise _Bad(f"unknown key (known: {', '.join(fields)})", _join(prefix, str(k)))
    kwargs = {k: _convert(v, hints[k], _join(prefix, k)) for k, v in data.items()}
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Bad("missing key", _join(prefix, name))
    try:
        return cls(**kwargs)
    except ConfigValueError as e:
        raise _Bad(e.problem, _join(prefix, e.field)) from None
    except KacliError as e:
        raise _Bad(e.message, prefix) from None
    except (ValueError, TypeError) as e:
        raise _Bad(str(e), prefix) from None


def _fail(e: _Bad, where: str | Path | None, context: str = "") -> KacliError:
    msg = f"config key {e.key!r}: {e.message}" if e.key else f"config: {e.message}"
    return KacliError(f"{context}{msg}", where)


# -- public API ----------------------------------------------------------------------------------


def from_dict(data: Mapping, schema: type[T], where: str | Path | None = None) -> T:
    """Build ``schema`` from a mapping; errors name ``where`` and the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise KacliError(f"a config must be a mapping of keys, got {type(data).__name__}", where)
    try:
        return _build(schema, data, "")
    except _Bad as e:
        raise _fail(e, where) from None


def load_config(source: str | Path | Mapping | None, schema: type[T], presets: Mapping[str, Any] | None = None) -> T:
    """Load a config of dataclass type ``schema``.

    Args:
        source: a preset name (a key of ``presets``), a YAML file path, a mapping, an instance
            of ``schema`` (copied), or None for the defaults.
        schema: the dataclass type; nested dataclass fields are given as nested mappings.
        presets: name → mapping or ``schema`` instance.

    Raises:
        KacliError: unknown preset or missing file, malformed YAML, unknown key, wrong type.
    """
    presets = presets or {}
    if source is None:
        return from_dict({}, schema)
    if isinstance(source, schema):
        return copy.deepcopy(source)
    if isinstance(source, Mapping):
        return from_dict(source, schema)
    if isinstance(source, str) and source in presets:
        preset = presets[source]
        if isinstance(preset, schema):
            return copy.deepcopy(preset)
        return from_dict(preset, schema, f"preset {source}")
    path = Path(source)
    if not path.exists():
        names = ", ".join(presets) if presets else "none"
        raise KacliError(f"no such config file, and not a preset name (presets: {names})", path)
    return from_dict(load_yaml(path), schema, path)


def _field_type(cfg, name: str):
    return _hints(type(cfg))[name]


def apply_overrides(cfg: T, overrides: Mapping[str, Any]) -> T:
    """Return a copy of ``cfg`` with dotted keys replaced (``{"train.epochs": 5}``).

    None values are skipped (a CLI flag that was not given). Values are type-checked like YAML.
    """
    cfg = copy.deepcopy(cfg)
    for dotted, value in overrides.items():
        if value is None:
            continue
        parts = dotted.split(".")
        try:
            cfg = _set(cfg, parts, value, "")
        except _Bad as e:
            raise _fail(e, None, "override: ") from None
    return cfg


def _set(obj, parts: list[str], value, prefix: str):
    name = parts[0]
    key = _join(prefix, name)
    if not dataclasses.is_dataclass(obj):
        raise _Bad(f"{prefix!r} is a value, not a section with keys", key)
    names = [f.name for f in dataclasses.fields(obj) if f.init]
    if name not in names:
        raise _Bad(f"unknown key (known: {', '.join(names)})", key)
    if len(parts) == 1:
        new = _convert(value, _field_type(obj, name), key)
    else:
        new = _set(getattr(obj, name), parts[1:], value, key)
    try:
        return dataclasses.replace(obj, **{name: new})
    except ConfigValueError as e:
        raise _Bad(e.problem, _join(prefix, e.field)) from None
    except KacliError as e:
        raise _Bad(e.message, key) from None
    except (ValueError, TypeError) as e:
        raise _Bad(str(e), key) from None


def config_to_dict(cfg) -> dict:
    """Plain YAML/JSON-able dict of a config (tuples → lists, paths → strings)."""

    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def save_config(path: str | Path, cfg) -> None:
    """Write ``cfg`` as YAML (atomically); :func:`load_config` reads it back equal."""
    write_yaml(path, config_to_dict(cfg))
