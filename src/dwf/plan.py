"""What the whole `dvc repro` costs before it runs: params -> pass counts -> device-hours.

Every stage is counted in *passes* through a network, per example:
  train   - one SGD step (forward + backward through the parameters);
  attack  - one forward + input gradient (an attack iteration);
  forward - one forward without gradient (a prediction, a Square query).
The networks are the ones the stages run: `expert` (one ResNet-18), `mixture` (DWF's experts +
gate), `soe` (every sub-model), `advmoe` (router + MoE network), `advmoe_expert` (the MoE
network with a fixed route), `advmoe_router`, and any other baseline's network by the
baseline's name (e.g. `vgg19`, config.DEFENSES). Passes are priced with measured rates (examples/s
per pass, a table per device under docs/bench/); a network or pass the table lacks is scaled from
a measured one by forward multiply-accumulates, and said to be extrapolated.

Evaluation counts follow dwf.evaluate, dwf.adaptive and dwf.audit. Three things depend on the
model's robustness and are assumptions (`Assumptions`): AutoAttack after APGD-CE, the audit's
own Square where AutoAttack did not cover the audited examples, and every PGD on the model that
keeps its best iterate after its first step (it drops the examples an iterate fooled) run only
on the examples still robust.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any, Callable

from dwf.config import ABLATION_NAMES, DEFENSES, ROUTING_NAMES, Params, Profile, TrainConfig, arch_kwargs, expert_kind
from dwf.data import NUM_CLASSES, SHAPE

# (train, test) examples per dataset: torchvision's CIFAR-10 and SVHN, our digits split (data.py)
SPLIT_SIZES = {"cifar10": (50_000, 10_000), "svhn": (73_257, 26_032), "digits": (1_437, 360)}
PASSES = ("train", "attack", "forward")
# an attack iteration ~ 2 forwards (forward + input gradient; the bench's FLOP convention)
FORWARDS_PER_ATTACK = 2.0
# AutoAttack standard (pyautoattack): APGD-CE 100 iterations (+1 initial gradient); APGD-T and
# FAB-T 9 target classes x 100 iterations; FAB's iteration = one gradient + one prediction
APGD_ITERS, TARGETS, FAB_ITERS = 101, 9, 100
RATES_DIR = Path(__file__).resolve().parents[2] / "docs" / "bench"

Counts = Counter  # (network, pass) -> passes, summed over examples


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What the plan cannot count from params: the share of evaluated examples still robust
    after the paper's protocol and APGD-CE (the rest of AutoAttack, the audit's own Square where
    it runs one, and the steps after the first of a keep_best PGD on the model run on those
    only). Defaults: the digits demo (DWF 55.0% after PGD-100 x 3, its benign expert 0.0%,
    README); every example correct on clean inputs (an upper bound)."""

    robust: float = 0.55       # adversarially trained models
    robust_undefended: float = 0.0  # models trained on clean images only

    def of(self, model: str) -> float:
        undefended = (model in DEFENSES and DEFENSES[model].undefended) or (
            model.startswith("experts/") and expert_kind(model.split("/")[1]) == "benign")
        return self.robust_undefended if undefended else self.robust


def network(model: str) -> str:
    """The network an evaluated or trained model runs: `mixture` (DWF), `expert` (a ResNet-18 at
    the profile's width: an expert or a single-network baseline), else the baseline's own name
    (soe, advmoe, vgg19, a ResNet-18 at a width of its own)."""
    if _dwf_weights(model) or ablation(model):
        return "mixture"
    if model in DEFENSES and (DEFENSES[model].arch != "resnet18" or DEFENSES[model].arch_settings):
        return model
    return "expert"


def ablation(model: str) -> str | None:
    """The ablation a model is DWF trained as (dwf_<ablation>, dwf train-joint --ablation)."""
    name = model.removeprefix("dwf_")
    return name if model.startswith("dwf_") and name in ABLATION_NAMES else None


def mixed_experts(params: Params, dataset: str, model: str) -> tuple[str, ...]:
    """The experts a DWF mixture (DWF, a rerouted or an ablated DWF) holds."""
    name = ablation(model)
    return params.ablation(dataset, name)[1] if name else params.experts


