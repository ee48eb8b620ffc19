"""DWF (section 4): expert pretraining (Algorithms 1-2) and joint end-to-end training (Alg. 3)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dwf import attacks, checkpoint, data, distributed, models
from dwf.config import TrainConfig
from dwf.runtime import choice
from dwf.train import Recipe, crafting, fit, without_timings

# ---------------------------------------------------------------- recipes (one batch each)


@distributed.shardable  # per example, per-batch draws only
def benign_batch(model, x, y, cfg: TrainConfig, rng):
    """Benign expert: clean images."""
    return x, y


def _fgsm_view(model, x, y, cfg: TrainConfig, rng):
    eps = choice(cfg.fgsm_eps, rng)  # Alg. 1: eps ~ Random{0.01, ..., 0.09} per batch
    with crafting(model, cfg.attack_bn):
        return attacks.fgsm(model, x, y, eps=eps)


def _pgd_view(model, x, y, cfg: TrainConfig, rng):
    steps = choice(cfg.pgd_steps, rng)  # Alg. 2: iterations ~ Random{10, ..., 50} per batch
    with crafting(model, cfg.attack_bn):
        # "No random restarts are used during training": start at x
        return attacks.pgd(model, x, y, eps=cfg.pgd_eps, alpha=cfg.pgd_alpha, steps=steps,
                           random_start=False, graph=True)  # CUDA: one capture, every batch


@distributed.shardable  # per example, per-batch draws only
def fgsm_batch(model, x, y, cfg: TrainConfig, rng):
    """FGSM expert (Alg. 1): trained on FGSM images only."""
    return _fgsm_view(model, x, y, cfg, rng), y


@distributed.shardable  # per example, per-batch draws only
def pgd_batch(model, x, y, cfg: TrainConfig, rng):
    """PGD expert (Alg. 2): trained on PGD images only."""
    return _pgd_view(model, x, y, cfg, rng), y


@distributed.shardable  # per example, per-batch draws only
def joint_batch(model, x, y, cfg: TrainConfig, rng):
    """Alg. 3: [clean, FGSM, PGD] crafted through the whole mixture, labels repeated."""
    x_fgsm = _fgsm_view(model, x, y, cfg, rng)
    x_pgd = _pgd_view(model, x, y, cfg, rng)
    return torch.cat([x, x_fgsm, x_pgd]), torch.cat([y, y, y])  # (3N, C, H, W), (3N,)


EXPERT_RECIPES: dict[str, Recipe] = {"benign": benign_batch, "fgsm": fgsm_batch, "pgd": pgd_batch}

# ---------------------------------------------------------------- stages


def resume_path(out: Path) -> Path:
    """Where a stage keeps its per-epoch checkpoint while it runs (git-ignored: *.resume)."""
    return out.with_name(out.name + ".resume")


def finish_stage(out: Path, model: nn.Module, meta: dict[str, Any], cfg: TrainConfig, seed: int,
                 history: list) -> None:
    """Write a finished stage's final checkpoint, then drop its resume file (main process only).

    The checkpoint is a pure function of the stage's inputs (same inputs, same bytes): its
    history leaves out wall-clock times, which the CLI writes beside the training curve.
    """
    if not distributed.world().main:
        return
    checkpoint.save(out, {**meta, "state_dict": model.state_dict(), "epoch": cfg.epochs,
                          "config": {"train": dataclasses.asdict(cfg), "seed": seed},
                          "history": without_timings(history)})
    resume_path(out).unlink(missing_ok=True)


def train_expert(kind: str, x: torch.Tensor, y: torch.Tensor, *, cfg: TrainConfig,
                 arch_kwargs: dict[str, Any], dataset: str, seed: int, flip: bool,
                 crop_padding: int, out: Path, device: torch.device, progress: bool = True
                 ) -> list[dict]:
    """Pretrain one expert (benign, fgsm or pgd) and write its checkpoint to `out`.

    Args:
        kind: recipe name in EXPERT_RECIPES.
        x, y: uint8 training images (N, 3, 32, 32) and labels.
        arch_kwargs: ResNet18 arguments (num_classes, width, mean, std).
        seed: seeds the initialization and every random draw of training.
    Returns:
        per-epoch history.
    """
    if kind not in EXPERT_RECIPES:
        raise ValueError(f"unknown expert kind {kind!r}; choose one of {', '.join(EXPERT_RECIPES)}")
    torch.manual_seed(seed)
    model = models.build("resnet18", **arch_kwargs).to(device)
    meta = {"arch": "resnet18", "arch_kwargs": arch_kwargs, "dataset": dataset,
            "defense": f"dwf_expert_{kind}"}
    history = fit(model, EXPERT_RECIPES[kind], x, y, cfg=cfg, seed=seed, flip=flip,
                  crop_padding=crop_padding, resume_path=resume_path(out), meta=meta,
                  device=device, progress=progress, desc=f"{out.stem} ({kind})")
    finish_stage(out, model, meta, cfg, seed, history)
    return history


def build_mixture(expert_paths: Sequence[Path], *, router_hidden: Sequence[int], seed: int,
                  dataset: str, pretrained: bool = True
                  ) -> tuple[models.SoftMoE, dict[str, Any], dict[str, str]]:
    """The paper's SoftMoE from pretrained experts and a freshly initialized router.

    Args:
        pretrained: False (an ablation): the experts keep the random initialization drawn with
            the router's; their files give only the architecture.
    Returns:
        the mixture, its architecture arguments, and the sha256 of each expert file by name
        (of the bytes its weights were loaded from).
    """
    ckpts, digests = zip(*(checkpoint.read(p) for p in expert_paths))
    kwargs = ckpts[0]["arch_kwargs"]
    for p, c in zip(expert_paths, ckpts):
        if c["arch"] != "resnet18" or c["arch_kwargs"] != kwargs:
            raise checkpoint.CheckpointError(f"{p}: expert architecture differs from {expert_paths[0]}")
        if c.get("dataset") != dataset:
            raise checkpoint.CheckpointError(f"{p}: trained on {c.get('dataset')!r}, not {dataset!r}")
    arch_kwargs = {"n_experts": len(ckpts), "expert": kwargs, "router_hidden": tuple(router_hidden),
                   "input_shape": data.SHAPE[dataset]}
    torch.manual_seed(seed)  # the router's initialization (and the experts', when not pretrained)
    moe = models.build("softmoe", **arch_kwargs)
    for expert, p, c in zip(moe.experts if pretrained else (), expert_paths, ckpts):
        expert.load_state_dict(checkpoint.model_from(c, p).state_dict())
    return moe, arch_kwargs, {Path(p).name: d for p, d in zip(expert_paths, digests)}


class GateOnly(nn.Module):
    """The mixture with its experts frozen as pretrained (an ablation: no joint phase for
    them): their weights take no step and their BatchNorm stays in eval mode, on its running
    statistics, whatever mode training asks for; only the router learns. Attacks still craft
    through the whole mixture (input gradients flow through frozen experts)."""

    def __init__(self, moe: models.SoftMoE):
        super().__init__()
        self.moe = moe
        moe.experts.requires_grad_(False)

    def train(self, mode: bool = True) -> "GateOnly":
        super().train(mode)
        self.moe.experts.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)


def train_joint(expert_paths: Sequence[Path], x: torch.Tensor, y: torch.Tensor, *,
                cfg: TrainConfig, router_hidden: Sequence[int], dataset: str, seed: int,
                flip: bool, crop_padding: int, out: Path, device: torch.device,
                progress: bool = True, pretrained: bool = True, train_experts: bool = True,
                defense: str = "dwf") -> list[dict]:
    """Alg. 3: the experts, unfrozen, and a fresh router trained end to end on mixed batches.

    Args:
        pretrained, train_experts: False for the ablations that start the experts from a
            random initialization, or keep them frozen (GateOnly); cfg carries the others'.
        defense: the name the checkpoint records (dwf, or dwf_<ablation>).
    """
    moe, arch_kwargs, digests = build_mixture(expert_paths, router_hidden=router_hidden,
                                              seed=seed, dataset=dataset, pretrained=pretrained)
    moe = moe.to(device)
    trained = moe if train_experts else GateOnly(moe)
    meta = {"arch": "softmoe", "arch_kwargs": arch_kwargs, "dataset": dataset, "defense": defense,
            "experts": [str(p) for p in expert_paths]}
    if not (pretrained and train_experts):  # in the fingerprint and the checkpoint
        meta["ablation"] = {"pretrained": pretrained, "train_experts": train_experts}
    history = fit(trained, joint_batch, x, y, cfg=cfg, seed=seed, flip=flip,
                  crop_padding=crop_padding, resume_path=resume_path(out), meta=meta,
                  device=device, progress=progress, desc=f"{out.stem} (joint)", inputs=digests)
    finish_stage(out, moe, meta, cfg, seed, history)
    return history


def reroute(mixture_path: Path, routing: str, *, dataset: str, out: Path) -> None:
    """Ablation (a) of issue 22: write DWF's trained mixture under another routing decision
    (dwf.models.ROUTINGS: its experts' uniform average, or top-1 by its gate) as a checkpoint
    of its own, so the pipeline evaluates it like any model. No training: same weights.

    Args:
        mixture_path: DWF's checkpoint (arch softmoe).
        routing: a name in dwf.models.ROUTINGS.
        out: the checkpoint to write; a pure function of the mixture's bytes and `routing`.
    """
    ckpt, digest = checkpoint.read(mixture_path)
    if ckpt["arch"] != "softmoe" or ckpt.get("dataset") != dataset:
        raise checkpoint.CheckpointError(f"{mixture_path}: not a DWF mixture trained on {dataset!r} "
                                         f"(arch {ckpt['arch']!r}, dataset {ckpt.get('dataset')!r})")
    kwargs = {"routing": routing, **ckpt["arch_kwargs"]}
    model = models.build("routed_moe", **kwargs)  # ValueError for an unknown routing
    model.mixture.load_state_dict(checkpoint.model_from(ckpt, mixture_path).state_dict())
    checkpoint.save(out, {"arch": "routed_moe", "arch_kwargs": kwargs, "dataset": dataset,
                          "defense": f"dwf_{routing}", "experts": ckpt.get("experts", []),
                          "state_dict": model.state_dict(), "epoch": ckpt.get("epoch", 0),
                          "config": {"routing": routing, "mixture": {"sha256": digest,
                                                                      **ckpt["config"]}},
                          "history": ckpt.get("history", [])})
