"""Sanity checks against gradient masking and broken attacks (Carlini et al. 2019, "On Evaluating
Adversarial Robustness"; AutoAttack's flags), computed on the model at hand.

Every check returns {"pass": bool, "value": the figure behind it}. Accuracies are in percent of
the audited examples; "noise" is one example or 0.5 points, whichever is larger.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from dwf import attacks
from dwf.config import EvalConfig
from dwf.runtime import derive_seed
from dwf.workers import Part

Check = dict[str, Any]             # {"pass": bool, "value": ...}
Run = dict[str, Any]               # {"correct": bool per example (CPU), "excess": float}
EPS_FRACTIONS = (0.0, 0.25, 0.5, 1.0, 2.0)   # the eps sweep, as multiples of cfg.pgd_eps
LARGE_EPS = 0.5                    # every image is within 0.5 of a uniform grey one
NEAR_ZERO = 2.0                    # accuracy (%) that counts as "near zero" at LARGE_EPS
CONVERGED = 0.5                    # points: doubling iterations and restarts must change less
SQUARE_SLACK = 0.2                 # points: AutoAttack's check_square_sr threshold
NONZERO_GRADS = 0.99               # fraction of examples with a non-zero input gradient
BINARIZED_FOUND = 0.95             # share of binarization tests the attack must win
INNER_SAMPLES = 16                 # points around each image the binarized readout keeps "clean"


def accuracy(flags: torch.Tensor) -> float:
    """Percent of True in per-example correctness flags (4 decimals, as the metrics files)."""
    return round(100.0 * flags.float().mean().item(), 4)


def _check(ok: bool, value: Any) -> Check:
    return {"pass": bool(ok), "value": value}


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fn: Callable, eps: float, *,
            batch_size: int, only: torch.Tensor | None = None) -> Run:
    """Per-example correctness (bool, CPU) under fn(model, x, y) -> x_adv, run in batches, and
    the largest step outside the eps-ball or [0, 1] it took (pixel units; inf for a non-finite
    output).

    `only` (bool, CPU) restricts the attack to some examples; the others count as correct.
    """
    keep = torch.ones(len(x), dtype=torch.bool) if only is None else only
    idx = keep.nonzero().squeeze(1).to(x.device)
    out, excess = [torch.zeros(0, dtype=torch.bool)], 0.0
    for i in range(0, len(idx), batch_size):
        xb, yb = x[idx[i:i + batch_size]], y[idx[i:i + batch_size]]
        x_adv = fn(model, xb, yb)
        steps = ((x_adv - xb).abs().amax() - eps, -x_adv.amin(), x_adv.amax() - 1)
        excess = max(excess, *(float(e) for e in steps))
        if not torch.isfinite(x_adv).all():
            excess = float("inf")
        with torch.no_grad():
            out.append((model(x_adv).argmax(1) == yb).cpu())
    flags = torch.ones(len(x), dtype=torch.bool)
    flags[keep] = torch.cat(out)
    return {"correct": flags, "excess": excess}


class Auditor:
    """Runs one attack family on the audited examples in batches, recording correctness.

    Args:
        model: the classifier in eval mode; x, y: audited images in [0, 1] and labels (device).
        attack: `attacks.pgd`-like (model, x, y, *, eps, alpha, steps, restarts, seed) -> x_adv.
        batch_size: examples per attack call; seed: base seed of every random start.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: Callable,
                 batch_size: int, seed: int):
        self.model, self.x, self.y, self.attack = model, x, y, attack
        self.batch_size, self.seed = batch_size, seed

    def correct(self, fn: Callable, eps: float, only: torch.Tensor | None = None) -> Run:
        """`correct` on the audited examples."""
        return correct(self.model, self.x, self.y, fn, eps, batch_size=self.batch_size, only=only)

    def pgd(self, eps: float, alpha: float, steps: int, restarts: int = 1) -> Run:
        seed = derive_seed(self.seed, "audit", f"{eps:g}/{steps}/{restarts}")
        return self.correct(lambda m, x, y: self.attack(
            m, x, y, eps=eps, alpha=alpha, steps=steps, restarts=restarts, seed=seed), eps)


def _noise(n: int) -> float:
    return max(CONVERGED, 100.0 / n)


def _monotone(accs: list[float], n: int) -> bool:
    """No value exceeds an earlier (weaker-attack) one by more than the noise."""
    return all(a <= min(accs[:i]) + _noise(n) for i, a in enumerate(accs) if i)


