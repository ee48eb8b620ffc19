"""Aggregation over runs (mean, std, 95% interval) and the paper's tables and figures.

Reads the per-run metrics files the evaluate stage writes (headline and details, dwf.metricsfile)
and produces: metrics/summary.json, metrics/models/<dataset>/<model>.json (a row a model for
`dvc metrics show`), reports/table2.{md,tex} (SA + RA-FGSM), reports/table3.{md,tex}
(RA-PGD), reports/figures/figure6_<dataset>.png and figure7_<dataset>.png, reports/audit.md, and
reports/statistics.md (95% intervals, DWF against every model paired by run), reports/verdict.md,
reports/ablations.md (DWF against its own ablations),
and figures/cost_<dataset>.png (DWF against systems of its training cost and size, dwf.verdict), and
reports/comparison.md, which sets our numbers beside the paper's printed ones
(src/dwf/paper_values.yaml). `publish` writes them all or none.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from scipy import stats

from dwf import paths, verdict
from dwf.config.defenses import label
from dwf.metricsfile import ATTACKS, Records
from dwf.metricsfile import read as read_metrics
from dwf.metricsfile import records as records_of

DATASET_LABELS = {"cifar10": "CIFAR-10", "svhn": "SVHN", "digits": "digits (CPU study)"}
SKIP = {"n_examples", "per_example", "settings", "environment", "checkpoint", "gate_mean_weight",
        "audit", "external", "training", ATTACKS}


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a metrics dict as {'fgsm/0.01': 52.1, 'clean': 91.2, ...}."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not prefix and k in SKIP:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample std and the half-width of the 95% t-interval over runs."""
    a = np.asarray(values, dtype=float)
    n = len(a)
    std = float(a.std(ddof=1)) if n > 1 else 0.0
    ci = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": round(float(a.mean()), 4), "std": round(std, 4), "ci95": round(ci, 4), "n": n}


def load_runs(datasets, runs, models) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{dataset: {model: [metrics of each run]}} (a missing file fails, naming the command).
    Every run of every model of a dataset must have been evaluated on as many test examples:
    a spread over runs, a table's rows and the comparisons paired by run mean something only
    over the same images (issue 23: a 20-example run among 360-example ones)."""
    out: dict = {}
    for d in datasets:
        first = None  # (path, n_examples) of the dataset's first run read
        for m in models:
            for r in runs:
                path = paths.evaluation(d, r, m)
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: missing; run `dwf evaluate --dataset {d} --run {r} --model {m}`")
                metrics = read_metrics(path)
                first = first or (path, metrics["n_examples"])
                if metrics["n_examples"] != first[1]:
                    raise ValueError(f"{path}: evaluated on {metrics['n_examples']} test examples, "
                                     f"{first[0]} on {first[1]}; re-run `dwf evaluate` for the odd "
                                     "one with the params' evaluate.n_examples")
                out.setdefault(d, {}).setdefault(m, []).append(metrics)
    return out


def attack_records(metrics: list[dict[str, Any]]) -> Records:
    """{attack name: record} over metrics dicts; one name must mean one attack everywhere."""
    out: Records = {}
    for m in metrics:
        for name, r in records_of(m).items():
            if out.setdefault(name, r) != r:
                raise ValueError(f"{name!r} names two different attacks ({out[name]} and {r}): "
                                 "the models were evaluated with different settings")
    return out


def all_runs(per_run: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    return [r for models in per_run.values() for runs in models.values() for r in runs]


def aggregate(per_run: dict[str, dict[str, list[dict[str, Any]]]]
              ) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{dataset: {model: {metric: spread over runs}}}; a metric counts if every run has it."""
    summary: dict = {}
    for d, models in per_run.items():
        for m, runs in models.items():
            flat = [flatten(r) for r in runs]
            keys = [k for k in flat[0] if all(k in f for f in flat)]
            summary.setdefault(d, {})[m] = {k: spread([f[k] for f in flat]) for k in keys}
    return summary


