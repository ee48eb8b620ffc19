"""Small digits models trained inside the test tier (shared by the evaluation tests)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from dwf import checkpoint, models
from dwf.config import TrainConfig
from dwf.data import SHAPE, download, load_split, mean_std, to_unit
from dwf.defenses.dwf import train_expert

WIDTH = 4
# The tests' budget (pixel units) on native 1x8x8 digits, where the width-4 models below separate
# (first 120 test digits, PGD-20: the 3-epoch plain one keeps 2.5%, the 4-epoch PGD-trained one
# 44%) while the plain one is not at exactly 0% (so per-example results still tell models apart)
# and PGD-10 has converged on it (the audit's check). Below the demo's eps (docs/decisions.md):
# these models are narrower and shorter-trained.
EPS = 0.12


def digits_root(root: Path) -> Path:
    download("digits", root, progress=False)
    return root


def first_test_images(root: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n digits test images in [0, 1] and their labels."""
    x, y = load_split("digits", digits_root(root), "test")
    return to_unit(x[:n]), y[:n]


@functools.lru_cache(maxsize=None)
def trained(kind: str, root: str, epochs: int = 4) -> nn.Module:
    """A width-4 ResNet-18 trained on digits with an expert recipe ('benign' or 'pgd'), eval mode."""
    x, y = load_split("digits", digits_root(Path(root)), "train")
    mean, std = mean_std("digits")
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, pgd_eps=EPS, pgd_alpha=0.4 * EPS,
                      pgd_steps=(4,), fgsm_eps=(EPS,))
    arch = {"num_classes": 10, "width": WIDTH, "mean": mean, "std": std,
            "in_channels": SHAPE["digits"][0]}
    out = Path(root) / f"{kind}.pt"
    if not out.is_file():
        train_expert(kind, x, y, cfg=cfg, arch_kwargs=arch, dataset="digits", seed=0, flip=False,
                     crop_padding=0, out=out, device=torch.device("cpu"), progress=False)
    return checkpoint.load_model(out)


def mixture(*experts: nn.Module, seed: int = 0) -> models.SoftMoE:
    """A SoftMoE over copies of trained experts with a fresh small router, eval mode."""
    torch.manual_seed(seed)
    moe = models.SoftMoE([_copy(e) for e in experts], experts[0].normalize.mean.flatten().tolist(),
                         experts[0].normalize.std.flatten().tolist(), router_hidden=(16,),
                         input_shape=SHAPE["digits"])
    return moe.eval()


def _copy(model: nn.Module) -> nn.Module:
    c = model.conv1.in_channels
    clone = models.ResNet18(num_classes=model.linear.out_features, width=model.conv1.out_channels,
                            mean=(0.5,) * c, std=(0.5,) * c, in_channels=c)
    clone.load_state_dict(model.state_dict())
    return clone


def robust_by_precision(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        device: torch.device) -> dict[str, float]:
    """Robust accuracy (%) under PGD-10 at eps 0.1 crafted in fp32 and in bf16 autocast, both
    scored in fp32: the mixed-precision attack-strength check (issue 6). On native digits eps
    0.1 leaves the conftest model mid-range (~1/3), where a weaker attack would show."""
    from dwf import attacks
    from dwf.runtime import autocast

    robust = {}
    for precision in ("fp32", "bf16"):
        with autocast(precision, device):
            x_adv = attacks.pgd(model, x, y, eps=0.1, alpha=0.025, steps=10, seed=0)
        with torch.no_grad():
            robust[precision] = 100.0 * (model(x_adv).argmax(1) == y).float().mean().item()
    return robust

