"""Type checks of settings read from JSON, TOML or a command line into dataclasses (UNetConfig, TrainConfig).

JSON and TOML give strings, numbers, booleans and lists as the file holds them: ``"no"`` is a non-empty
string, so a plain ``if value`` would read it as true. Each value is checked against its field's annotation
(a string under ``from __future__ import annotations``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

_EXPECTED = {"int": "an integer", "bool": "true or false", "float": "a finite number", "str": "a string",
             "dict": "a table of settings", "tuple[int, ...]": "a list of integers"}


def _is(kind: str, v) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if isinstance(v, bool):  # True is an int to Python, not a number of steps or channels
        return False
    if kind == "int":
        return isinstance(v, numbers.Integral)
    if kind == "float":
        return isinstance(v, numbers.Real) and math.isfinite(v)
    if kind == "str":
        return isinstance(v, str)
    if kind == "dict":
        return isinstance(v, dict)
    if kind == "tuple[int, ...]":
        return isinstance(v, (list, tuple)) and all(_is("int", x) for x in v)
    raise TypeError(f"no check for the annotation {kind!r}")


def check_value(name: str, annotation: str, v) -> None:
    """ValueError naming ``name`` unless ``v`` fits ``annotation`` ("int", "int | None", "bool", "float",
    "str", "dict", "tuple[int, ...]"): booleans are not numbers, floats are finite, lists hold integers."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    optional = "None" in kinds
    kind = next(k for k in kinds if k != "None")
    if (v is None and optional) or _is(kind, v):
        return
    raise ValueError(f"{name}: expected {_EXPECTED[kind]}{' or null' if optional else ''}, got {v!r}")


def check_fields(obj, name=lambda field: field) -> None:
    """check_value for every field of the dataclass instance ``obj``; ``name(field)`` is how errors name it."""
    for f in dataclasses.fields(obj):
        check_value(name(f.name), f.type, getattr(obj, f.name))


def annotations(cls) -> dict[str, str]:
    """field name -> annotation of a dataclass."""
    return {f.name: f.type for f in dataclasses.fields(cls)}


def env_int(name: str, default: int) -> int:
    """The integer environment variable ``name`` (torchrun's WORLD_SIZE, RANK, LOCAL_RANK), ``default`` where it is
    unset; anything else is a ValueError naming the variable."""
    import os

    v = os.environ.get(name, "")
    if v.strip() == "":
        return default
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{name}: expected a non-negative integer in the environment variable, got {v!r}") from None
    if n < 0:
        raise ValueError(f"{name}: expected a non-negative integer in the environment variable, got {v!r}")
    return n
