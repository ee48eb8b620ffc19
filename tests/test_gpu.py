"""CUDA checks, run on a GPU machine (`pytest -m gpu`): determinism, the batched experts, bf16."""

from __future__ import annotations

import pytest
import torch

from dwf import attacks, data, models
from dwf.config import TrainConfig
from dwf.defenses.dwf import train_expert
from dwf.models import moe as moe_module
from dwf.runtime import autocast, configure_determinism

from _models import robust_by_precision
from conftest import digits_arch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_gives_bit_identical_weights_on_cuda(digits, tmp_path, precision):
    """With dwf's determinism switches, two CUDA trainings with one seed agree bit for bit."""
    configure_determinism()
    cfg = TrainConfig(epochs=1, batch_size=128, lr=0.05, pgd_eps=0.1, pgd_alpha=0.025, pgd_steps=(3, 5),
                      precision=precision)
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
    moe = models.build("softmoe", n_experts=3, expert=digits_arch(8), router_hidden=(32,),
                       input_shape=data.SHAPE["digits"]).to(CUDA).eval()
    moe.batching = {"cuda": "always"}  # NCHW on CUDA defaults to the loop
    x = torch.rand(16, *data.SHAPE["digits"], device=CUDA)
    y = torch.randint(0, 10, (16,), device=CUDA)
    fast = moe(x)
    moe.batched = False
    ref = moe(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    moe.batched = True
    x_adv = attacks.pgd(moe, x, y, eps=0.1, alpha=0.025, steps=5, seed=0)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1


def test_bf16_attack_strength_within_one_point_of_fp32_on_cuda(trained_model, digits):
    """tests/test_precision.py's check with CUDA's bf16 kernels."""
    configure_determinism()
    model = trained_model.to(CUDA)
    robust = robust_by_precision(model, data.to_unit(digits[2]).to(CUDA), digits[3].to(CUDA), CUDA)
    model.cpu()
    assert 20 < robust["fp32"] < 80, robust
    assert abs(robust["bf16"] - robust["fp32"]) <= 1.0, robust


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_pgd_equals_eager_and_sees_weight_updates(precision):
    """attacks.pgd(graph=True) replays one captured iteration: same images as eager PGD, and
    the cached graph reads the weights an optimizer step changed in place."""
    configure_determinism()
    torch.manual_seed(0)
    model = models.build("resnet18", **digits_arch(8)).to(CUDA).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.rand(32, *data.SHAPE["digits"], device=CUDA)
    y = torch.randint(0, 10, (32,), device=CUDA)
    previous = None
    for _ in range(2):
        with autocast(precision, CUDA):
            eager = attacks.pgd(model, x, y, eps=0.1, alpha=0.025, steps=5, random_start=False)
            graphed = attacks.pgd(model, x, y, eps=0.1, alpha=0.025, steps=5, random_start=False,
                                  graph=True)
        assert (eager != graphed).float().mean() < 1e-3  # equal up to a rare rounding tie
        if previous is not None:
            assert (graphed != previous).float().mean() > 0.01  # new weights, new attack
        previous = graphed
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # in place: the captured graph must follow
        model.eval()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_joint_training_is_bit_identical_on_cuda(digits, tmp_path, precision):
    """Joint training as CUDA runs it: the expert loop in fp32 (NCHW); in bf16 the grouped
    experts in NHWC with PGD replayed from a CUDA graph. Two runs with one seed agree bitwise."""
    from dwf.defenses.dwf import train_joint
    from dwf.runtime import memory_format

    configure_determinism()
    cfg = TrainConfig(epochs=1, batch_size=128, lr=0.05, pgd_eps=0.1, pgd_alpha=0.025,
                      pgd_steps=(2, 3), precision=precision)
    x_nhwc = torch.rand(2, 3, 32, 32, device=CUDA).contiguous(memory_format=memory_format(CUDA, precision))
    assert moe_module.batch_here(x_nhwc) == (precision == "bf16")
    experts = []
    for i, kind in enumerate(["benign", "pgd"]):
        experts.append(tmp_path / f"{kind}.pt")
        train_expert(kind, digits[0], digits[1], cfg=cfg, arch_kwargs=digits_arch(8), dataset="digits",
                     seed=i, flip=False, crop_padding=2, out=experts[-1], device=CUDA, progress=False)
    states = []
    for i in range(2):
        out = tmp_path / f"joint{i}.pt"
        train_joint(experts, digits[0], digits[1], cfg=cfg, router_hidden=(32,), dataset="digits",
                    seed=3, flip=False, crop_padding=2, out=out, device=CUDA, progress=False)
        states.append(torch.load(out, weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
