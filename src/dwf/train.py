"""The training loop every defense shares: SGD + cosine annealing per iteration (Table 5),
whole-batch augmentation on the device, a checkpoint after every epoch, exact resume.

A defense supplies a *recipe*: `recipe(model, x, y, cfg, rng) -> (inputs, targets)` turns a
clean augmented batch into the batch the model is trained on (e.g. FGSM images, or the
paper's [clean, FGSM, PGD] triple). A recipe with its own objective (TRADES, SoE) returns an
`Objective` instead, and alternating optimization (ADVMoE's expert and router steps) is a list
of `Phase`s, each one SGD step per batch on its own parameters. All randomness (data order,
augmentation, attack draws) comes from one CPU generator whose state is checkpointed, so a
resumed run is bit-identical. A resume file is used only by a run with the same inputs: it
carries their fingerprint (dwf.fingerprint), and one that differs, or whose weights are not
finite, is set aside with one line saying why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dwf import checkpoint, distributed, fingerprint
from dwf.config import TrainConfig
from dwf.data import augment, batch_indices, to_unit
from dwf.runtime import autocast, memory_format


@dataclasses.dataclass(frozen=True)
class Objective:
    """A recipe's own loss, for objectives that are not cross-entropy on one batch."""

    loss: torch.Tensor     # scalar, minimized
    logits: torch.Tensor   # (M, C), only for the running accuracy
    targets: torch.Tensor  # (M,)


Recipe = Callable[[nn.Module, torch.Tensor, torch.Tensor, TrainConfig, torch.Generator],
                  "tuple[torch.Tensor, torch.Tensor] | Objective"]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One SGD step per batch on a subset of the parameters (alternating optimization).

    Phases run in order on every batch; each updates only `params(model)`, at `lr` (None: the
    stage's lr) under the shared cosine schedule. History reports the first phase.
    """

    recipe: Recipe
    params: Callable[[nn.Module], Iterable[nn.Parameter]]
    lr: float | None = None


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


@contextlib.contextmanager
def crafting(model: nn.Module, bn_mode: str):
    """BatchNorm mode while a recipe crafts attacks: 'eval' uses running statistics and leaves
    them untouched; 'train' uses batch statistics (and updates the running ones)."""
    was_training = model.training
    model.train(bn_mode == "train")
    try:
        yield
    finally:
        model.train(was_training)


def without_timings(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """The per-epoch history without wall-clock seconds: the part that is a pure function of
    the inputs (what a final checkpoint and the training curve keep)."""
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _cosine(total_steps: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _first_bad(model: nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return name
    return None


def _objective(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits, targets) of a recipe's output: cross-entropy unless it brought its own."""
    if isinstance(batch, Objective):
        return batch.loss, batch.logits, batch.targets
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits, targets), logits, targets


