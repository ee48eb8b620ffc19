"""The CLI end to end on a shrunken digits config, and its one-line, exit-code-2 input errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dwf import paths
from dwf.checkpoint import load_model
from dwf.cli import app


def dwf(*args: str):
    """Run `dwf ARGS` in this process; returns the click Result (stdout and stderr apart)."""
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _ok(result):
    assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Stages write models/ and metrics/ relative to the working directory, as under DVC."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_stage_end_to_end(workdir, tiny_params):
    p = ["--params", str(tiny_params), "--dataset", "digits", "--quiet"]
    _ok(dwf("download", "--params", str(tiny_params), "--quiet"))
    for expert in ("benign", "pgd_0"):
        assert "wrote" in _ok(dwf("train-expert", "--expert", expert, *p)).stdout
    _ok(dwf("train-joint", *p))
    models = sorted(f.name for f in (workdir / "models").rglob("*.pt"))
    assert models == ["benign.pt", "dwf.pt", "pgd_0.pt"]
    assert len(load_model(paths.model("digits", 0, "dwf")).experts) == 2

    _ok(dwf("evaluate", "--model", "dwf", *p))  # default paths, as dvc.yaml runs it
    out = paths.evaluation("digits", 0, "dwf")
    metrics = json.loads(out.read_text())
    assert metrics["n_examples"] == 40
    assert set(metrics["pgd"]) == {"2", "3"} and len(metrics["fgsm"]) == 2
    attacked = [v for g in ("fgsm", "pgd") for v in metrics[g].values()]
    attacked += [metrics["pgd3_ms"], metrics["pgd3_adaptive"]]
    assert metrics["worst_case"] <= min(attacked) <= max(attacked) <= 100
    assert len(metrics["gate_mean_weight"]) == 2
    assert len(metrics["per_example"]["worst_case_correct"]) == 40

    table = _ok(dwf("table", str(out))).stdout
    assert "dwf" in table and "|" in table
    _ok(dwf("aggregate", "--params", str(tiny_params)))
    assert json.loads((workdir / "metrics/summary.json").read_text())
    assert any((workdir / "reports").iterdir())


def test_evaluate_an_expert_by_checkpoint(workdir, tiny_params):
    p = ["--params", str(tiny_params), "--dataset", "digits", "--quiet"]
    ckpt = workdir / "e.pt"
    _ok(dwf("train-expert", "--expert", "benign", "--out", str(ckpt), *p))
    out = workdir / "e.json"
    _ok(dwf("evaluate", "--checkpoint", str(ckpt), "--out", str(out), *p,
            "--set", "evaluate.n_examples=20"))
    metrics = json.loads(out.read_text())
    assert metrics["n_examples"] == 20 and "gate_mean_weight" not in metrics


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err
    return err


def test_unknown_dataset_is_exit_2(workdir, tiny_params):
    r = dwf("train-expert", "--expert", "benign", "--params", str(tiny_params), "--dataset", "mnist")
    _one_line_error(r, "mnist")


def test_eps_outside_unit_range_via_set_is_exit_2(workdir, tiny_params):
    r = dwf("evaluate", "--params", str(tiny_params), "--dataset", "digits", "--checkpoint", "x.pt",
            "--out", "m.json", "--set", "evaluate.pgd_eps=8")
    _one_line_error(r, "digits.evaluate.pgd_eps")
    assert not (workdir / "m.json").exists()


def test_missing_checkpoint_is_exit_2(workdir, tiny_params):
    r = dwf("evaluate", "--params", str(tiny_params), "--dataset", "digits",
            "--checkpoint", str(workdir / "nope.pt"), "--out", "m.json")
    _one_line_error(r, "nope.pt", "not found")


def test_missing_experts_for_joint_training_is_exit_2(workdir, tiny_params):
    r = dwf("train-joint", "--params", str(tiny_params), "--dataset", "digits", "--quiet")
    _one_line_error(r, "benign.pt")


def test_expert_not_in_params_is_exit_2(workdir, tiny_params):
    r = dwf("train-expert", "--expert", "fgsm_7", "--params", str(tiny_params), "--dataset", "digits")
    _one_line_error(r, "fgsm_7")


def test_module_entry_point(workdir, tiny_params):
    """`python -m dwf` is the same app, with the same exit code and single error line."""
    r = subprocess.run([sys.executable, "-m", "dwf", "train-expert", "--expert", "benign",
                        "--params", str(tiny_params), "--dataset", "mnist"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
