"""CUDA checks, run on a GPU machine (`pytest -m gpu`): determinism and the batched experts."""

from __future__ import annotations

import pytest
import torch

from dwf import attacks, models
from dwf.config import TrainConfig
from dwf.defenses.dwf import train_expert
from dwf.runtime import configure_determinism

from conftest import digits_arch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def test_same_seed_gives_bit_identical_weights_on_cuda(digits, tmp_path):
    """With dwf's determinism switches, two CUDA trainings with one seed agree bit for bit."""
    configure_determinism()
    cfg = TrainConfig(epochs=1, batch_size=128, lr=0.05, pgd_eps=0.1, pgd_alpha=0.025, pgd_steps=(3, 5))
    states = []
    for i in range(2):
        out = tmp_path / f"pgd{i}.pt"
        train_expert("pgd", digits[0], digits[1], cfg=cfg, arch_kwargs=digits_arch(16),
                     dataset="digits", seed=7, flip=False, crop_padding=2, out=out, device=CUDA,
                     progress=False)
        states.append(torch.load(out, weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_batched_mixture_matches_the_expert_loop_on_cuda():
    configure_determinism()
    torch.manual_seed(0)
    moe = models.build("softmoe", n_experts=3, expert=digits_arch(8), router_hidden=(32,)).to(CUDA).eval()
    x = torch.rand(16, 3, 32, 32, device=CUDA)
    y = torch.randint(0, 10, (16,), device=CUDA)
    fast = moe(x)
    moe.batched = False
    ref = moe(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    moe.batched = True
    x_adv = attacks.pgd(moe, x, y, eps=0.1, alpha=0.025, steps=5, seed=0)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
