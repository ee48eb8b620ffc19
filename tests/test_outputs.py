"""The metrics files DVC reads, the all-or-nothing aggregate, and one-line errors on corrupt
metrics (issues 11 and 15), on metrics files written from synthetic per-example results."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import _tiny_section
from test_cli import _ok, _one_line_error, dwf

from dwf import adaptive, metricsfile, paths, report
from dwf import evaluate as ev
from dwf.config import load_params

EPS = 8 / 255
# the attack names of the paper's configuration (params.yaml), as the metrics dict spells them
PAPER_ATTACKS = (["clean"] + [f"fgsm/{e / 100:g}" for e in range(1, 10)]
                 + [f"pgd/{k}" for k in (10, 20, 30, 40, 50)] + ["pgd100_ms", "pgd100_adaptive"]
                 + [f"strong/{a}" for a in ("pgd_dlr", "pgd_margin", "gate", "transfer_pretrained_benign")]
                 + [f"strong/expert_{i}" for i in range(9)]
                 + [f"autoattack/{a}" for a in ("apgd-ce", "apgd-t", "fab-t", "square")])


def paper_records() -> dict[str, metricsfile.AttackRecord]:
    """The records of PAPER_ATTACKS, from the suites of the paper's evaluation settings."""
    cfg = load_params(Path(__file__).parents[1] / "params.yaml", "cifar10", []).profile("cifar10").evaluate
    nine = SimpleNamespace(n_experts=9, expert=None, expert_logits=None, gate_weights=None, route=None,
                           hard_routing=False)
    suite = ev.protocol(cfg) | ev.strong_suite(cfg, nine, {"pretrained_benign": None})
    aa = adaptive.autoattack_records(eps=cfg.pgd_eps)
    records = {"clean": ev.CLEAN, **{k: r for e in suite.values() for k, r in e.records.items()},
               **{f"autoattack/{k}": r for k, r in aa.items()}}
    assert set(records) == set(PAPER_ATTACKS)
    return records


def synthetic_metrics(seed: int, n: int = 50) -> dict:
    """A metrics dict as dwf.evaluate.evaluate returns it, from random per-example flags."""
    gen = torch.Generator().manual_seed(seed)
    flags = {a: torch.rand(n, generator=gen) < 0.8 for a in PAPER_ATTACKS}
    records = paper_records()
    worst = ev.worst_case(ev.within_budget(flags, records, EPS))
    return {"n_examples": n, **ev.summarize(flags, records, EPS),
            metricsfile.FAMILIES: ev.by_family(flags, records, EPS),
            metricsfile.ATTACKS: {k: dataclasses.asdict(r) for k, r in records.items()},
            "gate_mean_weight": [1 / 9] * 9,
            "audit": {"in_ball": {"pass": True, "value": 0.0}, "converged": {"pass": False, "value": 2.5}},
            "per_example": {"worst_case_correct": "".join("1" if v else "0" for v in worst.tolist())},
            "settings": {"seed": seed, "transfer_sources": ["pretrained_benign"]},
            "environment": {"torch": torch.__version__}, "checkpoint": "models/x.pt"}


def write_metrics(path: Path, metrics: dict) -> None:
    headline, details = metricsfile.split(metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(headline))
    metricsfile.details_path(path).write_text(json.dumps(details))


def numbers_only(obj) -> bool:
    if isinstance(obj, dict):
        return all(numbers_only(v) for v in obj.values())
    return isinstance(obj, (int, float)) and not isinstance(obj, bool)


MODELS = ["dwf", "experts/benign"]


@pytest.fixture
def study(tmp_path, monkeypatch, digits_root):
    """A project folder with two runs of two models evaluated (synthetic), and its params."""
    monkeypatch.chdir(tmp_path)
    raw = {"seed": 0, "runs": [0, 1], "datasets": ["digits"], "data_root": str(digits_root),
           "experts": ["benign", "pgd_0"], "evaluate_models": MODELS, "digits": _tiny_section()}
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_runs(0)
    return tmp_path


# parameters (M) and training cost (TMAC) as dwf evaluate records them (cli.evaluate)
COSTS = {"dwf": {"params_m": 2.2445, "train_tmacs": 0.986781},
         "experts/benign": {"params_m": 0.1763, "train_tmacs": 0.02306}}


def write_runs(seed: int) -> None:
    for r in (0, 1):
        for i, m in enumerate(MODELS):
            write_metrics(paths.evaluation("digits", r, m),
                          synthetic_metrics(100 * seed + 10 * r + i) | COSTS[m])