def _dwf_weights(model: str) -> bool:
    """DWF's trained mixture, under its own gate or another routing (dwf_<routing>, dwf reroute):
    the same network, training and transfer sources."""
    return model == "dwf" or (model.startswith("dwf_") and model[4:] in ROUTING_NAMES)


def _hard(model: str) -> bool | None:
    """Whether a rerouted DWF routes hard (dwf.models.ROUTINGS); None: as its network does."""
    if model.startswith("dwf_") and _dwf_weights(model):
        from dwf.models import ROUTINGS

        return ROUTINGS[model[4:]][1]
    return None


def _passes(network: str, times: float = 1.0, **kinds: float) -> Counts:
    """Counts of `kinds` (train=, attack=, forward=) passes through `network`, times `times`."""
    return Counts({(network, k): n * times for k, n in kinds.items() if n})


def _scaled(counts: Counts, times: float) -> Counts:
    return Counts({k: v * times for k, v in counts.items()})

# ---------------------------------------------------------------- training


def examples_per_epoch(n: int, batch_size: int) -> int:
    """Examples one epoch trains on: the last partial batch is dropped (train.fit)."""
    return (n // batch_size) * batch_size


def expert_training(kind: str, cfg: TrainConfig, n: int) -> Counts:
    """Algorithms 1-2: an SGD step per example, after FGSM (1 iteration) or PGD-k (k drawn from
    pgd_steps per batch: its mean) for the attacked experts."""
    attack = {"benign": 0.0, "fgsm": 1.0, "pgd": mean(cfg.pgd_steps)}[kind]
    return _passes("expert", cfg.epochs * examples_per_epoch(n, cfg.batch_size), train=1, attack=attack)


def joint_training(cfg: TrainConfig, n: int, frozen: bool = False) -> Counts:
    """Algorithm 3: FGSM + PGD-k through the mixture, then SGD on [clean, FGSM, PGD]. With the
    experts `frozen` (an ablation) the SGD step is a forward: only the small gate learns."""
    return _passes("mixture", cfg.epochs * examples_per_epoch(n, cfg.batch_size),
                   attack=1 + mean(cfg.pgd_steps), **{"forward" if frozen else "train": 3})


def dwf_training(params: Params, dataset: str, prof: Profile, model: str) -> Counts:
    """Passes of a DWF mixture's whole training: its experts' pretraining and the joint phase,
    as its ablation (if any) changes them; a rerouted DWF's is DWF's."""
    n, name = SPLIT_SIZES[dataset][0], ablation(model)
    if name is None:
        return sum((expert_training(expert_kind(e), prof.expert, n) for e in params.experts),
                   joint_training(prof.joint, n))
    ab, mixed = params.ablation(dataset, name)
    pretraining = [expert_training(expert_kind(e), prof.expert, n) for e in mixed if ab.pretrained]
    return sum(pretraining, joint_training(ab.joint(prof.joint), n, frozen=not ab.train_experts))


def baseline_training(name: str, cfg: Any, n: int) -> Counts:
    """Per defense, by its recipe (config.DEFENSES, dwf.defenses.RECIPES): its attack iterations
    and SGD passes per example, through its network."""
    net, k = network(name), mean(cfg.pgd_steps)
    per_example = {
        "benign": lambda: _passes(net, train=1),
        # adv_fraction of each batch attacked (round(fraction x batch) examples)
        "fgsm_at": lambda: _passes(net, train=1, attack=_fraction(cfg)),
        "pgd_at": lambda: _passes(net, train=1, attack=k * _fraction(cfg)),
        # KL-PGD from the clean prediction, then CE(clean) + KL(adversarial): two passes
        "trades": lambda: _passes(net, forward=1, attack=k, train=2),
        "soe": lambda: _passes(net, attack=k, train=2),
        "advmoe": lambda: _advmoe_batch(cfg, k),
    }[DEFENSES[name].recipe]()
    return _scaled(per_example, cfg.epochs * examples_per_epoch(n, cfg.batch_size))


def _fraction(cfg: Any) -> float:
    return round(cfg.adv_fraction * cfg.batch_size) / cfg.batch_size


def _advmoe_batch(cfg: Any, k: float) -> Counts:
    """Two phases per batch, each crafting its own KL-PGD on the network's and the router's
    outputs (the router runs again as the second head); the expert phase trains on TRADES'
    two passes, the official router phase on the router's two."""
    craft = _passes("advmoe", forward=1, attack=k) + _passes("advmoe_router", forward=1, attack=k)
    router = (_passes("advmoe_router", train=2) if cfg.router_objective == "official"
              else _passes("advmoe", train=2))
    return craft + craft + _passes("advmoe", train=2) + router

# ---------------------------------------------------------------- evaluation


def pgd_cost(steps: int, restarts: int = 1, keep_best: bool = True, ranked: bool = False,
             robust: float = 1.0) -> tuple[float, float]:
    """(attack, forward) passes per example of one PGD call and its correctness check.

    keep_best scores the last iterate with one more forward per restart, and drops an example
    as soon as an iterate fooled it (attacks._pgd_best): each restart's first gradient is taken
    on every example, its other steps - 1 on the `robust` share (an assumption: the share the
    model keeps at the end). Its forwards stay counted on every example (an upper bound).
    Several restarts (or a `ranked` call: pgd_objective always ranks) add one forward per
    restart (worst_of).
    """
    shrink = robust if keep_best else 1.0  # the last iterate: every example takes every step
    forwards = restarts * keep_best + (restarts if restarts > 1 or ranked else 0) + 1
    return restarts * (1 + (steps - 1) * shrink), forwards


def protocol(cfg: Any, net: str, n: int, robust: float) -> Counts:
    """The paper's attacks (evaluate.protocol) on all n examples, clean predictions included:
    FGSM on every example; the PGD runs keep their best iterate, their steps after the first
    priced on the `robust` share (pgd_cost)."""
    runs = [pgd_cost(max(cfg.pgd_steps), robust=robust),
            pgd_cost(cfg.ms_steps, cfg.ms_restarts, robust=robust),
            pgd_cost(cfg.adaptive_steps, robust=robust)]
    attack = len(cfg.fgsm_eps) + sum(a for a, _ in runs)
    # clean; FGSM's check; PGD-10..50's checks beyond the one pgd_cost counts
    forward = 1 + len(cfg.fgsm_eps) + len(cfg.pgd_steps) - 1 + sum(f for _, f in runs)
    return _passes(net, n, attack=attack, forward=forward)


@dataclasses.dataclass(frozen=True)
class Mixture:
    """How an evaluated mixture runs in the strong suite (evaluate.strong_suite): its members'
    network, one `expert_logits` forward, one iteration of the gate attack's objective (one
    `route` pass with the route forced), and whether its routing is hard (then it also gets the
    relaxed-router PGD, CE and margin: one `route` pass with input gradient per iteration)."""

    member: str
    logits: Callable[[str, int], Counts]     # (network, members) -> passes
    objective: Callable[[str, int], Counts]
    hard: bool = False


MIXTURES = {
    "mixture": Mixture("expert", lambda net, m: _passes(net, forward=1),
                       lambda net, m: _passes(net, attack=1)),
    "soe": Mixture("expert", lambda net, m: _passes(net, forward=1),
                   lambda net, m: _passes(net, attack=1), hard=True),
    # ADVMoE's expert_logits routes the batch through each of its m experts in turn; `route`
    # computes every expert's filters in each MoE layer (MoEConv2d), whatever the gate
    "advmoe": Mixture("advmoe_expert", lambda net, m: _passes("advmoe_expert", forward=m),
                      lambda net, m: _passes(net, attack=1), hard=True),
}


def strong(cfg: Any, net: str, members: int, sources: int, n: float, robust: float,
           hard: bool | None = None) -> Counts:
    """The strong suite on n examples: DLR and margin PGD (keep_best: their steps after the
    first on the `robust` share, pgd_cost); for a mixture the gate attack and PGD on each member,
    for a hard-routed one the relaxed-router PGD (priced like keep_best); PGD on each transfer source (an expert). The last three take every step on every example
    (the last iterate). Each ends with a check on the model."""
    k, r = cfg.strong_steps, cfg.strong_restarts
    a, f = pgd_cost(k, r, robust=robust)
    per = _passes(net, attack=2 * a, forward=2 * f)
    a_other, f_other = pgd_cost(k, r, keep_best=False)  # on another network, checked on the model

    def other(network: str) -> Counts:
        return _passes(network, attack=a_other, forward=f_other - 1) + _passes(net, forward=1)

    if net in MIXTURES:
        mix = MIXTURES[net]
        per += mix.logits(net, members) + _scaled(mix.objective(net, members), k * r)
        per += _passes(net, forward=pgd_cost(k, r, keep_best=False, ranked=True)[1])
        per += _scaled(other(mix.member), members)
        if mix.hard if hard is None else hard:  # relaxed_pgd, CE and margin: a check on the model after every iteration
            a_rel, _ = pgd_cost(k, cfg.relax_restarts, robust=robust)
            per += _passes(net, attack=2 * a_rel, forward=2 * (a_rel + 1))
    per += _scaled(other("expert"), sources)
    return _scaled(per, n)


def autoattack(cfg: Any, net: str, n: int, robust: float) -> Counts:
    """AutoAttack standard, one attack after the other on the examples still robust: APGD-CE on
    all n (after one clean check), APGD-T, FAB-T and Square on the robust share (an upper
    bound: nobody is fooled inside an attack). Its bookkeeping forwards are left out."""
    rest = robust * n
    return (_passes(net, n, attack=APGD_ITERS, forward=1)
            + _passes(net, rest, attack=TARGETS * (APGD_ITERS + FAB_ITERS),
                      forward=TARGETS * FAB_ITERS + cfg.square_queries))


def audit(cfg: Any, net: str, n: int, robust: float, square: bool = True) -> Counts:
    """dwf.audit on n examples: the eps sweep, FGSM, the iteration sweep and its doubling,
    large eps, the binarization test, with `square` its own Square on the robust share (else
    AutoAttack's is read); the model checks on one batch. The known-adversary test attacks a
    linear probe (no model pass).

    Its PGD runs keep their best iterate (pgd_cost): the eps sweep below eps takes its steps on
    every example (more survive a smaller ball: an upper bound), at eps and above on the
    `robust` share (at 2 eps and the large eps an upper bound), as the iteration sweep, its
    doubling and the binarization test do; at eps 0 one step (audit.attack_parts)."""
    from dwf.audit import EPS_FRACTIONS, INNER_SAMPLES

    k, r = cfg.strong_steps, cfg.strong_restarts
    iters = sorted({(max(1, k // 4), 1), (max(1, k // 2), 1), (k, r)} - {(k, 1)}) + [(2 * k, 2 * r)]
    runs = [pgd_cost(k if f else 1, robust=robust if f >= 1 else 1.0) for f in EPS_FRACTIONS]
    runs += [pgd_cost(s, rr, robust=robust) for s, rr in iters] + [pgd_cost(max(k, 20), robust=robust)]
    # the binarization test's probe has an adversarial point in every image's ball, which the
    # attack must find for nearly all (BINARIZED_FOUND): few hold out, so it is priced as the
    # model's own attacks at eps (an estimate; an undefended model's images are all crossed)
    runs += [(1, 1), pgd_cost(k, r, robust=robust)]  # FGSM; binarized model
    # clean check; binarization: the image, INNER_SAMPLES inner points, the target, 2 sanity checks
    forward = 1 + sum(f for _, f in runs) + 1 + INNER_SAMPLES + 1 + 2
    batch = min(cfg.batch_size, n)  # input gradients (CE, margin), determinism (2), logits (1)
    return (_passes(net, n, attack=sum(a for a, _ in runs), forward=forward)
            + _passes(net, batch, attack=2, forward=3)
            + _passes(net, robust * n if square else 0, forward=cfg.square_queries + 1))

# ---------------------------------------------------------------- networks and rates


def macs(model: Any, call: Callable, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the convolutions and linear layers that call(one image of
    `shape`) runs, counted at the functions (F.conv2d, F.linear): eval-mode BatchNorm folds
    into F.conv2d calls that no Conv2d module makes (resnet.fold)."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    total = 0

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal total
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func in (F.conv2d, F.linear):
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                total += out[0].numel() * weight[0].numel()  # per output: in/groups x kernel
            return out

    with torch.no_grad(), Count():
        call(torch.zeros(1, *shape))
    return total


def network_macs(width: int, shape: tuple[int, ...], n_experts: int, *, classes: int = 10,
                 router_hidden: tuple[int, ...] = (1024, 512, 128),
                 baselines: dict[str, TrainConfig] | None = None) -> dict[str, int]:
    """Forward MACs per example of the networks the stages run, built as dwf.models builds them
    (on the CPU, one image: about two seconds at width 64). `baselines`: the settings of the
    baselines to count, by name; a ResNet-18 one is the expert."""
    from dwf import models

    arch = {"num_classes": classes, "width": width, "mean": (0.5,) * shape[0],
            "std": (0.25,) * shape[0], "in_channels": shape[0]}
    expert = models.build("resnet18", **arch).eval()
    mixture = models.build("softmoe", n_experts=n_experts, expert=arch, router_hidden=router_hidden,
                           input_shape=shape).eval()
    mixture.batched = False  # the expert loop: its heads are F.linear calls (batched: one einsum)
    out = {"expert": macs(expert, expert, shape), "mixture": macs(mixture, mixture, shape)}
    for name, cfg in (baselines or {}).items():
        if network(name) in out:
            continue
        model = models.build(DEFENSES[name].arch, **arch_kwargs(name, arch, cfg)).eval()
        out[name] = macs(model, model, shape)
        if name == "advmoe":  # its mixture parts (MIXTURES)
            out |= {"advmoe_expert": macs(model, model.expert(0), shape),
                    "advmoe_router": macs(model, model.router_scores, shape)}
    return out


@dataclasses.dataclass(frozen=True)
class Rate:
    """Examples per second of one pass through one network, and where the number comes from."""

    per_s: float
    measured: bool
    source: str


# the device whose rates price a configuration when the user names none: the digits study is
# the CPU profile, the paper's datasets are trained on GPUs (docs/bench/h200.json)
GPU_REFERENCE = "NVIDIA H200"


def reference_device(datasets: Sequence[str]) -> str:
    """The device a configuration is priced on by default: "cpu" for digits alone, else the GPU."""
    return "cpu" if set(datasets) <= {"digits"} else GPU_REFERENCE


def load_rates(path: Path | None, device: str) -> tuple[Path, dict]:
    """A rate table file: `path`, or the one under docs/bench/ whose "device" is `device`."""
    if path is None:
        found = [p for p in sorted(RATES_DIR.glob("*.json")) if _device_of(p) == device]
        if not found:
            raise ValueError(f"no rate table for device {device!r} in {RATES_DIR}; pass --rates FILE")
        path = found[0]
    table = _read_json(Path(path))
    if not isinstance(table, dict) or not isinstance(table.get("tables"), dict):
        raise ValueError(f"{path}: not a rate table (no 'tables' mapping)")
    return Path(path), table


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable as JSON ({e})") from None


def _device_of(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data.get("device") if isinstance(data, dict) and "tables" in data else None


class Pricing:
    """Rates of a profile's networks from a rate file's tables ("train/bf16", "evaluate/fp32").

    A rate measured for the network at the profile's sizes is used as it is. Otherwise it is
    extrapolated by the ratio of forward MACs: from the same network measured at the table's
    sizes, else from the expert, else the mixture; a missing forward rate is the attack rate
    x FORWARDS_PER_ATTACK. `used` keeps every rate priced, for the report.

    Args:
        tables: the rate file's "tables".
        macs_here: network_macs at the profile's sizes.
        macs_there: table -> network_macs at the table's sizes (expert and mixture).
    """

    def __init__(self, tables: dict, macs_here: dict[str, int], macs_there: Callable[[dict], dict]):
        self.tables, self.macs_here, self.macs_there = tables, macs_here, macs_there
        self.used: dict[str, Rate] = {}

    def rate(self, table: str, network: str, kind: str) -> Rate:
        key = f"{table}: {network} {kind}"
        if key not in self.used:
            self.used[key] = self._rate(table, network, kind)
        return self.used[key]

    def _rate(self, name: str, network: str, kind: str) -> Rate:
        if name not in self.tables:
            raise ValueError(f"the rate file has no {name!r} table (has: {', '.join(self.tables)})")
        table = self.tables[name]
        there = self.macs_there(table)
        for ref in dict.fromkeys((network, "expert", "mixture")):
            entry = table["rates"].get(ref, {}).get(kind)
            if entry is None or ref not in there:
                continue
            ratio = there[ref] / self.macs_here[network]
            if ref == network and abs(ratio - 1) < 1e-9:
                return Rate(entry["per_s"], True, entry["source"])
            return Rate(entry["per_s"] * ratio, False, f"{ref} {kind} {entry['per_s']:.5g}/s x FLOP "
                        f"ratio {ratio:.3g} ({entry['source']})")
        if kind == "forward":
            attack = self.rate(name, network, "attack")
            return Rate(attack.per_s * FORWARDS_PER_ATTACK, False,
                        f"attack rate x {FORWARDS_PER_ATTACK:g} (an attack iteration ~ 2 forwards)")
        raise ValueError(f"rate table {name!r} has no {kind} rate to price {network} from")

    def hours(self, table: str, counts: Counts) -> float:
        """Device-hours of `counts` at the rates of `table`."""
        return sum(n / self.rate(table, net, kind).per_s for (net, kind), n in counts.items()) / 3600

# ---------------------------------------------------------------- the plan


def _members(model: str, params: Params, prof: Profile, dataset: str) -> int:
    """Members of an evaluated mixture (experts, sub-models); 0 for a single network."""
    if network(model) == "mixture":
        return len(mixed_experts(params, dataset, model))
    counts = {"soe": "n_submodels", "advmoe": "n_experts"}  # their settings' member count
    return getattr(prof.baselines.get(model), counts[model]) if model in counts else 0


def system_training(params: Params, dataset: str, prof: Profile, model: str) -> Counts:
    """Passes of the whole training of an evaluated system on `dataset`: DWF's is its experts'
    pretraining plus the joint phase; an expert's (experts/<name>) or a baseline's, its job."""
    n = SPLIT_SIZES[dataset][0]
    if network(model) == "mixture":
        return dwf_training(params, dataset, prof, model)
    if model.startswith("experts/"):
        return expert_training(expert_kind(model.split("/", 1)[1]), prof.expert, n)
    return baseline_training(model, prof.baselines.get(model), n)


# forward-pass equivalents of a pass (the bench's FLOP convention): an SGD step is a forward
# and a backward through activations and weights (about two forwards)
FORWARDS = {"train": 3.0, "attack": FORWARDS_PER_ATTACK, "forward": 1.0}


def training_cost(params: Params, dataset: str, prof: Profile, model: str) -> dict[str, float]:
    """Multiply-accumulates of `model`'s whole training (every attack step and, for DWF, its
    experts' pretraining), counted from params as `dwf plan` counts them.

    Returns:
        {"train_tmacs": tera-MACs, "train_passes": {"<network> <pass>": passes}}.
    """
    counts = system_training(params, dataset, prof, model)
    nets = {net for net, _ in counts}
    experts = len(mixed_experts(params, dataset, model))  # the mixture it trained
    macs = network_macs(prof.width, SHAPE[dataset], experts, classes=NUM_CLASSES[dataset],
                        router_hidden=prof.router_hidden,
                        baselines={b: prof.baselines.get(b) for b in nets if b in DEFENSES})
    total = sum(n * FORWARDS[kind] * macs[net] for (net, kind), n in counts.items())
    return {"train_tmacs": round(total / 1e12, 6),
            "train_passes": {f"{net} {kind}": n for (net, kind), n in sorted(counts.items())}}


def training_jobs(params: Params, dataset: str, prof: Profile) -> list[tuple[str, str, Counts]]:
    """(stage, name, counts) of every training job of one run on `dataset`."""
    n = SPLIT_SIZES[dataset][0]
    jobs = [("expert", expert_kind(e), expert_training(expert_kind(e), prof.expert, n))
            for e in params.experts]
    jobs.append(("joint", "dwf", joint_training(prof.joint, n)))
    for name in params.ablations:  # priced as nine experts' mixture: an upper bound for fewer
        ab = params.ablation(dataset, name)[0]
        jobs.append(("ablation", name, joint_training(ab.joint(prof.joint), n, not ab.train_experts)))
    return jobs + [("baseline", b, baseline_training(b, prof.baselines.get(b), n))
                   for b in params.baselines]


def evaluation_parts(params: Params, dataset: str, prof: Profile, model: str,
                     assume: Assumptions) -> dict[str, Counts]:
    """Counts of one evaluation (one model, run and dataset) by part, as cfg switches them on."""
    cfg, n_test = prof.evaluate, SPLIT_SIZES[dataset][1]
    n = min(cfg.n_examples or n_test, n_test)
    net, robust = network(model), assume.of(model)
    parts = {"protocol": protocol(cfg, net, n, robust)}
    if net in MIXTURES:  # mean gate weight on clean inputs (evaluate.gate_usage)
        parts["protocol"] += _passes(net, n, forward=1)
    if cfg.strong:  # on every example; transfer from DWF's own experts
        sources = len(mixed_experts(params, dataset, model)) if net == "mixture" else 0
        parts["strong"] = strong(cfg, net, _members(model, params, prof, dataset), sources, n, robust,
                                 _hard(model))
    n_aa, n_audit = min(cfg.autoattack_n or n, n), min(cfg.audit_n or n, n)
    if cfg.autoattack:
        parts["autoattack"] = autoattack(cfg, net, n_aa, robust)
    if cfg.audit:  # AutoAttack's Square, where it covered the audited examples, is the audit's
        own_square = not (cfg.autoattack and n_aa >= n_audit)
        parts["audit"] = audit(cfg, net, n_audit, robust, square=own_square)
    return parts


def plan(params: Params, profiles: dict[str, Profile], rates: dict,
         assume: Assumptions = Assumptions()) -> dict[str, Any]:
    """Jobs and device-hours of the whole pipeline: every training and evaluation job of every
    dataset and run.

    Args:
        params: the params file (datasets, runs, experts, baselines, evaluate_models).
        profiles: dataset -> its profile (with any overrides applied).
        rates: a rate file's contents (load_rates).
    Returns:
        {"rows": one per (dataset, stage, name), "stages", "total", "rates", "assumptions"}.
    """
    runs, rows = len(params.runs), []
    used: dict[tuple[str, Rate], list[str]] = {}
    cache: dict[str, dict[str, int]] = {}

    def macs_there(table: dict) -> dict[str, int]:
        key = json.dumps([table["width"], table["input_shape"], table["n_experts"]])
        if key not in cache:
            cache[key] = network_macs(table["width"], tuple(table["input_shape"]), table["n_experts"])
        return cache[key]

    for d in params.datasets:
        prof = profiles[d]
        here = network_macs(prof.width, SHAPE[d], len(params.experts), classes=NUM_CLASSES[d],
                            router_hidden=prof.router_hidden,
                            baselines={b: prof.baselines.get(b) for b in params.baselines})
        pricing = Pricing(rates["tables"], here, macs_there)
        for stage, name, counts in training_jobs(params, d, prof):
            precision = (prof.joint if stage in ("joint", "ablation") else prof.expert if stage == "expert"
                         else prof.baselines.get(name)).precision
            hours = pricing.hours(f"train/{precision}", counts)
            rows.append(_row(d, "train", f"{stage} {name}", runs, {"train": hours}, counts))
        for model in params.evaluate_models:
            parts = evaluation_parts(params, d, prof, model, assume)
            hours = {k: pricing.hours("evaluate/fp32", c) for k, c in parts.items()}
            rows.append(_row(d, "evaluate", f"evaluate {model}", runs, hours, sum(parts.values(), Counts())))
        for k, r in pricing.used.items():  # one entry per rate, naming the datasets it prices
            used.setdefault((k, r), []).append(d)
    stages = {s: {"jobs": sum(r["jobs"] for r in rows if r["stage"] == s),
                  "hours": sum(r["hours"] for r in rows if r["stage"] == s)} for s in ("train", "evaluate")}
    total = {"jobs": sum(s["jobs"] for s in stages.values()),
             "hours": sum(s["hours"] for s in stages.values())}
    rates_used = [{"rate": k, "datasets": ds, **dataclasses.asdict(r)} for (k, r), ds in used.items()]
    return {"rows": rows, "stages": stages, "total": total, "rates": rates_used,
            "assumptions": dataclasses.asdict(assume)}


def rule_hours(result: dict[str, Any]) -> dict[str, float]:
    """Hours of the longest job of each pipeline rule (expert, joint, baseline, evaluate): what
    a cluster's time limit for the rule must allow (scripts/slurm-profile.py writes the SLURM
    profile's runtimes from it; tests/test_plan.py holds the profiles to it)."""
    longest: dict[str, float] = {}
    for r in result["rows"]:
        rule = r["name"].split()[0]  # "expert pgd", "evaluate dwf": the rule, then the job
        longest[rule] = max(longest.get(rule, 0.0), r["hours_per_job"])
    return longest


def _row(dataset: str, stage: str, name: str, runs: int, hours: dict[str, float], counts: Counts
         ) -> dict[str, Any]:
    """One (dataset, job kind) line: `runs` jobs of `hours` each (by part)."""
    return {"dataset": dataset, "stage": stage, "name": name, "jobs": runs,
            "hours_per_job": sum(hours.values()), "hours": runs * sum(hours.values()),
            "parts": {k: runs * h for k, h in hours.items()},
            "passes_per_job": {f"{net} {kind}": n for (net, kind), n in sorted(counts.items())}}


def table(result: dict[str, Any]) -> str:
    """The plan as Markdown: a line per job kind (datasets summed), the stages, the total, and
    each rate with where it comes from."""
    parts = ("protocol", "strong", "autoattack", "audit")
    merged: dict[str, dict] = {}
    for r in result["rows"]:
        m = merged.setdefault(r["name"], {"jobs": 0, "hours": 0.0, "parts": Counter()})
        m["jobs"] += r["jobs"]
        m["hours"] += r["hours"]
        m["parts"].update(r["parts"])
    lines = ["| job | jobs | " + " | ".join(parts) + " | device-hours |",
             "|---|---:|" + "---:|" * len(parts) + "---:|"]
    for name, m in merged.items():
        cells = [_h(m["parts"][p]) if p in m["parts"] else "" for p in parts]
        lines.append(f"| {name} | {m['jobs']} | " + " | ".join(cells) + f" | {_h(m['hours'])} |")
    for stage, s in result["stages"].items():
        lines.append(f"| **{stage}** | {s['jobs']} |" + " |" * len(parts) + f" **{_h(s['hours'])}** |")
    t = result["total"]
    lines.append(f"| **total** | {t['jobs']} |" + " |" * len(parts) + f" **{_h(t['hours'])}** |")
    lines.append("\nrates (examples/s per pass):")
    lines += [f"- {r['rate']} ({', '.join(r['datasets'])}): {r['per_s']:.5g}, "
              f"{'measured' if r['measured'] else 'extrapolated'}: {r['source']}" for r in result["rates"]]
    return "\n".join(lines)


def _h(hours: float) -> str:
    """Hours as a person reads them: 1,347 / 18.7 / 0.87; under a minute in seconds."""
    if hours >= 100:
        return f"{hours:,.0f}"
    if hours >= 1 / 60:
        return f"{hours:.3g}"
    seconds = hours * 3600
    return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.2f} s"
