"""Every audit check passes on a correctly evaluated model and fails on a deliberately broken one."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from dwf import adaptive, attacks, audit
from dwf.config import EvalConfig

from _models import EPS, first_test_images, trained

CFG = EvalConfig(batch_size=64, pgd_eps=EPS, pgd_alpha=EPS / 4, pgd_steps=(10,), strong_steps=10,
                 strong_restarts=1, square_queries=100)
SQUARE = functools.partial(adaptive.square, queries=CFG.square_queries, seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    x, y = first_test_images(root, 48)
    return trained("benign", str(root), 3), x, y


def _attack_checks(model, x, y, attack=attacks.pgd, cfg=CFG, square=SQUARE):
    aud = audit.Auditor(model, x, y, attack=attack, batch_size=cfg.batch_size, seed=0)
    runs = {name: part.run() for name, part in audit.attack_parts(aud, cfg, attacks.fgsm).items()}
    return audit.attack_checks(runs, cfg, audit.square_run(model, x, y, cfg, square))


# ---------------------------------------------------------------- broken models and attacks


class MaskedGradients(nn.Module):
    """Quantizes its input: the gradient is zero almost everywhere, the model is not robust."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 8) / 8)


class Randomized(MaskedGradients):
    def forward(self, x):
        return self.model(x + 0.3 * torch.randn_like(x))


class Softmax(MaskedGradients):
    def forward(self, x):
        return self.model(x).softmax(dim=1)


def sign_flipped(model, x, y, **kw):
    """PGD descending the loss instead of ascending it."""
    negative = lambda logits, y_: -attacks.cross_entropy(logits, y_)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(attacks.LOSSES, "neg_ce", negative)
        return attacks.pgd(model, x, y, **kw, loss="neg_ce")


def one_step(model, x, y, **kw):
    return attacks.pgd(model, x, y, **{**kw, "steps": 1})


def ignores_eps(model, x, y, *, eps, alpha, **kw):
    """Never attacks with less than 0.05: breaks eps = 0 and the ball."""
    return attacks.pgd(model, x, y, eps=max(eps, 0.05), alpha=max(alpha, 0.0125), **kw)


# ---------------------------------------------------------------- tests


@pytest.mark.slow
def test_every_check_passes_on_a_correct_evaluation(data):
    model, x, y = data
    checks = audit.audit(model, x, y, cfg=CFG, seed=0, square=SQUARE)
    failed = {k: c["value"] for k, c in checks.items() if not c["pass"]}
    assert not failed
    assert set(checks) >= {"eps0_equals_clean", "iterative_beats_single_step", "monotone_eps",
                           "monotone_iterations", "large_eps_zero", "converged", "square_vs_whitebox",
                           "in_ball", "gradients_nonzero", "deterministic", "outputs_are_logits",
                           "attack_finds_known_adversarial", "attack_finds_binarized_adversarial"}


@pytest.mark.slow
def test_masked_gradients_are_caught(data):
    model, x, y = data
    masked = MaskedGradients(model)
    assert not audit.gradient_check(masked, x, y)["pass"]
    checks = _attack_checks(masked, x, y)
    assert not checks["square_vs_whitebox"]["pass"] or not checks["large_eps_zero"]["pass"]


def test_randomized_forward_is_caught(data):
    model, x, y = data
    torch.manual_seed(0)
    assert audit.determinism_check(model, x)["pass"]
    assert not audit.determinism_check(Randomized(model), x)["pass"]


def test_masked_gradients_fail_the_gradient_check(data):
    model, x, y = data
    assert audit.gradient_check(model, x, y)["pass"]
    assert not audit.gradient_check(MaskedGradients(model), x, y)["pass"]


@pytest.mark.slow
def test_randomized_forward_breaks_eps0(data):
    model, x, y = data
    torch.manual_seed(0)
    assert not _attack_checks(Randomized(model), x, y, square=None)["eps0_equals_clean"]["pass"]


def test_softmax_output_is_caught(data):
    model, x, _ = data
    assert audit.logits_check(model, x)["pass"]
    assert not audit.logits_check(Softmax(model), x)["pass"]


@pytest.mark.slow
def test_sign_flipped_attack_is_caught(data):
    model, x, y = data
    checks = _attack_checks(model, x, y, attack=sign_flipped, square=None)
    assert not checks["iterative_beats_single_step"]["pass"]
    assert not checks["large_eps_zero"]["pass"]
    assert not audit.known_adversary_check(sign_flipped, x, CFG, 0, 48)["pass"]


def test_attack_cut_to_one_step_is_caught(data):
    model, x, y = data
    checks = _attack_checks(model, x, y, attack=one_step, square=None)
    assert not checks["iterative_beats_single_step"]["pass"]
    assert not audit.known_adversary_check(one_step, x, CFG, 0, 48)["pass"]
    assert audit.known_adversary_check(attacks.pgd, x, CFG, 0, 48)["pass"]


