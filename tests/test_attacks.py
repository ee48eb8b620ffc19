"""Attacks: the threat model's constraints, purity (mode and .grad untouched), seeding, strength."""

from __future__ import annotations

import pytest
import torch

from dwf import attacks
from dwf.models import ResNet18

EPS, ALPHA = 0.1, 0.025  # pixel units; eps 0.1 separates models on digits (DESIGN.md)
TOL = 1e-6               # float32 rounding of x +- eps


@pytest.fixture
def small():
    """An untrained width-4 ResNet-18 and a random batch that touches 0 and 1."""
    torch.manual_seed(0)
    model = ResNet18(width=4).eval()
    x = torch.rand(6, 3, 32, 32)
    x[0], x[1] = 0.0, 1.0  # clamping must bite at both ends
    return model, x, torch.randint(0, 10, (6,))


ATTACKS = {
    "fgsm": lambda m, x, y, eps: attacks.fgsm(m, x, y, eps=eps),
    "pgd": lambda m, x, y, eps: attacks.pgd(m, x, y, eps=eps, alpha=eps / 2, steps=3, seed=0),
    "pgd_restarts": lambda m, x, y, eps: attacks.pgd(m, x, y, eps=eps, alpha=eps / 2, steps=2,
                                                     restarts=2, seed=0),
    "pgd_margin": lambda m, x, y, eps: attacks.pgd(m, x, y, eps=eps, alpha=eps / 2, steps=2,
                                                   seed=0, loss="margin"),
    "pgd_best": lambda m, x, y, eps: attacks.pgd(m, x, y, eps=eps, alpha=eps / 2, steps=3,
                                                 restarts=2, seed=0, keep_best=True),
}


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("eps", [8 / 255, 0.3])
def test_attacks_stay_in_eps_ball_and_unit_range(small, name, eps):
    model, x, y = small
    x_adv = ATTACKS[name](model, x, y, eps)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + TOL
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).any()  # the attack moved something


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("existing_grads", [False, True])
def test_attacks_leave_mode_and_param_grads_alone(small, name, training, existing_grads):
    model, x, y = small
    model.train(training)
    if existing_grads:  # e.g. an attack called between backward() and step()
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    ATTACKS[name](model, x, y, 0.1)
    assert all(m.training == training for m in model.modules())
    for p, g in zip(model.parameters(), before):
        if g is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, g)


def test_bad_budgets_are_refused(small):
    model, x, y = small
    with pytest.raises(ValueError, match="eps"):
        attacks.fgsm(model, x, y, eps=8)  # 8 instead of 8/255
    with pytest.raises(ValueError, match="alpha"):
        attacks.pgd(model, x, y, eps=0.1, alpha=2, steps=1)


def test_pgd_with_zero_eps_returns_the_clean_input(small):
    model, x, y = small
    assert torch.equal(attacks.pgd(model, x, y, eps=0.0, alpha=0.01, steps=3, restarts=2, seed=0), x)
    assert torch.equal(attacks.fgsm(model, x, y, eps=0.0), x)


def test_pgd_is_seeded(small):
    model, x, y = small
    run = lambda seed: attacks.pgd(model, x, y, eps=0.1, alpha=0.02, steps=0, seed=seed)
    assert torch.equal(run(3), run(3))  # steps=0: just the random start
    assert not torch.equal(run(3), run(4))


def test_one_pgd_step_from_x_is_fgsm(trained_model, test_batch):
    """PGD-1 with alpha = eps and no random start is FGSM, example by example."""
    x, y = test_batch
    pgd1 = attacks.pgd(trained_model, x, y, eps=EPS, alpha=EPS, steps=1, random_start=False)
    assert torch.equal(pgd1, attacks.fgsm(trained_model, x, y, eps=EPS))


def _correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


