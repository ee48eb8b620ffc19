"""The fair comparison: every system's worst-case robust accuracy beside what its training cost
and how many parameters it has, and the verdict those numbers support, written from the metrics.

A gain that costs 21 times the compute of the baseline it beats is not a gain of the method until
a baseline given the same budget has been beaten too (DESIGN.md, "Comparisons a reviewer
accepts"). So the verdict compares DWF, run by run, with the most robust system that cost no more
to train, and with the most robust one of its size at that cost, before the paper's own comparison.
Reads what dwf.metricsfile writes (`train_tmacs`, `params_m`, `worst_case`); no torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import stats

from dwf.config.defenses import ABLATION_NAMES, ROUTING_NAMES, label

MATCH = 1.05  # "no more than DWF's": within 5% above (epochs and widths come in whole numbers)
SIZE = 0.5    # "of DWF's size": at least half its parameters (capacity, not a smaller network)
PerRun = dict[str, list[dict[str, Any]]]  # model -> its runs' metrics dicts


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def costed(models: PerRun) -> PerRun:
    """The models whose every run records its training cost and parameters (not public ones)."""
    return {m: runs for m, runs in models.items()
            if all("train_tmacs" in r and "params_m" in r for r in runs)}


def own(model: str) -> bool:
    """DWF itself, one of its experts, or a variant of it (rerouted, ablated): not a competitor
    in the verdict; reports/ablations.md compares them with DWF."""
    return model == "dwf" or model.startswith(("dwf_", "experts/"))


def best_within(models: PerRun, fits: Callable[[list[dict[str, Any]]], bool]) -> str | None:
    """Among the models other than DWF and its own parts and variants whose runs `fits`
    accepts, the one with the highest mean worst case (None if there is none)."""
    chosen = [m for m, runs in models.items() if not own(m) and fits(runs)]
    return max(chosen, key=lambda m: _mean(models[m], "worst_case"), default=None)


def paired(dwf: list[float], other: list[float]) -> dict[str, float]:
    """DWF minus another model over the same runs (same seeds, same test images): mean
    difference, the half-width of its 95% t-interval, and the paired t-test's two-sided p.

    Runs pair up because run r of every model derives its seeds from (seed, r) and is evaluated
    on the same examples; pairing removes what the runs share (e.g. the data split).
    """
    d = np.asarray(dwf, dtype=float) - np.asarray(other, dtype=float)
    n = len(d)
    if n < 2:
        return {"diff": round(float(d.mean()), 4), "ci95": float("nan"), "p": float("nan"), "n": n}
    std = float(d.std(ddof=1))
    ci = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    p = float(stats.ttest_rel(dwf, other).pvalue) if std > 0 else (0.0 if d.mean() else 1.0)
    return {"diff": round(float(d.mean()), 4), "ci95": round(ci, 4), "p": round(p, 6), "n": n}


def _outcome(t: dict[str, float]) -> str:
    """What a paired difference DWF − model says: its 95% interval decides."""
    if t["n"] < 2 or t["ci95"] != t["ci95"]:
        return "one run: no interval"
    if t["diff"] - t["ci95"] > 0:
        return "DWF is more robust"
    if t["diff"] + t["ci95"] < 0:
        return "DWF is less robust"
    return "no difference the runs can resolve"


def _versus(models: PerRun, other: str, why: str) -> str:
    """One sentence: `why` (ending where the other system's name goes), its numbers, DWF − it."""
    dwf, runs = models["dwf"], models[other]
    t = paired([r["worst_case"] for r in dwf], [r["worst_case"] for r in runs])
    ratio = _mean(dwf, "train_tmacs") / _mean(runs, "train_tmacs")
    interval = "" if t["n"] < 2 else f" ± {t['ci95']:.2f} (95%, p = {t['p']:.3g})"
    return (f"{why} {label(other)} "
            f"({_mean(runs, 'worst_case'):.2f}% worst case, {_mean(runs, 'params_m'):.2f} M parameters, "
            f"DWF's training cost / its = {ratio:.2f}); DWF − it: {t['diff']:+.2f} points{interval} "
            f"over {t['n']} paired runs: **{_outcome(t)}**.")


def sentences(models: PerRun, reference: str = "resnet18_pgd_at") -> list[str]:
    """The verdict on one dataset: DWF against the best system at no more than its training cost,
    the best of its size (SIZE..MATCH x its parameters) at no more than its cost, and the paper's
    comparison with its cost ratio."""
    models = costed(models)
    if "dwf" not in models:
        return []
    dwf = models["dwf"]
    cost, params = _mean(dwf, "train_tmacs"), _mean(dwf, "params_m")
    head = (f"DWF: {_mean(dwf, 'worst_case'):.2f}% worst-case robust accuracy over {len(dwf)} runs, "
            f"{params:.2f} M parameters, {cost:.3g} TMAC of training.")
    out = [head]

    def cheaper(runs: list[dict[str, Any]]) -> bool:
        return _mean(runs, "train_tmacs") <= cost * MATCH

    def sized(runs: list[dict[str, Any]]) -> bool:
        return cheaper(runs) and params * SIZE <= _mean(runs, "params_m") <= params * MATCH

    for fits, why in ((cheaper, f"At no more than DWF's training cost (≤ {cost * MATCH:.3g} TMAC)"),
                      (sized, f"Of DWF's size ({params * SIZE:.3g}-{params * MATCH:.3g} M parameters) "
                              "at no more than its cost")):
        best = best_within(models, fits)
        out.append(_versus(models, best, f"{why}, the most robust system is") if best
                   else f"{why}, no system was evaluated.")
    if reference in models:
        out.append(_versus(models, reference, "The paper's comparison is with"))
    return out


def page(per_run: dict[str, PerRun], datasets: dict[str, str]) -> str:
    """reports/verdict.md: the verdict, then every costed system's row, per dataset."""
    lines = ["# Verdict: DWF against systems of the same training cost and size", "",
             "Written by `dwf aggregate` from the metrics. Worst case: per example, correct under every",
             "attack of the evaluation (AutoAttack standard included). Training cost: multiply-accumulates",
             "of the whole training, attack steps and DWF's expert pretraining included",
             "(dwf.plan.training_cost). DWF − model: mean of per-run differences, runs paired.", ""]
    for d, models in per_run.items():
        said = sentences(models)
        if not said:
            continue
        lines += [f"## {datasets.get(d, d)}", "", *[f"- {s}" for s in said], "",
                  "| system | runs | parameters (M) | training (TMAC) | × DWF's cost | clean | worst case |",
                  "|---|---|---|---|---|---|---|"]
        rows = costed(models)
        dwf_cost = _mean(rows["dwf"], "train_tmacs")
        for m, runs in sorted(rows.items(), key=lambda kv: _mean(kv[1], "train_tmacs")):
            lines.append(f"| {label(m)} | {len(runs)} | {_mean(runs, 'params_m'):.3f} | "
                         f"{_mean(runs, 'train_tmacs'):.4f} | {_mean(runs, 'train_tmacs') / dwf_cost:.2f} | "
                         f"{_mean(runs, 'clean'):.2f} | {_mean(runs, 'worst_case'):.2f} |")
        lines += ["", f"![worst case against cost and size](figures/cost_{d}.png)", ""]
    return "\n".join(lines)


# the ablations of issue 22: DWF's trained mixture under other routings (a), DWF trained another
# way (b, c); then its best single expert, chosen per run (BEST_EXPERT)
ABLATIONS = (*(f"dwf_{r}" for r in ROUTING_NAMES), *(f"dwf_{a}" for a in ABLATION_NAMES))
BEST_EXPERT = "best single expert"


def best_expert(models: PerRun) -> list[dict[str, Any]]:
    """Per run, the metrics of DWF's expert with the highest worst case on that run, its name
    added; [] unless at least two of DWF's experts were evaluated. Chosen on the test digits it
    is then scored on: an upper bound on any honest choice of one expert."""
    experts = [m for m in models if m.startswith("experts/")]
    if len(experts) < 2:
        return []
    n = len(models[experts[0]])
    return [{**max((models[m][i] for m in experts), key=lambda r: r["worst_case"]),
             "expert": max(experts, key=lambda m: models[m][i]["worst_case"])} for i in range(n)]


def ablation_page(per_run: dict[str, PerRun], datasets: dict[str, str]) -> str:
    """reports/ablations.md: DWF against each evaluated ablation of itself, paired by run."""
    lines = ["# Ablations: what in DWF makes it robust", "",
             "Written by `dwf aggregate` from the metrics. Each row changes one thing of DWF: its",
             "routing at inference on DWF's trained weights (uniform, top-1), its training (frozen",
             "experts, no pretraining, fixed attack strengths: same experts and seeds), or its",
             "experts (fewer, PGD only). DWF − row: mean of per-run differences (runs paired), its",
             "95% interval and the paired t-test's p. Worst case as in reports/verdict.md. The best",
             "single expert is picked per run on the test digits themselves: an upper bound.", ""]
    shown = False
    for d, models in per_run.items():
        rows = {m: models[m] for m in ABLATIONS if m in models}
        if best := best_expert(models):
            rows[BEST_EXPERT] = best
        if "dwf" not in models or not rows:
            continue
        shown = True
        dwf = models["dwf"]
        cost = _mean(dwf, "train_tmacs") if "train_tmacs" in dwf[0] else None

        def costs(runs: list[dict[str, Any]]) -> str:
            if cost is None or any("train_tmacs" not in r for r in runs):
                return ""
            return f"{_mean(runs, 'train_tmacs') / cost:.2f}"

        lines += [f"## {datasets.get(d, d)}", "",
                  "| model | runs | × DWF's training cost | clean | worst case | DWF − it, worst case "
                  "| what that says |", "|---|---|---|---|---|---|---|",
                  f"| {label('dwf')} | {len(dwf)} | {costs(dwf)} | {_mean(dwf, 'clean'):.2f} | "
                  f"{_mean(dwf, 'worst_case'):.2f} | | |"]
        for m, runs in rows.items():
            t = paired([r["worst_case"] for r in dwf], [r["worst_case"] for r in runs])
            interval = "" if t["n"] < 2 else f" ± {t['ci95']:.2f} (p = {t['p']:.3g})"
            name = label(m) if m != BEST_EXPERT else (
                "DWF's best single expert (per run: " + ", ".join(r["expert"].split("/")[1] for r in runs) + ")")
            lines.append(f"| {name} | {len(runs)} | {costs(runs)} | {_mean(runs, 'clean'):.2f} | "
                         f"{_mean(runs, 'worst_case'):.2f} | {t['diff']:+.2f}{interval} | {_outcome(t)} |")
        lines.append("")
    if not shown:
        lines.append("No ablation was evaluated: list " + ", ".join(ABLATIONS) + " in `evaluate_models` "
                     "(and their names in `routings` and `ablations`), or two or more `experts/<name>`.")
    return "\n".join(lines) + "\n"


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The cost-robustness front: the points no cheaper (or equal) point beats, by cost."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out


def figure(summary: dict[str, dict[str, dict[str, float]]], per_run: PerRun, path: Path,
           title: str) -> None:
    """Worst case (mean, 95% interval) against training cost (log axis), the front drawn; a
    second panel against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in costed(per_run) if "worst_case" in summary.get(m, {})]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), dpi=120)
    colors = plt.get_cmap("tab20").colors  # some 30 systems: 20 colours x 3 markers stay apart
    for ax, key, xlabel in zip(axes, ("train_tmacs", "params_m"),
                               ("training cost (TMAC, log)", "parameters (M, log)")):
        pts = []
        for i, m in enumerate(models):
            x, s = summary[m][key]["mean"], summary[m]["worst_case"]
            ax.errorbar(x, s["mean"], yerr=s["ci95"], color=colors[i % len(colors)],
                        marker="*" if m == "dwf" else "D" if own(m) else "o",  # DWF, its parts
                        markersize=12 if m == "dwf" else 6, capsize=3, label=label(m))
            pts.append((x, s["mean"]))
        fx, fy = zip(*front(pts))
        ax.step(fx, fy, where="post", color="grey", alpha=0.5, linestyle="--", label="front")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("worst-case robust accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{title}: robustness against training cost")
    axes[1].set_title("against parameters")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(0.8, 0.5))
    fig.tight_layout(rect=(0, 0, 0.8, 1))  # the legend to the right of both panels
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})  # no version stamp: byte-identical reruns
    plt.close(fig)
