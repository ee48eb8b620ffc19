"""The digits study (studies/digits): its pipeline is the root one, its params say what the
README claims (every system, five runs, the whole test set, standard AutoAttack)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from dwf.config import load_params

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "digits"


def _generator():
    spec = importlib.util.spec_from_file_location("study_pipeline", ROOT / "scripts" / "study-pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_pipeline_is_the_root_pipeline_regenerated():
    expected = _generator().study_pipeline((ROOT / "dvc.yaml").read_text())
    assert (STUDY / "dvc.yaml").read_text() == expected, "run: python scripts/study-pipeline.py digits"


def test_study_code_deps_point_at_the_package():
    stages = yaml.safe_load((STUDY / "dvc.yaml").read_text())["stages"]
    deps = [d for s in stages.values() for d in (s.get("do", s)).get("deps", [])]
    code = [d for d in deps if "src/" in d]
    assert code and all(d.startswith("../../src/dwf/") and (STUDY / d).exists() for d in code)


def test_study_params_are_the_full_study():
    p = load_params(STUDY / "params.yaml")
    ev = p.profile("digits").evaluate
    assert p.datasets == ("digits",) and p.runs == (0, 1, 2, 3, 4)
    assert set(p.baselines) == {"resnet18", "resnet18_fgsm_at", "resnet18_pgd_at", "trades", "soe", "advmoe",
                                "resnet34", "resnet50",  # the two cheapest zoo rows (docs/baselines.md)
                                "pgd_at_matched_cost", "trades_matched_cost", "pgd_at_matched_params"}
    assert set(p.routings) == {"uniform", "top1"}  # ablation (a): DWF's weights, other routings
    # ablations (b), (c): DWF trained another way; every expert alone (its best single expert)
    assert set(p.ablations) == {"frozen_experts", "no_pretraining", "fixed_strengths", "pgd_experts",
                                "five_experts"}
    assert set(p.evaluate_models) == {"dwf", *(f"experts/{e}" for e in p.experts), *p.baselines,
                                      *(f"dwf_{r}" for r in p.routings),
                                      *(f"dwf_{a}" for a in p.ablations)}
    assert ev.n_examples == 0 and ev.autoattack and ev.autoattack_n == 0  # all 360 digits
    assert ev.autoattack_version == "standard" and ev.square_queries == 5000
    assert (ev.ms_steps, ev.ms_restarts, ev.adaptive_steps) == (100, 3, 100)  # Table 4


def test_an_experiment_changes_one_line_of_the_study_params(tmp_path):
    """Issue 24: `dvc exp run -S seed=3` writes params.yaml back in its own style (block lists;
    a comment between a list and the next key is lost): the study's file is already in it, so
    the experiment's diff is the one value."""
    import subprocess
    import sys

    dvc = Path(sys.executable).parent / "dvc"
    original = (STUDY / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(original)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo\n    params:\n      - seed\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([dvc, "exp", "run", "-q", "-S", "seed=3"], cwd=tmp_path, check=True, capture_output=True)
    before, after = original.splitlines(), (tmp_path / "params.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and changed == [("seed: 0", "seed: 3")], changed
