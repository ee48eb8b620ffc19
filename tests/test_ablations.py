"""Ablations (b), (c) of issue 22: DWF trained another way, declared in params (config.Ablation)
and trained by `dwf train-joint --ablation`. What each changes, and only that: frozen experts
keep their pretrained weights and BatchNorm statistics while the gate learns; no pretraining
starts from the random experts (same router); a subset mixes only its experts; the evaluation
records the training each one took."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import _tiny_section
from dwf import checkpoint, paths, plan
from dwf.checkpoint import load_model
from dwf.cli import app
from dwf.config import ConfigError, TrainConfig, load_params, parse_params
from dwf.defenses import dwf as dwf_defense
from dwf.metricsfile import read

CPU = torch.device("cpu")
ABLATIONS = {"frozen_experts": {"train_experts": False},
             "no_pretraining": {"pretrained": False, "epochs": 2},
             "fixed_strengths": {"fgsm_eps": [0.1], "pgd_steps": [2]},
             "pgd_experts": {"experts": ["pgd_0"]}}


def dwf(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _raw(**top) -> dict:
    section = {**_tiny_section(), "ablations": ABLATIONS}
    return {"seed": 0, "runs": [0], "datasets": ["digits"], "experts": ["benign", "pgd_0"],
            "ablations": list(ABLATIONS), "digits": section, **top}


@pytest.mark.parametrize("change, says", [
    ({"ablations": ["frozen"]}, "ablations: expected one of"),
    ({"evaluate_models": ["dwf_five_experts"]}, "evaluate_models"),  # not in `ablations`
    ({"ablations": ["five_experts"]}, "digits.ablations.five_experts: no settings"),
])
def test_ablation_names_are_checked(change, says):
    with pytest.raises(ConfigError, match=says):
        parse_params(_raw(**change))


@pytest.mark.parametrize("setting, says", [
    ({"experts": ["pgd_1"]}, "experts"),                            # not one of params' experts
    ({"pretrained": False, "train_experts": False}, "train_experts"),  # random and frozen
    ({"epochs": 0}, "epochs"),
    ({"pgd_steps": [0]}, "pgd_steps"),                              # validated as the joint phase's
    ({"width": 8}, "unknown key"),
])
def test_ablation_settings_are_checked(setting, says):
    raw = _raw()
    raw["digits"]["ablations"] = {**ABLATIONS, "pgd_experts": setting}
    with pytest.raises(ConfigError, match=says):
        p = parse_params(raw)
        ab, _ = p.ablation("digits", "pgd_experts")
        ab.joint(p.profile("digits").joint)


def test_an_ablation_changes_only_what_it_names():
    p = parse_params(_raw(evaluate_models=["dwf", "dwf_fixed_strengths"]))
    joint = p.profile("digits").joint
    fixed, mixed = p.ablation("digits", "fixed_strengths")
    assert mixed == ("benign", "pgd_0") and fixed.pretrained and fixed.train_experts
    changed = fixed.joint(joint)
    assert (changed.fgsm_eps, changed.pgd_steps) == ((0.1,), (2,))
    assert (changed.epochs, changed.lr, changed.pgd_eps) == (joint.epochs, joint.lr, joint.pgd_eps)
    assert p.ablation("digits", "pgd_experts")[1] == ("pgd_0",)
    assert p.ablation("digits", "no_pretraining")[0].joint(joint).epochs == 2


def _experts(digits, folder: Path) -> list[Path]:
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, fgsm_eps=(0.1,), pgd_eps=0.1,
                      pgd_alpha=0.05, pgd_steps=(1,))
    from conftest import digits_arch

    out = []
    for kind in ("benign", "pgd"):
        path = folder / f"{kind}.pt"
        dwf_defense.train_expert(kind, digits[0][:256], digits[1][:256], cfg=cfg,
                                 arch_kwargs=digits_arch(4), dataset="digits", seed=1, flip=False,
                                 crop_padding=0, out=path, device=CPU, progress=False)
        out.append(path)
    return out


def _joint(digits, experts, out, **ablation):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, fgsm_eps=(0.1,), pgd_eps=0.1,
                      pgd_alpha=0.05, pgd_steps=(1,))
    dwf_defense.train_joint(experts, digits[0][:256], digits[1][:256], cfg=cfg, router_hidden=(16,),
                            dataset="digits", seed=3, flip=False, crop_padding=0, out=out,
                            device=CPU, progress=False, **ablation)
    return checkpoint.load(out)


def test_frozen_experts_keep_weights_and_statistics_while_the_gate_learns(digits, tmp_path):
    experts = _experts(digits, tmp_path)
    frozen = _joint(digits, experts, tmp_path / "frozen.pt", train_experts=False)
    joint = _joint(digits, experts, tmp_path / "joint.pt")
    start, _, _ = dwf_defense.build_mixture(experts, router_hidden=(16,), seed=3, dataset="digits")
    before = start.state_dict()
    for k, v in frozen["state_dict"].items():
        if k.startswith("experts."):  # weights and BatchNorm running statistics alike
            assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, before[k]) for k, v in frozen["state_dict"].items()
               if k.startswith("router."))
    moved = [k for k, v in joint["state_dict"].items()
             if k.startswith("experts.") and not torch.equal(v, before[k])]
    assert moved  # Algorithm 3 itself trains the experts
    assert frozen["ablation"] == {"pretrained": True, "train_experts": False}
    assert frozen["arch"] == "softmoe" and "moe." not in "".join(frozen["state_dict"])  # DWF's format


def test_no_pretraining_starts_from_random_experts_and_the_same_router(digits, tmp_path):
    experts = _experts(digits, tmp_path)
    pre, _, _ = dwf_defense.build_mixture(experts, router_hidden=(16,), seed=3, dataset="digits")
    rand, _, _ = dwf_defense.build_mixture(experts, router_hidden=(16,), seed=3, dataset="digits",
                                           pretrained=False)
    a, b = pre.state_dict(), rand.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("router."))
    loaded = checkpoint.load(experts[0])["state_dict"]  # the first expert's pretrained weights
    assert all(torch.equal(a[f"experts.0.{k}"], v) for k, v in loaded.items())
    weights = [k for k in loaded if k.endswith("weight")]
    assert not any(torch.equal(b[f"experts.0.{k}"], loaded[k]) for k in weights if loaded[k].dim() > 1)


@pytest.fixture
def ablated(tmp_path, digits_root, monkeypatch) -> Path:
    """A tiny project with two experts trained and the ablations declared (params)."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    raw = {**_raw(), "data_root": str(digits_root)}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    p = ["--params", "params.yaml", "--dataset", "digits", "--quiet"]
    for expert in ("benign", "pgd_0"):
        assert dwf("train-expert", "--expert", expert, *p).exit_code == 0
    return root


