"""Evaluation-only attacks: attacks aimed at a mixture's gate and experts, and wrappers of the
official AutoAttack and Square. Training never imports this module, so a change here re-runs
evaluation and not training (dvc.yaml). Same contracts as dwf.attacks.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dwf.attacks import _check_budget, _pgd_run, cross_entropy, margin, worst_of
from dwf.metricsfile import AttackRecord

# ---------------------------------------------------------------- attacks aimed at a mixture

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) -> per-example loss (N,)


class _AsModel(nn.Module):
    """An objective (x, y) -> (N,) dressed as a model so `_pgd_run` can ascend it."""

    def __init__(self, objective: Objective, y: torch.Tensor):
        super().__init__()
        self.objective, self.y = objective, y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.objective(x, self.y)


def pgd_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective, *,
                  eps: float, alpha: float, steps: int, restarts: int = 1,
                  seed: int | None = None) -> torch.Tensor:
    """PGD ascending any per-example objective; restarts are ranked on `model`'s error.

    Args:
        model: the classifier under attack (used only to rank restarts).
        objective: (x, y) -> (N,) loss to maximize, e.g. a gate or single-expert loss.
        eps, alpha, steps, restarts, seed: as in `pgd` (random start from seed + r).
    Returns:
        adversarial images, detached; per example the restart that fools `model` (ties: margin).
    """
    _check_budget(eps, alpha)
    target = _AsModel(objective, y)

    def run(r: int) -> torch.Tensor:
        gen = None if seed is None else torch.Generator().manual_seed(seed + r)
        return _pgd_run(target, x, y, eps, alpha, steps, True, gen, lambda out, _: out)

    return worst_of(model, (run(r) for r in range(restarts)), y, "margin")


@torch.no_grad()
def weakest_expert(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example, the expert with the smallest clean margin (the one closest to erring), (N,)."""
    logits = model.expert_logits(x)  # (N, E, C)
    n, e, c = logits.shape
    m = margin(logits.reshape(n * e, c), y.repeat_interleave(e)).view(n, e)
    return m.argmax(dim=1)  # margin = wrong - true: largest = weakest


def gate_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
                steps: int, restarts: int = 1, seed: int | None = None) -> torch.Tensor:
    """Drive the gate toward the expert weakest on each input while attacking that expert.

    Maximizes log w_k(x) + CE(f_k(x), y) with k = `weakest_expert(x)`: the first term moves the
    gate's weight onto expert k, the second makes expert k err, so the mixture follows it.
    Needs `model.gate_weights` (N, E) and `model.expert_logits` (N, E, C).
    """
    k = weakest_expert(model, x, y)  # (N,)
    rows = torch.arange(len(k), device=k.device)

    def objective(x_adv: torch.Tensor, y_: torch.Tensor) -> torch.Tensor:
        log_w = model.gate_weights(x_adv)[rows, k].clamp_min(1e-30).log()  # (N,)
        return log_w + cross_entropy(model.expert_logits(x_adv)[rows, k], y_)  # f_k: (N, C)

    return pgd_objective(model, x, y, objective, eps=eps, alpha=alpha, steps=steps,
                         restarts=restarts, seed=seed)


# ---------------------------------------------------------------- AutoAttack (pyautoattack)


def _rng_kept(device: torch.device):
    """AutoAttack's attacks reseed torch's global generators; keep the caller's streams intact."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, queries: int = 5000,
           seed: int = 0) -> torch.Tensor:
    """Square Attack (Andriushchenko et al. 2020), gradient-free, as AutoAttack runs it.

    Args:
        eps: L-inf budget in pixel units; queries: model evaluations per example.
    Returns:
        adversarial images (clean ones where it failed), detached.
    """
    from pyautoattack.square import SquareAttack

    _check_budget(eps)
    attack = SquareAttack(model, norm="Linf", n_queries=queries, eps=eps, p_init=0.8, n_restarts=1,
                          seed=seed, verbose=False, resc_schedule=False, device=x.device)
    with _rng_kept(x.device):
        return attack.perturb(x, y).detach()


def _adversary(model: nn.Module, eps: float, version: str, seed: int, square_queries: int,
               device: torch.device):
    from pyautoattack import AutoAttack

    _check_budget(eps)
    adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, device=device)
    adversary.square.n_queries = square_queries
    return adversary


def autoattack_records(*, eps: float, version: str = "standard", square_queries: int = 5000
                       ) -> dict[str, AttackRecord]:
    """What `autoattack` runs, read off the official AutoAttack object's own settings.

    Returns:
        {attack name: record}: losses, iterations (Square: queries) and restarts (targeted
        attacks: restarts x target classes).
    """
    a = _adversary(nn.Identity(), eps, version, 0, square_queries, torch.device("cpu"))
    runs = {"apgd-ce": ("ce", a.apgd.n_iter, a.apgd.n_restarts),
            "apgd-dlr": ("dlr", a.apgd.n_iter, a.apgd.n_restarts),
            "apgd-t": ("dlr_targeted", a.apgd_targeted.n_iter,
                       a.apgd_targeted.n_restarts * a.apgd_targeted.n_target_classes),
            "fab": ("fab", a.fab.n_iter, a.fab.n_restarts),
            "fab-t": ("fab_targeted", a.fab.n_iter, a.fab.n_restarts * a.fab.n_target_classes),
            "square": ("square", a.square.n_queries, a.square.n_restarts)}
    return {name: AttackRecord("autoattack", *runs[name][:1], eps, *runs[name][1:], "model",
                               f"AA {name}") for name in a.attacks_to_run}


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
               version: str = "standard", seed: int = 0, square_queries: int = 5000
               ) -> dict[str, torch.Tensor]:
    """AutoAttack (Croce & Hein 2020), official code, run one attack at a time in its order.

    Each attack runs only on the examples every earlier one left correct, as in
    `run_standard_evaluation`, so the flags after the last attack are AutoAttack's result.
    `square_queries` other than 5000 departs from the standard version (CPU demo only).

    Returns:
        {attack name: per-example correctness (bool, (N,)) after it and all earlier ones}.
    """
    adversary = _adversary(model, eps, version, seed, square_queries, x.device)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    out: dict[str, torch.Tensor] = {}
    for name in list(adversary.attacks_to_run):
        idx = correct.nonzero().squeeze(1)
        if len(idx):
            adversary.attacks_to_run = [name]
            with _rng_kept(x.device):
                _, y_adv = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=len(idx))
            correct = correct.clone()
            correct[idx] = y_adv.to(y.device) == y[idx]
        out[name] = correct
    return out
