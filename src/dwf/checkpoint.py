"""Self-describing, atomic, safe-to-load checkpoints (DESIGN.md, contracts).

A checkpoint is a plain dict of tensors and primitive values: the weights, the architecture
name and arguments to rebuild the model, the resolved config, training state for resume, and
versions. It is written to a temporary file and renamed into place, and read only with
`torch.load(weights_only=True)`, so a file from an untrusted remote cannot run code.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dwf import __version__, models
from dwf.fileio import atomic_write

FORMAT = "dwf-checkpoint/1"
REQUIRED = ("format", "arch", "arch_kwargs", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or inconsistent; names the file."""


def environment() -> dict[str, Any]:
    """Versions and device facts recorded in checkpoints and metrics."""
    cuda = torch.cuda.is_available()
    return {
        "dwf": __version__,
        "torch": str(torch.__version__),  # TorchVersion is not a safe global
        "python": platform.python_version(),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
    }


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically (adds format tag and versions)."""
    payload = {"format": FORMAT, "versions": environment(), **payload}
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    atomic_write(path, lambda f: torch.save(payload, f))


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint dict without executing any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated zip, not a torch file ...
        raise CheckpointError(f"{path}: not a loadable dwf checkpoint ({_reason(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dwf checkpoint (expected format {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if ckpt["arch"] not in models.ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {ckpt['arch']!r}")
    return ckpt


def _reason(e: Exception) -> str:
    """The informative line of torch.load's error (it buries the cause under advice)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported global" in ln or "WeightsUnpickler error" in ln:
            return ln.split("Please use")[0].strip()[:200] + " - refused, nothing was executed"
    return (lines[0] if lines else type(e).__name__)[:200]


def model_from(ckpt: dict[str, Any], path: str | Path = "<checkpoint>") -> nn.Module:
    """Rebuild the model a checkpoint describes, checking every tensor's name and shape first."""
    try:
        model = models.build(ckpt["arch"], **ckpt["arch_kwargs"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad architecture arguments ({e})") from None
    expected = model.state_dict()
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