def snapshot(root: Path) -> dict[str, bytes]:
    files = [root / "metrics/summary.json", *(root / "reports").rglob("*"), *(root / "metrics/models").rglob("*")]
    return {str(f.relative_to(root)): f.read_bytes() for f in files if f.is_file()}


# ---------------------------------------------------------------- the two files


def test_split_is_flat_numbers_and_join_restores_the_metrics():
    metrics = synthetic_metrics(0)
    headline, details = metricsfile.split(metrics)
    assert numbers_only(headline) and all(not isinstance(v, dict) for v in headline.values())
    assert set(headline) == {"n_examples", "clean", "fgsm", "pgd", "pgd_ms", "pgd_adaptive",
                             "strong", "autoattack", "worst_case", "audit_failed"}
    assert headline["audit_failed"] == 1
    assert headline["worst_case"] <= min(headline[f] for f in ("fgsm", "pgd", "strong", "autoattack"))
    assert details["per_example"] == metrics["per_example"] and "clean" not in details
    assert metricsfile.join(headline, details) == metrics


def test_family_worst_case_is_per_example_within_the_threat_model():
    t, f = True, False
    flags = {"clean": torch.tensor([t, t, t]), "fgsm/0.01": torch.tensor([t, f, t]),
             "fgsm/0.03": torch.tensor([f, t, t]), "fgsm/0.09": torch.tensor([f, f, f]),
             "pgd/10": torch.tensor([t, t, f])}
    fam = ev.by_family(flags, paper_records(), EPS)  # fgsm/0.09 lies outside the 8/255 ball
    assert fam == {"fgsm": pytest.approx(100 / 3, abs=1e-3), "pgd": pytest.approx(200 / 3, abs=1e-3)}


def dvc_metrics(folder: Path, *args: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    return subprocess.run([bin_dir / "dvc", "metrics", *args], cwd=folder, check=True,
                          capture_output=True, text=True)


def test_dvc_metrics_show_is_a_row_a_model(study):
    """Issue 24: `dvc metrics show --md` in a study: one row per model with mean and std over runs
    (and n runs) of clean and worst-case accuracy, < 200 characters a line, no warning; `dvc
    metrics diff` between two commits reads the same way."""
    _ok(dwf("aggregate", "--params", "params.yaml"))
    # the longest names of the paper's configuration, as a study's dvc.yaml declares the folder
    summary = json.loads((study / "metrics/summary.json").read_text())
    summary["cifar10"] = {m: summary["digits"]["dwf"] for m in ("trades_matched_params", "experts/benign")}
    for name, row in report.model_metrics(summary).items():
        path = study / "metrics/models" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row))
    (study / "dvc.yaml").write_text(yaml.safe_dump({"metrics": ["metrics/models"]}))
    subprocess.run(["git", "init", "-q"], cwd=study, check=True)
    subprocess.run([Path(sys.executable).parent / "dvc", "init", "-q"], cwd=study, check=True)
    shown = dvc_metrics(study, "show", "--md")
    lines = shown.stdout.strip().splitlines()
    assert len(lines) == 2 + 4 and not shown.stderr, shown  # header, rule, 2 + 2 models
    assert max(map(len, lines)) < 200, shown.stdout
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Path", "clean", "clean_std", "params_m", "runs", "train_tmacs",
                      "worst_case", "worst_case_std"]
    row = next(ln for ln in lines if ln.startswith("| metrics/models/digits/dwf.json"))
    dwf_clean = summary["digits"]["dwf"]["clean"]
    assert f"| {float(dwf_clean['mean'])!r} " in row and f"| {float(dwf_clean['std'])!r} " in row and "| 2 " in row

    _ok(dwf("aggregate", "--params", "params.yaml"))  # the digits study alone, committed
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a"]):
        subprocess.run(cmd, cwd=study, check=True)
    _ok(dwf("aggregate", "--params", "params.yaml"))  # unchanged numbers: nothing to diff
    assert len(dvc_metrics(study, "diff", "--md").stdout.strip().splitlines()) == 2  # header, rule
    write_runs(1)
    _ok(dwf("aggregate", "--params", "params.yaml"))
    diff = dvc_metrics(study, "diff", "--md")
    assert not diff.stderr and "metrics/models/digits/dwf.json" in diff.stdout
    assert max(map(len, diff.stdout.splitlines())) < 200, diff.stdout


