"""Protocol forensics (issue 13): which evaluation mistake reproduces the paper's Table 3 pattern.

The paper's undefended public networks keep 38-47% robust accuracy at 8/255 from PGD-10 to
PGD-100 x 3, nearly flat across iterations, where a correct pixel-space PGD takes such networks
to ~0%. Each variant below reproduces one plausible evaluation mistake; NONE of them is a valid
evaluation (every printed label says so). They exist to explain the paper's numbers, never to
report a model's robustness: `dwf evaluate` runs only the correct protocol.

Every variant is `(model, x, y, *, eps, alpha, steps, seed) -> {k: x_adv after k steps}` in
pixel units: one trajectory, snapshots at each k, the last iterate (attacks.pgd's default; the
evaluation's best-iterate PGD can only be lower), so each differs from `correct` in its one
mistake. Whatever the variant did, accuracy is judged by the caller's model in eval mode on the
returned images clamped to [0, 1], and how far they left the pixel eps-ball is reported: a
variant whose images leave the ball is measuring another threat model, which is part of the
finding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dwf import attacks
from dwf.models import is_mixture
from dwf.models.resnet import Normalize
from dwf.runtime import derive_seed

NOT_VALID = "not a valid evaluation"
STEPS = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
# The paper's pattern (Table 3, undefended networks, public and ours): PGD-10 37.7-49.6%,
# PGD-100 x 3 37.1-48.3%, drops of 0.7-3.6 points between them. A sweep "matches" when it
# keeps at least FLOOR percent at its largest step count and loses at most FLATNESS points
# from its smallest: loose enough for the whole printed range, far from a correct attack's ~0%.
FLOOR = 20.0
FLATNESS = 5.0
IN_BALL_SLACK = 1e-6  # float rounding of x + delta - x, in pixel units

Iterates = dict[int, torch.Tensor]


def normalization(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, std) of the model's Normalize layers, each (1, C, 1, 1).

    A mixture holds one per expert and one for its router; they must agree, since a buggy
    pipeline normalizes once, in the data loader.
    """
    layers = [m for m in model.modules() if isinstance(m, Normalize)]
    stats = {(tuple(m.mean.flatten().tolist()), tuple(m.std.flatten().tolist())) for m in layers}
    if len(stats) != 1:
        raise ValueError(f"{type(model).__name__}: needs Normalize layers with one mean/std, "
                         f"found {len(stats)} distinct")
    return layers[0].mean, layers[0].std


