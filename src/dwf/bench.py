"""Throughput benchmark of the nine-expert mixture: reference vs optimized, FLOP/s, projection.

Steps, each on one batch of N images per view:
  clean  - one SGD step of the mixture on N clean images (forward + backward ~ 3 forwards);
  fgsm   - one FGSM example per image through the mixture (forward + input gradient ~ 2);
  pgd    - one PGD iteration per image through the mixture (~ 2), timed over `pgd_steps`;
  joint  - Algorithm 3: FGSM + PGD-k through the mixture, then an SGD step on the 3N batch;
  expert_clean, expert_pgd - the same for one ResNet-18 alone (expert pretraining);
  pgd_graph (CUDA) - the mixture's PGD with iterations replayed from a CUDA graph.
The *reference* runs the expert loop in fp32 and takes input gradients with `loss.backward()`
(which also computes every parameter gradient); the *optimized* path is what training runs:
the experts batched where that is faster (`models.moe.BATCHING`), `torch.autograd.grad`
for the input only, PGD from a CUDA graph in training recipes, and the chosen precision and
memory format. Images/s counts clean images per view. FLOPs are counted analytically
(`resnet18_macs`); rates are compared with a measured dense matmul of the path's precision.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dwf import attacks, models
from dwf.checkpoint import environment
from dwf.config import TrainConfig
from dwf.defenses.dwf import joint_batch
from dwf.models import moe
from dwf.runtime import autocast

# The paper's pipeline (section 5, Table 5; CIFAR-10): what `project_hours` prices.
PAPER = {"images": 50_000, "expert_epochs": 150, "joint_epochs": 100, "n_benign": 1, "n_fgsm": 4,
         "n_pgd": 4, "pgd_steps_mean": 30.0}  # iterations ~ Random{10, ..., 50}, mean 30
EPS, ALPHA = 8 / 255, 2 / 255  # pixel units


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run.

    Args:
        width: ResNet-18 stage-1 channels (64 in the paper).
        batch: images per view (128 in the paper).
        pgd_steps: PGD iterations per timed pgd/joint step.
        repeats: timed calls per step (after one warm-up call); the best is reported.
        n_experts: experts in the mixture (9 in the paper).
        precision: arithmetic of the optimized path ("fp32" or "bf16" autocast).
        channels_last: NHWC memory format for the optimized path.
        batched: grouped-convolution experts for the optimized path (None: the device default).
        reference: also time the reference path (off: optimized only, no speedups).
        input_shape: (C, H, W) of the images (data.SHAPE: CIFAR's 3x32x32, digits' 1x8x8).
    """

    width: int = 64
    batch: int = 128
    pgd_steps: int = 10
    repeats: int = 5
    n_experts: int = 9
    num_classes: int = 10
    router_hidden: tuple[int, ...] = (1024, 512, 128)
    precision: str = "fp32"
    channels_last: bool = False
    batched: bool | None = None
    reference: bool = True
    input_shape: tuple[int, int, int] = (3, 32, 32)


# The paper's sizes where a GPU makes them affordable; the demo's width on a CPU (< 3 minutes).
DEFAULTS = {"cuda": BenchConfig(), "cpu": BenchConfig(width=8, batch=32, pgd_steps=2, repeats=2)}

# ---------------------------------------------------------------- FLOP count


def resnet18_macs(width: int, num_classes: int = 10,
                  input_shape: tuple[int, int, int] = (3, 32, 32)) -> int:
    """Multiply-accumulates of one CIFAR ResNet-18 forward on a (C, H, W) image (convs + linear)."""
    c, h, w = input_shape
    hw = h * w  # output pixels of the 3x3 stem and stage 1 (stride 1, padding 1)
    macs = hw * c * width * 9  # 3x3 stem
    c_in = width
    for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        if i > 0:  # stride 2, padding 1: ceil(size / 2) (8x8 digits: 8, 4, 2, 1)
            h, w = (h + 1) // 2, (w + 1) // 2
            hw = h * w
        macs += hw * c_in * c_out * 9 + 3 * hw * c_out * c_out * 9  # four 3x3 convs
        if c_in != c_out:
            macs += hw * c_in * c_out  # 1x1 projection shortcut
        c_in = c_out
    return macs + c_in * num_classes


def mixture_flop(cfg: BenchConfig) -> float:
    """FLOPs of one mixture forward per image: E experts + the router MLP (2 FLOPs per MAC)."""
    c, h, w = cfg.input_shape
    sizes = (c * h * w, *cfg.router_hidden, cfg.n_experts)
    router = sum(a * b for a, b in zip(sizes, sizes[1:]))
    return 2.0 * (cfg.n_experts * resnet18_macs(cfg.width, cfg.num_classes, cfg.input_shape)
                  + router)


