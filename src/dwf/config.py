"""params.yaml -> frozen dataclasses. Unknown keys, wrong types and bad values fail loudly.

The library never reads params.yaml; the CLI loads it here and passes plain values down.
Epsilons and step sizes may be written as fractions ("8/255"); all are [0, 1] pixel units.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

DATASETS = ("cifar10", "svhn", "digits")
EXPERT_KINDS = ("benign", "fgsm", "pgd")
BN_MODES = ("eval", "train")
NORMALIZATIONS = ("correct", "paper")
AUTOATTACK_VERSIONS = ("standard", "plus")
ROUTER_OBJECTIVES = ("official", "paper")  # ADVMoE router step, docs/baselines.md
PRECISIONS = ("fp32", "bf16")  # training arithmetic; bf16 = autocast, docs/performance.md


class ConfigError(ValueError):
    """A bad parameter: the message names the key and what is allowed."""


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
        _positive(self, "epochs", "batch_size", "lr")
        _in_unit(self, "pgd_eps", "pgd_alpha", "weight_decay", "momentum")
        _nonempty(self, "fgsm_eps", "pgd_steps")
        for e in self.fgsm_eps:
            _check(0 <= e <= 1, "fgsm_eps", f"values in [0, 1], got {e}")
        for s in self.pgd_steps:
            _check(s >= 1, "pgd_steps", f"values >= 1, got {s}")
        _choice(self.attack_bn, "attack_bn", BN_MODES)
        _choice(self.precision, "precision", PRECISIONS)


@dataclass(frozen=True)
class AdvTrainConfig(TrainConfig):
    """FGSM-AT / PGD-AT (section 5): a fraction of every batch replaced by its attacked images.

    FGSM-AT draws eps from fgsm_eps; PGD-AT uses pgd_eps, pgd_alpha and steps from pgd_steps.
    """

    adv_fraction: float = 0.5        # "half of each training batch"
    random_start: bool = False       # PGD-AT start: uniform in the ball, or at x

    def __post_init__(self):
        super().__post_init__()
        _in_unit(self, "adv_fraction")


@dataclass(frozen=True)
class TradesConfig(TrainConfig):
    """TRADES (Zhang et al. 2019): CE(clean) + beta * KL(adv || clean); PGD on the KL term."""

    beta: float = 6.0
    start_std: float = 0.001         # Gaussian start of the KL attack, pixel units (TRADES code)

    def __post_init__(self):
        super().__post_init__()
        _check(self.beta >= 0 and self.start_std >= 0, "beta", "beta >= 0 and start_std >= 0")


@dataclass(frozen=True)
class SoEConfig(TrainConfig):
    """SoE (Cui et al. 2022): sub-models with confidence heads, PGD on the whole ensemble."""

    n_submodels: int = 3
    confidence_weight: float = 1.0   # lambda of the confidence-head loss (official: 1.0)
    random_start: bool = False       # training PGD start (official default: at x)

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "n_submodels")
        _check(self.confidence_weight >= 0, "confidence_weight", "a value >= 0")


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
        _positive(self, "n_experts", "router_lr", "router_width", "router_blocks")
        _check(0 < self.ratio <= 1, "ratio", f"a value in (0, 1], got {self.ratio}")
        _choice(self.router_objective, "router_objective", ROUTER_OBJECTIVES)
        _check(self.router_alpha >= 0, "router_alpha", "a value >= 0")


@dataclass(frozen=True)
class Baselines:
    """Settings of every system the paper compares against, by defense name (docs/baselines.md)."""

    resnet18: TrainConfig | None = None
    resnet18_fgsm_at: AdvTrainConfig | None = None
    resnet18_pgd_at: AdvTrainConfig | None = None
    trades: TradesConfig | None = None
    soe: SoEConfig | None = None
    advmoe: ADVMoEConfig | None = None

    def get(self, name: str) -> TrainConfig:
        """The settings of defense `name`; ConfigError if the profile has none."""
        names = [f.name for f in dataclasses.fields(self)]
        _choice(name, "baselines", tuple(names))
        if getattr(self, name) is None:
            raise ConfigError(f"baselines.{name}: no settings for this defense in the profile")
        return getattr(self, name)


@dataclass(frozen=True)
class EvalConfig:
    """The paper's test protocol (Table 4)."""

    n_examples: int = 0              # first-N test examples; 0 = the whole test set
    batch_size: int = 500
    fgsm_eps: tuple[float, ...] = tuple(i / 100 for i in range(1, 10))
    pgd_eps: float = 8 / 255
    pgd_alpha: float = 2 / 255
    pgd_steps: tuple[int, ...] = (10, 20, 30, 40, 50)
    ms_steps: int = 100              # multi-step PGD: 100 iterations ...
    ms_restarts: int = 3             # ... 3 random restarts
    adaptive_steps: int = 100        # "adaptive" PGD-100 through the whole mixture, EoT = 1
    # beyond the paper (evaluation issue): stronger attacks, AutoAttack and the audit
    strong: bool = True              # DLR/margin PGD, gate and single-expert PGD, transfer attacks
    strong_steps: int = 100
    strong_restarts: int = 1
    autoattack: bool = True          # official AutoAttack at pgd_eps on the first autoattack_n
    autoattack_n: int = 0            # 0 = every evaluated example
    autoattack_version: str = "standard"
    audit: bool = True               # gradient-masking and attack sanity checks (dwf.audit)
    audit_n: int = 1000              # first-N examples the audit attacks (0 = all)
    square_queries: int = 5000       # Square attack queries in the audit (AutoAttack: 5000)

    def __post_init__(self):
        _check(self.n_examples >= 0, "n_examples", "an integer >= 0 (0 = all)")
        _check(self.autoattack_n >= 0, "autoattack_n", "an integer >= 0 (0 = all)")
        _check(self.audit_n >= 0, "audit_n", "an integer >= 0 (0 = all)")
        _choice(self.autoattack_version, "autoattack_version", AUTOATTACK_VERSIONS)
        _positive(self, "batch_size", "ms_steps", "ms_restarts", "adaptive_steps", "strong_steps",
                  "strong_restarts", "square_queries")
        _in_unit(self, "pgd_eps", "pgd_alpha")
        _nonempty(self, "fgsm_eps", "pgd_steps")
        for e in self.fgsm_eps:
            _check(0 <= e <= 1, "fgsm_eps", f"values in [0, 1], got {e}")
        for k in self.pgd_steps:
            _check(k >= 1, "pgd_steps", f"values >= 1, got {k}")


