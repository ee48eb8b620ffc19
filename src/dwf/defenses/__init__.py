"""Defenses: how each model is built and trained. One file per defense.

`DEFENSES` (config/defenses.py, the registry) names every system the paper compares against
(Tables 2-3) with its architecture and its recipe by name; `RECIPES` holds the training each
recipe name stands for. `train_defense` builds one from the profile's ResNet-18 arguments and its
settings (params `baselines.<name>`), trains it with the shared loop and writes its checkpoint.
DWF itself lives in `dwf.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from dwf import models
from dwf.config import DEFENSES, TrainConfig
from dwf.config import arch_kwargs as defense_arch_kwargs
from dwf.defenses import advmoe, at, soe, trades
from dwf.defenses.dwf import finish_stage, resume_path
from dwf.train import Phase, Recipe, fit


def _always(recipe: Recipe) -> Callable[[TrainConfig], Recipe]:
    return lambda cfg: recipe


# recipe name (DEFENSES[...].recipe) -> settings -> what fit runs (one recipe per batch, or phases)
RECIPES: dict[str, Callable[[Any], Recipe | Sequence[Phase]]] = {
    "benign": _always(at.benign_batch),
    "fgsm_at": _always(at.fgsm_at_batch),
    "pgd_at": _always(at.pgd_at_batch),
    "trades": _always(trades.trades_batch),
    "soe": _always(soe.soe_batch),
    "advmoe": advmoe.phases,
}


def train_defense(name: str, x: torch.Tensor, y: torch.Tensor, *, cfg: TrainConfig,
                  arch_kwargs: dict[str, Any], dataset: str, seed: int, flip: bool,
                  crop_padding: int, out: Path, device: torch.device, progress: bool = True
                  ) -> list[dict]:
    """Build and train defense `name`, write its checkpoint to `out`.

    Args:
        name: key of DEFENSES.
        x, y: uint8 training images (N, 3, 32, 32) and labels.
        cfg: the defense's settings (params `baselines.<name>`).
        arch_kwargs: the profile's ResNet18 arguments (num_classes, width, mean, std).
        seed: seeds the initialization and every random draw of training.
    Returns:
        per-epoch history.
    """
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; choose one of {', '.join(DEFENSES)}")
    defense = DEFENSES[name]
    kwargs = defense_arch_kwargs(name, arch_kwargs, cfg)
    torch.manual_seed(seed)
    model = models.build(defense.arch, **kwargs).to(device)
    meta = {"arch": defense.arch, "arch_kwargs": kwargs, "dataset": dataset, "defense": name}
    history = fit(model, RECIPES[defense.recipe](cfg), x, y, cfg=cfg, seed=seed, flip=flip,
                  crop_padding=crop_padding, resume_path=resume_path(out), meta=meta,
                  device=device, progress=progress, desc=f"{out.stem} ({name})")
    finish_stage(out, model, meta, cfg, seed, history)
    return history