def _optimizer(model: nn.Module, phases: Sequence[Phase], cfg: TrainConfig) -> torch.optim.SGD:
    """One SGD whose parameter group k belongs to phase k (SGD skips parameters without grad)."""
    groups = [{"params": list(ph.params(model)), "lr": ph.lr or cfg.lr} for ph in phases]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def fit(model: nn.Module, recipe: Recipe | Sequence[Phase], x_train: torch.Tensor,
        y_train: torch.Tensor, *, cfg: TrainConfig, seed: int, flip: bool, crop_padding: int,
        resume_path: Path,
        meta: dict[str, Any], device: torch.device, progress: bool = True,
        desc: str = "train", inputs: dict[str, str] | None = None) -> list[dict[str, float]]:
    """Train `model` in place with `recipe`; returns per-epoch history.

    Args:
        model: the network, already initialized (seeded by the caller) and on `device`.
        recipe: builds the trained batch from a clean augmented batch; or a list of Phases.
        x_train: uint8 images (N, 3, H, W) (any device); y_train: labels (N,).
        cfg: the stage's TrainConfig.
        seed: seeds the generator of data order, augmentation and attack draws.
        flip, crop_padding: augmentation.
        resume_path: checkpoint written after every epoch, resumed from if present and its
            fingerprint matches this run's; removed by the caller when the stage is done.
        meta: extra fields stored in every checkpoint (arch, arch_kwargs, dataset ...).
        inputs: sha256 of each file the initial model was built from, by name (the joint
            stage's experts); part of the resume fingerprint.
    Returns:
        per-epoch history (loss, acc, lr and wall-clock seconds).
    """
    if cfg.batch_size > len(x_train):  # before anything is allocated on the device
        raise ValueError(f"{desc}: batch_size {cfg.batch_size} is larger than the training data "
                         f"({len(x_train)} examples): an epoch would have no step")
    phases = list(recipe) if isinstance(recipe, Sequence) else [Phase(recipe, nn.Module.parameters)]
    config = {"train": dataclasses.asdict(cfg), "seed": seed, "flip": flip, "crop_padding": crop_padding}
    run_fingerprint = _fingerprint(config, meta, inputs or {}, x_train, y_train)
    x_train, y_train = x_train.to(device), y_train.to(device)
    layout = memory_format(device, cfg.precision)
    model.to(memory_format=layout)
    rng = torch.Generator().manual_seed(seed)
    world, trained = distributed.world(), model
    if world.size > 1:  # under torchrun: every rank builds the global batch and trains on a shard
        if cfg.batch_size % world.size:
            raise ValueError(f"batch_size {cfg.batch_size} does not split over {world.size} processes")
        distributed.require_shardable([ph.recipe for ph in phases], world)
        gpu = None if device.type != "cuda" else [
            device.index if device.index is not None else torch.cuda.current_device()]
        trained = torch.nn.parallel.DistributedDataParallel(distributed.sync_batchnorm(model),
                                                            device_ids=gpu)
    opt = _optimizer(model, phases, cfg)
    steps_per_epoch = len(batch_indices(len(x_train), cfg.batch_size, shuffle=False, drop_last=True))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(cfg.epochs * steps_per_epoch))
    history: list[dict[str, float]] = []
    start = _resume(resume_path, run_fingerprint, model, opt, sched, rng, history, world.main)
    if not distributed.same_on_all_ranks(start, world, device):
        raise TrainingError(f"{desc}: the processes resume at different epochs; {resume_path} "
                            "must be on a file system every rank sees")
    progress = progress and world.main

    for epoch in range(start, cfg.epochs):
        model.train()
        # running sums stay on the device: no host synchronization inside the step loop
        t0, seen = time.perf_counter(), 0
        total = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        batches = batch_indices(len(x_train), cfg.batch_size, shuffle=True, generator=rng, drop_last=True)
        bar = tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False, mininterval=1.0)
        for step, idx in enumerate(bar):
            x = augment(to_unit(x_train[idx]), flip=flip, padding=crop_padding, generator=rng)
            x = x.contiguous(memory_format=layout)
            x, y = world.shard(x), world.shard(y_train[idx])
            for k, phase in enumerate(phases):
                with autocast(cfg.precision, device):  # crafting and forward; backward outside
                    # recipes craft through the plain model: attacks need no gradient sync
                    out = _objective(trained, phase.recipe(model, x, y, cfg, rng))
                # one sync per step (over all ranks): a NaN must stop every rank before the update
                if world.sum(torch.isfinite(out[0]).float()) < world.size:
                    raise TrainingError(f"{desc}: non-finite loss at epoch {epoch + 1}, step {step + 1}; "
                                        f"last good checkpoint: {resume_path}")
                opt.zero_grad(set_to_none=True)
                out[0].backward()
                for other in opt.param_groups[:k] + opt.param_groups[k + 1:]:
                    for p in other["params"]:
                        p.grad = None  # a phase moves only its own parameters
                opt.step()
                if k == 0:
                    loss, logits, targets = out
            sched.step()
            total += loss.detach() * len(targets)
            correct += (logits.detach().argmax(1) == targets).sum()
            seen += len(targets)
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{float(total) / seen:.3f}", refresh=False)
        total, correct = world.sum(total), world.sum(correct)
        seen *= world.size
        bad = _first_bad(model)
        if bad is not None:
            raise TrainingError(f"{desc}: non-finite weight {bad!r} after epoch {epoch + 1}; "
                                f"last good checkpoint: {resume_path}")
        history.append({"epoch": epoch + 1, "loss": float(total) / seen, "acc": int(correct) / seen,
                        "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0})
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]['loss']:.4f} "
                       f"acc {history[-1]['acc']:.4f} ({history[-1]['seconds']:.1f} s)")
        if not world.main:
            continue
        checkpoint.save(resume_path, {
            **meta, "config": config, "fingerprint": run_fingerprint, "epoch": epoch + 1,
            "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": rng.get_state(), "history": history})
    return history


# The code every training stage runs: the defenses package imports each defense (their
# recipes) and this module, and through them the models, attacks, data and config.
STAGE_CODE = ("dwf.defenses",)


def _fingerprint(config: dict, meta: dict, inputs: dict[str, str], x_train: torch.Tensor,
                 y_train: torch.Tensor) -> dict[str, Any]:
    """Everything a run's result depends on, part by part: its settings (training config,
    seed, augmentation), the model it builds (meta: architecture and its arguments), the
    files it starts from, the training data, the code of the modules it runs, and the CPU
    thread count (a float sum's order, hence a CPU result, depends on it: params cpu_threads)."""
    return fingerprint.plain({
        "settings": config, "model": meta, "inputs": inputs,
        "cpu_threads": torch.get_num_threads(),
        "data": fingerprint.tensor_digest(x_train, y_train),
        "code": fingerprint.code_version(*STAGE_CODE)})


def _resume(path: Path, expected: dict, model: nn.Module, opt, sched, rng: torch.Generator,
            history: list, main: bool) -> int:
    """Restore everything from `path` if it belongs to this run; return the epoch to start at.

    A file from other inputs, or one that cannot be trusted (non-finite weights, corrupt), is
    set aside by the main process with one line saying why, and training starts afresh.
    """
    if not path.is_file():
        return 0
    try:
        ckpt = checkpoint.load(path)
        differs = fingerprint.difference(ckpt.get("fingerprint"), expected)
        why = f"its {differs} differs from this run's" if differs else None
    except checkpoint.CheckpointError as e:
        why = str(e).removeprefix(f"{path}: ")
    if why:
        if main:  # the other ranks see the same file and the same reason
            fingerprint.set_aside(path, why)
        return 0
    model.load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    rng.set_state(ckpt["rng"])
    history.extend(ckpt["history"])
    tqdm.write(f"{path}: resuming after epoch {ckpt['epoch']}", file=sys.stderr)
    return int(ckpt["epoch"])
