"""Recipes: a config dataclass read from YAML, overridden by ``--set a.b=value``, written back.

Works on any config dataclass of ``memgen_cli.config`` (which re-exports these names): values
are coerced to the declared field types, and unknown keys are errors with a suggestion, never
ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from memgen_cli.console import make_console
from memgen_cli.errors import MemgenError, did_you_mean


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _coerce(value, tp, where: str):
    """Turn a YAML/CLI value into the field's declared type, or explain why it can't."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MemgenError(f"{where} must be a mapping, got {value!r}.")
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise MemgenError(f"{where} must be a list, got {value!r}.")
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise MemgenError(f"{where} must be a mapping, got {value!r}.")
        return dict(value)
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return tp(value)
    except (TypeError, ValueError) as exc:
        raise MemgenError(f"{where} must be {tp.__name__}, got {value!r}.") from exc
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys are errors with a suggestion."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in _renamed(cls, data or {}, where).items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise MemgenError(f'Unknown config key "{path}".{_key_hint(key, names)}')
        kwargs[key] = _coerce(value, _field_type(cls, key), path)
    return cls(**kwargs)


def _renamed(cls, data: dict, where: str) -> dict:
    """``data`` with the sections ``cls.RENAMED`` gave new names under them: an old name still
    reads, with a note; the old and the new name together are an error."""
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old not in data:
            continue
        at = f"{where}." if where else ""
        if new in data:
            raise MemgenError(
                f'"{at}{old}" and "{at}{new}" are one section ("{old}" is its old name), given '
                f'twice: keep "{new}" only.'
            )
        make_console(stderr=True).print(
            f'[yellow]note:[/] config section "{at}{old}" is now called "{at}{new}" (read as '
            "such); rename it.",
            highlight=False,
        )
        data = {new if key == old else key: value for key, value in data.items()}
    return data


def _key_hint(name: str, keys) -> str:
    """The closest key, or (none close) every key that fits there: what to write instead."""
    return did_you_mean(name, keys) or f" Keys here: {', '.join(sorted(keys))}."


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg, overrides: list[str]):
    """Apply ``a.b=value`` strings (from ``--set``) to a dataclass config, returning a new one."""
    data = to_dict(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise MemgenError(f'--set expects key=value, got "{item}".')
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise MemgenError(f'Unknown config key "{key}".{_key_hint(part, node)}')
            node = node[part]
        if parts[-1] not in node:
            raise MemgenError(f'Unknown config key "{key}".{_key_hint(parts[-1], node)}')
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError as exc:
            raise MemgenError(
                f"--set {item}: the value is not valid YAML ({getattr(exc, 'problem', exc)}); "
                "quote it or fix the brackets, e.g. --set memory.lora_targets=[q_proj,v_proj]."
            ) from None
        if isinstance(node[parts[-1]], str) and isinstance(value, bool):
            value = raw.strip()  # YAML reads off/yes/no as booleans; a text field means the word
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def load_recipe(cls, path: str | Path | None, overrides: list[str] | None = None):
    """Read a recipe YAML into ``cls`` (defaults where absent), then apply ``--set`` overrides."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MemgenError(f"Recipe {path} does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise MemgenError(f"Recipe {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise MemgenError(f"Recipe {path} must be a mapping of config keys.")
    cfg = from_dict(cls, data)
    return apply_overrides(cfg, overrides or [])


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
