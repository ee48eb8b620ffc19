"""ADVMoE training (Zhang et al., ICCV 2023), after the official code's trainer.

Every batch, two alternating SGD steps, each on freshly crafted TRADES examples (KL-PGD whose
objective also pushes the router's scores away from their clean values):

1. expert step (everything but the router): CE(f(x), y) + beta * KL(f(x_adv) || f(x));
2. router step (router only), "official": alpha * CE(router(x), y mod E)
   + beta * KL(router(x_adv) || router(x)); or "paper": the MoE's TRADES loss of step 1,
   reaching the router through the straight-through gate.
Deviations from the paper and the official code: docs/baselines.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dwf.config import ADVMoEConfig
from dwf.defenses.trades import kl_adversary, trades_objective
from dwf.models.advmoe import ADVMoEResNet18
from dwf.runtime import choice
from dwf.train import Objective, Phase, crafting


def _adversary(model: ADVMoEResNet18, x: torch.Tensor, cfg: ADVMoEConfig,
               rng: torch.Generator) -> torch.Tensor:
    with crafting(model, cfg.attack_bn):
        return kl_adversary(lambda z: [model(z), model.router_scores(z)], x, eps=cfg.pgd_eps,
                            alpha=cfg.pgd_alpha, steps=choice(cfg.pgd_steps, rng),
                            start_std=cfg.start_std, generator=rng)


def expert_step(model: ADVMoEResNet18, x: torch.Tensor, y: torch.Tensor, cfg: ADVMoEConfig,
                rng: torch.Generator) -> Objective:
    """TRADES on the whole MoE; the phase moves only the expert parameters."""
    return trades_objective(model, x, _adversary(model, x, cfg, rng), y, cfg.beta)


def router_step_official(model: ADVMoEResNet18, x: torch.Tensor, y: torch.Tensor,
                         cfg: ADVMoEConfig, rng: torch.Generator) -> Objective:
    """The official router loss: class-derived expert labels y mod E plus a router TRADES term."""
    x_adv = _adversary(model, x, cfg, rng)
    scores = model.router_scores(x)  # (N, E)
    expert_label = y % model.n_experts
    kl = F.kl_div(model.router_scores(x_adv).log_softmax(1), scores.softmax(1),
                  reduction="batchmean")
    loss = cfg.router_alpha * F.cross_entropy(scores, expert_label) + cfg.beta * kl
    return Objective(loss, scores, expert_label)


def router_step_paper(model: ADVMoEResNet18, x: torch.Tensor, y: torch.Tensor,
                      cfg: ADVMoEConfig, rng: torch.Generator) -> Objective:
    """The MoE's TRADES loss w.r.t. the router (through the straight-through gate)."""
    return trades_objective(model, x, _adversary(model, x, cfg, rng), y, cfg.beta)


ROUTER_STEPS = {"official": router_step_official, "paper": router_step_paper}


def phases(cfg: ADVMoEConfig) -> list[Phase]:
    """Expert step, then router step (the official order), per batch."""
    return [Phase(expert_step, ADVMoEResNet18.expert_parameters),
            Phase(ROUTER_STEPS[cfg.router_objective], ADVMoEResNet18.router_parameters,
                  lr=cfg.router_lr)]
