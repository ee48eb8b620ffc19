"""What native digits save (issue 14): seconds of one expert epoch (width 8) and of one PGD-10
pass over the 360 test digits through a 9-expert SoftMoE, at the native 1x8x8 shape and at
the 3x32x32 shape digits were upsampled to before (bilinear, channels copied), side by side
with the analytic FLOP ratio (dwf.bench). Best of --repeats; the weights do not change the
cost, so the mixture is freshly initialized.

Usage: OMP_NUM_THREADS=1 python scripts/digits-shape-cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dwf import attacks, bench, data, models
from dwf.config import TrainConfig
from dwf.defenses.dwf import train_expert

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--eps", type=float, default=0.2, help="PGD budget (pixel units)")
parser.add_argument("--batch", type=int, default=60, help="evaluation batch")
parser.add_argument("--data-root", type=Path, default=Path("data"))
args = parser.parse_args()

CPU = torch.device("cpu")
WIDTH = 8
data.download("digits", args.data_root, progress=False)
native = {s: data.load_split("digits", args.data_root, s) for s in data.SPLITS}


def upsampled(x: torch.Tensor) -> torch.Tensor:
    """The old stored form: (N, 1, 8, 8) -> (N, 3, 32, 32) uint8, bilinear, grey copied."""
    img = F.interpolate(x.float(), size=(32, 32), mode="bilinear", align_corners=False)
    return img.round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


SHAPES = {  # name -> (train, test, ResNet-18 arguments); 3x32x32: the old measured statistics
    "native 1x8x8": (native["train"], native["test"], dict(zip(("mean", "std"),
                                                                 data.mean_std("digits")))),
    "old 3x32x32": ((upsampled(native["train"][0]), native["train"][1]),
                    (upsampled(native["test"][0]), native["test"][1]),
                    {"mean": (0.3054,) * 3, "std": (0.3237,) * 3}),
}


def expert_epoch(kind: str, train, stats: dict) -> float:
    """Best wall seconds of one epoch of expert pretraining (digits settings)."""
    arch = {"num_classes": 10, "width": WIDTH, "in_channels": len(stats["mean"]), **stats}
    cfg = TrainConfig(epochs=args.repeats, batch_size=64, lr=0.05, pgd_eps=args.eps,
                      pgd_alpha=0.4 * args.eps, pgd_steps=(1, 2, 3, 4, 5))
    with tempfile.TemporaryDirectory() as tmp:
        history = train_expert(kind, *train, cfg=cfg, arch_kwargs=arch, dataset="digits", seed=0,
                               flip=False, crop_padding=0, out=Path(tmp) / "e.pt", device=CPU,
                               progress=False)
    return min(h["seconds"] for h in history)


def pgd_pass(test, stats: dict) -> float:
    """Best wall seconds of PGD-10 over every test digit through a 9-expert mixture."""
    shape = tuple(test[0].shape[1:])
    expert = {"num_classes": 10, "width": WIDTH, "in_channels": shape[0], **stats}
    torch.manual_seed(0)
    moe = models.build("softmoe", n_experts=9, expert=expert, input_shape=shape).eval()
    x, y = data.to_unit(test[0]), test[1]
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(0, len(y), args.batch):
            attacks.pgd(moe, x[i:i + args.batch], y[i:i + args.batch], eps=args.eps,
                        alpha=args.eps / 4, steps=10, seed=0)
        times.append(time.perf_counter() - t0)
    return min(times)


rows = {}
for name, (train, test, stats) in SHAPES.items():
    shape = tuple(test[0].shape[1:])
    flop = bench.mixture_flop(bench.BenchConfig(width=WIDTH, input_shape=shape))
    rows[name] = {"benign epoch s": expert_epoch("benign", train, stats),
                  "PGD expert epoch s": expert_epoch("pgd", train, stats),
                  "9-expert PGD-10 pass s": pgd_pass(test, stats),
                  "mixture MFLOP/image": flop / 1e6}
keys = list(next(iter(rows.values())))
print(f"width {WIDTH}, best of {args.repeats}, {torch.get_num_threads()} thread(s); "
      f"PGD expert: steps ~ {{1..5}}; PGD pass: {len(native['test'][1])} digits, batch {args.batch}")
print("| shape | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
for name, r in rows.items():
    print(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
old, new = rows["old 3x32x32"], rows["native 1x8x8"]
print("| ratio old/native | " + " | ".join(f"{old[k] / new[k]:.1f}x" for k in keys) + " |")
