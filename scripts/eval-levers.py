"""The evaluation's two speed levers, each measured side by side with what it replaced
(issue 12 item 2; docs/performance.md):

1. attacks drop an example once an iterate fooled it (attacks.pgd keep_best) vs the same PGD
   on the whole batch at every step: wall time, ratio, and whether the same examples fall;
2. an evaluation's independent parts in worker processes (dwf.workers) vs one after another
   (`--evaluation`; minutes): wall time, ratio, and whether the metrics are identical.

Runs on a checkpoint of the digits study (`cd studies/digits && dvc pull joint@digits-0`),
one thread per process, as the study does.

Usage (from studies/digits): python ../../scripts/eval-levers.py [--checkpoint models/digits/run0/dwf.pt]
    [--steps 100] [--evaluation] [--workers 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dwf import attacks
from dwf import evaluate as ev
from dwf.checkpoint import load_model
from dwf.config import load_params
from dwf.data import load_split, to_unit
from dwf.runtime import derive_seed

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", default="models/digits/run0/dwf.pt")
parser.add_argument("--params", default="params.yaml")
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--evaluation", action="store_true", help="also time a whole evaluation")
parser.add_argument("--workers", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(1)

params = load_params(Path(args.params), "digits", [])
cfg = params.profile("digits").evaluate
model = load_model(args.checkpoint, dataset="digits")
x_u8, y = load_split("digits", Path(params.data_root), "test")
x = to_unit(x_u8)


def whole_batch_pgd(seed: int) -> torch.Tensor:
    """The replaced path: every example attacked at every step, the best iterate kept."""
    x_adv = attacks._pgd_start(x, cfg.pgd_eps, True, torch.Generator().manual_seed(seed))
    fooled = torch.zeros(len(x), dtype=torch.bool)
    for k in range(args.steps + 1):
        grad, _, logits = attacks._grad_and_output(model, x_adv, y, attacks.cross_entropy)
        fooled |= logits.argmax(1) != y
        if k < args.steps:
            x_adv = attacks.project(x_adv + cfg.pgd_alpha * grad.sign(), x, cfg.pgd_eps)
    return fooled


def robust_only_pgd(seed: int) -> torch.Tensor:
    x_adv = attacks.pgd(model, x, y, eps=cfg.pgd_eps, alpha=cfg.pgd_alpha, steps=args.steps,
                        seed=seed, keep_best=True)
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def timed(fn, *a, **kw):
    start = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - start


full, t_full = timed(whole_batch_pgd, 0)
mine, t_mine = timed(robust_only_pgd, 0)
print(f"PGD-{args.steps} (keep best) on {len(x)} digits, {args.checkpoint}, 1 thread:")
print(f"  whole batch every step: {t_full:.1f} s; only what is still robust: {t_mine:.1f} s "
      f"({t_full / t_mine:.2f}x); same examples fooled: {torch.equal(full, mine)} "
      f"(accuracy {100 - 100 * mine.float().mean():.2f}%)")

if args.evaluation:
    kw = {"cfg": cfg, "seed": derive_seed(params.seed, 0, "digits", "evaluate"),
          "device": torch.device("cpu"), "progress": False}
    serial, t_serial = timed(ev.evaluate, model, x_u8, y, **kw)
    parallel, t_par = timed(ev.evaluate, model, x_u8, y, **kw, workers=args.workers)
    serial.pop("environment"), parallel.pop("environment")
    print(f"whole evaluation (no transfer sources): one process {t_serial:.0f} s; {args.workers} "
          f"workers {t_par:.0f} s ({t_serial / t_par:.2f}x); identical metrics: {serial == parallel}")
