"""`dwf bench`: the FLOP count against a module count, and one tiny end-to-end run."""

from __future__ import annotations

import json

import torch
from torch import nn
from typer.testing import CliRunner

from dwf import bench
from dwf.cli import app
from dwf.models import ResNet18


def _counted_macs(model: nn.Module) -> int:
    """MACs of one forward on a 32x32 image, counted from the layers' actual output shapes."""
    total = 0

    def hook(m, _, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model.eval()(torch.rand(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return total


def test_analytic_macs_match_the_network():
    for width in (4, 16):
        assert bench.resnet18_macs(width) == _counted_macs(ResNet18(width=width))
    # the figure: CIFAR ResNet-18 forward ~ 1.11 GFLOP per image
    assert abs(2 * bench.resnet18_macs(64) / 1e9 - 1.11) < 0.01


def test_cli_bench_tiny_run_writes_every_step(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "--device", "cpu", "--width", "2", "--batch", "4",
                                   "--pgd-steps", "1", "--repeats", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert set(result["steps"]) == {"clean", "fgsm", "pgd", "joint", "expert_clean", "expert_pgd"}
    for step in result["steps"].values():
        assert step["speedup"] > 0
        for path in ("reference", "optimized"):
            assert 0 < step[path]["fraction_of_matmul"] and step[path]["images_per_s"] > 0
    assert result["config"]["width"] == 2 and result["projected_hours"]["optimized"] > 0
    assert "| pgd |" in res.output
