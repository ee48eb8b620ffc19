"""Training sections of params.yaml: one stage each (Table 5), and the baselines' settings
classes (which row uses which: config/defenses.py).

A training stage's DVC deps name this module, not the evaluation's (config/evaluate.py), so an
evaluation option never retrains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from dwf.config.base import (MAX_BATCH, MAX_EPOCHS, MAX_LOSS_WEIGHT, MAX_LR, MAX_MEMBERS, MAX_STEPS,
                             MAX_WIDTH, at_most, check, choice, in_unit, nonempty, positive)

BN_MODES = ("eval", "train")
ROUTER_OBJECTIVES = ("official", "paper")  # ADVMoE router step, docs/baselines.md
PRECISIONS = ("fp32", "bf16")  # training arithmetic; bf16 = autocast, docs/performance.md


def _own_width(cfg) -> None:
    """A row's own `width` (its network's first-stage channels): a positive, bounded integer."""
    positive(cfg, "width")
    at_most(cfg, MAX_WIDTH, "width")


@dataclass(frozen=True)
class TrainConfig:
    """One training stage (Table 5): SGD with momentum, cosine annealing over all iterations."""

    epochs: int
    batch_size: int = 128            # per view; joint training feeds 3 x batch_size (clean, FGSM, PGD)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    fgsm_eps: tuple[float, ...] = tuple(i / 100 for i in range(1, 10))  # drawn per batch (Alg. 1)
    pgd_eps: float = 8 / 255
    pgd_alpha: float = 2 / 255
    pgd_steps: tuple[int, ...] = (10, 20, 30, 40, 50)  # drawn per batch (Alg. 2)
    attack_bn: str = "eval"          # BatchNorm mode while crafting training attacks (paper silent)
    precision: str = "fp32"          # "bf16": autocast, stem + perturbation + loss stay fp32

    def __post_init__(self):
        positive(self, "epochs", "batch_size", "lr")
        at_most(self, MAX_EPOCHS, "epochs")
        at_most(self, MAX_BATCH, "batch_size")  # a batch above the training set: train.py says so
        at_most(self, MAX_LR, "lr")
        in_unit(self, "pgd_eps", "pgd_alpha", "weight_decay", "momentum")
        nonempty(self, "fgsm_eps", "pgd_steps")
        for e in self.fgsm_eps:
            check(0 <= e <= 1, "fgsm_eps", f"values in [0, 1], got {e}")
        for s in self.pgd_steps:
            check(1 <= s <= MAX_STEPS, "pgd_steps", f"values in [1, {MAX_STEPS}], got {s}")
        choice(self.attack_bn, "attack_bn", BN_MODES)
        choice(self.precision, "precision", PRECISIONS)


@dataclass(frozen=True)
class Ablation:
    """DWF trained another way (issue 22, ablations (b), (c)): what differs from Algorithm 3
    on the nine pretrained experts. A field left at its default keeps DWF's own recipe."""

    experts: tuple[str, ...] = ()       # the experts mixed, a subset of `experts`; empty: all
    pretrained: bool = True             # False: the experts start from a random initialization
    train_experts: bool = True          # False: frozen as pretrained; only the gate learns
    epochs: Optional[int] = None        # the joint phase's epochs; None: joint's own
    fgsm_eps: tuple[float, ...] = ()    # the joint phase's FGSM eps draws; empty: joint's own
    pgd_steps: tuple[int, ...] = ()     # the joint phase's PGD iteration draws; empty: joint's own

    def __post_init__(self):
        check(self.pretrained or self.train_experts, "train_experts",
              "true when pretrained is false (random experts, frozen, would never learn)")
        check(len(set(self.experts)) == len(self.experts), "experts", "unique names")
        if self.epochs is not None:
            positive(self, "epochs")

    def joint(self, cfg: TrainConfig) -> TrainConfig:
        """The joint phase's settings under this ablation (validated as any TrainConfig)."""
        changed = {"epochs": self.epochs, "fgsm_eps": self.fgsm_eps or None,
                   "pgd_steps": self.pgd_steps or None}
        return dataclasses.replace(cfg, **{k: v for k, v in changed.items() if v is not None})


