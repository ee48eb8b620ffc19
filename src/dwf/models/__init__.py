"""Model registry: a checkpoint names its architecture and arguments; `build` rebuilds it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from torch import nn

from dwf.models.advmoe import ADVMoEResNet18
from dwf.models.moe import ROUTINGS, RoutedMoE, Router, SoftMoE
from dwf.models.resnet import Normalize, ResNet18
from dwf.models.soe import SoE
from dwf.models.zoo import ZOO

__all__ = ["ARCHITECTURES", "ROUTINGS", "ZOO", "build", "frozen", "is_mixture", "ADVMoEResNet18", "Normalize",
           "ResNet18", "RoutedMoE", "Router", "SoE", "SoftMoE"]


def _softmoe(n_experts: int, expert: dict[str, Any], router_hidden=(1024, 512, 128),
             input_shape=(3, 32, 32)) -> SoftMoE:
    experts = [ResNet18(**expert) for _ in range(n_experts)]
    return SoftMoE(experts, expert["mean"], expert["std"], router_hidden, input_shape)


def _routed_moe(routing: str, **mixture: Any) -> RoutedMoE:
    """DWF's mixture (softmoe's arguments) under another routing decision (ablation (a))."""
    return RoutedMoE(_softmoe(**mixture), routing)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "softmoe": _softmoe,
    "routed_moe": _routed_moe,
    "soe": SoE,
    "advmoe_resnet18": ADVMoEResNet18,
    **ZOO,  # the paper's benign baselines (models/zoo.py): vgg19, resnet34, ..., mobilenet_v2
}


def build(arch: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture from plain arguments (as stored in checkpoints)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


def is_mixture(model: nn.Module) -> bool:
    """A model with experts and a gate, through the one interface DWF, SoE and ADVMoE share:
    `n_experts`, `expert(i)` (expert i as a classifier), `expert_logits`, `gate_weights`,
    `route(x, gate)` (logits with the routing decision gate(scores) in place of its own) and
    `hard_routing` (whether that decision has no useful gradient: argmax, top-1)."""
    return all(hasattr(model, a) for a in ("n_experts", "expert", "expert_logits", "gate_weights",
                                           "route", "hard_routing"))


@contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """No parameter of `models` needs a gradient inside the block; the flags are restored after.

    An evaluation attacks inputs only: with frozen weights, backward passes skip the weights'
    gradients (AutoAttack's FAB calls `.backward()`, which would otherwise compute and store
    them) and eval-mode BatchNorm folds once (resnet.fold).
    """
    params = {id(p): p for m in models for p in m.parameters()}.values()
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)
