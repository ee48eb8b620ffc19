"""The paper's evaluation protocol (Table 4) on one model -> a metrics dict.

Every attack runs on the same first-N test examples; per example we keep whether it was
classified correctly under each attack, and report the worst case over all of them (an
example counts as robust only if no attack fooled it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dwf import attacks
from dwf.checkpoint import environment
from dwf.config import EvalConfig
from dwf.data import to_unit
from dwf.runtime import derive_seed

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]  # (model, x, y, seed)


def protocol(cfg: EvalConfig) -> dict[str, Attack]:
    """The paper's attacks (Table 4), named as they appear in the metrics file."""
    eps, alpha = cfg.pgd_eps, cfg.pgd_alpha
    suite: dict[str, Attack] = {}
    for e in cfg.fgsm_eps:
        suite[f"fgsm/{e:g}"] = lambda m, x, y, s, e=e: attacks.fgsm(m, x, y, eps=e)
    for k in cfg.pgd_steps:
        suite[f"pgd/{k}"] = lambda m, x, y, s, k=k: attacks.pgd(
            m, x, y, eps=eps, alpha=alpha, steps=k, seed=s)
    suite[f"pgd{cfg.ms_steps}_ms"] = lambda m, x, y, s: attacks.pgd(
        m, x, y, eps=eps, alpha=alpha, steps=cfg.ms_steps, restarts=cfg.ms_restarts, seed=s)
    # "Adaptive" PGD with EoT = 1 on a deterministic model: PGD through the whole mixture
    suite[f"pgd{cfg.adaptive_steps}_adaptive"] = lambda m, x, y, s: attacks.pgd(
        m, x, y, eps=eps, alpha=alpha, steps=cfg.adaptive_steps, seed=s)
    return suite


def correct_under(model: nn.Module, suite: dict[str, Attack], x_u8: torch.Tensor, y: torch.Tensor,
                  *, batch_size: int, seed: int, device: torch.device, progress: bool = True
                  ) -> dict[str, torch.Tensor]:
    """Per-example correctness (bool, (N,)) on clean inputs and under every attack of `suite`."""
    flags: dict[str, list[torch.Tensor]] = {"clean": [], **{name: [] for name in suite}}
    n_batches = -(-len(x_u8) // batch_size)
    bar = tqdm(total=n_batches * (len(suite) + 1), desc="evaluate", disable=not progress,
               mininterval=1.0)
    for b, start in enumerate(range(0, len(x_u8), batch_size)):
        x = to_unit(x_u8[start:start + batch_size].to(device))
        yb = y[start:start + batch_size].to(device)
        with torch.no_grad():
            flags["clean"].append((model(x).argmax(1) == yb).cpu())
        bar.update()
        for name, attack in suite.items():
            x_adv = attack(model, x, yb, derive_seed(seed, name, b))
            with torch.no_grad():
                flags[name].append((model(x_adv).argmax(1) == yb).cpu())
            bar.set_postfix_str(name, refresh=False)
            bar.update()
    bar.close()
    return {k: torch.cat(v) for k, v in flags.items()}


def summarize(flags: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Accuracies in percent, grouped like the paper's tables, plus the per-example worst case."""
    worst = torch.stack(list(flags.values())).all(dim=0)
    out: dict[str, Any] = {}
    for name, f in flags.items():
        group, _, key = name.partition("/")
        acc = round(100.0 * f.float().mean().item(), 4)
        if key:
            out.setdefault(group, {})[key] = acc
        else:
            out[group] = acc
    out["worst_case"] = round(100.0 * worst.float().mean().item(), 4)
    return out


def gate_usage(model: nn.Module, x_u8: torch.Tensor, device: torch.device, batch_size: int) -> list[float] | None:
    """Mean gate weight per expert on clean inputs (mixtures only)."""
    if not hasattr(model, "gate_weights"):
        return None
    with torch.no_grad():
        w = torch.cat([model.gate_weights(to_unit(x_u8[i:i + batch_size].to(device))).cpu()
                       for i in range(0, len(x_u8), batch_size)])
    return [round(v, 6) for v in w.mean(0).tolist()]


def evaluate(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, cfg: EvalConfig,
             seed: int, device: torch.device, progress: bool = True) -> dict[str, Any]:
    """Run the paper's protocol on the first cfg.n_examples test images (0 = all).

    Args:
        model: classifier in eval mode, on `device`, taking [0, 1] images.
        x_u8, y: the test split (uint8 images, labels).
        seed: seeds every attack's random start.
    Returns:
        metrics dict: accuracies in percent, n_examples, the per-example worst case, settings.
    """
    n = cfg.n_examples or len(x_u8)
    x_u8, y = x_u8[:n], y[:n]
    flags = correct_under(model, protocol(cfg), x_u8, y, batch_size=cfg.batch_size, seed=seed,
                          device=device, progress=progress)
    metrics = {"n_examples": n, **summarize(flags)}
    usage = gate_usage(model, x_u8, device, cfg.batch_size)
    if usage is not None:
        metrics["gate_mean_weight"] = usage
    worst = torch.stack(list(flags.values())).all(dim=0)
    metrics["per_example"] = {"worst_case_correct": "".join("1" if v else "0" for v in worst.tolist())}
    metrics["settings"] = {**dataclasses.asdict(cfg), "seed": seed}
    metrics["environment"] = environment()
    return metrics