# ---------------------------------------------------------------- aggregate: all or nothing


def test_aggregate_summary_holds_numbers_only(study):
    r = _ok(dwf("aggregate", "--params", "params.yaml"))
    summary = json.loads((study / "metrics/summary.json").read_text())
    assert numbers_only(summary) and summary["digits"]["dwf"]["clean"]["n"] == 2
    assert summary["digits"]["dwf"]["train_tmacs"]["mean"] == 0.9868  # cost travels as a metric (4 decimals)
    assert "fail" in (study / "reports/audit.md").read_text()  # the audit, from the details
    verdict = (study / "reports/verdict.md").read_text()  # the verdict, printed last too
    assert "Of DWF's size" in verdict and "ResNet-18 (benign expert)" in verdict
    assert (study / "reports/figures/cost_digits.png").stat().st_size > 0
    assert "digits: DWF:" in r.stdout


def test_aggregate_failing_midway_leaves_old_outputs_whole(study, monkeypatch):
    _ok(dwf("aggregate", "--params", "params.yaml"))
    before = snapshot(study)
    write_runs(1)  # other numbers: a partial write would differ from before
    real, calls = report.figure, []

    def figure_then_fail(*args, **kwargs):
        if calls:
            raise ValueError("disk full")
        calls.append(args)
        real(*args, **kwargs)

    monkeypatch.setattr(report, "figure", figure_then_fail)
    _one_line_error(dwf("aggregate", "--params", "params.yaml"), "disk full")
    assert calls  # it failed part-way, after writing tables and one figure
    assert snapshot(study) == before
    assert sorted(p.name for p in study.iterdir()) == ["metrics", "params.yaml", "reports"]
    assert sorted(p.name for p in (study / "metrics").iterdir()) == ["models", "runs", "summary.json"]

    monkeypatch.setattr(report, "figure", real)
    _ok(dwf("aggregate", "--params", "params.yaml"))
    after = snapshot(study)
    assert after.keys() == before.keys() and after != before


def test_aggregate_refuses_a_reports_folder_it_did_not_write(study):
    (study / "notes").mkdir()
    (study / "notes/thesis.txt").write_text("mine")
    _one_line_error(dwf("aggregate", "--params", "params.yaml", "--reports", "notes"), "thesis.txt")
    assert (study / "notes/thesis.txt").read_text() == "mine"
    _one_line_error(dwf("aggregate", "--params", "params.yaml", "--reports", "metrics"), "metrics")
    assert (study / paths.evaluation("digits", 0, "dwf")).is_file()


# ---------------------------------------------------------------- corrupt metrics: one line


@pytest.mark.parametrize("damage", ["headline", "details", "typed"])
def test_corrupt_metrics_file_is_one_line_naming_it(study, damage):
    path = paths.evaluation("digits", 1, "dwf")
    broken = metricsfile.details_path(path) if damage == "details" else path
    typed = '{"n_examples": 40, "clean": "high", "worst_case": 1.0}'
    broken.write_text(typed if damage == "typed" else '{"clean": 9')
    for cmd in (["table", str(path)], ["aggregate", "--params", "params.yaml"]):
        _one_line_error(dwf(*cmd), str(broken))


@pytest.mark.parametrize("model", MODELS)
def test_aggregate_refuses_runs_evaluated_on_other_numbers_of_examples(study, model):
    """Issue 23: an ad-hoc 20-example evaluation among the study's 360-example ones (of any
    model: a table's rows and the paired comparisons hold over the same images) is refused,
    and the published outputs stay as they were."""
    _ok(dwf("aggregate", "--params", "params.yaml"))
    before = snapshot(study)
    odd = paths.evaluation("digits", 1, model)
    write_metrics(odd, synthetic_metrics(7, n=20) | COSTS[model])
    err = _one_line_error(dwf("aggregate", "--params", "params.yaml"), str(odd), "20 test examples")
    assert str(paths.evaluation("digits", 0, "dwf")) in err and "on 50" in err
    assert snapshot(study) == before


@pytest.mark.parametrize("where, value", [("headline", float("nan")), ("headline", 250.0),
                                          ("headline", -1.0), ("details", 100.5)])