@dataclass(frozen=True)
class Profile:
    """Everything about one dataset: data, model size, the two training stages, evaluation."""

    expert: TrainConfig
    joint: TrainConfig
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    width: int = 64                  # ResNet-18 first-stage channels (paper: 64)
    normalization: str = "correct"   # "paper" uses the statistics as printed (swapped)
    flip: bool = False               # horizontal flip augmentation (CIFAR-10 only)
    crop_padding: int = 4            # random-crop padding in pixels
    router_hidden: tuple[int, ...] = (1024, 512, 128)
    baselines: Baselines = field(default_factory=Baselines)

    def __post_init__(self):
        _positive(self, "width")
        _check(self.crop_padding >= 0, "crop_padding", "an integer >= 0")
        _choice(self.normalization, "normalization", NORMALIZATIONS)
        _nonempty(self, "router_hidden")


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    seed: int
    runs: tuple[int, ...]            # run indices; run r derives its seeds from seed + r
    datasets: tuple[str, ...]
    experts: tuple[str, ...]
    profiles: dict[str, Profile]
    baselines: tuple[str, ...] = ()  # systems the pipeline trains per dataset and run (Tables 2-3)
    evaluate_models: tuple[str, ...] = ("dwf",)  # checkpoints the pipeline evaluates per run
    data_root: str = "data"

    def __post_init__(self):
        _nonempty(self, "runs", "datasets", "experts", "evaluate_models")
        _check(all(r >= 0 for r in self.runs) and len(set(self.runs)) == len(self.runs), "runs",
               f"distinct run indices >= 0, got {list(self.runs)}")
        for d in self.datasets:
            _choice(d, "datasets", DATASETS)
            _check(d in self.profiles, "datasets", f"a section '{d}:' for every listed dataset")
        for e in self.experts:
            _check(e.split("_")[0] in EXPERT_KINDS, "experts",
                   f"names starting with one of {', '.join(EXPERT_KINDS)} (e.g. fgsm_0), got {e!r}")
        _check(len(set(self.experts)) == len(self.experts), "experts", "unique names")
        known = tuple(f.name for f in dataclasses.fields(Baselines))
        for b in self.baselines:
            _choice(b, "baselines", known)
            for d in self.datasets:
                self.profiles[d].baselines.get(b)  # every trained baseline needs its settings
        models = ("dwf", *(f"experts/{e}" for e in self.experts), *self.baselines)
        for m in self.evaluate_models:
            _choice(m, "evaluate_models", models)

    def profile(self, dataset: str) -> Profile:
        _choice(dataset, "dataset", DATASETS)
        if dataset not in self.profiles:
            raise ConfigError(f"dataset: no section '{dataset}:' in params")
        return self.profiles[dataset]


