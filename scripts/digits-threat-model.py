"""The digits threat model, measured: at which eps does a plainly trained ResNet-18 fall to ~0%
under PGD while adversarially trained ones keep their accuracy? (issue 14, docs/decisions.md)

Trains, per seed, on native 1x8x8 digits (width 8, batch 64, lr 0.05, no crop, no flip): one
plain ResNet-18, a DWF FGSM expert (Alg. 1: eps drawn per batch from --fgsm-eps), and for
every eps of --train-eps a PGD-AT baseline (half of each batch PGD-3, alpha 0.4 eps) and a
DWF PGD expert (Alg. 2: whole batch, PGD-{1..5}, alpha 0.4 eps). Then prints accuracy (%) on
all 360 test digits, mean +- std over seeds, under PGD-50 (alpha eps/4, random start) and
FGSM at every eps of --eps. About 4 minutes on one thread.

Usage: OMP_NUM_THREADS=1 python scripts/digits-threat-model.py [--epochs 10] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dwf import attacks, data
from dwf.checkpoint import load_model
from dwf.config import AdvTrainConfig, TrainConfig
from dwf.defenses import train_defense
from dwf.defenses.dwf import train_expert

parser = argparse.ArgumentParser()
parser.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.3],
                    help="evaluation budgets (pixel units)")
parser.add_argument("--train-eps", type=float, nargs="+", default=[0.1, 0.15, 0.2],
                    help="budgets of the PGD-trained models")
parser.add_argument("--fgsm-eps", type=float, nargs="+",
                    default=[0.04, 0.08, 0.12, 0.16, 0.2, 0.24, 0.28, 0.32, 0.36],
                    help="the FGSM expert's per-batch draws")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--steps", type=int, default=50, help="PGD iterations of the evaluation")
parser.add_argument("--data-root", type=Path, default=Path("data"))
args = parser.parse_args()

CPU = torch.device("cpu")
data.download("digits", args.data_root, progress=False)
x_train, y_train = data.load_split("digits", args.data_root, "train")
x_test, y_test = data.load_split("digits", args.data_root, "test")
x_test = data.to_unit(x_test)
mean, std = data.mean_std("digits")
ARCH = {"num_classes": 10, "width": 8, "mean": mean, "std": std,
        "in_channels": data.SHAPE["digits"][0]}


def models_of(seed: int, tmp: Path) -> dict[str, torch.nn.Module]:
    """name -> trained model (eval mode) for one seed."""
    common = dict(arch_kwargs=ARCH, dataset="digits", seed=seed, flip=False, crop_padding=0,
                  device=CPU, progress=False)
    out = {}

    def train(name, fn, *a, **kw):
        path = tmp / f"{name}-{seed}.pt"
        fn(*a, x_train, y_train, out=path, **common, **kw)
        out[name] = load_model(path)

    train("plain", train_defense, "resnet18",
          cfg=TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05))
    train("fgsm_expert", train_expert, "fgsm", cfg=TrainConfig(
        epochs=args.epochs, batch_size=64, lr=0.05, fgsm_eps=tuple(args.fgsm_eps)))
    for eps in args.train_eps:
        train(f"pgd_at@{eps:g}", train_defense, "resnet18_pgd_at", cfg=AdvTrainConfig(
            epochs=args.epochs, batch_size=64, lr=0.05, pgd_eps=eps, pgd_alpha=0.4 * eps,
            pgd_steps=(3,), adv_fraction=0.5))
        train(f"pgd_expert@{eps:g}", train_expert, "pgd", cfg=TrainConfig(
            epochs=args.epochs, batch_size=64, lr=0.05, pgd_eps=eps, pgd_alpha=0.4 * eps,
            pgd_steps=(1, 2, 3, 4, 5)))
    return out


def accuracy(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y_test).float().mean().item()


def row(model: torch.nn.Module) -> dict[str, float]:
    """Clean, PGD-k and FGSM accuracy (%) at every eps of the grid."""
    r = {"clean": accuracy(model, x_test)}
    for eps in args.eps:
        x_adv = attacks.pgd(model, x_test, y_test, eps=eps, alpha=eps / 4, steps=args.steps,
                            random_start=True, seed=0)
        r[f"pgd/{eps:g}"] = accuracy(model, x_adv)
        r[f"fgsm/{eps:g}"] = accuracy(model, attacks.fgsm(model, x_test, y_test, eps=eps))
    return r


t0 = time.perf_counter()
results: dict[str, list[dict[str, float]]] = {}
with tempfile.TemporaryDirectory() as tmp:
    for seed in args.seeds:
        for name, model in models_of(seed, Path(tmp)).items():
            results.setdefault(name, []).append(row(model))


def cell(name: str, key: str) -> str:
    values = [r[key] for r in results[name]]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


print(f"digits 1x8x8, {len(y_test)} test images, width 8, {args.epochs} epochs, seeds "
      f"{args.seeds}; robust accuracy % (mean ± std over seeds)")
for attack in ("pgd", "fgsm"):
    label = f"PGD-{args.steps}, alpha eps/4, random start" if attack == "pgd" else "FGSM"
    keys = ["clean"] + [f"{attack}/{eps:g}" for eps in args.eps]
    print(f"\n{label}\n| model | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name in results:
        print(f"| {name} | " + " | ".join(cell(name, k) for k in keys) + " |")
print(f"\n{time.perf_counter() - t0:.0f} s with {torch.get_num_threads()} thread(s)")
