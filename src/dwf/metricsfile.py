"""The evaluate stage's two files: the numbers DVC shows, and everything else beside them.

`<model>.json`, the file dvc.yaml declares as metrics, is flat and holds numbers only, so that
`dvc metrics show` and `dvc exp show` fit a screen: the examples evaluated, clean accuracy, the
system's parameters and training cost (COST), the worst case of each attack family (an example
counts as robust only if every attack of the
family within the threat model failed on it), the worst case over every attack, and how many
audit checks failed. `<model>.details.json` beside it holds the rest: each attack's accuracy
(the report's Tables 2-3), the audit, gate weights, the per-example worst case, settings,
environment and checkpoint, and what each attack was (`AttackRecord`, under "attacks").
`split` and `join` convert between the two files and the metrics dict `dwf.evaluate.evaluate`
returns; no torch here, so the report reads them cheaply.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

HEADLINE = ("n_examples", "clean", "worst_case")  # in the headline file only, never repeated
# headline only, where known (not for a public checkpoint's training): the system's parameters in
# millions and its whole training's multiply-accumulates in tera-MACs (dwf.plan.training_cost)
COST = ("params_m", "train_tmacs")
FAMILIES = "worst_by_family"  # metrics key: {family: worst-case accuracy}, flat in the headline
AUDIT_FAILED = "audit_failed"  # headline only: derived from the details' audit
ATTACKS = "attacks"  # details only: {attack name: AttackRecord as a dict}


@dataclasses.dataclass(frozen=True)
class AttackRecord:
    """One attack of an evaluation described by data. The threat-model budget, the attack
    families of the headline file and the report's columns read these fields, never the
    attack's name (which stays only as the key of its accuracy).

    Args:
        family: the row group it belongs to: "clean"; the paper's protocol (Table 4) "fgsm",
            "pgd" (the PGD-k sweep), "pgd_ms" (multi-restart), "pgd_adaptive"; ours "strong";
            "autoattack" (the official code).
        loss: what the attack ascends: "ce", "dlr", "margin", "gate" (log w_k + CE of expert
            k), AutoAttack's "dlr_targeted", "fab_targeted", "square" (gradient-free margin).
        eps: L-inf budget in [0, 1] pixel units (0 for clean).
        steps: gradient steps per run (FGSM 1; Square: queries).
        restarts: runs per example (random restarts, or AutoAttack's target classes).
        target: whose loss is attacked: "model" (the whole evaluated model), "gate",
            "expert_<i>", "transfer:<source>" (crafted on another model, replayed).
        label: the column header the report prints ("FGSM 0.04", "PGD-100 (MS)").
    """

    family: str
    loss: str
    eps: float
    steps: int
    restarts: int
    target: str
    label: str


Records = dict[str, AttackRecord]  # attack name -> what the attack is


def records(metrics: dict[str, Any]) -> dict[str, AttackRecord]:
    """{attack name: its record} of a metrics dict (`read` has checked they are there)."""
    return {k: AttackRecord(**v) for k, v in metrics[ATTACKS].items()}


def details_path(path: Path) -> Path:
    """The details file beside a headline metrics file: eval/dwf.json -> eval/dwf.details.json."""
    return path.with_suffix(".details.json")


def split(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """(headline, details) of a metrics dict: numbers only, flat; and everything else."""
    headline = {k: metrics[k] for k in HEADLINE[:2]} | metrics.get(FAMILIES, {})
    headline["worst_case"] = metrics["worst_case"]
    headline |= {k: metrics[k] for k in COST if k in metrics}
    if "audit" in metrics:
        headline[AUDIT_FAILED] = sum(not c["pass"] for c in metrics["audit"].values())
    details = {k: v for k, v in metrics.items() if k not in (*HEADLINE, *COST, FAMILIES)}
    return headline, details


def join(headline: dict[str, float], details: dict[str, Any]) -> dict[str, Any]:
    """The metrics dict back from its two files (the inverse of `split`)."""
    families = {k: v for k, v in headline.items() if k not in (*HEADLINE, *COST, AUDIT_FAILED)}
    return {**details, **{k: headline[k] for k in (*HEADLINE, *COST) if k in headline}, FAMILIES: families}


def read(path: Path) -> dict[str, Any]:
    """The metrics dict of a headline file and the details file beside it.

    Raises:
        FileNotFoundError, ValueError: a file missing, not JSON, not shaped as `split` writes
            it, or holding an accuracy no evaluation gives (NaN, outside [0, 100]); the message
            names the file.
    """
    headline, details = _object(path), _object(details_path(path))
    missing = [k for k in HEADLINE if k not in headline]
    if missing:
        raise ValueError(f"{path}: not a dwf metrics file (lacks {', '.join(missing)})")
    odd = [k for k, v in headline.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if odd:
        raise ValueError(f"{path}: not a dwf metrics file ({odd[0]!r} is not a number)")
    fields = {f.name for f in dataclasses.fields(AttackRecord)}
    attacks = details.get(ATTACKS)
    if not isinstance(attacks, dict) or not all(isinstance(r, dict) and set(r) == fields
                                                for r in attacks.values()):
        raise ValueError(f"{details_path(path)}: no attack records (written by an older dwf?); "
                         "re-run `dwf evaluate`")
    n = headline["n_examples"]
    if type(n) is not int or n < 1:
        raise ValueError(f"{path}: n_examples = {n!r} is not a count of test examples")
    metrics = join(headline, details)
    for name, v in accuracies(metrics).items():
        if type(v) not in (int, float) or not 0 <= v <= 100:  # NaN fails both comparisons
            raise ValueError(f"{path}: accuracy {name} = {str(v)[:20]} is not a percentage in "
                             "[0, 100]; re-run `dwf evaluate`")
    return metrics


def accuracies(metrics: dict[str, Any]) -> dict[str, Any]:
    """Every accuracy of a metrics dict (percent) by name: clean, the worst case, each attack
    family's ("worst_by_family/pgd") and each attack's ("pgd/10"); None where one is missing."""
    out = {"clean": metrics["clean"], "worst_case": metrics["worst_case"]}
    out |= {f"{FAMILIES}/{k}": v for k, v in metrics[FAMILIES].items()}
    for name in metrics[ATTACKS]:
        group, _, key = name.partition("/")  # as dwf.evaluate.summarize nests them
        value = metrics.get(group)
        out[name] = (value.get(key) if isinstance(value, dict) else None) if key else value
    return out


def _object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (dwf evaluate writes it)")
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a dwf metrics file (a JSON object expected)")
    return obj
