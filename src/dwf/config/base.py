"""What every params section shares: the error type and the validation helpers."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad parameter: the message names the key and what is allowed."""


def check(ok: bool, key: str, allowed: str) -> None:
    """ConfigError naming `key` and what is `allowed` unless ok."""
    if not ok:
        raise ConfigError(f"{key}: expected {allowed}")


def positive(obj: Any, *keys: str) -> None:
    """Each attribute `keys` of obj is > 0."""
    for k in keys:
        v = getattr(obj, k)
        check(v > 0, k, f"a value > 0, got {v}")


def in_unit(obj: Any, *keys: str) -> None:
    """Each attribute `keys` of obj is in [0, 1]."""
    for k in keys:
        v = getattr(obj, k)
        check(0 <= v <= 1, k, f"a value in [0, 1], got {v}")


def nonempty(obj: Any, *keys: str) -> None:
    """Each attribute `keys` of obj is a non-empty sequence."""
    for k in keys:
        check(len(getattr(obj, k)) > 0, k, "a non-empty list")


def choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    """`value` is one of `allowed`."""
    check(value in allowed, key, f"one of {', '.join(allowed)}, got {value!r}")