def test_unconverged_budget_is_caught(data):
    model, x, y = data
    short = EvalConfig(batch_size=64, pgd_eps=EPS, pgd_alpha=EPS / 20, pgd_steps=(1,), strong_steps=1,
                       strong_restarts=1)
    assert not _attack_checks(model, x, y, cfg=short, square=None)["converged"]["pass"]


@pytest.mark.slow
def test_attack_leaving_the_ball_is_caught(data):
    model, x, y = data
    checks = _attack_checks(model, x, y, attack=ignores_eps, square=None)
    assert not checks["eps0_equals_clean"]["pass"] and not checks["in_ball"]["pass"]


def test_known_adversary_ground_truth_is_exact(data):
    _, x, _ = data
    probe = audit.KnownAdversary(x, seed=1)
    need = probe.needed_eps(x)
    eps = need[torch.isfinite(need)].median().item()
    with torch.no_grad():
        y = probe(x).argmax(1)
        # the optimal attack of a linear model: every pixel moves by eps toward the boundary
        gap = probe(x)[:, 0]
        step = -torch.sign(gap).view(-1, 1, 1, 1) * probe.v * eps
        fooled = probe((x + step).clamp(0, 1)).argmax(1) != y
    assert torch.equal(fooled[need < 0.99 * eps], torch.ones_like(fooled[need < 0.99 * eps]))
    assert not fooled[need > 1.01 * eps].any()


def test_accuracy_rising_beyond_noise_breaks_monotonicity():
    assert audit._monotone([50.0, 40.0, 40.5], 1000)  # 0.5 points: noise
    assert not audit._monotone([50.0, 40.0, 45.0], 1000)
    assert audit._monotone([50.0, 40.0, 45.0], 20)  # one example of 20 is 5 points


def test_misreported_worst_case_is_caught():
    flags = {"clean": torch.tensor([True, True, True, False]),
             "a": torch.tensor([True, False, True, False]), "b": torch.tensor([False, True, True, False]),
             "subset": torch.tensor([True, True])}
    assert audit.worst_case_check({"worst_case": 25.0}, flags)["pass"]
    assert not audit.worst_case_check({"worst_case": 50.0}, flags)["pass"]  # min over attacks
    assert not audit.worst_case_check({"worst_case": 100 * 3 / 8}, flags)["pass"]  # mean of attacks


def timid(model, x, y, *, alpha, **kw):
    """PGD with a hundredth of the step size: it cannot travel far enough inside the ball."""
    return attacks.pgd(model, x, y, alpha=alpha / 100, **kw)


def test_binarization_test_passes_pgd_and_catches_a_weakened_attack(data):
    model, x, y = data
    ok = audit.binarization_check(model, attacks.pgd, x, CFG, seed=0)
    assert ok["pass"], ok["value"]
    assert ok["value"]["n_tests"] >= 0.8 * len(x)  # the readout separates nearly every image
    weak = audit.binarization_check(model, timid, x, CFG, seed=0)
    assert not weak["pass"] and weak["value"]["found"] < 0.5, weak["value"]


def test_binarized_model_has_its_adversarial_inside_the_ball(data):
    model, x, _ = data
    probe, target, valid = audit.binarize(model, x, EPS, torch.Generator().manual_seed(0))
    assert (target - x).abs().max() <= EPS + 1e-6 and 0 <= target.min() and target.max() <= 1
    with torch.no_grad():
        assert (probe(target).argmax(1)[valid] == 1).all()
        assert (probe(x).argmax(1)[valid] == 0).all()
        rows = torch.tensor([3, 0, 7])  # what an attack that drops fooled examples sees
        assert torch.allclose(probe.subset(rows)(x[rows]), probe(x)[rows], atol=1e-5)


def test_converged_asks_what_doubled_pgd_fools_beyond_every_attack():
    ones = torch.ones(200, dtype=torch.bool)
    base, doubled = ones.clone(), ones.clone()
    base[:10] = doubled[:14] = False                 # PGD alone gains 2 points with twice the budget
    suite = ones.clone()
    suite[:14] = False                                # ... all of them fooled by another attack
    alone = audit.converged_check(base, doubled, [(100, 1), (200, 2)], None)
    assert not alone["pass"] and alone["value"] == {"pgd100x1": 95.0, "pgd200x2": 93.0}
    covered = audit.converged_check(base, doubled, [(100, 1), (200, 2)], suite)
    assert covered["pass"] and covered["value"]["doubled_pgd_only_pct"] == 0.0
    suite[13] = True                                  # one the suite missed: 0.5 points, not < 0.5
    assert not audit.converged_check(base, doubled, [(100, 1), (200, 2)], suite)["pass"]


def test_binarizing_leaves_the_model_mode_alone(data):
    model, x, _ = data
    model = copy.deepcopy(model).train()  # a copy: train-mode forwards move BatchNorm statistics
    audit.binarize(model, x[:4], EPS, torch.Generator().manual_seed(0))
    assert all(m.training for m in model.modules())