def audit_table(per_run: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Every evaluated model's audit (docs/evaluation.md): checks passed in how many runs."""
    lines = ["# Audit of every evaluated model", "",
             "Each cell: runs passing / runs audited. A failing check means the robust accuracy",
             "of that model is not to be trusted as measured (docs/evaluation.md).", ""]
    for d, models in per_run.items():
        checks = sorted({c for runs in models.values() for r in runs for c in r.get("audit", {})})
        if not checks:
            continue
        lines += [f"## {DATASET_LABELS.get(d, d)}", "", "| model | " + " | ".join(checks) + " |",
                  "|---" * (len(checks) + 1) + "|"]
        for m, runs in models.items():
            cells = []
            for c in checks:
                seen = [r["audit"][c]["pass"] for r in runs if c in r.get("audit", {})]
                cells.append(f"{sum(seen)}/{len(seen)}" + ("" if all(seen) else " **fail**") if seen else "-")
            lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
        lines.append("")
        for m, runs in models.items():  # the checks whose failure changes what a number means
            for c, why in IN_WORDS.items():
                failed = [r["audit"][c]["value"] for r in runs if not r.get("audit", {}).get(c, {"pass": True})["pass"]]
                if failed:
                    lines.append(f"- **{label(m)}**, {len(failed)} of {len(runs)} runs: {why(failed)}")
        lines.append("")
    return "\n".join(lines)


# what a failed check means, said in words under the audit table
IN_WORDS: dict[str, Callable[[list[Any]], str]] = {
    "routing_not_obfuscated": lambda values: (
        "its hard router hides the gradient. Attacks through the relaxed router fooled "
        f"{max(v['gap'] for v in values):.2f} points more than every plain white-box attack together "
        "(the largest gap of these runs): robustness measured by plain gradient attacks alone is "
        "over-reported for this model; its worst case here includes the relaxed attacks."),
}


def paper_values() -> dict[str, Any]:
    """The paper's printed Tables 2 and 3 (src/dwf/paper_values.yaml)."""
    return yaml.safe_load(resources.files("dwf").joinpath("paper_values.yaml").read_text())


PAIRED = ("worst_case", "clean")   # the metrics DWF is compared on, run by run


def statistics_table(per_run: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """reports/statistics.md: every model's headline numbers with their 95% intervals and the
    numbers of runs and examples behind them, and DWF against each model, paired by run."""
    lines = ["# Statistics over runs", "",
             "Mean ± std and the 95% t-interval over runs; `n` runs of `examples` test images each.",
             "DWF − model: the mean of the per-run differences (runs paired: same seeds, same images),",
             "its 95% interval and the paired t-test's p (two-sided). One run gives no interval.", ""]
    for d, models in per_run.items():
        lines += [f"## {DATASET_LABELS.get(d, d)}", "",
                  "| model | runs | examples | clean | worst case | DWF − model, worst case | p | DWF − model, clean | p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        base = models.get("dwf")
        for m, runs in models.items():
            cols = [spread([r[k] for r in runs]) for k in ("clean", "worst_case")]
            cells = [f"{c['mean']:.2f}" if c["n"] < 2 else
                     f"{c['mean']:.2f} ± {c['std']:.2f} [{c['mean'] - c['ci95']:.2f}, {c['mean'] + c['ci95']:.2f}]"
                     for c in cols]
            for k in PAIRED:
                if base is None or m == "dwf" or len(base) != len(runs):
                    cells += ["-", "-"]
                    continue
                t = verdict.paired([r[k] for r in base], [r[k] for r in runs])
                cells += ([f"{t['diff']:+.2f}", "-"] if t["n"] < 2 else
                          [f"{t['diff']:+.2f} ± {t['ci95']:.2f}", f"{t['p']:.3g}"])
            examples = sorted({int(r["n_examples"]) for r in runs})
            lines.append(f"| {label(m)} | {len(runs)} | {', '.join(map(str, examples))} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- tables

def _cell(s: dict[str, float] | None, latex: bool = False) -> str:
    if s is None:
        return "-"
    pm = r"$\pm$" if latex else "±"
    return f"{s['mean']:.2f}" if s["n"] < 2 else f"{s['mean']:.2f}{pm}{s['std']:.2f}"


# the attack families of each table, in the paper's column order (Table 2: SA + FGSM eps;
# Table 3: PGD-k, then multi-restart and adaptive PGD)
TABLE_FAMILIES = {"table2": ("clean", "fgsm"), "table3": ("pgd", "pgd_ms", "pgd_adaptive")}


def _columns(records: Records, which: str) -> list[tuple[str, str]]:
    """(metric key, header) of Table 2 or Table 3: the attacks of its families, ordered by
    family, budget and effort (records, never names)."""
    families = TABLE_FAMILIES[which]
    chosen = sorted((k for k, r in records.items() if r.family in families), key=lambda k: (
        families.index(records[k].family), records[k].eps, records[k].steps, records[k].restarts))
    cols = [(k, records[k].label) for k in chosen]
    return cols + ([("worst_case", "worst case")] if which == "table3" else [])


def table(summary: dict, which: str, records: Records, latex: bool = False) -> str:
    """Table 2 or 3 in the paper's layout (a block per dataset, a row per model)."""
    cols = _columns(records, which)
    head = ["Model"] + [h for _, h in cols]
    if latex:
        lines = [r"\begin{tabular}{l" + "c" * len(cols) + "}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    else:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, models in summary.items():
        title = DATASET_LABELS.get(d, d)
        lines.append(rf"\multicolumn{{{len(head)}}}{{l}}{{\textbf{{{title}}}}} \\" if latex else f"| **{title}** |" + " |" * len(cols))
        for m, metrics in models.items():
            cells = [label(m)] + [_cell(metrics.get(k), latex) for k, _ in cols]
            lines.append(" & ".join(cells) + r" \\" if latex else "| " + " | ".join(cells) + " |")
    if latex:
        lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def accuracy_table(rows: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of single metrics files: one row per model, accuracies in percent."""
    summary = {"": {name: {k: spread([v]) for k, v in flatten(m).items()} for name, m in rows.items()}}
    records = attack_records(list(rows.values()))
    t2, t3 = _columns(records, "table2"), _columns(records, "table3")
    cols = t2 + t3
    lines = ["| model | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, metrics in summary[""].items():
        lines.append(f"| {name} | " + " | ".join(_cell(metrics.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- figures

def _curve(metrics: dict, records: Records, kind: str) -> tuple[list[float], list[float], list[float]]:
    """The x (FGSM: eps; PGD: iterations), mean and std of one model's curve in a figure."""
    x = {k: r.eps if kind == "fgsm" else r.steps for k, r in records.items()
         if r.family == kind and k in metrics}
    keys = sorted(x, key=x.get)
    return [x[k] for k in keys], [metrics[k]["mean"] for k in keys], [metrics[k]["std"] for k in keys]


def figure(summary: dict, dataset: str, kind: str, path: Path, records: Records) -> None:
    """Figure 6 (RA vs FGSM eps) or Figure 7 (RA vs PGD iterations) for one dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m, metrics in summary[dataset].items():
        x, y, e = _curve(metrics, records, kind)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label(m))
    ax.set_xlabel("FGSM $\\epsilon$" if kind == "fgsm" else "PGD iterations")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(f"{DATASET_LABELS.get(dataset, dataset)}: robustness under {kind.upper()}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})  # no version stamp: byte-identical reruns
    plt.close(fig)


# ---------------------------------------------------------------- comparison with the paper

def _paper_cell(v: Any) -> tuple[float, float] | None:
    if v is None:
        return None
    return (float(v["mean"]), float(v.get("std", 0.0))) if isinstance(v, dict) else (float(v), 0.0)


def comparison(summary: dict, paper: dict, forensics: dict[str, str] | None = None) -> str:
    """Our mean ± std beside the paper's printed value; flags differences beyond the spread.

    A difference is flagged when |ours - paper| exceeds 2 x the larger of the two standard
    deviations, and at least one point (a single run has no spread of its own). `forensics`:
    per dataset, the protocol forensics section (`dwf forensics`), printed after its table.
    """
    lines = ["# dwf vs the paper's printed values", "",
             f"Source: {paper.get('source', 'paper tables')}. Flag: |ours - paper| > max(1, 2 x std).", ""]
    for d, models in summary.items():
        printed = paper.get(d)
        lines.append(f"## {DATASET_LABELS.get(d, d)}")
        if not printed:
            lines += ["", "The paper has no values for this dataset.", ""]
            continue
        lines += ["", "| model | metric | ours | paper | diff | flag |", "|---|---|---|---|---|---|"]
        for m, metrics in models.items():
            row = printed.get("resnet18" if m == "experts/benign" else m)
            for k, s in metrics.items():
                p = _paper_cell(row.get(k)) if row else None
                if p is None:
                    continue
                diff = s["mean"] - p[0]
                flag = "**differs**" if abs(diff) > max(1.0, 2 * max(s["std"], p[1])) else ""
                lines.append(f"| {label(m)} | {k} | {_cell(s)} | {p[0]:.2f} | {diff:+.2f} | {flag} |")
        lines.append("")
    for d in summary:
        if forensics and d in forensics:
            lines += [f"# {DATASET_LABELS.get(d, d)}: protocol forensics", "", forensics[d].replace("## ", "### ", 1)]
    return "\n".join(lines)


# A model's row in `dvc metrics show`: what a reader compares first, narrow enough to diff
MODEL_METRICS = ("clean", "worst_case", "params_m", "train_tmacs")


def model_metrics(summary: dict) -> dict[str, dict[str, float]]:
    """{"DATASET/MODEL": {clean, clean_std, worst_case, worst_case_std, runs, params_m,
    train_tmacs}}: one small file per model, so `dvc metrics show` and `dvc metrics diff` give a
    row a model (the summary JSON holds every number, too many for a table)."""
    rows = {}
    for d, models in summary.items():
        for m, metrics in models.items():
            row: dict[str, float] = {}
            for key in (k for k in MODEL_METRICS if k in metrics):
                row[key] = metrics[key]["mean"]
                if key in ("clean", "worst_case"):
                    row[f"{key}_std"] = metrics[key]["std"]
                    row["runs"] = metrics[key]["n"]
            rows[f"{d}/{m}"] = row
    return rows


def publish(summary: dict, per_run: dict, reports: Path, summary_path: Path,
            forensics: dict[str, str] | None = None) -> None:
    """The reports folder, the summary JSON and the models' metrics folder beside it
    (model_metrics) from one snapshot, all or nothing.

    Everything is rendered into temporary siblings first; only then are the old folders and
    the new ones swapped by renames and the summary renamed into place, so a failure part-way
    leaves the previous outputs whole.
    """
    models = summary_path.parent / "models"
    for folder, check in ((reports, _check_replaceable), (models, _check_models)):
        if folder.exists():
            check(folder)
    reports.parent.mkdir(parents=True, exist_ok=True)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{reports.name}.", dir=reports.parent))
    staged_models = Path(tempfile.mkdtemp(prefix=f".{models.name}.", dir=models.parent))
    fd, staged_summary = tempfile.mkstemp(prefix=f".{summary_path.name}.", dir=summary_path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(staged_summary, 0o644)  # mkstemp makes 0600 (0700 for folders); outputs are
        for folder in (staged, staged_models):  # shared through DVC
            os.chmod(folder, 0o755)
        write_reports(summary, staged, per_run, forensics)
        for name, row in model_metrics(summary).items():
            path = staged_models / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, indent=2) + "\n")
        _swap(staged, reports, lambda: _swap(
            staged_models, models, lambda: os.replace(staged_summary, summary_path)))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(staged_models, ignore_errors=True)
        Path(staged_summary).unlink(missing_ok=True)


def _swap(new: Path, old: Path, also: Callable[[], None]) -> None:
    """Rename `new` into place of folder `old` and call `also()`; on a failure, `old` is back."""
    backup = old.with_name(f".{old.name}.old")
    shutil.rmtree(backup, ignore_errors=True)  # left by an aggregate killed mid-swap
    if old.exists():
        old.rename(backup)
    placed = False
    try:
        new.rename(old)
        placed = True
        also()
    except BaseException:
        if placed:
            shutil.rmtree(old, ignore_errors=True)
        if backup.exists():
            backup.rename(old)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a folder holding anything but reports (a mistyped --reports)."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; --reports names the reports folder")
    for f in folder.rglob("*"):
        rel = f.relative_to(folder)
        report = rel.parts[0].startswith(".") or f.is_dir() and rel == Path("figures") or (
            f.suffix in (".md", ".tex") and len(rel.parts) == 1) or (
            f.suffix == ".png" and rel.parent == Path("figures"))
        if not report:
            raise ValueError(f"{folder}: holds {rel}, which aggregate did not write; "
                             "--reports must name a folder of reports only")


def _check_models(folder: Path) -> None:
    """Refuse to replace a models' metrics folder holding anything but DATASET/MODEL.json files."""
    for f in folder.rglob("*"):
        rel = f.relative_to(folder)
        if not (f.is_dir() or f.suffix == ".json" and len(rel.parts) >= 2):  # experts/benign
            raise ValueError(f"{folder}: holds {rel}, which aggregate did not write; it writes "
                             "the models' metrics beside the summary JSON")


def write_reports(summary: dict, out_dir: Path, per_run: dict,
                  forensics: dict[str, str] | None = None) -> list[Path]:
    """Every report file from a summary and the per-run metrics it was made from (the audit,
    the statistics, the attack records) and the forensics sections; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = attack_records(all_runs(per_run))
    p = out_dir / "audit.md"
    p.write_text(audit_table(per_run))
    written = [p]
    for which in ("table2", "table3"):
        for ext, latex in (("md", False), ("tex", True)):
            p = out_dir / f"{which}.{ext}"
            p.write_text(table(summary, which, records, latex))
            written.append(p)
    for d in summary:
        for kind, fig in (("fgsm", "figure6"), ("pgd", "figure7")):
            p = out_dir / "figures" / f"{fig}_{d}.png"
            figure(summary, d, kind, p, records)
            written.append(p)
    p = out_dir / "statistics.md"
    p.write_text(statistics_table(per_run))
    written.append(p)
    p = out_dir / "verdict.md"
    p.write_text(verdict.page(per_run, DATASET_LABELS))
    written.append(p)
    p = out_dir / "ablations.md"
    p.write_text(verdict.ablation_page(per_run, DATASET_LABELS))
    written.append(p)
    for d, models in per_run.items():
        if verdict.sentences(models):
            p = out_dir / "figures" / f"cost_{d}.png"
            verdict.figure(summary[d], models, p, DATASET_LABELS.get(d, d))
            written.append(p)
    p = out_dir / "comparison.md"
    p.write_text(comparison(summary, paper_values(), forensics))
    return written + [p]
