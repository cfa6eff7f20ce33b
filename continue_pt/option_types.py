"""Option values as their declared types: what YAML and the command line give (strings, YAML 1.1 numbers) coerced
to a dataclass field's annotation, and the problem with a value that is not of it. No torch here."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any


def _allowed(annotation: Any) -> tuple[type, ...]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(a for arg in typing.get_args(annotation) for a in _allowed(arg))
    origin = typing.get_origin(annotation)
    return (origin if origin is not None else annotation,)


def _describe_types(allowed: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
             type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in allowed)


def coerce(name: str, annotation: Any, value: Any) -> Any:
    """``value`` as ``annotation`` (option ``name``'s declared type); ValueError says what was expected.

    YAML 1.1 reads ``1e-4`` (no dot) as a string and ``1.0e4`` as a float: numbers written either way are taken,
    and a float that is a whole number is taken where an integer is expected (``max_steps: 1e4``)."""
    allowed = _allowed(annotation)
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError(f"{name} needs {_describe_types(allowed)}, got nothing (null)")
    for kind in allowed:
        converted = _convert(value, kind)
        if converted is not _NO:
            return converted
    raise ValueError(f"{name} needs {_describe_types(tuple(t for t in allowed if t is not type(None)))}, "
                     f"got {value!r}")


_NO = object()


def _convert(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        return _NO
    if isinstance(value, bool):  # True is an int in Python, not a number of steps
        return str(value).lower() if kind is str else _NO
    if kind is int:
        number = _number(value)
        return int(number) if number is not None and float(number).is_integer() else _NO
    if kind is float:
        number = _number(value)
        return float(number) if number is not None else _NO
    if kind is str:
        return str(value) if isinstance(value, (str, int, float, Path)) else _NO
    if kind is dict:
        return value if isinstance(value, dict) else _NO
    return value if isinstance(value, kind) else _NO


def _number(value: Any) -> float | int | None:
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if number == number and abs(number) != float("inf") else None
    return None


def type_problem(name: str, annotation: Any, value: Any) -> str | None:
    """What is wrong when ``value`` is not of ``annotation`` (None when it is)."""
    allowed = _allowed(annotation)
    if _has_type(value, allowed):
        return None
    return f"{name} needs {_describe_types(allowed)}, got {value!r}"


def _has_type(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)