@dataclass(frozen=True)
class AdvTrainConfig(TrainConfig):
    """FGSM-AT / PGD-AT (section 5): a fraction of every batch replaced by its attacked images.

    FGSM-AT draws eps from fgsm_eps; PGD-AT uses pgd_eps, pgd_alpha and steps from pgd_steps.
    """

    adv_fraction: float = 0.5        # "half of each training batch"
    random_start: bool = False       # PGD-AT start: uniform in the ball, or at x

    def __post_init__(self):
        super().__post_init__()
        in_unit(self, "adv_fraction")


@dataclass(frozen=True)
class TradesConfig(TrainConfig):
    """TRADES (Zhang et al. 2019): CE(clean) + beta * KL(adv || clean); PGD on the KL term."""

    beta: float = 6.0
    start_std: float = 0.001         # Gaussian start of the KL attack, pixel units (TRADES code)

    def __post_init__(self):
        super().__post_init__()
        check(0 <= self.beta <= MAX_LOSS_WEIGHT, "beta",
              f"a value in [0, {MAX_LOSS_WEIGHT}], got {self.beta}")
        in_unit(self, "start_std")  # pixel units


@dataclass(frozen=True)
class SoEConfig(TrainConfig):
    """SoE (Cui et al. 2022): sub-models with confidence heads, PGD on the whole ensemble."""

    n_submodels: int = 3
    confidence_weight: float = 1.0   # lambda of the confidence-head loss (official: 1.0)
    random_start: bool = False       # training PGD start (official default: at x)

    def __post_init__(self):
        super().__post_init__()
        positive(self, "n_submodels")
        at_most(self, MAX_MEMBERS, "n_submodels")
        check(0 <= self.confidence_weight <= MAX_LOSS_WEIGHT, "confidence_weight",
              f"a value in [0, {MAX_LOSS_WEIGHT}], got {self.confidence_weight}")


@dataclass(frozen=True)
class ADVMoEConfig(TradesConfig):
    """ADVMoE (Zhang et al. 2023): MoE convolutions, alternating expert and router TRADES steps."""

    n_experts: int = 2
    ratio: float = 0.5               # expert width as a fraction of the dense layer's
    router_lr: float = 0.1           # official code: the model's lr (its --router-lr is unused)
    router_width: int = 16           # router CNN: ResNet-20-like, stages of w, 2w, 4w
    router_blocks: int = 3           # blocks per router stage (3 = ResNet-20)
    router_objective: str = "official"  # "official": alpha*CE(router, y mod E) + beta*KL; "paper"
    router_alpha: float = 6.0        # weight of the official router CE term

    def __post_init__(self):
        super().__post_init__()
        positive(self, "n_experts", "router_lr", "router_width", "router_blocks")
        at_most(self, MAX_MEMBERS, "n_experts", "router_blocks")
        at_most(self, MAX_LR, "router_lr")
        at_most(self, MAX_WIDTH, "router_width")
        check(0 < self.ratio <= 1, "ratio", f"a value in (0, 1], got {self.ratio}")
        choice(self.router_objective, "router_objective", ROUTER_OBJECTIVES)
        check(0 <= self.router_alpha <= MAX_LOSS_WEIGHT, "router_alpha",
              f"a value in [0, {MAX_LOSS_WEIGHT}], got {self.router_alpha}")


@dataclass(frozen=True)
class WideAdvTrainConfig(AdvTrainConfig):
    """PGD-AT of a ResNet-18 at a width of its own (a capacity-matched row), not the profile's."""

    width: int = field(kw_only=True)  # required: the row exists to set it

    def __post_init__(self):
        super().__post_init__()
        _own_width(self)


@dataclass(frozen=True)
class WideTradesConfig(TradesConfig):
    """TRADES of a ResNet-18 at a width of its own (a capacity-matched row)."""

    width: int = field(kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        _own_width(self)


@dataclass(frozen=True)
class ZooConfig(TrainConfig):
    """Plain training of a network of models/zoo.py (the undefended rows of Tables 2-3).

    `width` is the network's own (its first stage's channels, a DenseNet's growth rate): the
    profile's `width` is ResNet-18's, and the networks' sources differ (models/zoo.py).
    """

    width: int = field(kw_only=True)  # required: the public source's value, smaller for CPU

    def __post_init__(self):
        super().__post_init__()
        _own_width(self)
