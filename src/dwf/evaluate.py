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
from dwf.metricsfile import ATTACKS, FAMILIES, AttackRecord
from dwf.runtime import derive_seed

# (model, x, y, seed) -> x_adv, or {name: x_adv} for an attack that yields several (PGD-10..50)
Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor | dict[str, torch.Tensor]]
Flags = dict[str, torch.Tensor]  # attack name -> per-example correctness (bool, CPU)
Records = dict[str, AttackRecord]  # attack name -> what the attack is


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


def is_mixture(model: nn.Module) -> bool:
    """A model with experts and a gate, through the one interface DWF, SoE and ADVMoE share:
    `n_experts`, `expert(i)` (expert i as a classifier), `expert_logits`, `gate_weights`."""
    return all(hasattr(model, a) for a in ("n_experts", "expert", "expert_logits", "gate_weights"))


def strong_suite(cfg: EvalConfig, model: nn.Module, sources: dict[str, nn.Module]) -> dict[str, Entry]:
    """Attacks aimed at the mixture, at pgd_eps with strong_steps x strong_restarts.

    Margin-type losses (no softmax saturation); for a mixture, PGD on each expert's own loss and
    the gate attack; transfer: PGD on each source model, replayed on the evaluated one.
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
    suite.update(_one(f"strong/transfer_{name}", record("ce", f"transfer:{name}", f"from {name}"),
                      lambda m, x, y, s, f=source: attacks.pgd(f, x, y, **kw, seed=s))
                 for name, source in sources.items())
    return suite


class Resume:
    """Per-batch results of one part of an evaluation, kept in `folder` so a rerun skips them.

    A batch file is reused only if it was saved under the same key (model, data, settings, seed,
    code) and holds what `valid` accepts; otherwise it is recomputed, said once on stderr.

    Args:
        folder: where batch files live (None: keep nothing). key: the run's fingerprint.
        valid: (saved results, batch index) -> whether they have the expected shape.
    """

    def __init__(self, folder: Path | None, key: str, valid: Callable[[Any, int], bool]):
        self.folder, self.key, self.valid = folder, key, valid
        self.said = False

    def get(self, b: int, compute: Callable[[], Any]) -> Any:
        """Batch b's results: read back if saved under this key, else computed and saved."""
        path = self.folder / f"batch{b:05d}.pt" if self.folder is not None else None
        if path is not None and path.is_file():
            saved, why = self._read(path, b)
            if why is None:
                return saved
            self._say(f"{path}: {why}; recomputing")
        out = compute()
        if path is not None:
            atomic_write(path, lambda f: torch.save({"key": self.key, "flags": out}, f))
        return out

    def _read(self, path: Path, b: int) -> tuple[Any, str | None]:
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as e:  # truncated, corrupt, or a pickle that needs code to load
            return None, f"unreadable ({type(e).__name__})"
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            return None, "left by an evaluation of another model, data, setting or code version"
        if not self.valid(saved.get("flags"), b):
            return None, "holds results of an unexpected type or shape"
        return saved["flags"], None

    def _say(self, line: str) -> None:
        if not self.said:  # one line per part, not one per batch
            tqdm.write(line, file=sys.stderr)
            self.said = True


def _flags_of(n: int, batch_size: int) -> Callable[[Any, int], bool]:
    """Validator of saved batch flags: {attack name: bool tensor of the batch's length}."""
    def valid(flags: Any, b: int) -> bool:
        size = min(batch_size, n - b * batch_size)
        return (isinstance(flags, dict) and bool(flags) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) and v.dtype == torch.bool
            and v.shape == (size,) for k, v in flags.items()))
    return valid


def _checks(saved: Any, b: int) -> bool:
    """Validator of saved audit checks: {name: {"pass": bool, "value": ...}}."""
    return isinstance(saved, dict) and all(
        isinstance(c, dict) and isinstance(c.get("pass"), bool) for c in saved.values())


def _merge(chunks: list[Flags], folder: Path | None) -> Flags:
    """Batches' flags concatenated; every batch must name the same attacks."""
    names = set(chunks[0])
    if any(set(c) != names for c in chunks):
        raise ValueError(f"{folder}: batches name different attacks; delete the folder to start afresh")
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


