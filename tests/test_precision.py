"""Mixed precision (issue 6): bf16 autocast with the stem, the perturbation and the loss in fp32,
and attacks crafted in bf16 as strong as in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dwf import attacks, data, models
from dwf.config import ConfigError, TrainConfig
from dwf.defenses.dwf import pgd_batch
from dwf.runtime import autocast
from dwf.train import fit

from _models import robust_by_precision
from conftest import digits_arch

CPU = torch.device("cpu")
ARCH = {"num_classes": 10, "width": 8, "mean": (0.5,) * 3, "std": (0.25,) * 3}


def _dtypes(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.dtype]:
    """Output dtype of the named submodules during one bf16-autocast forward."""
    seen, hooks = {}, []
    for name in names:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o.dtype)))
    with autocast("bf16", CPU):
        seen["logits"] = model(x).dtype
    for h in hooks:
        h.remove()
    return seen


def _conv_dtypes(model: torch.nn.Module, x: torch.Tensor) -> list[torch.dtype]:
    """Output dtype of every convolution, in call order, during one bf16-autocast forward
    (recorded at F.conv2d: in eval mode BatchNorm folds in and no Conv2d module runs)."""
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is F.conv2d:
                seen.append(out.dtype)
            return out

    with autocast("bf16", CPU), Record():
        model(x)
    return seen


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_resnet_stem_and_logits_stay_fp32_under_bf16(mode):
    model = models.build("resnet18", **ARCH).train(mode == "train")
    convs = _conv_dtypes(model, torch.rand(4, 3, 32, 32))
    assert len(convs) == 20  # stem, 16 in the blocks, 3 shortcuts
    assert convs[0] == torch.float32  # the stem: input gradients end here
    assert set(convs[1:]) == {torch.bfloat16}
    got = _dtypes(model, ["linear"], torch.rand(4, 3, 32, 32))
    assert got["linear"] == got["logits"] == torch.float32  # logits computed, not just cast, in fp32


@pytest.mark.parametrize("batched", [False, True])
def test_mixture_gate_and_mix_stay_fp32_under_bf16(batched):
    torch.manual_seed(0)
    moe = models.build("softmoe", n_experts=3, expert=ARCH, router_hidden=(16,)).eval()
    moe.batched = batched
    x = torch.rand(4, 3, 32, 32)
    got = _dtypes(moe, ["router.scores.1"], x)
    assert got["router.scores.1"] == torch.float32  # the gate: a second input-gradient path
    convs = _conv_dtypes(moe, x)  # batched: one grouped convolution per layer for all experts
    stems = 1 if batched else 3
    assert convs[:1] == [torch.float32] and convs.count(torch.float32) == stems
    assert torch.bfloat16 in convs
    with autocast("bf16", CPU):
        w, out = moe.gate_weights(x), moe(x)
    assert w.dtype == out.dtype == torch.float32
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    # bf16 changes the numbers a little, not the model
    torch.testing.assert_close(out, moe(x), atol=0.05, rtol=0.05)


def test_fp32_is_a_no_op():
    torch.manual_seed(0)
    model = models.build("resnet18", **ARCH).eval()
    x = torch.rand(4, 3, 32, 32)
    with autocast("fp32", CPU):
        inside = model(x)
    assert torch.equal(inside, model(x))


def test_bf16_attack_keeps_the_threat_model(trained_model, test_batch):
    x, y = test_batch
    with autocast("bf16", CPU):
        x_adv = attacks.pgd(trained_model, x, y, eps=0.05, alpha=0.0125, steps=5, seed=0)
    assert x_adv.dtype == torch.float32  # the perturbation is fp32
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_bf16_attack_strength_within_one_point_of_fp32(trained_model, digits):
    """The issue's check: PGD crafted in bf16 is as strong as in fp32 on a digits model.

    eps 0.1 puts the small benign model mid-range (~1/3 robust on the 360 native test digits),
    where a weaker attack would show; both sets of images are scored in fp32.
    """
    robust = robust_by_precision(trained_model, data.to_unit(digits[2]), digits[3], CPU)
    assert 20 < robust["fp32"] < 80, robust  # mid-range, or the comparison says nothing
    # not weaker by more than a point; either way within a few digits (rounding moves near ties)
    assert robust["bf16"] <= robust["fp32"] + 1.0, robust
    assert abs(robust["bf16"] - robust["fp32"]) <= 2.0, robust


def test_bf16_training_keeps_fp32_weights(digits, tmp_path):
    torch.manual_seed(0)
    model = models.build("resnet18", **digits_arch())
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, pgd_eps=0.1, pgd_alpha=0.05, pgd_steps=(1,),
                      precision="bf16")
    x, y = digits[0][:128], digits[1][:128]
    history = fit(model, pgd_batch, x, y, cfg=cfg, seed=0, flip=False, crop_padding=2,
                  resume_path=tmp_path / "r.pt", meta={"arch": "resnet18", "arch_kwargs": digits_arch()},
                  device=CPU, progress=False)
    assert 0 < history[0]["loss"] < 10  # finite (fit raises on NaN), and learning-sized
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(epochs=1, precision="fp16")
