"""Single-network baselines of section 5: plain ResNet-18, FGSM-AT and PGD-AT.

The adversarially trained networks replace a fraction (the paper: half) of every batch by
its adversarial images; the batch is already shuffled, so its first part is a random one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dwf import attacks
from dwf.config import AdvTrainConfig
from dwf.defenses.dwf import benign_batch
from dwf.runtime import choice, draw_seed
from dwf.train import crafting

__all__ = ["benign_batch", "fgsm_at_batch", "pgd_at_batch"]

Craft = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _partly_attacked(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AdvTrainConfig,
                     craft: Craft) -> tuple[torch.Tensor, torch.Tensor]:
    k = round(cfg.adv_fraction * len(x))  # attacked examples in this batch
    if k == 0:
        return x, y
    with crafting(model, cfg.attack_bn):
        x_adv = craft(model, x[:k], y[:k])
    return torch.cat([x_adv, x[k:]]), y


def fgsm_at_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AdvTrainConfig,
                  rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FGSM-AT: adv_fraction of the batch FGSM at eps drawn from fgsm_eps (paper: 0.03)."""
    eps = choice(cfg.fgsm_eps, rng)
    return _partly_attacked(model, x, y, cfg, lambda m, xa, ya: attacks.fgsm(m, xa, ya, eps=eps))


def pgd_at_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AdvTrainConfig,
                 rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD-AT: adv_fraction of the batch PGD (paper: eps 8/255, alpha 2/255, 10 steps)."""
    steps = choice(cfg.pgd_steps, rng)
    seed = draw_seed(rng) if cfg.random_start else None
    return _partly_attacked(model, x, y, cfg, lambda m, xa, ya: attacks.pgd(
        m, xa, ya, eps=cfg.pgd_eps, alpha=cfg.pgd_alpha, steps=steps,
        random_start=cfg.random_start, seed=seed, graph=True))
