"""The evaluate stage's two files: the numbers DVC shows, and everything else beside them.

`<model>.json`, the file dvc.yaml declares as metrics, is flat and holds numbers only, so that
`dvc metrics show` and `dvc exp show` fit a screen: the examples evaluated, clean accuracy, the
worst case of each attack family (an example counts as robust only if every attack of the
family within the threat model failed on it), the worst case over every attack, and how many
audit checks failed. `<model>.details.json` beside it holds the rest: each attack's accuracy
(the report's Tables 2-3), the audit, gate weights, the per-example worst case, settings,
environment and checkpoint. `split` and `join` convert between the two files and the metrics
dict `dwf.evaluate.evaluate` returns; no torch here, so the report reads them cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HEADLINE = ("n_examples", "clean", "worst_case")  # in the headline file only, never repeated
FAMILIES = "worst_by_family"  # metrics key: {family: worst-case accuracy}, flat in the headline
AUDIT_FAILED = "audit_failed"  # headline only: derived from the details' audit


def details_path(path: Path) -> Path:
    """The details file beside a headline metrics file: eval/dwf.json -> eval/dwf.details.json."""
    return path.with_suffix(".details.json")


def split(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """(headline, details) of a metrics dict: numbers only, flat; and everything else."""
    headline = {k: metrics[k] for k in HEADLINE[:2]} | metrics.get(FAMILIES, {})
    headline["worst_case"] = metrics["worst_case"]
    if "audit" in metrics:
        headline[AUDIT_FAILED] = sum(not c["pass"] for c in metrics["audit"].values())
    details = {k: v for k, v in metrics.items() if k not in (*HEADLINE, FAMILIES)}
    return headline, details


def join(headline: dict[str, float], details: dict[str, Any]) -> dict[str, Any]:
    """The metrics dict back from its two files (the inverse of `split`)."""
    families = {k: v for k, v in headline.items() if k not in (*HEADLINE, AUDIT_FAILED)}
    return {**details, **{k: headline[k] for k in HEADLINE}, FAMILIES: families}


def read(path: Path) -> dict[str, Any]:
    """The metrics dict of a headline file and the details file beside it.

    Raises:
        FileNotFoundError, ValueError: a file missing, not JSON, or not shaped as `split` writes
            it; the message names the file.
    """
    headline, details = _object(path), _object(details_path(path))
    missing = [k for k in HEADLINE if k not in headline]
    if missing:
        raise ValueError(f"{path}: not a dwf metrics file (lacks {', '.join(missing)})")
    odd = [k for k, v in headline.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if odd:
        raise ValueError(f"{path}: not a dwf metrics file ({odd[0]!r} is not a number)")
    return join(headline, details)


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
