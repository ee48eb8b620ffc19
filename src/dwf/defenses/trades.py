"""TRADES (Zhang et al., ICML 2019): CE on clean images + beta * KL(adversarial || clean).

The adversarial images maximize the KL divergence to the clean prediction (no labels), by
sign-gradient ascent from a small Gaussian start, as in the TRADES reference code. ADVMoE
reuses both pieces with an extra router head.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dwf import attacks
from dwf.config import TradesConfig
from dwf.runtime import choice
from dwf.train import Objective, crafting

Heads = Callable[[torch.Tensor], list[torch.Tensor]]  # images -> logits of every head


def kl_adversary(heads: Heads, x: torch.Tensor, *, eps: float, alpha: float, steps: int,
                 start_std: float, generator: torch.Generator) -> torch.Tensor:
    """L-inf PGD on sum_h KL(softmax(h(x_adv)) || softmax(h(x))), summed over the batch.

    Args:
        heads: the outputs to push away from their clean values (the classifier, a router).
        x: clean images in [0, 1]; eps, alpha: pixel units; steps: iterations.
        start_std: std of the Gaussian start, pixel units; generator: its CPU generator.
    Returns:
        adversarial images, detached, within the eps-ball and [0, 1].
    """
    with torch.no_grad():
        targets = [h.softmax(1) for h in heads(x)]
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    x_adv = attacks.project(x + start_std * noise, x, eps)
    for _ in range(steps):
        with torch.enable_grad():
            x_adv.requires_grad_(True)
            loss = sum(F.kl_div(h.log_softmax(1), p, reduction="sum")
                       for h, p in zip(heads(x_adv), targets))
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = attacks.project(x_adv.detach() + alpha * grad.sign(), x, eps)
    return x_adv


def trades_objective(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                     beta: float) -> Objective:
    """CE(f(x), y) + beta * KL(f(x_adv) || f(x)) per example (gradient through both sides)."""
    logits, logits_adv = model(x), model(x_adv)
    kl = F.kl_div(logits_adv.log_softmax(1), logits.softmax(1), reduction="batchmean")
    return Objective(F.cross_entropy(logits, y) + beta * kl, torch.cat([logits, logits_adv]),
                     torch.cat([y, y]))


def trades_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TradesConfig,
                 rng: torch.Generator) -> Objective:
    """One TRADES step: KL-PGD (eps pgd_eps, step pgd_alpha, pgd_steps drawn) then the loss."""
    with crafting(model, cfg.attack_bn):
        x_adv = kl_adversary(lambda z: [model(z)], x, eps=cfg.pgd_eps, alpha=cfg.pgd_alpha,
                             steps=choice(cfg.pgd_steps, rng), start_std=cfg.start_std,
                             generator=rng)
    return trades_objective(model, x, x_adv, y, cfg.beta)
