"""Images/s of real expert pretraining (`fit`: augmentation, recipe, CUDA-graph PGD, SGD) on
random CIFAR-shaped data, to check that training reaches the rates `dwf bench` measures, and
what running K independent expert trainings side by side on one GPU (threads, one CUDA stream
each) would add.

Usage: python scripts/fit-throughput.py [--precision bf16] [--steps 10] [--batches 40] [--concurrent 4]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

from dwf.config import TrainConfig
from dwf.defenses.dwf import train_expert
from dwf.runtime import configure_determinism, pick_device

parser = argparse.ArgumentParser()
parser.add_argument("--precision", default="bf16")
parser.add_argument("--steps", type=int, default=10, help="PGD iterations per batch")
parser.add_argument("--batches", type=int, default=40)
parser.add_argument("--concurrent", type=int, default=0, help="also time K PGD experts side by side")
parser.add_argument("--device", default=None)
args = parser.parse_args()

configure_determinism()
device = pick_device(args.device)
n = 128 * args.batches
x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
y = torch.randint(0, 10, (n,))
arch = {"num_classes": 10, "width": 64, "mean": (0.5,) * 3, "std": (0.25,) * 3}


def train(kind: str, seed: int, epochs: int) -> list[dict]:
    cfg = TrainConfig(epochs=epochs, batch_size=128, pgd_steps=(args.steps,), precision=args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        return train_expert(kind, x, y, cfg=cfg, arch_kwargs=arch, dataset="cifar10", seed=seed,
                            flip=True, crop_padding=4, out=Path(tmp) / "e.pt", device=device,
                            progress=False)


for kind in ("benign", "pgd"):
    t0 = time.perf_counter()
    hist = train(kind, 0, 2)
    epoch2 = hist[1]["seconds"]  # the first epoch pays for cuDNN plans and graph capture
    print(f"{kind} expert, {args.precision}, PGD-{args.steps if kind == 'pgd' else 0}: "
          f"{n / epoch2:.0f} images/s in epoch 2 ({time.perf_counter() - t0:.1f} s for both epochs)")

if args.concurrent and device.type == "cuda":
    def worker(seed: int) -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            train("pgd", seed, 1)

    for k in (1, args.concurrent):
        train("pgd", 99, 1)  # warm: allocator and plans
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(k)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        print(f"{k} PGD expert(s) side by side: {k * n / wall:.0f} images/s in all "
              f"(one epoch each incl. graph capture, {wall:.1f} s)")
