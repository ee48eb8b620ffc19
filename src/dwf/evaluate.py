"""The paper's evaluation protocol (Table 4) on one model -> a metrics dict.

Every attack runs on the same first-N test examples; per example we keep whether it was
classified correctly under each attack, and report the worst case over all of them (an
example counts as robust only if no attack fooled it). Beyond the paper (evaluation issue): the
attacks aimed at the mixture, AutoAttack on the first autoattack_n examples, and the audit.
Long runs keep each finished batch on disk (`state`), so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dwf import adaptive, attacks, audit
from dwf.checkpoint import environment
from dwf.config import EvalConfig
from dwf.data import to_unit
from dwf.fileio import atomic_write
from dwf.fingerprint import code_version, tensor_digest, weights_digest
from dwf.metricsfile import ATTACKS, FAMILIES, AttackRecord, Records
from dwf.models import frozen, is_mixture
from dwf.runtime import derive_seed
from dwf.workers import Part, WorkerDied, run

# (model, x, y, seed) -> x_adv, or {name: x_adv} for an attack that yields several (PGD-10..50)
Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor | dict[str, torch.Tensor]]
Flags = dict[str, torch.Tensor]  # attack name -> per-example correctness (bool, CPU)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One attack run of a suite: the function and the record of each result it yields."""
    records: Records
    run: Attack


CLEAN = AttackRecord("clean", "none", 0.0, 0, 0, "model", "SA")


def _one(name: str, record: AttackRecord, run: Attack) -> tuple[str, Entry]:
    return name, Entry({name: record}, run)


def protocol(cfg: EvalConfig) -> dict[str, Entry]:
    """The paper's attacks (Table 4), keyed by the names of the metrics file.

    Every PGD keeps, per example, its best iterate (attacks.pgd keep_best): an iterate that
    crossed the boundary counts even if a later one crossed back (near ties).
    """
    eps, alpha = cfg.pgd_eps, cfg.pgd_alpha
    suite = dict(_one(f"fgsm/{e:g}", AttackRecord("fgsm", "ce", e, 1, 1, "model", f"FGSM {e:g}"),
                      lambda m, x, y, s, e=e: attacks.fgsm(m, x, y, eps=e)) for e in cfg.fgsm_eps)
    # PGD-10..50 as snapshots of one trajectory: the same as separate runs from one start
    suite["pgd"] = Entry(
        {f"pgd/{k}": AttackRecord("pgd", "ce", eps, k, 1, "model", f"PGD-{k}") for k in cfg.pgd_steps},
        lambda m, x, y, s: {f"pgd/{k}": x_k for k, x_k in attacks.pgd_iterates(
            m, x, y, eps=eps, alpha=alpha, steps=cfg.pgd_steps, seed=s, keep_best=True).items()})
    k, r = cfg.ms_steps, cfg.ms_restarts
    suite.update([_one(f"pgd{k}_ms", AttackRecord("pgd_ms", "ce", eps, k, r, "model", f"PGD-{k} (MS)"),
                       lambda m, x, y, s, k=k: attacks.pgd(m, x, y, eps=eps, alpha=alpha, steps=k,
                                                           restarts=r, seed=s, keep_best=True))])
    # "Adaptive" PGD with EoT = 1 on a deterministic model: PGD through the whole mixture
    k = cfg.adaptive_steps
    suite.update([_one(f"pgd{k}_adaptive",
                       AttackRecord("pgd_adaptive", "ce", eps, k, 1, "model", f"PGD-{k} (A)"),
                       lambda m, x, y, s, k=k: attacks.pgd(m, x, y, eps=eps, alpha=alpha, steps=k,
                                                           seed=s, keep_best=True))])
    return suite