def expert_kind(name: str) -> str:
    """'fgsm_2' -> 'fgsm' (the training recipe of an expert)."""
    return name.split("_")[0]


# ---------------------------------------------------------------- loading


def load_params(path: str | Path, dataset: str | None = None,
                overrides: typing.Sequence[str] = ()) -> Params:
    """Read and validate params.yaml. Raises ConfigError naming the key on any problem.

    Args:
        path: the params file.
        dataset: the section `overrides` apply to.
        overrides: "dotted.key=value" strings (value parsed as YAML), e.g. "expert.epochs=2".
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if overrides:
        if dataset is None or not isinstance(raw, dict) or not isinstance(raw.get(dataset), dict):
            raise ConfigError(f"--set: no section '{dataset}:' in {path} to override")
        for item in overrides:
            _override(raw[dataset], item, dataset)
    return parse_params(raw)


def _override(section: dict, item: str, dataset: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. expert.epochs=2")
    *parents, leaf = key.strip().split(".")
    node = section
    for k in parents:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[leaf] = yaml.safe_load(value)


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML) into Params."""
    if not isinstance(raw, dict):
        raise ConfigError("params: expected a mapping at the top level")
    raw = dict(raw)
    if "profiles" in raw:
        raise ConfigError("profiles: unknown key; write one section per dataset (cifar10:, svhn:, digits:)")
    profiles = {d: _build(Profile, raw.pop(d), f"{d}.") for d in DATASETS if d in raw}
    return _build(Params, {**raw, "profiles": profiles}, "")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'params'}: {e}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or len(inner) != 1:
            return value
        return _coerce(value, inner[0], key)  # Optional[X]: validated as X
    if origin is dict:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        return _number(value, key)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # a bug in this module, not in params


def _number(value: Any, key: str) -> float:
    """A float, accepting fractions written as strings ("8/255")."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{key}: expected a number or a fraction like 8/255, got {value!r}")


# ---------------------------------------------------------------- validation helpers


def _check(ok: bool, key: str, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {allowed}")


def _positive(obj: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        _check(v > 0, k, f"a value > 0, got {v}")


def _in_unit(obj: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        _check(0 <= v <= 1, k, f"a value in [0, 1], got {v}")


def _nonempty(obj: Any, *keys: str) -> None:
    for k in keys:
        _check(len(getattr(obj, k)) > 0, k, "a non-empty list")


def _choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, key, f"one of {', '.join(allowed)}, got {value!r}")
