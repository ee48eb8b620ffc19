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
    assert set(p.evaluate_models) == {"dwf", "experts/benign", *p.baselines}
    assert ev.n_examples == 0 and ev.autoattack and ev.autoattack_n == 0  # all 360 digits
    assert ev.autoattack_version == "standard" and ev.square_queries == 5000
    assert (ev.ms_steps, ev.ms_restarts, ev.adaptive_steps) == (100, 3, 100)  # Table 4
