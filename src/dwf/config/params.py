"""params.yaml -> frozen dataclasses. Unknown keys, wrong types and bad values fail loudly.

The library never reads params.yaml; the CLI loads it here and passes plain values down.
Epsilons and step sizes may be written as fractions ("8/255"); all are [0, 1] pixel units.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from dwf.config.base import (EXPERT_NAME, MAX_WIDTH, MODEL_NAME, ConfigError, at_most,
                             check, check_name, choice, nonempty, positive)
from dwf.config.defenses import ABLATION_NAMES, DEFENSES, ROUTING_NAMES, Baselines
from dwf.config.evaluate import EvalConfig
from dwf.config.train import Ablation, TrainConfig
from dwf.data import SHAPE

DATASETS = ("cifar10", "svhn", "digits")
NORMALIZATIONS = ("correct", "paper")
MAX_THREADS = 256  # intra-op CPU threads


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
    ablations: dict[str, Ablation] = field(default_factory=dict)  # by name in ABLATION_NAMES

    def __post_init__(self):
        for name in self.ablations:
            choice(name, "ablations", ABLATION_NAMES)
        positive(self, "width")
        at_most(self, MAX_WIDTH, "width")
        check(self.crop_padding >= 0, "crop_padding", "an integer >= 0")  # upper bound: Params
        choice(self.normalization, "normalization", NORMALIZATIONS)
        nonempty(self, "router_hidden")
        for h in self.router_hidden:
            check(1 <= h <= MAX_WIDTH, "router_hidden", f"values in [1, {MAX_WIDTH}], got {h}")


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    seed: int
    runs: tuple[int, ...]            # run indices; run r derives its seeds from seed + r
    datasets: tuple[str, ...]
    experts: tuple[str, ...]
    profiles: dict[str, Profile]
    baselines: tuple[str, ...] = ()  # systems the pipeline trains per dataset and run (Tables 2-3)
    # DWF's trained mixture under other routing decisions (dwf reroute), models dwf_<routing>
    routings: tuple[str, ...] = ()
    # DWF trained another way (dwf train-joint --ablation), models dwf_<ablation>; each with
    # its settings in every dataset's `ablations:` section
    ablations: tuple[str, ...] = ()
    evaluate_models: tuple[str, ...] = ("dwf",)  # checkpoints the pipeline evaluates per run
    data_root: str = "data"
    # intra-op threads of CPU kernels: a float sum's order, hence a CPU result, depends on it,
    # so it comes from params, not from OMP_NUM_THREADS or the scheduler (issue 15); absent,
    # 1 (what every machine has; params.yaml sets 2)
    cpu_threads: int = 1

    def __post_init__(self):
        check(self.seed >= 0, "seed", f"an integer >= 0, got {self.seed}")  # numpy's SeedSequence
        check(1 <= self.cpu_threads <= MAX_THREADS, "cpu_threads",
              f"an integer in [1, {MAX_THREADS}], got {self.cpu_threads}")
        nonempty(self, "runs", "datasets", "experts", "evaluate_models")
        check(all(r >= 0 for r in self.runs) and len(set(self.runs)) == len(self.runs), "runs",
               f"distinct run indices >= 0, got {list(self.runs)}")
        for d in self.datasets:  # names are checked before anything else reads them
            choice(d, "datasets", DATASETS)
            check(d in self.profiles, "datasets", f"a section '{d}:' for every listed dataset")
        for e in self.experts:
            check_name(e, "experts", EXPERT_NAME)
        check(len(set(self.experts)) == len(self.experts), "experts", "unique names")
        for b in self.baselines:
            choice(b, "baselines", tuple(DEFENSES))
            for d in self.datasets:
                self.profiles[d].baselines.get(b)  # every trained baseline needs its settings
        for r in self.routings:
            choice(r, "routings", ROUTING_NAMES)
        for a in self.ablations:
            choice(a, "ablations", ABLATION_NAMES)
            for d in self.datasets:
                self.ablation(d, a)  # its settings exist and name listed experts only
        models = ("dwf", *(f"experts/{e}" for e in self.experts), *self.baselines,
                  *(f"dwf_{r}" for r in self.routings), *(f"dwf_{a}" for a in self.ablations))
        for m in self.evaluate_models:
            check_name(m, "evaluate_models", MODEL_NAME)
            choice(m, "evaluate_models", models)
        for d, prof in self.profiles.items():
            _check_crop(d, prof.crop_padding)

    def profile(self, dataset: str) -> Profile:
        choice(dataset, "dataset", DATASETS)
        if dataset not in self.profiles:
            raise ConfigError(f"dataset: no section '{dataset}:' in params")
        return self.profiles[dataset]


    def ablation(self, dataset: str, name: str) -> tuple[Ablation, tuple[str, ...]]:
        """Ablation `name`'s settings on `dataset` and the experts its mixture holds."""
        prof = self.profile(dataset)
        choice(name, "ablations", ABLATION_NAMES)
        if name not in prof.ablations:
            raise ConfigError(f"{dataset}.ablations.{name}: no settings for this ablation")
        ab = prof.ablations[name]
        for e in ab.experts:
            choice(e, f"{dataset}.ablations.{name}.experts", self.experts)
        return ab, ab.experts or self.experts


def _check_crop(dataset: str, padding: int) -> None:
    """A random crop keeps at least half the image in each direction: padding <= side / 2."""
    side = min(SHAPE[dataset][1:])  # pixels
    check(padding <= side // 2, f"{dataset}.crop_padding",
          f"an integer in [0, {side // 2}] (half the {side}-pixel image side), got {padding}")


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
    raw = _yaml(path.read_text(), str(path))
    if overrides:
        if dataset is None or not isinstance(raw, dict) or not isinstance(raw.get(dataset), dict):
            raise ConfigError(f"--set: no section '{dataset}:' in {path} to override")
        # a copy: YAML merge keys (svhn: <<: *paper) share nested mappings between sections,
        # and an override of one dataset must not reach another
        raw[dataset] = copy.deepcopy(raw[dataset])
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
    node[leaf] = _yaml(value, f"--set {item!r}")


def _yaml(text: str, where: str) -> Any:
    """YAML's plain values (safe_load: a tag such as !!python/object builds nothing); an error
    in one line naming `where`, the problem and its place."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: not valid YAML ({why}{at})") from None


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


def _baselines(raw: Any, key: str) -> Baselines:
    """Each `baselines.<name>` section parsed into its registry entry's settings class."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    for name in raw:
        if name not in DEFENSES:
            raise ConfigError(f"{key}.{name}: unknown key; allowed: {', '.join(sorted(DEFENSES))}")
    return Baselines({n: _build(DEFENSES[n].settings, v, f"{key}.{n}.") for n, v in raw.items()})


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Baselines:
        return _baselines(value, key)
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
        inner = typing.get_args(hint)[-1] if typing.get_args(hint) else None
        if not dataclasses.is_dataclass(inner) or (  # parse_params builds `profiles` itself
                isinstance(value, dict) and all(isinstance(v, inner) for v in value.values())):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _build(inner, v, f"{key}.{k}.") for k, v in value.items()}
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