def correct_under(model: nn.Module, suite: dict[str, Entry], x_u8: torch.Tensor, y: torch.Tensor,
                  *, batch_size: int, seed: int, device: torch.device, progress: bool = True,
                  state: Path | None = None, key: str = "") -> Flags:
    """Per-example correctness (bool, (N,)) on clean inputs and under every attack of `suite`.

    With `state`, each finished batch is saved there under `key` and skipped when rerun (Resume).
    """
    n_batches = -(-len(x_u8) // batch_size)
    # one tick per attack and batch: a whole-test-set batch still shows where it is
    bar = tqdm(total=n_batches * len(suite), desc="evaluate", unit="attack", disable=not progress,
               mininterval=1.0)

    def batch(b: int) -> Flags:
        x = to_unit(x_u8[b * batch_size:(b + 1) * batch_size].to(device))
        yb = y[b * batch_size:(b + 1) * batch_size].to(device)
        with torch.no_grad():
            flags = {"clean": (model(x).argmax(1) == yb).cpu()}
        for name, entry in suite.items():
            bar.set_postfix_str(name)
            x_adv = entry.run(model, x, yb, derive_seed(seed, name, b))
            for key, xa in (x_adv.items() if isinstance(x_adv, dict) else [(name, x_adv)]):
                with torch.no_grad():
                    flags[key] = (model(xa).argmax(1) == yb).cpu()
            bar.update()
        return flags

    resume = Resume(state, key, _flags_of(len(x_u8), batch_size))
    chunks = []
    for b in range(n_batches):
        before = bar.n
        chunks.append(resume.get(b, functools.partial(batch, b)))
        bar.update(len(suite) - (bar.n - before))  # a resumed batch counts whole
    bar.close()
    return _merge(chunks, state)


def autoattack_flags(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, cfg: EvalConfig,
                     seed: int, device: torch.device, state: Path | None = None, key: str = ""
                     ) -> Flags:
    """AutoAttack in batches: correctness after each of its attacks, as "autoattack/<name>"."""
    def batch(b: int) -> Flags:
        sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
        flags = adaptive.autoattack(model, to_unit(x_u8[sl].to(device)), y[sl].to(device),
                                   eps=cfg.pgd_eps, version=cfg.autoattack_version,
                                   seed=derive_seed(seed, "autoattack", b),
                                   square_queries=cfg.square_queries)
        return {f"autoattack/{k}": v.cpu() for k, v in flags.items()}

    resume = Resume(state, key, _flags_of(len(x_u8), cfg.batch_size))
    chunks = [resume.get(b, functools.partial(batch, b)) for b in range(-(-len(x_u8) // cfg.batch_size))]
    return _merge(chunks, state)


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


def run_audit(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, cfg: EvalConfig,
              seed: int, device: torch.device, whitebox: torch.Tensor | None = None,
              square_done: torch.Tensor | None = None) -> dict[str, dict]:
    """The audit (dwf.audit) on the first cfg.audit_n examples, Square with cfg.square_queries.

    The audited PGD is the evaluation's (best iterate kept); `whitebox`: per-example correctness
    under every white-box attack of the evaluation, for the Square check; `square_done`:
    AutoAttack's result after its Square, which then stands for the audit's own.
    """
    n = cfg.audit_n or len(x_u8)
    square = functools.partial(adaptive.square, queries=cfg.square_queries,
                               seed=derive_seed(seed, "audit", "square"))
    return audit.audit(model, to_unit(x_u8[:n].to(device)), y[:n].to(device), cfg=cfg, seed=seed,
                       attack=functools.partial(attacks.pgd, keep_best=True), square=square,
                       whitebox=whitebox, square_done=square_done)


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


def _key(prints: list[str], cfg: EvalConfig, seed: int, part: str, names: list[str]) -> str:
    return json.dumps([prints, dataclasses.asdict(cfg), seed, part, names], sort_keys=True)


def evaluate(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *, cfg: EvalConfig,
             seed: int, device: torch.device, progress: bool = True,
             sources: dict[str, nn.Module] | None = None, state: Path | None = None
             ) -> dict[str, Any]:
    """The paper's protocol on the first cfg.n_examples test images (0 = all), then what
    cfg switches on: the strong attacks, AutoAttack (first autoattack_n) and the audit.

    Args:
        model: classifier in eval mode, on `device`, taking [0, 1] images.
        x_u8, y: the test split (uint8 images, labels).
        seed: seeds every attack's random start.
        sources: models to transfer attacks from (name -> model on `device`, eval mode).
        state: folder for per-batch results, so an interrupted run resumes (None: keep nothing).
    Returns:
        metrics dict: accuracies in percent grouped by attack family, the worst case of each
        family (by_family) and over every attack, n_examples, the per-example worst case, the
        audit, settings. dwf.metricsfile splits it into the headline and details files.
    """
    n = cfg.n_examples or len(x_u8)
    x_u8, y = x_u8[:n], y[:n]
    suite = protocol(cfg) | (strong_suite(cfg, model, sources or {}) if cfg.strong else {})
    # what a saved batch must match to be reused: the model, the transfer sources, the data,
    # the code it ran
    prints = [weights_digest(model), *(f"{k}:{weights_digest(f)}" for k, f in sorted((sources or {}).items())),
              tensor_digest(x_u8, y), code_version("dwf.evaluate", "dwf.checkpoint")
              ] if state is not None else []
    flags = correct_under(model, suite, x_u8, y, batch_size=cfg.batch_size, seed=seed,
                          device=device, progress=progress, state=state and state / "attacks",
                          key=_key(prints, cfg, seed, "attacks", list(suite)))
    records = {"clean": CLEAN, **{k: r for entry in suite.values() for k, r in entry.records.items()}}
    if cfg.autoattack:
        n_aa = min(cfg.autoattack_n or n, n)
        flags |= autoattack_flags(model, x_u8[:n_aa], y[:n_aa], cfg=cfg, seed=seed, device=device,
                                  state=state and state / "autoattack",
                                  key=_key(prints, cfg, seed, "autoattack", []))
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
        resume = Resume(state and state / "audit", _key(prints, cfg, seed, "audit", []), _checks)
        # Square is judged against every white-box attack (AutoAttack's own Square left out).
        # AutoAttack's Square ran last, on every example its gradient attacks left, a superset
        # of what all white-box attacks left: where it covered the audited examples, its result
        # answers the check and a second 5000-query Square would only repeat it
        square = [k for k in threat if records[k].loss == "square"]
        whitebox = worst_case({k: v for k, v in threat.items() if k not in square})
        audited = min(cfg.audit_n or n, n)
        done = threat[square[0]] if square and len(threat[square[0]]) >= audited else None
        checks = resume.get(0, lambda: run_audit(model, x_u8, y, cfg=cfg, seed=seed, device=device,
                                                 whitebox=whitebox, square_done=done))
        metrics["audit"] = {**checks,
                            "worst_case_reported": audit.worst_case_check(metrics, threat)}
    worst = worst_case(threat)
    metrics["per_example"] = {"worst_case_correct": "".join("1" if v else "0" for v in worst.tolist())}
    metrics["settings"] = {**dataclasses.asdict(cfg), "seed": seed, "transfer_sources": sorted(sources or {})}
    metrics["environment"] = environment()
    return metrics
