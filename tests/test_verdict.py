"""The verdict written from the metrics (dwf.verdict): which rows it compares DWF with, what the
paired interval lets it say, and the cost-robustness front."""

from __future__ import annotations

from dwf import verdict


def _runs(worst: list[float], tmacs: float, params: float) -> list[dict]:
    return [{"worst_case": w, "clean": 95.0, "train_tmacs": tmacs, "params_m": params} for w in worst]


PER_RUN = {
    "dwf": _runs([50.0, 52.0, 51.0], 1.0, 2.0),
    "resnet18_pgd_at": _runs([30.0, 35.0, 33.0], 0.05, 0.2),        # the paper's comparison
    "pgd_at_matched_cost": _runs([60.0, 61.5, 61.0], 1.04, 0.2),    # within 5% of DWF's cost
    "trades_matched_cost": _runs([80.0, 80.0, 80.0], 1.2, 0.2),     # over budget: never chosen
    "pgd_at_matched_params": _runs([49.0, 53.0, 50.5], 0.9, 2.1),
    "external": [{"worst_case": 99.0, "clean": 99.0, "params_m": 1.0}] * 3,  # no training cost
}


def test_the_verdict_compares_with_the_best_row_within_dwfs_cost_and_size():
    said = verdict.sentences(PER_RUN)
    assert said[0].startswith("DWF: 51.00% worst-case robust accuracy over 3 runs")
    cost, size, paper = said[1:]
    assert "PGD-AT at DWF's cost" in cost and "**DWF is less robust**" in cost  # 80% row is over budget
    assert "TRADES" not in cost and "external" not in " ".join(said)
    assert "PGD-AT at DWF's parameters" in size  # the one row of 1-2.1 M parameters within the cost
    assert "ResNet-18 (PGD-AT)" in paper and "**DWF is more robust**" in paper


def test_a_difference_inside_its_interval_is_not_a_verdict():
    per_run = {"dwf": PER_RUN["dwf"], "pgd_at_matched_params": PER_RUN["pgd_at_matched_params"]}
    cost = verdict.sentences(per_run)[1]
    assert "no difference the runs can resolve" in cost  # differences +1, -1, +0.5


def test_the_front_keeps_only_points_no_cheaper_point_beats():
    points = [(1.0, 50.0), (0.05, 40.0), (0.98, 60.0), (5.0, 70.0), (2.0, 55.0)]
    assert verdict.front(points) == [(0.05, 40.0), (0.98, 60.0), (5.0, 70.0)]


def test_no_dwf_no_verdict():
    assert verdict.sentences({"resnet18_pgd_at": PER_RUN["resnet18_pgd_at"]}) == []


def test_the_ablation_page_pairs_dwf_with_each_ablation_of_itself():
    per_run = {"digits": {**PER_RUN, "dwf_uniform": _runs([40.0, 41.0, 39.0], 1.0, 2.0),
                          "dwf_top1": _runs([50.0, 53.0, 50.5], 1.0, 2.0)}}
    page = verdict.ablation_page(per_run, {"digits": "Digits"})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in page.splitlines() if line.startswith("| DWF")}
    assert set(rows) == {"DWF (ours)", "DWF, its experts' uniform average (no gate)",
                         "DWF, top-1 routing by its gate"}
    uniform = rows["DWF, its experts' uniform average (no gate)"]
    assert "+11.00 ±" in uniform and "DWF is more robust" in uniform  # differences 10, 11, 12
    assert "no difference the runs can resolve" in rows["DWF, top-1 routing by its gate"]
    assert "PGD-AT" not in page  # the matched baselines are the verdict's, not ablations
    empty = verdict.ablation_page({"digits": PER_RUN}, {"digits": "Digits"})
    assert "No ablation was evaluated" in empty


def test_dwfs_own_variants_and_experts_are_never_the_verdicts_competitor():
    """An ablation of DWF or one of its experts within its cost is reports/ablations.md's row,
    not the system DWF is judged against."""
    per_run = {**PER_RUN, "dwf_pgd_experts": _runs([90.0, 90.0, 90.0], 0.5, 1.0),
               "experts/pgd_0": _runs([95.0, 95.0, 95.0], 0.1, 0.2)}
    cost = verdict.sentences(per_run)[1]
    assert "PGD-AT at DWF's cost" in cost and "pgd_0" not in cost and "PGD experts" not in cost


def test_the_best_single_expert_is_chosen_per_run_and_paired_with_dwf():
    per_run = {"digits": {**PER_RUN, "experts/benign": _runs([0.0, 0.0, 0.0], 0.01, 0.2),
                          "experts/pgd_0": _runs([45.0, 40.0, 44.0], 0.02, 0.2),
                          "experts/pgd_1": _runs([41.0, 47.0, 43.0], 0.02, 0.2)}}
    best = verdict.best_expert(per_run["digits"])
    assert [r["expert"] for r in best] == ["experts/pgd_0", "experts/pgd_1", "experts/pgd_0"]
    assert [r["worst_case"] for r in best] == [45.0, 47.0, 44.0]
    page = verdict.ablation_page(per_run, {"digits": "Digits"})
    row = next(line for line in page.splitlines() if "best single expert" in line)
    assert "(per run: pgd_0, pgd_1, pgd_0)" in row and "+5.67 ±" in row  # 50-45, 52-47, 51-44
    assert "upper bound" in page  # chosen on the test digits, and said so
    assert verdict.best_expert({"experts/pgd_0": per_run["digits"]["experts/pgd_0"]}) == []