def _pgd_in_box(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps, alpha, lo, hi,
                steps: Sequence[int], seed: int | None) -> Iterates:
    """Sign-gradient PGD with budget eps and step alpha (floats or per-channel (1, C, 1, 1)
    tensors, pixel units) projected onto the ball and the box [lo, hi] every step; a uniform
    start in the ball drawn as attacks.pgd draws it. With a scalar eps and the box [0, 1] this is
    attacks.pgd_iterates."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    lo, hi = torch.as_tensor(lo).to(x), torch.as_tensor(hi).to(x)

    def project(x_adv: torch.Tensor) -> torch.Tensor:
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(lo, hi)

    noise = torch.rand(x.shape, generator=gen, device="cpu").to(x.device, x.dtype)
    x_adv, out = project(x + (2 * noise - 1) * eps), {}
    for k in range(1, max(steps) + 1):
        with torch.enable_grad():
            x_req = x_adv.detach().requires_grad_(True)
            loss = attacks.cross_entropy(model(x_req), y).sum()
            (grad,) = torch.autograd.grad(loss, x_req)  # no parameter .grad written
        x_adv = project(x_adv + alpha * grad.sign()).detach()
        if k in steps:
            out[k] = x_adv
    return {k: out[k] for k in steps}


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
            steps: Sequence[int] = STEPS, seed: int | None = None) -> Iterates:
    """The valid protocol: attacks.pgd in [0, 1] pixel space (= attacks.pgd(steps=k, seed))."""
    return attacks.pgd_iterates(model, x, y, eps=eps, alpha=alpha, steps=steps, seed=seed)


def clamp_normalized(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                     alpha: float, steps: Sequence[int] = STEPS, seed: int | None = None) -> Iterates:
    """NOT A VALID EVALUATION. The [0, 1] clamp applied to the normalized tensor
    z = (x - mean) / std after every step (budget and step still in pixel units, eps / std in
    z): in pixels the box is [mean, mean + std], so pixels outside it are moved there, out of
    the eps-ball, and cannot move further in that direction.
    """
    mean, std = normalization(model)
    return _pgd_in_box(model, x, y, eps=eps, alpha=alpha, lo=mean, hi=mean + std,
                       steps=steps, seed=seed)


def normalized_units(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                     alpha: float, steps: Sequence[int] = STEPS, seed: int | None = None) -> Iterates:
    """NOT A VALID EVALUATION. eps, step and projection in normalized units: the pixel budget is
    eps * std per channel (smaller wherever std < 1; CIFAR-10's ~0.25 makes 8/255 about 2/255).
    Images stay in the valid [0, 1] range: the units alone (normalized_input adds the clamp).
    """
    _, std = normalization(model)
    return _pgd_in_box(model, x, y, eps=eps * std, alpha=alpha * std, lo=0.0, hi=1.0,
                       steps=steps, seed=seed)


def normalized_input(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                     alpha: float, steps: Sequence[int] = STEPS, seed: int | None = None) -> Iterates:
    """NOT A VALID EVALUATION. Attack code written for [0, 1] images fed the normalized tensor:
    clamp_normalized and normalized_units at once (eps, step and projection in normalized
    units, z clamped to [0, 1]), the single bug a loader that normalizes produces.
    """
    mean, std = normalization(model)
    return _pgd_in_box(model, x, y, eps=eps * std, alpha=alpha * std, lo=mean, hi=mean + std,
                       steps=steps, seed=seed)


def bn_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
             steps: Sequence[int] = STEPS, seed: int | None = None) -> Iterates:
    """NOT A VALID EVALUATION. The correct PGD with BatchNorm in train mode while attacking: the
    gradients come from batch statistics of the adversarial batch. Runs on a deep copy, so the
    caller's mode and BatchNorm running statistics (which train mode updates) are untouched.
    """
    attacker = copy.deepcopy(model).train()
    return attacks.pgd_iterates(attacker, x, y, eps=eps, alpha=alpha, steps=steps, seed=seed)


def no_random_start(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                    alpha: float, steps: Sequence[int] = STEPS, seed: int | None = None) -> Iterates:
    """NOT A VALID EVALUATION. PGD from the clean image with one fixed step size: deterministic,
    so restarts (the paper's PGD-100 x 3) repeat one run. `seed` is ignored."""
    return attacks.pgd_iterates(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=False)


class ProbabilityMixture(nn.Module):
    """log sum_i w_i(x) softmax(f_i(x)): a mixture's log-probabilities mixed after the softmax.

    Cross-entropy on it is -log sum_i w_i softmax(f_i)_y (its rows' logsumexp is 0). Computed as
    a logsumexp, so a saturated expert gives a finite loss; a weight of 0 gives no gradient.
    """

    def __init__(self, mixture: nn.Module):
        super().__init__()
        self.mixture = mixture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, f = self.mixture.gate_weights(x), self.mixture.expert_logits(x)  # (N, E), (N, E, C)
        log_w = torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))
        return torch.logsumexp(log_w[:, :, None] + f.log_softmax(-1), dim=1)  # (N, C)


def softmax_mixture(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                    alpha: float, steps: Sequence[int] = STEPS, seed: int | None = None) -> Iterates:
    """NOT A VALID EVALUATION (mixtures only). The correct PGD on the mixture of the experts'
    softmax probabilities instead of the model's logits sum_i w_i f_i: a confident expert's
    softmax saturates and hides its gradient."""
    if not is_mixture(model):
        raise ValueError(f"softmax_mixture needs a mixture (expert_logits, gate_weights), "
                         f"got {type(model).__name__}")
    return attacks.pgd_iterates(ProbabilityMixture(model), x, y, eps=eps, alpha=alpha,
                                steps=steps, seed=seed)


VARIANTS: dict[str, Callable[..., Iterates]] = {
    "correct": correct, "clamp_normalized": clamp_normalized, "normalized_units": normalized_units,
    "normalized_input": normalized_input, "bn_train": bn_train, "no_random_start": no_random_start,
    "softmax_mixture": softmax_mixture,
}


def label(variant: str) -> str:
    """How a variant is printed: every one but `correct` says it is not a valid evaluation."""
    return variant if variant == "correct" else f"{variant} ({NOT_VALID})"


def applies(variant: str, model: nn.Module) -> bool:
    return variant != "softmax_mixture" or is_mixture(model)