def test_the_cli_trains_an_ablation_as_params_declare_it_and_evaluate_costs_it(ablated, monkeypatch):
    """`--ablation` and the DVC stage's `--dvc` write the same checkpoint, the subset's experts
    only; its evaluation records the training it took (dwf.plan.training_cost)."""
    p = ["--params", "params.yaml", "--dataset", "digits", "--quiet"]
    r = dwf("train-joint", "--ablation", "pgd_experts", *p)
    assert r.exit_code == 0, r.stderr
    path = paths.model("digits", 0, "dwf_pgd_experts")
    ckpt = checkpoint.load(path)
    assert ckpt["defense"] == "dwf_pgd_experts" and [Path(e).name for e in ckpt["experts"]] == ["pgd_0.pt"]
    assert len(load_model(path).experts) == 1
    first = path.read_bytes()
    path.unlink()
    monkeypatch.setenv("DVC_STAGE", "dvc.yaml:ablation@digits-0-pgd_experts")
    assert dwf("train-joint", "--dvc", "--params", "params.yaml", "--quiet").exit_code == 0
    assert path.read_bytes() == first  # same stage, same bytes: DVC caches it
    monkeypatch.delenv("DVC_STAGE")

    r = dwf("evaluate", "--model", "dwf_pgd_experts", *p)
    assert r.exit_code == 0, r.stderr
    m = read(paths.evaluation("digits", 0, "dwf_pgd_experts"))
    params = load_params("params.yaml")
    cost = plan.training_cost(params, "digits", params.profile("digits"), "dwf_pgd_experts")
    assert m["train_tmacs"] == cost["train_tmacs"] > 0
    assert cost["train_tmacs"] < plan.training_cost(params, "digits", params.profile("digits"),
                                                    "dwf")["train_tmacs"]  # one expert, not two


def test_an_unknown_or_undeclared_ablation_is_one_line(ablated):
    for name, says in (("frozen", "--ablation"), ("five_experts", "no settings")):
        r = dwf("train-joint", "--ablation", name, "--params", "params.yaml", "--dataset", "digits")
        assert r.exit_code == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
