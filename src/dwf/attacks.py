"""White-box L-inf attacks as pure functions (DESIGN.md, contracts).

Every attack takes images in [0, 1] and epsilons/step sizes in [0, 1] pixel units, projects onto
the eps-ball around the clean image and clamps to [0, 1] after every step, takes input gradients
with `torch.autograd.grad` (no parameter `.grad` is written), never changes `model.training`
(the caller owns the mode), and is seeded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dwf import cudagraphs

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-example loss (N,)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: best wrong logit minus true logit (> 0 means misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return wrong - true


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein 2020), scale invariant; larger is stronger."""
    top = logits.sort(dim=1, descending=True).values
    denom = top[:, 0] - top[:, 2] + 1e-12
    return margin(logits, y) / denom


LOSSES: dict[str, Loss] = {"ce": cross_entropy, "margin": margin, "dlr": dlr}


def _check_budget(eps: float, alpha: float | None = None) -> None:
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1] (pixel units), got {eps}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (pixel units), got {alpha}")


def _grad_and_output(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Loss
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-example loss w.r.t. x, the per-example loss (N,) and the
    model's output at x, all from one forward pass."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = model(x)
        loss = loss_fn(out, y)  # (N,)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad, loss.detach(), out.detach()


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Loss
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-example loss w.r.t. x, and the per-example loss itself."""
    grad, loss, _ = _grad_and_output(model, x, y, loss_fn)
    return grad, loss


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the L-inf eps-ball around x, then into [0, 1] (the threat model, every step)."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
         loss: str = "ce") -> torch.Tensor:
    """Fast gradient sign method (paper eq. 3): x + eps * sign(grad), clamped to [0, 1].

    Args:
        model: classifier on [0, 1] images returning logits.
        x: clean images (N, C, H, W) in [0, 1]; y: labels (N,).
        eps: L-inf budget in pixel units.
        loss: name in LOSSES.
    Returns:
        adversarial images, detached.
    """
    _check_budget(eps)
    grad, _ = _input_grad(model, x, y, LOSSES[loss])
    return project(x + eps * grad.sign(), x, eps).detach()


def _pgd_start(x: torch.Tensor, eps: float, random_start: bool, generator: torch.Generator | None
               ) -> torch.Tensor:
    """Uniform in the eps-ball (drawn on the CPU, so seeds agree across devices), or x."""
    if not (random_start and eps > 0):
        return x.detach().clone()
    noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
    return project(x + (2 * noise - 1) * eps, x, eps)


def _pgd_step(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float,
              alpha: float, loss_fn: Loss) -> torch.Tensor:
    """One PGD iteration (paper eqs. 4-5): signed gradient step, projection, [0, 1] clamp."""
    grad, _ = _input_grad(model, x_adv, y, loss_fn)
    return project(x_adv + alpha * grad.sign(), x, eps)


def _pgd_iterates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                  steps: int, random_start: bool, generator: torch.Generator | None, loss_fn: Loss):
    """Yield the iterate after every PGD step, from a uniform random start in the ball or x."""
    x_adv = _pgd_start(x, eps, random_start, generator)
    if steps == 0:
        yield x_adv
    for _ in range(steps):
        x_adv = _pgd_step(model, x_adv, x, y, eps, alpha, loss_fn)
        yield x_adv


class _Best:
    """Per example, the most adversarial point seen so far: one that misclassifies, else the one
    with the highest loss (the order `worst_of` ranks restarts in)."""

    def __init__(self):
        self.x = self.wrong = self.loss = None

    def update(self, x_adv: torch.Tensor, wrong: torch.Tensor, loss: torch.Tensor,
               rows: torch.Tensor | None = None) -> None:
        """Score candidates x_adv for every example, or (rows) for those rows of the batch."""
        if self.x is None:
            self.x, self.wrong, self.loss = x_adv.clone(), wrong.clone(), loss.clone()
            return
        if rows is None:
            rows = torch.arange(len(self.x), device=self.x.device)
        was_wrong, was_loss = self.wrong[rows], self.loss[rows]
        better = (wrong & ~was_wrong) | ((wrong == was_wrong) & (loss > was_loss))
        self.x[rows] = torch.where(better.view(-1, *([1] * (x_adv.dim() - 1))), x_adv, self.x[rows])
        self.wrong[rows], self.loss[rows] = was_wrong | wrong, torch.where(better, loss, was_loss)


def _rows(model: nn.Module, rows: torch.Tensor, n: int) -> nn.Module:
    """The model for some rows of an n-example batch: itself, unless its row i belongs to
    example i (audit.Binarized), which then gives `subset(rows)`."""
    subset = getattr(model, "subset", None)
    return subset(rows) if subset is not None and len(rows) < n else model


def _pgd_best(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
              steps: int, random_start: bool, generator: torch.Generator | None, loss_fn: Loss):
    """Yield, after every PGD step k, the best of iterates 0..k per example (evaluation).

    PGD ascends a surrogate loss, so an iterate can cross the decision boundary and leave it
    again; the last iterate alone then misses a near-tie example that the attack did find.
    Iterate k is scored from the forward pass that takes its gradient for step k + 1, so the
    whole run costs one extra forward pass (the score of the last iterate).

    Once an iterate misclassifies an example, that example is done: it keeps that iterate and
    leaves the batch, so later steps cost only what is still robust. Every other example's
    trajectory is what it would be in the full batch (eval mode: an example's gradient is its
    own; the step takes its sign), so the examples fooled are the same. A model whose rows are
    tied to examples attacks the remaining ones through `subset(rows)` (`_rows`).

    Every yield is the same tensor, updated in place by later steps: a caller that keeps an
    iterate copies it (pgd_iterates does, at the counts it was asked for).
    """
    x_adv, best = _pgd_start(x, eps, random_start, generator), _Best()
    active = torch.arange(len(x), device=x.device)  # examples no iterate has fooled yet
    for k in range(steps + 1):
        xa, ya, m = x_adv[active], y[active], _rows(model, active, len(x))
        if k == steps:
            with torch.no_grad():
                logits = m(xa)
            loss = loss_fn(logits, ya)
        else:
            grad, loss, logits = _grad_and_output(m, xa, ya, loss_fn)
        best.update(xa, logits.argmax(1) != ya, loss, None if k == 0 else active)
        if k > 0:
            yield best.x
        if k < steps:
            x_adv[active] = project(xa + alpha * grad.sign(), x[active], eps)
            still = ~best.wrong[active]
            active = active[still]
            if len(active) == 0:  # every example fooled: iterates k + 1..steps are the best ones
                for _ in range(steps - k):
                    yield best.x
                return
    if steps == 0:
        yield best.x


def _pgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
             steps: int, random_start: bool, generator: torch.Generator | None, loss_fn: Loss,
             graph: bool = False, keep_best: bool = False) -> torch.Tensor:
    """One PGD run: its last iterate (replayed from a CUDA graph if asked, on CUDA, in eval
    mode), or with keep_best the best iterate per example."""
    if keep_best:
        *_, best = _pgd_best(model, x, y, eps, alpha, steps, random_start, generator, loss_fn)
        return best
    if graph and x.is_cuda and steps > 0 and not model.training:
        start = _pgd_start(x, eps, random_start, generator)
        return cudagraphs.replay(
            model, lambda xa, x0, y0: _pgd_step(model, xa, x0, y0, eps, alpha, loss_fn),
            ("pgd", eps, alpha, loss_fn), start, x, y, steps)
    *_, last = _pgd_iterates(model, x, y, eps, alpha, steps, random_start, generator, loss_fn)
    return last


def pgd_iterates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
                 steps: Sequence[int], seed: int | None = None, random_start: bool = True,
                 loss: str = "ce", keep_best: bool = False) -> dict[int, torch.Tensor]:
    """PGD-k for several k from one trajectory: {k: the iterate after k steps}.

    Identical to `pgd(..., steps=k, seed=seed, keep_best=keep_best)` for every k (same start,
    same steps), at the cost of the longest run alone; the evaluation's PGD-10..50 use it.
    """
    _check_budget(eps, alpha)
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be a non-empty list of counts >= 1, got {list(steps)}")
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    wanted, out = set(steps), {}
    trajectory = _pgd_best if keep_best else _pgd_iterates
    it = trajectory(model, x, y, eps, alpha, max(steps), random_start, gen, LOSSES[loss])
    for k, x_adv in enumerate(it, start=1):
        if k in wanted:  # a copy: keep_best's trajectory updates one tensor in place
            out[k] = x_adv.detach().clone()
    return {k: out[k] for k in steps}


@torch.no_grad()
def attack_score(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: str = "ce"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (misclassified, loss): the order in which adversarial examples are ranked."""
    logits = model(x_adv)
    return logits.argmax(1) != y, LOSSES[loss](logits, y)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
        steps: int, restarts: int = 1, random_start: bool = True, seed: int | None = None,
        loss: str = "ce", graph: bool = False, keep_best: bool = False) -> torch.Tensor:
    """Projected gradient descent with restarts, keeping the worst case per example.

    Restart r draws its random start from seed + r, so `pgd(..., restarts=1, seed=s + r)`
    reproduces restart r alone. Across restarts, an example keeps the restart that misclassifies
    it, and among equals the one with the highest loss. With one restart the last iterate is
    returned without the extra ranking forward pass (the training hot path).

    Args:
        model: classifier on [0, 1] images returning logits.
        x: clean images in [0, 1]; y: labels.
        eps, alpha: L-inf budget and step size in pixel units.
        steps: iterations per restart.
        restarts: number of runs; random_start: start uniformly in the ball (else at x).
        seed: seed of the random starts (None: torch's global generator).
        loss: name in LOSSES.
        graph: on CUDA with the model in eval mode, replay each iteration from a captured
            CUDA graph (dwf.cudagraphs): the same computation without per-kernel launches; for
            repeated calls on one batch shape (training). Ignored otherwise.
        keep_best: return, per example, the best iterate of each run (one that misclassifies,
            else the highest loss) instead of the last one: what evaluation reports. Training
            keeps the paper's last iterate (and may replay graphs); the two do not combine.
    Returns:
        adversarial images, detached.
    """
    _check_budget(eps, alpha)
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps must be >= 0 and restarts >= 1, got {steps}, {restarts}")
    if graph and keep_best:
        raise ValueError("keep_best (evaluation) and graph (training replay) do not combine")
    loss_fn = LOSSES[loss]

    def run(r: int) -> torch.Tensor:
        gen = None if seed is None else torch.Generator().manual_seed(seed + r)
        return _pgd_run(model, x, y, eps, alpha, steps, random_start, gen, loss_fn, graph, keep_best)

    if restarts == 1:
        return run(0).detach()
    return worst_of(model, (run(r) for r in range(restarts)), y, loss)


def worst_of(model: nn.Module, candidates: Iterable[torch.Tensor], y: torch.Tensor,
             loss: str = "ce") -> torch.Tensor:
    """Per example, the candidate that misclassifies, else the one with the highest loss.

    Candidates are consumed one at a time, so restarts never hold more than two batches.
    """
    best = _Best()
    for x_adv in candidates:
        best.update(x_adv, *attack_score(model, x_adv, y, loss))
    return best.x.detach()