def test_stronger_attacks_lower_accuracy(trained_model, test_batch):
    """clean > FGSM >= PGD-20 on a trained model (in aggregate: per example, an attack that
    follows the loss may move a misclassified example back; test_restarts_* and
    test_one_pgd_step_* check what must hold per example)."""
    model, (x, y) = trained_model, test_batch
    clean = _correct(model, x, y)
    fgsm = _correct(model, attacks.fgsm(model, x, y, eps=EPS), y)
    pgd20 = _correct(model, attacks.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=20, seed=0), y)
    assert clean.float().mean() >= 0.9  # the fixture model really learned digits
    assert clean.float().mean() > fgsm.float().mean() >= pgd20.float().mean()


def test_restarts_keep_the_worst_case_per_example(trained_model, test_batch):
    """Multi-restart PGD beats or ties every single restart, in the order (misclassified, loss).

    Restart r draws from seed + r, so pgd(restarts=1, seed=s + r) is restart r alone.
    """
    model, (x, y) = trained_model, test_batch
    s, n = 11, 3
    kw = dict(eps=0.06, alpha=0.02, steps=2)  # a weak attack, so restarts disagree
    best = attacks.pgd(model, x, y, restarts=n, seed=s, **kw)
    singles = [attacks.pgd(model, x, y, restarts=1, seed=s + r, **kw) for r in range(n)]
    wrong, loss = attacks.attack_score(model, best, y)
    scores = [attacks.attack_score(model, xr, y) for xr in singles]
    assert len({tuple(w.tolist()) for w, _ in scores}) > 1 or len({l.sum().item() for _, l in scores}) > 1
    for w_r, l_r in scores:
        better = wrong & ~w_r
        tied = (wrong == w_r) & (loss >= l_r - 1e-5 * (1 + l_r.abs()))
        assert (better | tied).all()
    # and each example's result is one of the restarts' own, not a blend
    same = torch.stack([(xr == best).flatten(1).all(1) for xr in singles])  # (R, N)
    assert same.any(0).all()


def test_pgd_iterates_equal_separate_runs(trained_model, test_batch):
    """PGD-k snapshots of one trajectory are exactly pgd(steps=k) with the same seed."""
    x, y = test_batch[0][:32], test_batch[1][:32]
    snaps = attacks.pgd_iterates(trained_model, x, y, eps=0.1, alpha=0.025, steps=[2, 5], seed=4)
    for k in (2, 5):
        alone = attacks.pgd(trained_model, x, y, eps=0.1, alpha=0.025, steps=k, seed=4)
        assert torch.equal(snaps[k], alone)


def test_graph_flag_is_the_same_attack_on_cpu(small):
    """graph=True asks for CUDA-graph replay (tests/test_gpu.py checks it on CUDA); on the CPU
    it is ignored, with the same result."""
    model, x, y = small
    a = attacks.pgd(model, x, y, eps=0.1, alpha=0.03, steps=3, seed=1)
    b = attacks.pgd(model, x, y, eps=0.1, alpha=0.03, steps=3, seed=1, graph=True)
    assert torch.equal(a, b)


def test_graph_replay_needs_eval_mode(small):
    """A captured iteration would update train-mode BatchNorm statistics in its warm-up passes;
    dwf.cudagraphs refuses such a model (attacks.pgd then stays eager)."""
    from dwf import cudagraphs

    model, x, y = small
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            cudagraphs.replay(model, lambda xa, x0, y0: xa, ("noop",), x, x, y, 1)
    finally:
        model.eval()


class _Ridge(torch.nn.Module):
    """Class 1 wins only on a narrow ridge of the mean pixel value (0.55 < v < 0.65): signed
    steps of 0.08 from 0.5 land on it (0.58), overshoot it (0.66), land on it again ..."""

    def forward(self, x):
        v = x.flatten(1).mean(1)
        ridge = 1 - 400 * (v - 0.6) ** 2
        return torch.stack([torch.zeros_like(ridge), ridge], dim=1)