def forwards_per_image(step: str, pgd_steps: float) -> float:
    """Cost of a step in forward passes per clean image (attack step ~ 2, train step ~ 3)."""
    return {"clean": 3.0, "fgsm": 2.0, "pgd": 2.0, "pgd_graph": 2.0, "expert_clean": 3.0,
            "expert_pgd": 2.0, "joint": 2.0 + 2.0 * pgd_steps + 3 * 3.0}[step]

# ---------------------------------------------------------------- the steps


def _backward_input_grad(model, x, y):
    """The reference's input gradient: loss.backward() (parameter gradients computed too)."""
    x = x.detach().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return x.grad


def _reference_pgd(model, x, y, steps):
    x_adv = x.clone()
    for _ in range(steps):
        x_adv = x_adv + ALPHA * _backward_input_grad(model, x_adv, y).sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    return x_adv


def _sgd_step(model, opt, x, y):
    model.train()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _steps(model, opt, x, y, cfg: BenchConfig, optimized: bool) -> dict[str, Callable[[], Any]]:
    """name -> a closure running that step once, on the reference or the optimized path.

    The mixture's steps (clean, fgsm, pgd, joint) price joint training; the expert_* steps run
    its first expert alone, as expert pretraining does (one ResNet-18 per job).
    """
    k = cfg.pgd_steps
    joint_cfg = TrainConfig(epochs=1, batch_size=len(x), fgsm_eps=(0.03,), pgd_eps=EPS,
                            pgd_alpha=ALPHA, pgd_steps=(k,))
    rng = torch.Generator().manual_seed(0)
    expert = model.experts[0]
    expert_opt = torch.optim.SGD(expert.parameters(), lr=1e-3, momentum=0.9)

    def fgsm():
        model.eval()
        if optimized:
            return attacks.fgsm(model, x, y, eps=EPS)
        return (x + EPS * _backward_input_grad(model, x, y).sign()).clamp(0, 1)

    def pgd(net, graph=False):
        def step():
            net.eval()
            if optimized:  # graph: replayed from a CUDA graph, as training does (dwf.cudagraphs)
                return attacks.pgd(net, x, y, eps=EPS, alpha=ALPHA, steps=k, random_start=False,
                                   graph=graph)
            return _reference_pgd(net, x, y, k)
        return step

    def joint():
        model.train()  # crafting switches BN to eval (attack_bn), as in training
        if optimized:
            inputs, targets = joint_batch(model, x, y, joint_cfg, rng)
        else:
            model.eval()
            x_f = (x + 0.03 * _backward_input_grad(model, x, y).sign()).clamp(0, 1)
            inputs, targets = torch.cat([x, x_f, _reference_pgd(model, x, y, k)]), y.repeat(3)
        _sgd_step(model, opt, inputs, targets)

    steps = {"clean": lambda: _sgd_step(model, opt, x, y), "fgsm": fgsm, "pgd": pgd(model),
             "joint": joint, "expert_clean": lambda: _sgd_step(expert, expert_opt, x, y),
             "expert_pgd": pgd(expert, graph=True)}
    if not optimized:
        return steps
    if x.device.type == "cuda":
        steps["pgd_graph"] = pgd(model, graph=True)

    def under_autocast(fn):
        def step():
            with autocast(cfg.precision, x.device):
                return fn()
        return step
    return {name: under_autocast(fn) for name, fn in steps.items()}


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls after one warm-up call (synchronized on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times

# ---------------------------------------------------------------- device rate and projection


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """Measured FLOP/s of an n x n x n matmul (the device's practical dense peak)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = min(_timed(lambda: a @ b, device, repeats))
    return 2.0 * n**3 / best


def project_hours(rates: dict[str, float], cfg: BenchConfig) -> float:
    """Hours of the paper's pipeline at the measured FLOP/s: expert pretraining at one expert's
    rates (its SGD steps at expert_clean's, its attack iterations at expert_pgd's), the joint
    epochs at the mixture's joint step's. FLOPs at cfg's sizes (the caller passes CIFAR's).
    """
    p = PAPER
    f1 = 2.0 * resnet18_macs(cfg.width, cfg.num_classes, cfg.input_shape)  # one expert forward
    per_image = p["images"] * p["expert_epochs"] * f1
    n_experts = p["n_benign"] + p["n_fgsm"] + p["n_pgd"]
    train = n_experts * 3.0 * per_image
    attack = (p["n_fgsm"] * 2.0 + p["n_pgd"] * 2.0 * p["pgd_steps_mean"]) * per_image
    joint_cfg = dataclasses.replace(cfg, n_experts=n_experts)
    joint = (p["images"] * p["joint_epochs"] * mixture_flop(joint_cfg)
             * forwards_per_image("joint", p["pgd_steps_mean"]))
    seconds = train / rates["expert_clean"] + attack / rates["expert_pgd"] + joint / rates["joint"]
    return seconds / 3600.0

# ---------------------------------------------------------------- the run


def run(device: torch.device, cfg: BenchConfig, seed: int = 0) -> dict[str, Any]:
    """Benchmark both paths; returns the dict written to metrics/bench.json."""
    torch.manual_seed(seed)
    c = cfg.input_shape[0]
    arch = {"num_classes": cfg.num_classes, "width": cfg.width, "mean": (0.5,) * c,
            "std": (0.25,) * c, "in_channels": c}
    model = models.build("softmoe", n_experts=cfg.n_experts, expert=arch,
                         router_hidden=cfg.router_hidden, input_shape=cfg.input_shape).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # tiny lr: weights barely move
    x = torch.rand(cfg.batch, *cfg.input_shape, device=device)
    flop, expert_flop = mixture_flop(cfg), 2.0 * resnet18_macs(cfg.width, cfg.num_classes,
                                                               cfg.input_shape)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), device=device)
    steps: dict[str, dict[str, Any]] = {}
    for path in ("reference", "optimized") if cfg.reference else ("optimized",):
        optimized = path == "optimized"
        model.batched = optimized
        if optimized and cfg.batched is not None:  # this run's override of the device policy
            model.batching = {**moe.BATCHING, device.type: "always" if cfg.batched else "never"}
        if optimized and cfg.channels_last:
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        for name, fn in _steps(model, opt, x, y, cfg, optimized).items():
            times = _timed(fn, device, cfg.repeats)
            images = cfg.batch * (cfg.pgd_steps if "pgd" in name else 1)  # pgd: per iteration
            best = min(times)
            per_forward = expert_flop if name.startswith("expert") else flop
            steps.setdefault(name, {})[path] = {
                "seconds": times, "images_per_s": images / best, "flop_per_s":
                images * forwards_per_image(name, cfg.pgd_steps) * per_forward / best}
    for s in steps.values():
        if "reference" in s:
            s["speedup"] = s["optimized"]["images_per_s"] / s["reference"]["images_per_s"]
    return {"config": dataclasses.asdict(cfg), "environment": environment(), "device": str(device),
            "threads": torch.get_num_threads(), "mixture_gflop_per_image": flop / 1e9,
            "steps": steps, **_device_rates(device, steps, cfg)}


def _device_rates(device: torch.device, steps: dict, cfg: BenchConfig) -> dict[str, Any]:
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    peak = {"fp32": matmul_rate(device, torch.float32, n),
            "bf16": matmul_rate(device, torch.bfloat16, n, repeats=10 if cuda else 3)}
    for s in steps.values():
        for path, r in ((p, r) for p, r in s.items() if p != "speedup"):
            precision = cfg.precision if path == "optimized" else "fp32"
            r["fraction_of_matmul"] = r["flop_per_s"] / peak[precision]  # of its own precision
            r["fraction_of_bf16_matmul"] = r["flop_per_s"] / peak["bf16"]
    # the paper's width and CIFAR's images for the projection: FLOP/s measured at this run's sizes
    paper = dataclasses.replace(cfg, width=64, input_shape=(3, 32, 32))
    hours = {path: project_hours({n: s[path]["flop_per_s"] for n, s in steps.items() if path in s}, paper)
             for path in ("reference", "optimized") if path in steps["pgd"]}
    return {"matmul_flop_per_s": peak, "projected_hours": hours}


def table(result: dict[str, Any]) -> str:
    """A short Markdown table of a `run` result."""
    rows = ["| step | reference img/s | optimized img/s | speedup | optimized GFLOP/s "
            "| of its matmul | of bf16 matmul |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in result["steps"].items():
        opt = s["optimized"]
        ref = f"{s['reference']['images_per_s']:.1f}" if "reference" in s else "-"
        speedup = f"{s['speedup']:.2f}x" if "speedup" in s else "-"
        rows.append(f"| {name} | {ref} | {opt['images_per_s']:.1f} | {speedup} | "
                    f"{opt['flop_per_s'] / 1e9:.1f} | {100 * opt['fraction_of_matmul']:.1f}% | "
                    f"{100 * opt['fraction_of_bf16_matmul']:.1f}% |")
    return "\n".join(rows)