def _budgets(cfg: EvalConfig) -> list[tuple[int, int]]:
    """PGD (iterations, restarts) of increasing effort; the last two are the strong budget and
    its doubling in iterations and restarts."""
    k, r = cfg.strong_steps, cfg.strong_restarts
    return sorted({(max(1, k // 4), 1), (max(1, k // 2), 1), (k, 1), (k, r)}) + [(2 * k, 2 * r)]


def _eps(f: float, cfg: EvalConfig) -> float:
    return min(1.0, f * cfg.pgd_eps)


def attack_parts(aud: Auditor, cfg: EvalConfig, single_step: Callable) -> dict[str, Part]:
    """The attack runs the checks read, each independent of the others (a Run each): clean,
    the eps sweep ("eps/<fraction>"), FGSM, the iteration sweep ("pgd/<k>x<r>", the strong
    budget itself being "eps/1"), the large-eps PGD. Costs are attack iterations."""
    eps, k = cfg.pgd_eps, cfg.strong_steps
    ratio = cfg.pgd_alpha / cfg.pgd_eps if cfg.pgd_eps else 0.25  # step size as a share of eps
    parts = {"clean": Part(1, lambda: aud.correct(lambda m, x, y: x, 0.0))}
    # at eps 0 every step projects back onto x: one step asks what k steps would (the steps
    # that may leave the ball are the other runs', all measured by in_ball)
    parts |= {f"eps/{f:g}": Part(s, lambda f=f, s=s: aud.pgd(_eps(f, cfg), ratio * _eps(f, cfg), s))
              for f, s in ((f, k if f else 1) for f in EPS_FRACTIONS)}
    parts["fgsm"] = Part(1, lambda: aud.correct(lambda m, x, y: single_step(m, x, y, eps=eps), eps))
    parts |= {f"pgd/{s}x{rr}": Part(s * rr, lambda s=s, rr=rr: aud.pgd(eps, cfg.pgd_alpha, s, rr))
              for s, rr in _budgets(cfg) if (s, rr) != (k, 1)}
    parts["large_eps"] = Part(max(k, 20), lambda: aud.pgd(LARGE_EPS, LARGE_EPS / 8, max(k, 20)))
    return parts


def _by_iter(runs: dict[str, Run], cfg: EvalConfig) -> dict[tuple[int, int], torch.Tensor]:
    k = cfg.strong_steps
    return {(s, rr): runs["eps/1" if (s, rr) == (k, 1) else f"pgd/{s}x{rr}"]["correct"]
            for s, rr in _budgets(cfg)}


def attack_checks(runs: dict[str, Run], cfg: EvalConfig, square: Callable | None = None,
                  whitebox: torch.Tensor | None = None, square_done: torch.Tensor | None = None
                  ) -> dict[str, Check]:
    """Checks on the attack runs of `attack_parts`: eps and iteration sweeps, large eps,
    convergence, Square.

    The audited PGD is the strong budget (cfg.strong_steps x cfg.strong_restarts) at pgd_eps.
    `whitebox` (bool per audited example, CPU): correct under every white-box attack the
    evaluation ran; Square is then judged against all of them, not only the audit's own PGD.
    `square_done` (bool per audited example, CPU): correctness after a Square that already ran
    on every example the white-box attacks left (AutoAttack's, which runs last on what its
    gradient attacks left); then no second Square runs. Otherwise `square(only)` runs one on the
    examples `only` marks (-> a Run), or the check is left out when it is None.
    """
    clean, fgsm = runs["clean"]["correct"], runs["fgsm"]["correct"]
    n, k = len(clean), cfg.strong_steps
    sweep = {f: runs[f"eps/{f:g}"]["correct"] for f in EPS_FRACTIONS}
    by_iter = _by_iter(runs, cfg)
    large = runs["large_eps"]["correct"]
    best_white = torch.stack([fgsm, *by_iter.values()]).all(dim=0)  # every white-box attack at eps
    if whitebox is not None:
        best_white &= whitebox[:n]
    budgets = list(by_iter)
    base, doubled = by_iter[budgets[-2]], by_iter[budgets[-1]]
    excess = max(run["excess"] for run in runs.values())
    checks = {
        "eps0_equals_clean": _check(torch.equal(sweep[0.0], clean),
                                    {"clean": accuracy(clean), "eps0": accuracy(sweep[0.0]),
                                     "differing": int((sweep[0.0] != clean).sum())}),
        "iterative_beats_single_step": _check(
            100.0 * (~fgsm & sweep[1.0]).float().mean().item() <= _noise(n)
            and accuracy(sweep[1.0]) <= accuracy(fgsm),
            {"fgsm": accuracy(fgsm), f"pgd{k}": accuracy(sweep[1.0]),
             "fgsm_only_fooled_pct": accuracy(~fgsm & sweep[1.0])}),
        "monotone_eps": _check(_monotone([accuracy(f) for f in sweep.values()], n),
                               [[round(_eps(f, cfg), 6), accuracy(v)] for f, v in sweep.items()]),
        "monotone_iterations": _check(_monotone([accuracy(v) for v in by_iter.values()], n),
                                      [[s, r, accuracy(v)] for (s, r), v in by_iter.items()]),
        "large_eps_zero": _check(accuracy(large) <= NEAR_ZERO, {"eps": LARGE_EPS, "acc": accuracy(large)}),
        "converged": converged_check(base, doubled, budgets[-2:], whitebox),
    }
    if square_done is not None or square is not None:
        if square_done is not None:  # fooled by that Square where white-box attacks failed
            sq, source = square_done[:n] | ~best_white, "autoattack"
        else:
            run = square(best_white)
            sq, source, excess = run["correct"], "audit", max(excess, run["excess"])
        gain = accuracy(~sq)  # ran (or counts) only where white-box failed: what Square alone fools
        checks["square_vs_whitebox"] = _check(gain <= SQUARE_SLACK, {
            "whitebox_worst_case": accuracy(best_white), "then_square": accuracy(best_white & sq),
            "square_only_pct": gain, "square_run": source})
    checks["in_ball"] = _check(excess <= 1e-6, {"max_excess": excess})
    return checks


def converged_check(base: torch.Tensor, doubled: torch.Tensor, budgets: list[tuple[int, int]],
                    whitebox: torch.Tensor | None) -> Check:
    """Doubling the audited PGD's iterations and restarts moves the reported number by less
    than CONVERGED points.

    With the evaluation's white-box flags, the reported number is the worst case over every
    attack, so the question is what the doubled PGD fools that no attack of the evaluation did;
    PGD alone may still gain (a mixture's cross-entropy landscape often needs APGD's adaptive
    step, which AutoAttack brings). Without them, PGD at the two budgets is compared.
    """
    (k, r), (k2, r2) = budgets
    value = {f"pgd{k}x{r}": accuracy(base), f"pgd{k2}x{r2}": accuracy(doubled)}
    if whitebox is None:
        return _check(abs(accuracy(base) - accuracy(doubled)) < CONVERGED, value)
    suite = whitebox[:len(doubled)]
    gain = accuracy(suite & ~doubled)  # fooled by the doubled PGD alone
    value |= {"worst_case_all_attacks": accuracy(suite), "doubled_pgd_only_pct": gain}
    return _check(gain < CONVERGED, value)


# ---------------------------------------------------------------- checks of the model itself


def gradient_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Check:
    """Input gradients of the margin loss (it never saturates, unlike CE) are finite and non-zero."""
    _, grad_fraction = _grad_stats(model, x, y, "ce")
    finite, nonzero = _grad_stats(model, x, y, "margin")
    return _check(finite == 1.0 and nonzero >= NONZERO_GRADS,
                  {"finite": finite, "nonzero_margin": nonzero, "nonzero_ce": grad_fraction})


def _grad_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[float, float]:
    grad, _ = attacks._input_grad(model, x, y, attacks.LOSSES[loss])
    g = grad.flatten(1)
    finite = torch.isfinite(g).all(dim=1)
    nonzero = finite & (g.abs().amax(dim=1) > 0)
    return finite.float().mean().item(), nonzero.float().mean().item()


@torch.no_grad()
def determinism_check(model: nn.Module, x: torch.Tensor) -> Check:
    """Two forward passes on the same batch agree (so EoT is not needed)."""
    a, b = model(x), model(x)
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item() or 1.0
    same_pred = torch.equal(a.argmax(1), b.argmax(1))
    return _check(diff <= 1e-5 * scale and same_pred, {"max_abs_diff": diff, "same_predictions": same_pred})


@torch.no_grad()
def logits_check(model: nn.Module, x: torch.Tensor) -> Check:
    """Outputs are logits: not in [0, 1] with rows summing to one (AutoAttack's check_range_output)."""
    out = model(x)
    row_sum_dev = (out.sum(1) - 1).abs().max().item()
    probs = out.min().item() > -1e-5 and out.max().item() < 1 + 1e-5 and row_sum_dev < 1e-4
    return _check(not probs, {"min": round(out.min().item(), 6), "max": round(out.max().item(), 6),
                              "max_row_sum_minus_1": round(row_sum_dev, 6)})


# ---------------------------------------------------------------- attack unit test


class KnownAdversary(nn.Module):
    """Linear two-class model s(x) = v.x - t on given images, whose minimal L-inf adversarial
    perturbation (inside [0, 1]) is known exactly, so an attack's misses can be counted.

    Args:
        x: the images it is built for (N, C, H, W); seed: draws the sign pattern v.
    """

    def __init__(self, x: torch.Tensor, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        v = torch.randint(0, 2, x.shape[1:], generator=gen).float() * 2 - 1
        self.register_buffer("v", v.to(x.device))
        proj = (x * self.v).flatten(1).sum(1).sort().values
        mid = max(0, len(proj) // 2 - 1)  # threshold between two images: none lies on the boundary
        self.t = ((proj[mid] + proj[min(mid + 1, len(proj) - 1)]) / 2).item()
        self.scale = (proj - self.t).std().item() or 1.0  # logits of order one: CE does not saturate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = ((x * self.v).flatten(1).sum(1) - self.t) / self.scale
        return torch.stack([s, -s], dim=1)  # class 0 iff s > 0

    def needed_eps(self, x: torch.Tensor) -> torch.Tensor:
        """Smallest L-inf budget that crosses the boundary inside [0, 1] (inf if none), (N,)."""
        gap = (x * self.v).flatten(1).sum(1) - self.t
        toward = -torch.sign(gap).view(-1, *[1] * (x.dim() - 1)) * self.v  # direction of each pixel
        room = torch.where(toward > 0, 1 - x, x).flatten(1)  # how far each pixel can move
        lo, hi = torch.zeros_like(gap), torch.ones_like(gap)
        for _ in range(40):  # bisection on the monotone sum_j min(e, room_j)
            mid = (lo + hi) / 2
            ok = torch.minimum(room, mid[:, None]).sum(1) > gap.abs()
            hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        reachable = room.sum(1) > gap.abs()
        return torch.where(reachable, hi, torch.full_like(hi, float("inf")))


def known_adversary_check(attack: Callable, x: torch.Tensor, cfg: EvalConfig, seed: int,
                          batch_size: int) -> Check:
    """The attack finds every adversarial example that exists in the ball and none that cannot.

    The budget is the median needed eps, so about half the examples have an adversarial example;
    examples within 10% of their needed eps are left out (numerical ties).
    """
    probe = KnownAdversary(x, seed)
    need = probe.needed_eps(x)
    eps = need[torch.isfinite(need)].median().item()
    with torch.no_grad():
        y = probe(x).argmax(1)
    aud = Auditor(probe, x, y, attack=attack, batch_size=batch_size, seed=seed)
    ratio = cfg.pgd_alpha / cfg.pgd_eps if cfg.pgd_eps else 0.25
    correct = aud.pgd(eps, ratio * eps, cfg.strong_steps)["correct"].to(x.device)
    exists, impossible = need < 0.9 * eps, need > 1.1 * eps
    found = (~correct & exists).sum().item() / max(1, exists.sum().item())
    false = int((~correct & impossible).sum())
    return _check(found >= 0.99 and false == 0 and exists.any().item() and impossible.any().item(),
                  {"eps": round(eps, 6), "found": round(found, 4), "n_exists": int(exists.sum()),
                   "fooled_where_impossible": false})


class Binarized(nn.Module):
    """The audited model read out by one linear unit per example (Zimmermann et al. 2022,
    "Increasing confidence in adversarial robustness evaluations"): s(x) = w . model(x) + b,
    class 1 ("adversarial") iff s > 0. Built by `binarize` so that class 1 provably exists
    inside the eps-ball of each image while the image itself is class 0.

    The batch is aligned with the images it was built for: row i uses readout i.
    """

    def __init__(self, model: nn.Module, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("w", w)  # (N, classes)
        self.register_buffer("b", b)  # (N,)
        # no .eval() here: it would recurse into the audited model, whose mode is the caller's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (self.model(x) * self.w).sum(1) + self.b  # (N,)
        return torch.stack([-s, s], dim=1)

    def subset(self, rows: torch.Tensor) -> Binarized:
        """The binarized model of some of its images (attacks that drop fooled examples)."""
        return Binarized(self.model, self.w[rows], self.b[rows])


@torch.no_grad()
def binarize(model: nn.Module, x: torch.Tensor, eps: float, generator: torch.Generator
             ) -> tuple[Binarized, torch.Tensor, torch.Tensor]:
    """A Binarized copy of `model` for images x, with a known adversarial point per image.

    The target is a random vertex of the eps-ball (clamped into [0, 1]); the readout direction
    is the target's logits minus the mean logits of the image and INNER_SAMPLES points within
    eps/2 of it; the threshold sits halfway, scaled so that the target scores +1 and every inner
    point at most -1 (logits of order one: the attack's loss does not saturate).

    Returns:
        (binarized model, target images, valid): valid[i] says the readout separates target i
        from its inner points (else the test says nothing about image i).
    """
    signs = torch.randint(0, 2, x.shape, generator=generator).to(x.device, x.dtype) * 2 - 1
    target = attacks.project(x + eps * signs, x, eps)
    noise = torch.rand((INNER_SAMPLES, *x.shape), generator=generator).to(x.device, x.dtype)
    inner = [x] + [attacks.project(x + 0.5 * eps * (2 * u - 1), x, eps) for u in noise]
    f_inner = torch.stack([model(v) for v in inner])  # (K + 1, N, classes)
    f_target = model(target)                          # (N, classes)
    w = f_target - f_inner.mean(0)
    s_inner, s_target = (f_inner * w).sum(-1).amax(0), (f_target * w).sum(-1)
    valid = s_target > s_inner
    half_gap = torch.where(valid, (s_target - s_inner) / 2, torch.ones_like(s_target))
    w, b = w / half_gap[:, None], -(s_target + s_inner) / 2 / half_gap
    return Binarized(model, w, b), target, valid


def binarization_check(model: nn.Module, attack: Callable, x: torch.Tensor, cfg: EvalConfig,
                       seed: int) -> Check:
    """The attack must find the adversarial example that provably exists for (nearly) every
    binarized copy of the model: a must-succeed test at the audited budget (strong_steps x
    strong_restarts at pgd_eps), on the model's own loss landscape."""
    gen = torch.Generator().manual_seed(seed)
    eps = cfg.pgd_eps
    found, valid_all = [], []
    for i in range(0, len(x), cfg.batch_size):
        xb = x[i:i + cfg.batch_size]
        probe, target, valid = binarize(model, xb, eps, gen)
        with torch.no_grad():
            sane = (probe(target).argmax(1) == 1) & (probe(xb).argmax(1) == 0)
        zeros = torch.zeros(len(xb), dtype=torch.long, device=xb.device)
        x_adv = attack(probe, xb, zeros, eps=eps, alpha=cfg.pgd_alpha, steps=cfg.strong_steps,
                       restarts=cfg.strong_restarts, seed=derive_seed(seed, "binarized", i))
        with torch.no_grad():
            in_ball = (x_adv - xb).abs().flatten(1).amax(1) <= eps + 1e-6
            found.append(((probe(x_adv).argmax(1) == 1) & in_ball)[valid & sane].cpu())
        valid_all.append((valid & sane).cpu())
    found, valid = torch.cat(found), torch.cat(valid_all)
    share = found.float().mean().item() if len(found) else 0.0
    return _check(len(found) > 0 and share >= BINARIZED_FOUND,
                  {"eps": eps, "n_tests": int(valid.sum()), "n_images": len(valid),
                   "found": round(share, 4)})


# ---------------------------------------------------------------- the audit


def worst_case_check(metrics: dict[str, Any], flags: dict[str, torch.Tensor]) -> Check:
    """The reported worst case is the per-example AND over every attack (one run on a first-N
    subset counts there only), and at most the lowest accuracy of any full-set attack."""
    n = max(len(f) for f in flags.values())
    worst = torch.ones(n, dtype=torch.bool)
    for f in flags.values():
        worst[:len(f)] &= f
    lowest = min(accuracy(f) for f in flags.values() if len(f) == n)
    reported = metrics.get("worst_case")
    return _check(reported is not None and abs(reported - accuracy(worst)) < 1e-3 and reported <= lowest,
                  {"reported": reported, "recomputed": accuracy(worst), "lowest_single_attack": lowest,
                   "n_attacks": len(flags)})


def relaxation_check(plain: torch.Tensor, relaxed: torch.Tensor) -> Check:
    """A hard-routed mixture's plain white-box attacks (through the deployed model) against the
    attacks through its relaxed router: if the relaxation fools more than the noise beyond them,
    the plain gradients were blind at the router (obfuscated routing), and a robust accuracy that
    gradient attacks alone measured on this model is not to be trusted.

    Args:
        plain, relaxed: per-example correctness (bool, same examples) after each set of attacks.
    """
    base, both = accuracy(plain), accuracy(plain & relaxed)
    gap = round(base - both, 4)
    return _check(gap <= _noise(len(plain)), {"plain_whitebox": base, "with_relaxed": both, "gap": gap})


MODEL_CHECKS = ("gradients_nonzero", "deterministic", "outputs_are_logits",
                "attack_finds_known_adversarial", "attack_finds_binarized_adversarial")


def parts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, cfg: EvalConfig, seed: int,
          attack: Callable = attacks.pgd, single_step: Callable = attacks.fgsm) -> dict[str, Part]:
    """The audit's independent pieces of work on audited examples x, y (model's device, model in
    eval mode): the attack runs of `attack_parts` (-> Run) and the checks of MODEL_CHECKS
    (-> Check). `checks` turns their results into the audit.

    Args:
        attack, single_step: the iterative and one-step attacks under audit.
    """
    aud = Auditor(model, x, y, attack=attack, batch_size=cfg.batch_size, seed=seed)
    xb, yb = x[:cfg.batch_size], y[:cfg.batch_size]
    k = cfg.strong_steps * cfg.strong_restarts
    model_checks = {
        "gradients_nonzero": Part(2, lambda: gradient_check(model, xb, yb)),
        "deterministic": Part(1, lambda: determinism_check(model, xb)),
        "outputs_are_logits": Part(1, lambda: logits_check(model, xb)),
        "attack_finds_known_adversarial": Part(1, lambda: known_adversary_check(
            attack, xb, cfg, derive_seed(seed, "audit", "known"), cfg.batch_size)),
        "attack_finds_binarized_adversarial": Part(k, lambda: binarization_check(
            model, attack, x, cfg, derive_seed(seed, "audit", "binarized"))),
    }
    return attack_parts(aud, cfg, single_step) | model_checks


def checks(results: dict[str, Any], cfg: EvalConfig, *, square: Callable | None = None,
           whitebox: torch.Tensor | None = None, square_done: torch.Tensor | None = None
           ) -> dict[str, Check]:
    """The audit from the results of `parts`; `square`, `whitebox`, `square_done` as in
    attack_checks."""
    runs = {name: r for name, r in results.items() if name not in MODEL_CHECKS}
    return attack_checks(runs, cfg, square, whitebox, square_done) | {
        name: results[name] for name in MODEL_CHECKS}


def audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, cfg: EvalConfig, seed: int,
          attack: Callable = attacks.pgd, single_step: Callable = attacks.fgsm,
          square: Callable | None = None, whitebox: torch.Tensor | None = None,
          square_done: torch.Tensor | None = None) -> dict[str, Check]:
    """Every check on audited examples x, y, its parts run here one after another.

    Args:
        attack, single_step: the iterative and one-step attacks under audit.
        square: gradient-free attack (model, x, y, *, eps) -> x_adv, or None to skip that check.
        whitebox: per-example correctness under the evaluation's white-box attacks (None: the
            audit's own PGD and FGSM alone stand for them in the Square check).
        square_done: per-example correctness after a Square the evaluation already ran on every
            example its white-box attacks left (see attack_checks), or None.
    Returns:
        {check name: {"pass": bool, "value": figure}}.
    """
    results = {name: part.run() for name, part in parts(
        model, x, y, cfg=cfg, seed=seed, attack=attack, single_step=single_step).items()}
    return checks(results, cfg, square=square_run(model, x, y, cfg, square),
                  whitebox=whitebox, square_done=square_done)


def square_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig,
               square: Callable | None) -> Callable[[torch.Tensor], Run] | None:
    """`square` (model, x, y, *, eps) -> x_adv as attack_checks runs it: on the examples a mask
    marks, at pgd_eps."""
    if square is None:
        return None
    return lambda only: correct(model, x, y, lambda m, xb, yb: square(m, xb, yb, eps=cfg.pgd_eps),
                                cfg.pgd_eps, batch_size=cfg.batch_size, only=only)
