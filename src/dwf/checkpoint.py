"""Self-describing, atomic, safe-to-load checkpoints (DESIGN.md, contracts).

A checkpoint is a plain dict of tensors and primitive values: the weights, the architecture
name and arguments to rebuild the model, the resolved config, training state for resume, and
the versions of dwf and torch. It holds nothing else (no wall-clock times, no machine), so
the same inputs give the same bytes: DVC sees a rebuilt checkpoint as unchanged. It is written
to a temporary file and renamed into place, and read only with
`torch.load(weights_only=True)`, so a file from an untrusted remote cannot run code; its
architecture arguments, tensors and their finiteness are checked before any model is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import platform
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dwf import __version__, models
from dwf.fileio import atomic_write, load_failure

FORMAT = "dwf-checkpoint/1"
REQUIRED = ("format", "arch", "arch_kwargs", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or inconsistent; names the file."""


def versions() -> dict[str, str]:
    """The versions a checkpoint records: the same in every run of one installation."""
    return {"dwf": __version__, "torch": str(torch.__version__)}  # TorchVersion: not a safe global


def environment() -> dict[str, Any]:
    """Versions and device facts of this machine, for metrics files (never in checkpoints)."""
    cuda = torch.cuda.is_available()
    return {
        **versions(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
    }


def _canonical(obj: Any) -> Any:
    """`obj` rebuilt so that its pickle depends on its values alone, not on how it was made.

    Pickle writes each string and container once per object and refers back to it after, so
    equal values built differently give different bytes: a resumed training's history comes
    from unpickling (every "loss" its own string), an uninterrupted one's from the code's
    constants (one shared "loss"), and DVC would see a new checkpoint (issue 23). Containers
    are rebuilt unshared (an OrderedDict keeps its type and torch's `_metadata`), strings
    interned; tensors and numbers stay as they are.
    """
    if isinstance(obj, str):
        return sys.intern(obj)
    if type(obj) in (dict, OrderedDict):
        out = type(obj)((_canonical(k), _canonical(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's module versions (load_state_dict reads them)
            out._metadata = _canonical(obj._metadata)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v) for v in obj)
    return obj


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically (adds format tag and versions); the same values give
    the same bytes however they were computed (_canonical)."""
    payload = _canonical({"format": FORMAT, "versions": versions(), **payload})
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    atomic_write(path, lambda f: torch.save(payload, f))


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint dict without executing any pickled code."""
    return read(path)[0]


def read(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read and validate a checkpoint dict, and the sha256 of the very bytes it was loaded from.

    Returns:
        (checkpoint, sha256 hex digest of the file).
    """
    path = Path(path)
    try:
        blob = path.read_bytes()  # hash and load one buffer: the file may change in between
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"{path}: checkpoint not found") from None
    try:
        ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated zip, not a torch file ...
        raise CheckpointError(f"{path}: {load_failure(e, 'dwf checkpoint')}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dwf checkpoint (expected format {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if ckpt["arch"] not in models.ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {ckpt['arch']!r}")
    check_arch_kwargs(ckpt["arch_kwargs"], path)
    check_weights(ckpt["state_dict"], path)
    return ckpt, hashlib.sha256(blob).hexdigest()


@dataclasses.dataclass(frozen=True)
class Allowed:
    """What one architecture argument may hold: a number in [low, high] ((low, high] if
    open_low), an integer unless `integer` is False; or a sequence of length[0]..length[1]."""

    low: float
    high: float
    integer: bool = True
    length: tuple[int, int] | None = None
    open_low: bool = False

    def __call__(self, value: Any) -> bool:
        if self.length is None:
            return self._number(value)
        return (isinstance(value, (list, tuple)) and self.length[0] <= len(value) <= self.length[1]
                and all(map(self._number, value)))

    def _number(self, v: Any) -> bool:
        kinds = (int,) if self.integer else (int, float)  # type(), not isinstance: no bools
        return (type(v) in kinds and math.isfinite(v) and v <= self.high
                and (v > self.low if self.open_low else v >= self.low))

    def __str__(self) -> str:
        bounds = f"{'(' if self.open_low else '['}{self.low}, {self.high}]"
        what = "integer" if self.integer else "number"
        if self.length is None:
            return f"an {what} in {bounds}" if self.integer else f"a {what} in {bounds}"
        return f"{self.length[0]}..{self.length[1]} {what}s in {bounds}"


# What a checkpoint's architecture arguments may hold: outside these ranges a file is corrupt
# or hostile, refused before its numbers size an allocation (width 10^7 would ask for terabytes).
# Paper sizes: 10 classes, width 64, 9 experts, router 1024-512-128, 3x32x32 images.
ARCH_KWARGS: dict[str, Allowed] = {
    "num_classes": Allowed(1, 100_000),
    "width": Allowed(1, 1024),
    "in_channels": Allowed(1, 16),
    "n_experts": Allowed(1, 64),
    "n_submodels": Allowed(1, 64),
    "router_width": Allowed(1, 1024),
    "router_blocks": Allowed(1, 64),
    "router_hidden": Allowed(1, 65_536, length=(1, 16)),
    "input_shape": Allowed(1, 4096, length=(3, 3)),
    "mean": Allowed(0, 1, integer=False, length=(1, 16)),  # one per channel, [0, 1] pixel units
    "std": Allowed(0, 1, integer=False, length=(1, 16), open_low=True),
    "ratio": Allowed(0, 1, integer=False, open_low=True),
}


def check_arch_kwargs(kwargs: Any, path: str | Path, where: str = "arch_kwargs") -> None:
    """Refuse architecture arguments of a wrong type or outside ARCH_KWARGS's ranges.

    Args:
        kwargs: a checkpoint's arch_kwargs (a mixture's holds its expert's as a nested dict).
        path: the file, for the message.
    """
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: {where} is not a dict")
    for key, value in kwargs.items():
        if isinstance(value, dict):
            check_arch_kwargs(value, path, f"{where}.{key}")
        elif key in ARCH_KWARGS and not ARCH_KWARGS[key](value):
            raise CheckpointError(f"{path}: {where}.{key} = {str(value)[:50]} is not "
                                  f"{ARCH_KWARGS[key]}")


def check_weights(state: Any, path: str | Path) -> None:
    """A state dict is a dict of tensors, and every floating-point one is finite."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: state_dict is not a dict")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict[{str(name)[:80]!r}] is a "
                                  f"{type(t).__name__}, not a tensor")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: weight {name!r} is not finite (NaN or inf)")


def model_from(ckpt: dict[str, Any], path: str | Path = "<checkpoint>") -> nn.Module:
    """Rebuild the model a checkpoint describes. Every tensor's name and shape is compared
    with the architecture built on the meta device first, so arguments that disagree with the
    weights allocate nothing."""
    try:
        with torch.device("meta"):  # shapes only, no memory
            expected = models.build(ckpt["arch"], **ckpt["arch_kwargs"]).state_dict()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad architecture arguments ({e})") from None
    state = ckpt["state_dict"]
    for name, t in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: weights lack {name!r} (wrong architecture?)")
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: {name!r} has shape {tuple(state[name].shape)}, "
                                  f"architecture expects {tuple(t.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected weights {extra[:3]} (wrong architecture?)")
    model = models.build(ckpt["arch"], **ckpt["arch_kwargs"])
    model.load_state_dict(state)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", *,
               dataset: str | None = None) -> nn.Module:
    """Any checkpoint dwf writes, rebuilt in eval mode: takes [0, 1] images, returns logits.

    Args:
        path: checkpoint file.
        device: where to put the model.
        dataset: if given, refuse a checkpoint trained on another dataset.
    """
    ckpt = load(path)
    if dataset is not None and ckpt.get("dataset") not in (None, dataset):
        raise CheckpointError(f"{path}: trained on {ckpt['dataset']!r}, not {dataset!r}")
    return model_from(ckpt, path).to(device).eval()