def test_accuracies_outside_0_100_are_refused(study, where, value):
    """Issue 23: `clean: NaN` or `250` in a metrics file (or an attack's 100.5 in its details)
    is no accuracy an evaluation gives: aggregate and table refuse it in one line."""
    path = paths.evaluation("digits", 1, "dwf")
    metrics = synthetic_metrics(3) | COSTS["dwf"]
    if where == "headline":
        metrics["clean"] = value
    else:
        metrics["pgd"]["10"] = value
    write_metrics(path, metrics)
    name = "clean" if where == "headline" else "pgd/10"
    for cmd in (["table", str(path)], ["aggregate", "--params", "params.yaml"]):
        _one_line_error(dwf(*cmd), str(path), f"accuracy {name} = ", "[0, 100]")


def _runs(values: dict[str, list[float]]) -> dict:
    return {"digits": {m: [{"clean": 90.0 + i, "worst_case": v, "n_examples": 360}
                           for i, v in enumerate(vs)] for m, vs in values.items()}}


def test_paired_comparison_arithmetic_by_hand():
    from dwf.verdict import paired

    t = paired([50.0, 52.0, 57.0], [10.0, 11.0, 13.0])  # differences 40, 41, 44: mean 41.6667
    sd = (((40 - 125 / 3) ** 2 + (41 - 125 / 3) ** 2 + (44 - 125 / 3) ** 2) / 2) ** 0.5
    assert t["diff"] == pytest.approx(41.6667, abs=1e-4) and t["n"] == 3
    assert t["ci95"] == pytest.approx(4.302653 * sd / 3 ** 0.5, abs=1e-3)  # t(0.975, 2) = 4.3027
    assert 0 < t["p"] < 0.001                                           # t = 34.6 on 2 df
    same = paired([50.0, 51.0], [50.0, 51.0])
    assert same["diff"] == 0 and same["p"] == 1.0


def test_statistics_table_pairs_dwf_with_every_model():
    from dwf.report import statistics_table

    text = statistics_table(_runs({"dwf": [50.0, 52.0, 57.0], "resnet18": [10.0, 11.0, 13.0]}))
    dwf_row, resnet_row = [ln for ln in text.splitlines() if ln.startswith("| DWF") or ln.startswith("| ResNet")]
    assert "| 3 | 360 |" in resnet_row and "+41.67 ± " in resnet_row
    assert dwf_row.endswith("| - | - | - | - |")  # DWF is not compared with itself


def test_table_columns_come_from_the_attack_records():
    """Tables 2-3 take their columns and headers from the records (issue 14: attacks described
    by data): FGSM by eps, then PGD-k by iterations, multi-restart, adaptive, as the paper."""
    records = paper_records()
    t2 = report._columns(records, "table2")
    t3 = report._columns(records, "table3")
    assert t2 == [("clean", "SA")] + [(f"fgsm/{e / 100:g}", f"FGSM {e / 100:g}") for e in range(1, 10)]
    assert [h for _, h in t3] == ["PGD-10", "PGD-20", "PGD-30", "PGD-40", "PGD-50", "PGD-100 (MS)",
                                  "PGD-100 (A)", "worst case"]
    relabelled = records | {"pgd/10": dataclasses.replace(records["pgd/10"], label="ten", steps=60)}
    assert [h for _, h in report._columns(relabelled, "table3")][:6] == [
        "PGD-20", "PGD-30", "PGD-40", "PGD-50", "ten", "PGD-100 (MS)"]


def test_a_metrics_file_without_attack_records_is_refused_naming_it(tmp_path):
    metrics = synthetic_metrics(0)
    del metrics[metricsfile.ATTACKS]
    write_metrics(tmp_path / "m.json", metrics)
    with pytest.raises(ValueError, match=r"m\.details\.json: no attack records"):
        metricsfile.read(tmp_path / "m.json")


def test_the_comparison_page_carries_the_forensics_section_of_the_first_run(study):
    """`dwf forensics` renders its section into its JSON; aggregate prints it on the comparison
    page (issue 13 item 4) and refuses a forensics file without one in one line."""
    path = paths.forensics("digits", 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"section": "## Protocol forensics: marker\n\nclamp_normalized: pattern\n"}))
    _ok(dwf("aggregate", "--params", "params.yaml"))
    page = (study / "reports" / "comparison.md").read_text()
    assert "# digits (CPU study): protocol forensics" in page and "### Protocol forensics: marker" in page
    path.write_text(json.dumps({"steps": [10]}))
    _one_line_error(dwf("aggregate", "--params", "params.yaml"), "not a dwf forensics file")