def strong_suite(cfg: EvalConfig, model: nn.Module, sources: dict[str, nn.Module]) -> dict[str, Entry]:
    """Attacks aimed at the mixture, at pgd_eps with strong_steps x strong_restarts.

    Margin-type losses (no softmax saturation); for a mixture, PGD on each expert's own loss and
    the gate attack, and for a hard-routed one PGD through its relaxed router (CE and margin,
    cfg.relax_temperatures annealed), judged on the real model; transfer: PGD on each source
    model, replayed on the evaluated one.
    Attacks on the whole model keep their best iterate; those on another model (an expert, a
    source) keep the last one, since "best" there would be judged by the wrong classifier.
    """
    kw = {"eps": cfg.pgd_eps, "alpha": cfg.pgd_alpha, "steps": cfg.strong_steps,
          "restarts": cfg.strong_restarts}
    budget = (cfg.pgd_eps, cfg.strong_steps, cfg.strong_restarts)

    def record(loss: str, target: str, label: str) -> AttackRecord:
        return AttackRecord("strong", loss, *budget, target, label)

    suite = dict(_one(f"strong/pgd_{loss}", record(loss, "model", f"PGD-{loss.upper()}"),
                      lambda m, x, y, s, loss=loss: attacks.pgd(m, x, y, **kw, seed=s, loss=loss,
                                                                keep_best=True))
                 for loss in ("dlr", "margin"))
    if is_mixture(model):
        suite.update([_one("strong/gate", record("gate", "gate", "gate"),
                           lambda m, x, y, s: adaptive.gate_attack(m, x, y, **kw, seed=s))])
        suite.update(_one(f"strong/expert_{i}", record("ce", f"expert_{i}", f"expert {i}"),
                          lambda m, x, y, s, i=i: attacks.pgd(m.expert(i), x, y, **kw, seed=s))
                     for i in range(model.n_experts))
    if is_mixture(model) and model.hard_routing:  # a soft gate's relaxation is the model itself
        relax = {**kw, "restarts": cfg.relax_restarts}
        suite.update(_one(f"strong/relaxed_{loss}",
                          AttackRecord("strong", loss, cfg.pgd_eps, cfg.strong_steps, cfg.relax_restarts,
                                       "relaxed_router", f"relaxed {loss.upper()}"),
                          lambda m, x, y, s, loss=loss: adaptive.relaxed_pgd(
                              m, x, y, **relax, temperatures=cfg.relax_temperatures, loss=loss, seed=s))
                     for loss in ("ce", "margin"))
    suite.update(_one(f"strong/transfer_{name}", record("ce", f"transfer:{name}", f"from {name}"),
                      lambda m, x, y, s, f=source: attacks.pgd(f, x, y, **kw, seed=s))
                 for name, source in sources.items())
    return suite


class Resume:
    """Results of the parts of an evaluation, kept in `folder` so a rerun skips them.

    A part's file is reused only if it was saved under the same key (model, data, settings,
    seed, code) and holds what the part's `valid` accepts; otherwise it is recomputed, said
    once on stderr. Workers save their own parts (atomic writes: a killed run leaves whole files).

    Args:
        folder: where part files live (None: keep nothing). key: the run's fingerprint.
    """

    def __init__(self, folder: Path | None, key: str):
        self.folder, self.key = folder, key
        self.said = False

    def part(self, name: str, part: Part) -> Part:
        """`part`, its result read back when saved under this key, else computed and saved."""
        return dataclasses.replace(part, run=functools.partial(self._get, name, part.run, part.valid))

    def _get(self, name: str, compute: Callable[[], Any], valid: Callable[[Any], bool]) -> Any:
        path = self.folder / f"{name.replace('/', '__')}.pt" if self.folder is not None else None
        if path is not None and path.is_file():
            saved, why = self._read(path, valid)
            if why is None:
                return saved
            self._say(f"{path}: {why}; recomputing")
        out = compute()
        if path is not None:
            atomic_write(path, lambda f: torch.save({"key": self.key, "result": out}, f))
        return out

    def _read(self, path: Path, valid: Callable[[Any], bool]) -> tuple[Any, str | None]:
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as e:  # truncated, corrupt, or a pickle that needs code to load
            return None, f"unreadable ({type(e).__name__})"
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            return None, "left by an evaluation of another model, data, setting or code version"
        if not valid(saved.get("result")):
            return None, "holds results of an unexpected type or shape"
        return saved["result"], None

    def announce(self) -> None:
        """Say on stderr how many saved parts this run starts from (a rerun after a kill)."""
        saved = list(self.folder.glob("*.pt")) if self.folder is not None and self.folder.is_dir() else []
        if saved:
            tqdm.write(f"resuming: {len(saved)} saved part(s) in {self.folder}", file=sys.stderr)

    def _say(self, line: str) -> None:
        if not self.said:  # one line per evaluation, not one per part
            tqdm.write(line, file=sys.stderr)
            self.said = True


