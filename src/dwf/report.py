"""Tables from metrics files."""

from __future__ import annotations

from typing import Any


def _columns(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    """(column, accuracy) pairs of one metrics dict, in the paper's order."""
    cols = [("clean", metrics["clean"])]
    cols += [(f"FGSM {k}", v) for k, v in metrics.get("fgsm", {}).items()]
    cols += [(f"PGD-{k}", v) for k, v in metrics.get("pgd", {}).items()]
    cols += [(k.replace("_", " "), v) for k, v in metrics.items()
             if k.startswith("pgd") and isinstance(v, (int, float))]
    cols.append(("worst case", metrics["worst_case"]))
    return cols


def accuracy_table(rows: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per model, accuracies in percent."""
    header = [c for c, _ in _columns(next(iter(rows.values())))]
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for _, v in _columns(metrics)) + " |")
    return "\n".join(lines)