def _flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, variant: str, *, eps: float,
           alpha: float, steps: Sequence[int], seed: int | None) -> dict[int, tuple[torch.Tensor, ...]]:
    """Per k: (correct under the pixel-clamped images, L-inf distance to x, left [0, 1]), (N,)."""
    out = {}
    for k, x_adv in VARIANTS[variant](model, x, y, eps=eps, alpha=alpha, steps=steps, seed=seed).items():
        with torch.no_grad():
            right = model(x_adv.clamp(0.0, 1.0)).argmax(1) == y
        linf = (x_adv - x).abs().flatten(1).amax(1)
        off_unit = (x_adv < 0).flatten(1).any(1) | (x_adv > 1).flatten(1).any(1)
        out[k] = (right.cpu(), linf.cpu(), off_unit.cpu())
    return out


def _percent(flags: torch.Tensor) -> float:
    return round(100.0 * flags.float().mean().item(), 4)


def sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, variant: str, *, eps: float,
          alpha: float, steps: Sequence[int] = STEPS, seed: int = 0,
          batch_size: int | None = None) -> dict[str, Any]:
    """Robust accuracy of `model` under one variant's PGD-k for every k, judged correctly.

    Args:
        model: classifier in eval mode taking [0, 1] images (judges every variant's images).
        x, y: images in [0, 1] and labels, on the model's device.
        variant: name in VARIANTS. eps, alpha: budget and step in pixel units.
        steps: the PGD-k to report (snapshots of one trajectory). seed: per batch, derived.
        batch_size: images per attack batch (None: all at once); bn_train depends on it.
    Returns:
        {"accuracy", "outside_ball", "outside_unit": {k: percent}, "max_linf": {k: pixels},
         "matches_paper": bool, "label"}: outside_ball counts images farther than eps from x,
        outside_unit those with a pixel outside [0, 1] before the judging clamp.
    """
    if model.training:
        raise ValueError("sweep judges with the model in eval mode; call model.eval() first")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be a non-empty list of counts >= 1, got {list(steps)}")
    size = batch_size or len(x)
    chunks = [_flags(model, x[i:i + size], y[i:i + size], variant, eps=eps, alpha=alpha,
                     steps=steps, seed=derive_seed(seed, variant, i // size))
              for i in range(0, len(x), size)]
    right, linf, off = ({k: torch.cat([c[k][j] for c in chunks]) for k in steps} for j in range(3))
    acc = {k: _percent(right[k]) for k in steps}
    return {"label": label(variant), "accuracy": acc,
            "max_linf": {k: round(linf[k].max().item(), 6) for k in steps},
            "outside_ball": {k: _percent(linf[k] > eps + IN_BALL_SLACK) for k in steps},
            "outside_unit": {k: _percent(off[k]) for k in steps},
            "matches_paper": matches_paper(acc)}


def matches_paper(levels: Mapping[int | str, float]) -> bool:
    """The paper's pattern: a high floor flat across iterations.

    Args:
        levels: robust accuracy (%) per step count (int or JSON string keys).
    Returns:
        accuracy at the largest count >= FLOOR and at most FLATNESS points below the smallest's.
    """
    by_k = {int(k): v for k, v in levels.items()}
    first, last = by_k[min(by_k)], by_k[max(by_k)]
    return last >= FLOOR and first - last <= FLATNESS


def compare(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *, undefended: str,
            eps: float, alpha: float, steps: Sequence[int] = STEPS, seed: int = 0,
            batch_size: int | None = None, progress: Callable[[str], None] | None = None
            ) -> dict[str, Any]:
    """Every variant that applies, on every model: what `section` renders and the CLI writes.

    Args:
        models: name -> classifier in eval mode; `undefended` names the one the paper's pattern
            (undefended networks) is judged on.
        x, y, eps, alpha, steps, seed, batch_size: as `sweep`. progress: told each (model, variant).
    Returns:
        settings, and per model its clean accuracy, whether it is a mixture, and per variant the
        sweep (None where the variant does not apply).
    """
    if undefended not in models:
        raise ValueError(f"undefended model {undefended!r} is not among {', '.join(models)}")
    out: dict[str, Any] = {"eps": eps, "alpha": alpha, "steps": list(steps), "seed": seed,
                           "n_examples": len(x), "floor": FLOOR, "flatness": FLATNESS,
                           "undefended": undefended, "models": {}}
    for name, model in models.items():
        with torch.no_grad():
            clean = torch.cat([model(x[i:i + (batch_size or len(x))]).argmax(1)
                               for i in range(0, len(x), batch_size or len(x))]) == y
        runs: dict[str, Any] = {v: None for v in VARIANTS}  # None: does not apply to this model
        for variant in filter(lambda v: applies(v, model), VARIANTS):
            if progress is not None:
                progress(f"{name}: {label(variant)}")
            runs[variant] = sweep(model, x, y, variant, eps=eps, alpha=alpha, steps=steps,
                                  seed=seed, batch_size=batch_size)
        out["models"][name] = {"clean": _percent(clean),
                               "mixture": is_mixture(model), "variants": runs}
    return out


def _at(levels: Mapping, k: int) -> float:
    """levels[k] whether the keys are ints (in memory) or strings (read back from JSON)."""
    return levels[k] if k in levels else levels[str(k)]


def _row(variant: str, name: str, run: dict | None, steps: Sequence[int]) -> str:
    """One variant's row for one model (`name`: as the table prints it)."""
    if run is None:
        return (f"| {label(variant)} | {name} | " + " | ".join(["n/a"] * len(steps))
                + " | not a mixture | n/a |")
    ball = max(run["outside_ball"].values())
    left = f"{ball:g}% (max {max(run['max_linf'].values()):.3g})" if ball else "no"
    accs = " | ".join(f"{_at(run['accuracy'], k):.1f}" for k in steps)
    return f"| {label(variant)} | {name} | {accs} | {left} | {'yes' if run['matches_paper'] else 'no'} |"


def verdict(results: Mapping[str, Any], model_label: Callable[[str], str] = str) -> str:
    """Which variant reproduces the paper's pattern on the undefended model, computed."""
    steps = results["steps"]
    runs = results["models"][results["undefended"]]["variants"]
    name = model_label(results["undefended"])
    hits = [v for v, r in runs.items() if v != "correct" and r is not None and r["matches_paper"]]
    first, last = min(steps), max(steps)
    ok = runs["correct"]
    said = (f"The correct protocol takes {name} from {_at(ok['accuracy'], first):.1f}% (PGD-{first}) "
            f"to {_at(ok['accuracy'], last):.1f}% (PGD-{last})"
            + ("; it shows the pattern itself, so these data cannot tell the mistakes apart."
               if ok["matches_paper"] else "."))
    if not hits:
        return (f"No variant reproduces the paper's pattern on the undefended model ({name}): a "
                f"negative result. {said}")
    which = "; ".join(f"`{label(v)}` ({_at(runs[v]['accuracy'], first):.1f}% -> "
                      f"{_at(runs[v]['accuracy'], last):.1f}%)" for v in hits)
    return f"On the undefended model ({name}) the paper's pattern is reproduced by: {which}. {said}"


def section(results: Mapping[str, Any], model_label: Callable[[str], str] = str) -> str:
    """The comparison page's forensics section (Markdown): per variant, every model's PGD-k
    row; `model_label` names the models as the report's tables do (config.defenses.label)."""
    steps = results["steps"]
    models = results["models"]
    clean = ", ".join(f"{model_label(n)} {m['clean']:.1f}%" for n, m in models.items())
    lines = [
        "## Protocol forensics: which evaluation mistake reproduces the paper's pattern", "",
        (f"Robust accuracy (%) on {results['n_examples']} test images at eps {results['eps']:g}, "
        f"step {results['alpha']:g} (pixel units); PGD-k are snapshots of one run (last iterate), "
        f"judged by the model in eval mode on the attack's images clamped to [0, 1]. Clean: "
        f"{clean}. Every row except `correct` is **{NOT_VALID}**: it reproduces a plausible "
        "evaluation mistake, to explain the paper's numbers. \"Left the ball\": images farther "
        "than eps from the clean one (max L-inf distance). \"Pattern\": the paper's Table 3 shape "
        f"for undefended networks, >= {results['floor']:g}% at PGD-{max(steps)} and at most "
        f"{results['flatness']:g} points below PGD-{min(steps)}."), "",
        "| protocol | model | " + " | ".join(f"PGD-{k}" for k in steps) + " | left the ball | pattern |",
        "|---|---|" + "---:|" * len(steps) + "---|---|",
    ]
    for variant in VARIANTS:
        lines += [_row(variant, model_label(n), m["variants"].get(variant), steps) for n, m in models.items()]
    return "\n".join(lines + ["", verdict(results, model_label), ""])
