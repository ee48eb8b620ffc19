"""What every params section shares: the error type, the validation helpers, the name rule."""

from __future__ import annotations

import re
from typing import Any

# One rule for names (issue 11): every name that becomes a path or a shell word (dataset,
# expert, defense, model) matches one of these in full. Lower-case letters, digits and "_" only:
# no quote, "$", "`", space, "/" or "..", so a name can neither end a shell word nor leave its
# folder. 32 characters keep paths and DVC stage names short.
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
EXPERT_KINDS = ("benign", "fgsm", "pgd")
EXPERT_NAME = re.compile(rf"({'|'.join(EXPERT_KINDS)})(_[0-9]{{1,3}})?")  # e.g. benign, fgsm_0
MODEL_NAME = re.compile(rf"experts/{EXPERT_NAME.pattern}|{NAME.pattern}")  # dwf, resnet18, experts/pgd_3

# Upper bounds of numeric params: each far above any value the paper or a sane study uses
# (paper: 200 epochs, batch 500, lr 0.1, 100 attack iterations, width 64), low enough that a
# typo (an extra zero block, 1e30) fails here, naming the key, not as a traceback or an attempt
# to allocate terabytes. Raise one if a real study needs it.
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536          # images per batch (per view in training)
MAX_LR = 10.0               # SGD learning rate; 0 < lr <= MAX_LR
MAX_STEPS = 10_000          # iterations of one attack
MAX_RESTARTS = 100          # random restarts of one attack
MAX_LOSS_WEIGHT = 1_000.0   # beta, lambda, alpha of a loss term
MAX_WIDTH = 1_024           # channels of a network's first stage, or of a gate layer
MAX_MEMBERS = 64            # sub-models or experts inside one baseline


class ConfigError(ValueError):
    """A bad parameter: the message names the key and what is allowed."""


def check(ok: bool, key: str, allowed: str) -> None:
    """ConfigError naming `key` and what is `allowed` unless ok."""
    if not ok:
        raise ConfigError(f"{key}: expected {allowed}")


def check_name(value: Any, key: str, pattern: re.Pattern = NAME) -> None:
    """ConfigError naming `key` unless `value` is a string matching `pattern` in full."""
    ok = isinstance(value, str) and pattern.fullmatch(value) is not None
    check(ok, key, f"a name matching {pattern.pattern}, got {value!r}")


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


def at_most(obj: Any, high: float, *keys: str) -> None:
    """Each attribute `keys` of obj is <= high (checked before anything is allocated from it)."""
    for k in keys:
        v = getattr(obj, k)
        check(v <= high, k, f"a value <= {high}, got {v}")


def nonempty(obj: Any, *keys: str) -> None:
    """Each attribute `keys` of obj is a non-empty sequence."""
    for k in keys:
        check(len(getattr(obj, k)) > 0, k, "a non-empty list")


def choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    """`value` is one of `allowed`."""
    check(value in allowed, key, f"one of {', '.join(allowed)}, got {value!r}")
