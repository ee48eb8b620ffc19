"""`dwf bench`: the FLOP count against a module count, and one tiny end-to-end run."""

from __future__ import annotations

import json

import torch
from torch import nn
from typer.testing import CliRunner

from dwf import bench
from dwf.cli import app
from dwf.models import ResNet18


def _counted_macs(model: nn.Module, shape: tuple[int, int, int] = (3, 32, 32)) -> int:
    """MACs of one forward on one image, counted from the layers' actual output shapes."""
    total = 0

    def hook(m, _, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    # train mode: in eval mode BatchNorm folds into F.conv2d (resnet.fold) and no Conv2d
    # module runs; out[0] is one image's output either way
    model.train()(torch.rand(2, *shape))
    for h in handles:
        h.remove()
    return total


def test_analytic_macs_match_the_network():
    for width in (4, 16):
        assert bench.resnet18_macs(width) == _counted_macs(ResNet18(width=width))
        # digits at their own shape (8x8 -> 1x1 in stage 4), and an odd size (7 -> 4 -> 2 -> 1)
        for shape in ((1, 8, 8), (1, 7, 7)):
            net = ResNet18(width=width, mean=(0.5,), std=(0.5,), in_channels=1)
            assert bench.resnet18_macs(width, 10, shape) == _counted_macs(net, shape)
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


def test_mixture_flop_counts_the_gate_on_the_input_shape():
    """The router's first layer reads C x H x W values: 64 for native digits, 3072 for CIFAR."""
    digits = bench.BenchConfig(width=4, n_experts=2, router_hidden=(8,), input_shape=(1, 8, 8))
    experts = 2 * bench.resnet18_macs(4, 10, (1, 8, 8))
    assert bench.mixture_flop(digits) == 2.0 * (experts + 64 * 8 + 8 * 2)
    cifar = bench.BenchConfig(width=4, n_experts=2, router_hidden=(8,))
    assert bench.mixture_flop(cifar) == 2.0 * (2 * bench.resnet18_macs(4) + 3072 * 8 + 8 * 2)


def test_bench_runs_the_mixture_at_the_digits_shape(monkeypatch):
    monkeypatch.setattr(bench, "matmul_rate", lambda *a, **k: 1e12)  # the peak: not tested here
    cfg = bench.BenchConfig(width=2, batch=4, pgd_steps=1, repeats=1, n_experts=2,
                            router_hidden=(8,), input_shape=(1, 8, 8), reference=False)
    result = bench.run(torch.device("cpu"), cfg)
    assert result["mixture_gflop_per_image"] == bench.mixture_flop(cfg) / 1e9
    assert all(s["optimized"]["images_per_s"] > 0 for s in result["steps"].values())
