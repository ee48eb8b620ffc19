"""Evaluation-only attacks: attacks aimed at a mixture's gate and experts, and wrappers of the
official AutoAttack and Square. Training never imports this module, so a change here re-runs
evaluation and not training (dvc.yaml). Same contracts as dwf.attacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
from torch import nn

from dwf.attacks import (LOSSES, _Best, _check_budget, _input_grad, _pgd_run, _pgd_start,
                         attack_score, cross_entropy, margin, project, worst_of)
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

    Maximizes log softmax(s(x))_k + CE(f_k(x), y) with k = `weakest_expert(x)` and s the
    routing scores: the first term moves the routing toward expert k (for DWF it is log w_k;
    for a hard router it is the relaxed decision, whose gradient is not zero), the second makes
    expert k err, so the mixture follows it. One pass of `model.route` with the route forced
    to k gives both.
    """
    k = weakest_expert(model, x, y)  # (N,)
    rows = torch.arange(len(k), device=k.device)
    forced = nn.functional.one_hot(k, model.n_experts)

    def objective(x_adv: torch.Tensor, y_: torch.Tensor) -> torch.Tensor:
        scores = []

        def to_k(s: torch.Tensor) -> torch.Tensor:
            scores.append(s)
            return forced.to(s.dtype)

        f_k = model.route(x_adv, to_k)  # expert k's logits, (N, C)
        return scores[0].log_softmax(1)[rows, k] + cross_entropy(f_k, y_)

    return pgd_objective(model, x, y, objective, eps=eps, alpha=alpha, steps=steps,
                         restarts=restarts, seed=seed)


class Relaxed(nn.Module):
    """A mixture with its routing decision replaced by softmax(scores / temperature): the
    differentiable surrogate of a hard router (BPDA, Athalye et al. 2018), through the mixture
    interface's `route`. As the temperature falls it tends to the hard choice in value."""

    def __init__(self, mixture: nn.Module, temperature: float):
        super().__init__()
        self.mixture, self.temperature = mixture, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixture.route(x, lambda s: torch.softmax(s / self.temperature, dim=1))


def _phases(steps: int, temperatures: Sequence[float]) -> list[float]:
    """The temperature of each of `steps` iterations: equal shares, the remainder last (fewer
    steps than temperatures: all at the last, the one closest to the hard choice)."""
    share = steps // len(temperatures)
    out = [t for t in temperatures[:-1] for _ in range(share)]
    return out + [temperatures[-1]] * (steps - len(out))


def relaxed_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
                steps: int, temperatures: Sequence[float] = (1.0, 0.1, 0.02), loss: str = "ce",
                restarts: int = 1, seed: int | None = None) -> torch.Tensor:
    """PGD on the router-relaxed surrogate (`Relaxed`), judged on the real model.

    Each restart starts uniformly in the ball (seed + r) and anneals the temperature through
    `temperatures` in equal shares of `steps`. Every iterate is scored on `model` itself: per
    example the best one over all iterates and restarts is kept (one that `model` misclassifies,
    else the largest margin), and an example leaves the batch once `model` errs on it.

    Args:
        model: a mixture with `route` (models.is_mixture); a hard router's attack surface.
        loss: name in attacks.LOSSES, ascended on the surrogate's logits.
        eps, alpha, steps, restarts, seed: as in attacks.pgd.
    Returns:
        adversarial images, detached.
    """
    _check_budget(eps, alpha)
    if steps < 1 or restarts < 1 or not temperatures or not all(t > 0 for t in temperatures):
        raise ValueError(f"need steps >= 1, restarts >= 1 and temperatures > 0, got {steps}, "
                         f"{restarts}, {list(temperatures)}")
    loss_fn, schedule = LOSSES[loss], _phases(steps, temperatures)
    best = _Best()
    best.update(x, *attack_score(model, x, y, "margin"))
    for r in range(restarts):
        gen = None if seed is None else torch.Generator().manual_seed(seed + r)
        active = (~best.wrong).nonzero().squeeze(1)  # examples no iterate has fooled yet
        x_adv = _pgd_start(x[active], eps, True, gen)
        for t in schedule:
            if len(active) == 0:
                return best.x.detach()
            grad, _ = _input_grad(Relaxed(model, t), x_adv, y[active], loss_fn)
            x_adv = project(x_adv + alpha * grad.sign(), x[active], eps)
            wrong, score = attack_score(model, x_adv, y[active], "margin")
            best.update(x_adv, wrong, score, active)
            active, x_adv = active[~wrong], x_adv[~wrong]
    return best.x.detach()


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