def test_keep_best_keeps_an_iterate_that_crossed_and_left_the_boundary():
    model, x, y = _Ridge(), torch.full((1, 1, 2, 2), 0.5), torch.zeros(1, dtype=torch.long)
    kw = {"eps": 0.5, "alpha": 0.08, "steps": 2, "random_start": False}
    last = attacks.pgd(model, x, y, **kw)
    best = attacks.pgd(model, x, y, **kw, keep_best=True)
    assert torch.allclose(last, torch.full_like(x, 0.66)) and model(last).argmax(1).item() == 0
    assert torch.allclose(best, torch.full_like(x, 0.58)) and model(best).argmax(1).item() == 1
    many = attacks.pgd_iterates(model, x, y, eps=0.5, alpha=0.08, steps=[1, 2, 3],
                                random_start=False, keep_best=True)
    assert all(model(v).argmax(1).item() == 1 for v in many.values())


def test_keep_best_is_never_weaker_and_iterates_match_single_runs(trained_model, test_batch):
    x, y = test_batch
    kw = {"eps": EPS, "alpha": ALPHA, "seed": 3}
    last = attacks.pgd(trained_model, x, y, steps=5, **kw)
    best = attacks.pgd(trained_model, x, y, steps=5, keep_best=True, **kw)
    wrong_last, _ = attacks.attack_score(trained_model, last, y)
    wrong_best, _ = attacks.attack_score(trained_model, best, y)
    assert (wrong_best | ~wrong_last).all()  # whatever the last iterate fools, the best fools
    assert (best - x).abs().max() <= EPS + TOL and 0 <= best.min() and best.max() <= 1
    many = attacks.pgd_iterates(trained_model, x, y, steps=[2, 5], keep_best=True, **kw)
    for k, x_k in many.items():
        assert torch.equal(x_k, attacks.pgd(trained_model, x, y, steps=k, keep_best=True, **kw))


def test_keep_best_refuses_graph_replay(small):
    model, x, y = small
    with pytest.raises(ValueError, match="keep_best"):
        attacks.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=2, graph=True, keep_best=True)


class _Rows(torch.nn.Module):
    """Counts the examples each forward pass sees."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, 0

    def forward(self, x):
        self.seen += len(x)
        return self.model(x)


def _full_batch_fooled(model, x, y, eps, alpha, steps, seed):
    """Reference: PGD on the whole batch at every step; an example counts as fooled if any
    iterate misclassified it."""
    x_adv = attacks._pgd_start(x, eps, True, torch.Generator().manual_seed(seed))
    fooled = torch.zeros(len(x), dtype=torch.bool)
    for k in range(steps + 1):
        with torch.no_grad():
            fooled |= model(x_adv).argmax(1) != y
        if k < steps:
            grad, _ = attacks._input_grad(model, x_adv, y, attacks.cross_entropy)
            x_adv = attacks.project(x_adv + alpha * grad.sign(), x, eps)
    return fooled


@pytest.mark.parametrize("eps", [0.05, EPS, 0.3])
def test_attacking_only_what_is_still_robust_fools_the_same_examples(trained_model, test_batch, eps):
    """keep_best drops an example once an iterate fooled it (issue 12: attacks run only on points
    still robust): the examples fooled after every k are those of PGD on the whole batch, and
    the forward passes see fewer examples."""
    x, y = test_batch
    counted = _Rows(trained_model)
    many = attacks.pgd_iterates(counted, x, y, eps=eps, alpha=eps / 4, steps=[1, 3, 10], seed=5,
                                keep_best=True)
    for k, x_k in many.items():
        wrong, _ = attacks.attack_score(trained_model, x_k, y)
        assert torch.equal(wrong, _full_batch_fooled(trained_model, x, y, eps, eps / 4, k, 5)), k
        assert (x_k - x).abs().max() <= eps + TOL and 0 <= x_k.min() and x_k.max() <= 1
    assert counted.seen < 11 * len(x)  # the whole batch at all 11 passes: nothing saved
    if eps == 0.3:  # every digit falls within a few steps: the rest costs nothing
        assert counted.seen < 5 * len(x)
