"""Public checkpoints (Tables 2-3, "publicly available pretrained baselines") under our protocol.

An external classifier is an architecture name from torchvision ("resnet50",
"torchvision:resnet50") or, if timm is installed, timm ("timm:xception"), a weights file (a
state dict, loaded with weights_only=True) and the dataset's normalization, which we put in
front of the network so that it takes [0, 1] images like every dwf model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dwf.checkpoint import CheckpointError
from dwf.models.resnet import Normalize


def _torchvision(name: str, num_classes: int) -> nn.Module:
    from torchvision import models as tvm

    if name not in tvm.list_models(module=tvm):
        raise ValueError(f"--external: torchvision has no classifier {name!r}")
    kwargs = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):  # no auxiliary heads at test time
        kwargs.update(aux_logits=False, init_weights=False)
    return tvm.get_model(name, **kwargs)


def _timm(name: str, num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError(f"--external timm:{name}: timm is not installed (pip install timm)") from None
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


SOURCES: dict[str, Callable[[str, int], nn.Module]] = {"torchvision": _torchvision, "timm": _timm}


class External(nn.Module):
    """A third-party classifier behind our Normalize layer: [0, 1] images -> logits (N, C)."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # public classifiers take 3 channels: grey images (native digits) are copied to all three
        return self.net(self.normalize(x).expand(-1, 3, -1, -1))


def build_external(arch: str, num_classes: int) -> nn.Module:
    """The bare network `arch` ("name" = torchvision, or "source:name"), randomly initialized."""
    source, _, name = arch.rpartition(":")
    source = source or "torchvision"
    if source not in SOURCES:
        raise ValueError(f"--external {arch!r}: unknown source {source!r}; use {', '.join(SOURCES)}")
    return SOURCES[source](name, num_classes)


def _state_dict(weights: Path) -> dict[str, torch.Tensor]:
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code is refused, not run
        raise CheckpointError(f"{weights}: not a loadable state dict ({str(e).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{weights}: expected a state dict")
    # checkpoints saved from DataParallel prefix every name with "module."
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_external(arch: str, weights: Path, *, num_classes: int, mean: tuple[float, ...],
                  std: tuple[float, ...], device: str | torch.device = "cpu") -> External:
    """An external classifier with its weights, in eval mode, taking [0, 1] images.

    Args:
        arch: architecture name, e.g. "vgg19_bn", "torchvision:densenet121", "timm:xception".
        weights: state dict file (its names must match the architecture exactly).
        num_classes: size of the classifier's output.
        mean, std: the dataset's normalization, applied in front of the network.
    """
    net = build_external(arch, num_classes)
    try:
        net.load_state_dict(_state_dict(weights))
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: does not fit {arch!r} ({str(e).splitlines()[0][:200]})") from None
    return External(net, mean, std).to(device).eval()
