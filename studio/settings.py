"""Frozen settings objects: the one shape every way in (tab, API, CLI, preset, share link,
gallery "restore") builds, and every way out (gallery row, PNG metadata) records.

Each technique defines one `@dataclass(frozen=True)` subclass of `Settings` with a
`technique` name and a `schema_version`; validation lives in its `__post_init__`, so an
object that exists is valid. `to_dict` / `from_dict` are the only serialisation: strict
about types and unknown keys, and upgrading older schema versions where a technique
registers an upgrader.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar

MAX_PROMPT_CHARS = 4000


class SettingsError(ValueError):
    """A settings value a user gave is not acceptable; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Settings:
    technique: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1
    # schema_version -> function upgrading a dict of that version by one version
    upgraders: ClassVar[dict[int, typing.Callable[[dict], dict]]] = {}

    def to_dict(self) -> dict[str, Any]:
        data = {"technique": self.technique, "schema_version": self.schema_version}
        data.update(_plain(dataclasses.asdict(self)))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise SettingsError("settings must be a JSON object")
        data = dict(data)
        technique = data.pop("technique", cls.technique)
        if technique != cls.technique:
            raise SettingsError(f"these settings are for {technique!r}, not {cls.technique!r}")
        version = data.pop("schema_version", cls.schema_version)
        if not isinstance(version, int) or version < 1 or version > cls.schema_version:
            raise SettingsError(
                f"settings schema version {version!r} is not one this studio reads "
                f"(it reads 1 to {cls.schema_version}); update the studio"
            )
        while version < cls.schema_version:
            if version not in cls.upgraders:
                raise SettingsError(f"settings of schema version {version} can no longer be read")
            data = cls.upgraders[version](data)
            version += 1
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise SettingsError(f"unknown settings: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _coerce(name, value, hints[name]) for name, value in data.items()})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(name: str, value, hint):
    """Check a JSON value against a field's type; lists become tuples, nested dataclasses objects."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except SettingsError as exc:
                errors.append(str(exc))
        raise SettingsError(errors[0] if errors else f"{name} may not be empty")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{name} must be a list")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(name, v, args[0]) for v in value)
        if len(args) != len(value):
            raise SettingsError(f"{name} must have {len(args)} entries")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args, strict=True))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise SettingsError(f"{name} must be an object")
        sub_hints = typing.get_type_hints(hint)
        unknown = set(value) - set(sub_hints)
        if unknown:
            raise SettingsError(f"unknown keys in {name}: {', '.join(sorted(unknown))}")
        return hint(**{k: _coerce(f"{name}.{k}", v, sub_hints[k]) for k, v in value.items()})
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{name} must be a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{name} must be a whole number")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise SettingsError(f"{name} must be {'text' if hint is str else 'true or false'}")
        return value
    raise SettingsError(f"{name} has an unsupported type")


# --------------------------------------------------------------------------- checks shared by techniques


def check_prompt(name: str, text: str, *, required: bool, limit: int = MAX_PROMPT_CHARS) -> None:
    if not isinstance(text, str):
        raise SettingsError(f"{name} must be text")
    if required and not text.strip():
        raise SettingsError(f"{name} is empty: describe the picture you want")
    if len(text) > limit:
        raise SettingsError(f"{name} has {len(text)} characters; the limit is {limit}")


def check_int(name: str, value: int | None, lo: int, hi: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{name} must be a whole number")
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be between {lo} and {hi}, not {value}")


def check_float(name: str, value: float | None, lo: float, hi: float) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, not {value!r}")
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be between {lo} and {hi}, not {value}")


def check_size(name: str, value: int | None, lo: int = 8, hi: int = 4096) -> None:
    check_int(name, value, lo, hi)
    if value is not None and value % 8:
        raise SettingsError(f"{name} must be a multiple of 8, not {value}")