def _flags_of(size: int) -> Callable[[Any], bool]:
    """Validator of a part's flags: {attack name: bool tensor of `size` examples}."""
    def valid(flags: Any) -> bool:
        return (isinstance(flags, dict) and bool(flags) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) and v.dtype == torch.bool
            and v.shape == (size,) for k, v in flags.items()))
    return valid


def _audit_result(result: Any) -> bool:
    """Validator of an audit part: a Run {"correct", "excess"} or a Check {"pass", "value"}."""
    return isinstance(result, dict) and (isinstance(result.get("pass"), bool) or (
        isinstance(result.get("correct"), torch.Tensor) and isinstance(result.get("excess"), float)))


def _cost(records: Records, n_experts: int) -> float:
    """Attack iterations through the whole model, for ordering the parts: snapshots of one
    trajectory cost its longest; an attack on one expert or source about 1 / n_experts."""
    def one(r: AttackRecord) -> float:
        share = 1.0 / n_experts if r.target.startswith(("expert_", "transfer:")) else 1.0
        return r.steps * r.restarts * share
    return max(one(r) for r in records.values())


def _batch_len(n: int, b: int, batch_size: int) -> int:
    """Examples in batch b of n examples in batches of batch_size."""
    return min(batch_size, n - b * batch_size)


