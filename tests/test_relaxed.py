"""Attacks through a hard router (issue 21): the relaxation must find what plain PGD cannot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dwf import adaptive, attacks, models
from dwf import evaluate as ev
from dwf.config import EvalConfig

EPS = 0.1


class Fixed(nn.Module):
    """An expert whose logits ignore the image: constant, so its input gradient is zero (the
    image still enters the graph, times 0, as a real network's would)."""

    def __init__(self, label: int, classes: int = 2):
        super().__init__()
        self.register_buffer("out", nn.functional.one_hot(torch.tensor(label), classes).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out + 0.0 * x.flatten(1).sum(1, keepdim=True)


class HardRouted(nn.Module):
    """Two experts: 0 always says class 0 (right on every test image), 1 always class 1. The
    top-1 router picks expert 1 once the image's mean brightness exceeds 0.55: reachable within
    eps 0.1 of the grey test images (mean 0.5), never by noise (64 pixels: the mean of a
    uniform start moves by about 0.007). The deployed model's input gradient is zero everywhere
    (its output is a constant expert), so PGD on it cannot move; an adversarial example exists."""

    hard_routing = True
    n_experts = 2

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([Fixed(0), Fixed(1)])

    def expert(self, i: int) -> nn.Module:
        return self.experts[i]

    def scores(self, x: torch.Tensor) -> torch.Tensor:  # (N, 2)
        s = 40.0 * (x.flatten(1).mean(1) - 0.55)
        return torch.stack([torch.zeros_like(s), s], 1)

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([f(x) for f in self.experts], 1)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(self.scores(x).argmax(1), 2).float()

    def route(self, x: torch.Tensor, gate) -> torch.Tensor:
        return torch.einsum("ne,nec->nc", gate(self.scores(x)), self.expert_logits(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x, lambda s: nn.functional.one_hot(s.argmax(1), 2).float())


@pytest.fixture
def task():
    x = torch.full((16, 1, 8, 8), 0.5) + 0.01 * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return HardRouted(), x.clamp(0, 1), torch.zeros(16, dtype=torch.long)


def test_plain_pgd_fails_on_the_hard_router(task):
    model, x, y = task
    assert models.is_mixture(model)
    x_adv = attacks.pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=50, restarts=3, seed=0, keep_best=True)
    assert (model(x_adv).argmax(1) == y).all()  # zero gradient: no step moves the image


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_the_relaxed_router_attack_finds_the_other_expert(task, loss):
    model, x, y = task
    x_adv = adaptive.relaxed_pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=30, loss=loss, seed=0)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():  # judged on the real (hard-routed) model
        assert (model(x_adv).argmax(1) != y).all()


def test_the_gate_attack_sees_through_a_hard_router(task):
    model, x, y = task
    x_adv = adaptive.gate_attack(model, x, y, eps=EPS, alpha=EPS / 4, steps=30, seed=0)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all()


def test_relaxation_is_identity_for_a_soft_gate_and_hard_in_value_at_low_temperature():
    torch.manual_seed(0)
    expert = dict(num_classes=10, width=4, mean=(0.5,), std=(0.25,), in_channels=1)
    x = torch.rand(6, 1, 8, 8)
    moe = models.build("softmoe", n_experts=3, expert=expert, router_hidden=(16,), input_shape=(1, 8, 8)).eval()
    soe = models.build("soe", n_submodels=3, **expert).eval()
    advmoe = models.build("advmoe_resnet18", n_experts=2, ratio=0.5, router_width=4, router_blocks=1,
                          **expert).eval()
    with torch.no_grad():
        torch.testing.assert_close(adaptive.Relaxed(moe, 1.0)(x), moe(x))
        for hard in (soe, advmoe):
            torch.testing.assert_close(adaptive.Relaxed(hard, 1e-4)(x), hard(x))
    assert not moe.hard_routing and soe.hard_routing and advmoe.hard_routing


def test_the_strong_suite_relaxes_hard_routers_only():
    cfg = EvalConfig(pgd_eps=EPS, pgd_alpha=EPS / 4, strong_steps=6)
    suite = ev.strong_suite(cfg, HardRouted(), {})
    relaxed = {k: r for e in suite.values() for k, r in e.records.items() if r.target == "relaxed_router"}
    assert set(relaxed) == {"strong/relaxed_ce", "strong/relaxed_margin"}
    assert all(r.eps == EPS and r.steps == 6 for r in relaxed.values())
    soft = models.build("softmoe", n_experts=2, expert=dict(num_classes=10, width=4, mean=(0.5,), std=(0.25,),
                        in_channels=1), router_hidden=(16,), input_shape=(1, 8, 8))
    assert not any("relaxed" in k for k in ev.strong_suite(cfg, soft, {}))