def attack_parts(model: nn.Module, suite: dict[str, Entry], x_u8: torch.Tensor, y: torch.Tensor,
                 *, batch_size: int, seed: int, device: torch.device) -> dict[str, Part]:
    """Per batch b, clean correctness ("<b>/clean") and each attack of `suite` ("<b>/<name>"):
    parts returning {result name: correctness (bool, CPU)} on the batch's examples."""
    n_experts = model.n_experts if is_mixture(model) else 1

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        sl = slice(b * batch_size, (b + 1) * batch_size)
        return to_unit(x_u8[sl].to(device)), y[sl].to(device)

    def part(cost: float, fn: Callable[..., Flags], b: int, *args: Any) -> Part:
        return Part(cost, functools.partial(fn, b, *args), _flags_of(_batch_len(len(x_u8), b, batch_size)))

    def clean(b: int) -> Flags:
        x, yb = batch(b)
        with torch.no_grad():
            return {"clean": (model(x).argmax(1) == yb).cpu()}

    def attack(b: int, name: str) -> Flags:
        x, yb = batch(b)
        x_adv = suite[name].run(model, x, yb, derive_seed(seed, name, b))
        flags = {}
        for key, xa in (x_adv.items() if isinstance(x_adv, dict) else [(name, x_adv)]):
            with torch.no_grad():
                flags[key] = (model(xa).argmax(1) == yb).cpu()
        return flags

    parts = {}
    for b in range(-(-len(x_u8) // batch_size)):
        parts[f"{b}/clean"] = part(1, clean, b)
        parts |= {f"{b}/{name}": part(_cost(entry.records, n_experts), attack, b, name)
                  for name, entry in suite.items()}
    return parts


def autoattack_parts(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, cfg: EvalConfig,
                     seed: int, device: torch.device) -> dict[str, Part]:
    """AutoAttack per batch ("<b>/autoattack"): correctness after each of its attacks, as
    "autoattack/<name>"."""
    records = adaptive.autoattack_records(eps=cfg.pgd_eps, version=cfg.autoattack_version,
                                          square_queries=cfg.square_queries)
    cost = sum(r.steps * r.restarts for r in records.values())

    def batch(b: int) -> Flags:
        sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
        flags = adaptive.autoattack(model, to_unit(x_u8[sl].to(device)), y[sl].to(device),
                                   eps=cfg.pgd_eps, version=cfg.autoattack_version,
                                   seed=derive_seed(seed, "autoattack", b),
                                   square_queries=cfg.square_queries)
        return {f"autoattack/{k}": v.cpu() for k, v in flags.items()}

    n = len(x_u8)
    return {f"{b}/autoattack": Part(cost, functools.partial(batch, b), _flags_of(_batch_len(n, b, cfg.batch_size)))
            for b in range(-(-n // cfg.batch_size))}


def _gather(results: dict[str, Flags], part: str) -> Flags:
    """The flags of one part over its batches ("<b>/<part>"), concatenated in batch order."""
    chunks = [flags for name, flags in results.items()
              if name.partition("/")[0].isdigit() and name.partition("/")[2] == part]
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


def audit_parts(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, cfg: EvalConfig,
                seed: int, device: torch.device) -> dict[str, Part]:
    """The audit's parts (dwf.audit.parts) on the first cfg.audit_n examples, as "audit/<name>".
    The audited PGD is the evaluation's (best iterate kept)."""
    n = cfg.audit_n or len(x_u8)
    parts = audit.parts(model, to_unit(x_u8[:n].to(device)), y[:n].to(device), cfg=cfg, seed=seed,
                        attack=functools.partial(attacks.pgd, keep_best=True))
    return {f"audit/{k}": dataclasses.replace(part, valid=_audit_result) for k, part in parts.items()}


def audit_checks(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, results: dict[str, Any], *,
                 cfg: EvalConfig, seed: int, device: torch.device, whitebox: torch.Tensor | None = None,
                 square_done: torch.Tensor | None = None) -> dict[str, dict]:
    """The audit's checks from its parts' results ("audit/<name>"). `whitebox`: per-example
    correctness under every white-box attack of the evaluation, for the Square check;
    `square_done`: AutoAttack's result after its Square, which then stands for the audit's own
    (else the audit runs a Square with cfg.square_queries here)."""
    n = cfg.audit_n or len(x_u8)
    square = functools.partial(adaptive.square, queries=cfg.square_queries,
                               seed=derive_seed(seed, "audit", "square"))
    own = {k.removeprefix("audit/"): v for k, v in results.items() if k.startswith("audit/")}
    return audit.checks(own, cfg, whitebox=whitebox, square_done=square_done, square=audit.square_run(
        model, to_unit(x_u8[:n].to(device)), y[:n].to(device), cfg, square))


def run_audit(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, cfg: EvalConfig,
              seed: int, device: torch.device, workers: int = 1) -> dict[str, dict]:
    """The audit alone (`dwf audit`): its parts in `workers` processes, then its checks."""
    results = run(audit_parts(model, x_u8, y, cfg=cfg, seed=seed, device=device), workers)
    return audit_checks(model, x_u8, y, results, cfg=cfg, seed=seed, device=device)


def worst_case(flags: Flags) -> torch.Tensor:
    """Per example: correct under every attack that ran on it (attacks on a first-N subset
    count only there)."""
    n = max(len(f) for f in flags.values())
    padded = [torch.cat([f, torch.ones(n - len(f), dtype=torch.bool)]) for f in flags.values()]
    return torch.stack(padded).all(dim=0)


def within_budget(flags: Flags, records: Records, eps: float) -> Flags:
    """The attacks of the threat model: every attack whose record's budget is at most `eps`
    (the paper's FGSM sweep reaches 0.09 while its threat model is 8/255; a larger ball is
    another threat model, not a stronger attack)."""
    return {k: v for k, v in flags.items() if records[k].eps <= eps + 1e-12}


def summarize(flags: Flags, records: Records, eps: float) -> dict[str, Any]:
    """Accuracies in percent, grouped like the paper's tables, plus the worst case at `eps`."""
    worst = worst_case(within_budget(flags, records, eps))
    out: dict[str, Any] = {}
    for name, f in flags.items():
        group, _, key = name.partition("/")
        acc = round(100.0 * f.float().mean().item(), 4)
        if key:
            out.setdefault(group, {})[key] = acc
        else:
            out[group] = acc
    out["worst_case"] = round(100.0 * worst.float().mean().item(), 4)
    return out


def gate_usage(model: nn.Module, x_u8: torch.Tensor, device: torch.device, batch_size: int) -> list[float] | None:
    """Mean gate weight per expert on clean inputs (mixtures only)."""
    if not hasattr(model, "gate_weights"):
        return None
    with torch.no_grad():
        w = torch.cat([model.gate_weights(to_unit(x_u8[i:i + batch_size].to(device))).cpu()
                       for i in range(0, len(x_u8), batch_size)])
    return [round(v, 6) for v in w.mean(0).tolist()]


def by_family(flags: Flags, records: Records, eps: float) -> dict[str, float]:
    """Per attack family (AttackRecord.family: fgsm, pgd, pgd_ms, strong, autoattack ...), the
    percent of examples no attack of the family fooled within the threat model `eps`; clean
    left out."""
    families: dict[str, Flags] = {}
    for name, f in within_budget(flags, records, eps).items():
        if records[name] != CLEAN:
            families.setdefault(records[name].family, {})[name] = f
    return {family: audit.accuracy(worst_case(f)) for family, f in families.items()}


def coverage(flags: Flags, records: Records, n: int) -> dict[str, int]:
    """Per attack family, on how many of the n evaluated examples it ran: the worst case counts
    each attack only where it ran (AutoAttack on a first-N subset leaves the rest to the others)."""
    out: dict[str, int] = {}
    for name, f in flags.items():
        family = records[name].family
        out[family] = max(out.get(family, 0), len(f))
    return {family: min(k, n) for family, k in out.items()}


def autoattack_settings(cfg: EvalConfig, n_run: int, n: int) -> dict[str, Any]:
    """What the AutoAttack entry ran: "standard" only when every setting is the standard
    version's (5000 Square queries) and it covered every evaluated example."""
    departs = ([f"square {cfg.square_queries} queries (standard: 5000)"]
               if cfg.square_queries != 5000 else [])
    departs += [f"first {n_run} of {n} examples"] if n_run < n else []
    label = cfg.autoattack_version if not departs else f"custom ({'; '.join(departs)})"
    return {"n_examples": n_run, "version": label, "square_queries": cfg.square_queries}


def _key(prints: list[str], cfg: EvalConfig, seed: int) -> str:
    return json.dumps([prints, dataclasses.asdict(cfg), seed], sort_keys=True)


def evaluate(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, cfg: EvalConfig,
             seed: int, device: torch.device, progress: bool = True,
             sources: dict[str, nn.Module] | None = None, state: Path | None = None,
             workers: int = 1) -> dict[str, Any]:
    """The paper's protocol on the first cfg.n_examples test images (0 = all), then what
    cfg switches on: the strong attacks, AutoAttack (first autoattack_n) and the audit.

    Args:
        model: classifier in eval mode, on `device`, taking [0, 1] images.
        x_u8, y: the test split (uint8 images, labels).
        seed: seeds every attack's random start.
        sources: models to transfer attacks from (name -> model on `device`, eval mode).
        state: folder for each finished part's results, so an interrupted run resumes (None:
            keep nothing).
        workers: processes the independent parts run in (dwf.workers; the result is the same
            for any number).
    Returns:
        metrics dict: accuracies in percent grouped by attack family, the worst case of each
        family (by_family) and over every attack, n_examples, the per-example worst case, the
        audit, settings. dwf.metricsfile splits it into the headline and details files.
    """
    with frozen(model, *(sources or {}).values()):  # attacks need input gradients only
        return _evaluate(model, x_u8, y, cfg=cfg, seed=seed, device=device, progress=progress,
                         sources=sources, state=state, workers=workers)


def _evaluate(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, cfg: EvalConfig,
              seed: int, device: torch.device, progress: bool, sources: dict[str, nn.Module] | None,
              state: Path | None, workers: int) -> dict[str, Any]:
    n = cfg.examples(len(x_u8))
    x_u8, y = x_u8[:n], y[:n]
    suite = protocol(cfg) | (strong_suite(cfg, model, sources or {}) if cfg.strong else {})
    n_aa = min(cfg.autoattack_n or n, n)
    # what a saved part must match to be reused: the model, the transfer sources, the data,
    # the code it ran, the CPU thread count its sums ran with (the workers' too, dwf.workers)
    prints = [weights_digest(model), *(f"{k}:{weights_digest(f)}" for k, f in sorted((sources or {}).items())),
              tensor_digest(x_u8, y), code_version("dwf.evaluate", "dwf.checkpoint"),
              f"cpu_threads:{torch.get_num_threads()}"] if state is not None else []
    resume = Resume(state, _key(prints, cfg, seed))
    resume.announce()
    kw = {"seed": seed, "device": device}
    parts = attack_parts(model, suite, x_u8, y, batch_size=cfg.batch_size, **kw)
    if cfg.autoattack:
        parts |= autoattack_parts(model, x_u8[:n_aa], y[:n_aa], cfg=cfg, **kw)
    if cfg.audit:
        parts |= audit_parts(model, x_u8, y, cfg=cfg, **kw)
    parts = {name: resume.part(name, part) for name, part in parts.items()}
    with tqdm(total=len(parts), desc="evaluate", unit="part", disable=not progress,
              mininterval=1.0) as bar:
        def done(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update()
        try:
            results = run(parts, workers, done)
        except WorkerDied as e:  # the parts that finished are on disk: say so
            if state is None:
                raise
            raise WorkerDied(f"{e}; those are saved in {state}: a rerun resumes") from None

    flags = _gather(results, "clean") | {k: v for name in suite for k, v in _gather(results, name).items()}
    records = {"clean": CLEAN, **{k: r for entry in suite.values() for k, r in entry.records.items()}}
    if cfg.autoattack:
        flags |= _gather(results, "autoattack")
        records |= {f"autoattack/{k}": r for k, r in adaptive.autoattack_records(
            eps=cfg.pgd_eps, version=cfg.autoattack_version, square_queries=cfg.square_queries).items()}
    metrics = {"n_examples": n, **summarize(flags, records, cfg.pgd_eps),
               FAMILIES: by_family(flags, records, cfg.pgd_eps)}
    threat = within_budget(flags, records, cfg.pgd_eps)
    metrics["coverage"] = coverage(flags, records, n)
    metrics[ATTACKS] = {k: dataclasses.asdict(records[k]) for k in flags}
    if cfg.autoattack:
        metrics["autoattack"] |= autoattack_settings(cfg, n_aa, n)
        sub = {k: v[:n_aa] for k, v in threat.items()}
        metrics["autoattack"]["worst_case_all_attacks"] = audit.accuracy(worst_case(sub))
    usage = gate_usage(model, x_u8, device, cfg.batch_size)
    if usage is not None:
        metrics["gate_mean_weight"] = usage
    if cfg.audit:
        # Square is judged against every white-box attack (AutoAttack's own Square left out).
        # AutoAttack's Square ran last, on every example its gradient attacks left, a superset
        # of what all white-box attacks left: where it covered the audited examples, its result
        # answers the check and a second 5000-query Square would only repeat it
        square = [k for k in threat if records[k].loss == "square"]
        whitebox = worst_case({k: v for k, v in threat.items() if k not in square})
        audited = min(cfg.audit_n or n, n)
        done_sq = threat[square[0]] if square and len(threat[square[0]]) >= audited else None
        checks = audit_checks(model, x_u8, y, results, cfg=cfg, whitebox=whitebox,
                              square_done=done_sq, **kw)
        metrics["audit"] = {**checks,
                            "worst_case_reported": audit.worst_case_check(metrics, threat)}
        relaxed = [k for k in threat if records[k].target == "relaxed_router"]
        if relaxed:
            plain = [k for k in threat if records[k].target == "model" and k not in square]
            metrics["audit"]["routing_not_obfuscated"] = audit.relaxation_check(
                worst_case({k: threat[k] for k in plain}), worst_case({k: threat[k] for k in relaxed}))
    worst = worst_case(threat)
    metrics["per_example"] = {"worst_case_correct": "".join("1" if v else "0" for v in worst.tolist())}
    metrics["settings"] = {**dataclasses.asdict(cfg), "seed": seed, "transfer_sources": sorted(sources or {})}
    metrics["environment"] = environment()
    return metrics
