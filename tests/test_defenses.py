"""Tests for the baselines (dwf.defenses): registry and settings, one short training run per
defense, hard-routed models as plain classifiers, and external classifiers through the CLI."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dwf import checkpoint, data, models, report
from dwf.cli import app
from dwf.config import (Baselines, ConfigError, Defense, ZooConfig, arch_kwargs, load_params,
                        parse_params)
from dwf.defenses import DEFENSES, advmoe, at, train_defense, trades
from dwf.defenses.advmoe import expert_step
from dwf.defenses.soe import soe_loss
from dwf.models.advmoe import ADVMoEResNet18
from dwf.train import Phase, fit

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "digits" / "params.yaml"  # the digits settings of every defense
ARCH = {"num_classes": 10, "width": 4, "mean": data.MEAN_STD["digits"][0],
        "std": data.MEAN_STD["digits"][1], "in_channels": data.SHAPE["digits"][0]}
SHAPE = data.SHAPE["digits"]


@pytest.fixture(scope="module")
def defense_data(tmp_path_factory):
    """A data root holding digits (this module's own; conftest's may change under us)."""
    root = tmp_path_factory.mktemp("data")
    data.download("digits", root, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_train(defense_data):
    x, y = data.load_split("digits", defense_data, "train")
    return x[:64], y[:64]


@pytest.fixture(scope="module")
def params():
    """The paper's params with the digits study's section beside cifar10 and svhn."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return parse_params({**raw, "digits": yaml.safe_load(STUDY.read_text())["digits"]})


def _tiny(cfg):
    """One epoch of two batches, one attack step: exercises every code path quickly."""
    return dataclasses.replace(cfg, epochs=1, batch_size=32, pgd_steps=(1,))


# ---------------------------------------------------------------- registry and settings


# DWF's cost- and size-matched rows: set for the paper, run on request (docs/baselines.md)
OPT_IN = {"pgd_at_matched_cost", "trades_matched_cost", "pgd_at_matched_params", "trades_matched_params"}


def test_the_paper_trains_and_evaluates_every_registered_defense(params):
    assert set(params.baselines) == set(DEFENSES) - OPT_IN
    assert set(DEFENSES) - OPT_IN <= set(params.evaluate_models)
    for dataset in ("cifar10", "svhn"):
        for name in DEFENSES:
            cfg = params.profile(dataset).baselines.get(name)
            assert isinstance(cfg, DEFENSES[name].settings) and cfg.epochs >= 1


def test_paper_settings_reach_the_baselines(params):
    b = params.profile("cifar10").baselines
    fgsm_at, pgd_at = b.get("resnet18_fgsm_at"), b.get("resnet18_pgd_at")
    assert fgsm_at.fgsm_eps == (0.03,) and fgsm_at.adv_fraction == 0.5
    assert pgd_at.pgd_eps == pytest.approx(8 / 255) and pgd_at.pgd_steps == (10,)
    advmoe_cfg, soe_cfg = b.get("advmoe"), b.get("soe")
    assert (advmoe_cfg.epochs, advmoe_cfg.lr, advmoe_cfg.pgd_steps) == (200, 0.1, (2,))
    assert (soe_cfg.epochs, soe_cfg.lr, soe_cfg.batch_size) == (200, 0.1, 128)
    assert params.profile("svhn").baselines == b  # svhn merges the cifar10 anchor


def _optimizer(cfg):
    return cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay


@pytest.mark.parametrize("name, width", [("vgg19", 64), ("resnet34", 64), ("resnet50", 64),
                                         ("densenet121", 12), ("densenet169", 32), ("googlenet", 64),
                                         ("inception_v3", 32), ("xception", 32), ("mobilenet_v2", 32)])
def test_zoo_rows_train_plainly_at_their_sources_width(params, name, width):
    b = params.profile("cifar10").baselines
    assert DEFENSES[name].arch == name and DEFENSES[name].undefended
    assert _optimizer(b.get(name)) == _optimizer(b.get("resnet18"))  # Table 5, as resnet18
    assert arch_kwargs(name, ARCH, b.get(name)) == {**ARCH, "width": width}  # not ResNet-18's


def test_arch_settings_extend_the_profiles_arguments(params):
    b = params.profile("digits").baselines
    assert arch_kwargs("resnet18", ARCH, b.get("resnet18")) == ARCH
    assert arch_kwargs("soe", ARCH, b.get("soe")) == {**ARCH, "n_submodels": 3}
    assert arch_kwargs("advmoe", ARCH, b.get("advmoe")) == {
        **ARCH, "n_experts": 2, "ratio": 0.5, "router_width": 4, "router_blocks": 1}


@pytest.mark.parametrize("section, message", [
    ({"soe": {"epochs": 1, "n_experts": 2}}, "baselines.soe.n_experts: unknown key"),
    ({"vgg": {"epochs": 1}}, "baselines.vgg: unknown key"),
    ({"vgg19": {"epochs": 1}}, "baselines.vgg19: .*'width'"),  # a zoo row's width is required
    ({"advmoe": {"epochs": 1, "router_objective": "both"}}, "router_objective"),
    ({"resnet18_pgd_at": {"epochs": 1, "adv_fraction": 1.5}}, "adv_fraction"),
])
def test_bad_baseline_settings_are_refused(section, message):
    raw = yaml.safe_load(STUDY.read_text())
    raw["digits"]["baselines"] = section
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_missing_settings_are_named():
    with pytest.raises(ConfigError, match="baselines.soe: no settings"):
        Baselines().get("soe")


# ---------------------------------------------------------------- training, one short epoch each


def _study_baselines() -> list[str]:
    return yaml.safe_load(STUDY.read_text())["baselines"]


@pytest.mark.parametrize("name", _study_baselines())
def test_each_defense_trains_and_reloads(name, params, tiny_train, tmp_path):
    cfg = _tiny(params.profile("digits").baselines.get(name))
    out = tmp_path / f"{name}.pt"
    history = train_defense(name, *tiny_train, cfg=cfg, arch_kwargs=ARCH, dataset="digits",
                            seed=3, flip=False, crop_padding=2, out=out,
                            device=torch.device("cpu"), progress=False)
    assert len(history) == 1 and history[0]["loss"] == history[0]["loss"]  # one finite epoch
    assert not out.with_name(out.name + ".resume").exists()
    model = checkpoint.load_model(out, dataset="digits")
    x = data.to_unit(tiny_train[0][:5])
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (5, 10)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, model(x))  # deterministic in eval mode
    torch.manual_seed(3)
    fresh = models.build(checkpoint.load(out)["arch"], **checkpoint.load(out)["arch_kwargs"])
    moved = [not torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters())]
    assert all(moved)  # every parameter (router included) was trained


@pytest.mark.parametrize("arch, kwargs", [
    ("soe", {**ARCH, "n_submodels": 3}),
    ("advmoe_resnet18", {**ARCH, "n_experts": 3, "router_width": 4, "router_blocks": 1}),
])
def test_hard_routed_models_are_plain_classifiers(arch, kwargs):
    torch.manual_seed(0)
    model = models.build(arch, **kwargs).eval()
    x = torch.rand(6, *SHAPE)
    w = model.gate_weights(x)
    assert w.shape == (6, 3) and torch.equal(w.sum(1), torch.ones(6))
    assert torch.equal(w.max(1).values, torch.ones(6))  # one-hot: one expert answers
    assert torch.allclose(model(x), torch.einsum("ne,nec->nc", w, model.expert_logits(x)), atol=1e-5)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    assert grad.abs().sum() > 0


def test_a_phase_moves_only_its_parameters(tiny_train, params, tmp_path):
    cfg = _tiny(params.profile("digits").baselines.get("advmoe"))
    torch.manual_seed(0)
    model = ADVMoEResNet18(n_experts=2, **ARCH, router_width=4, router_blocks=1)
    router = [p.clone() for p in model.router_parameters()]
    experts = [p.clone() for p in model.expert_parameters()]
    # the expert step's TRADES loss reaches the router through the straight-through gate ...
    out = expert_step(model, data.to_unit(tiny_train[0][:8]), tiny_train[1][:8], cfg,
                      torch.Generator().manual_seed(0))
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router_parameters())
    # ... but the phase updates only the experts
    model.zero_grad(set_to_none=True)
    fit(model, [Phase(expert_step, ADVMoEResNet18.expert_parameters)], *tiny_train, cfg=cfg,
        seed=0, flip=False, crop_padding=2, resume_path=tmp_path / "x.resume",
        meta={"arch": "advmoe_resnet18", "arch_kwargs": {}}, device=torch.device("cpu"),
        progress=False)
    assert all(torch.equal(a, b) for a, b in zip(router, model.router_parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(experts, model.expert_parameters()))


def test_alternating_training_resumes_exactly(tiny_train, params, tmp_path):
    cfg = dataclasses.replace(_tiny(params.profile("digits").baselines.get("advmoe")), epochs=2)
    kwargs = {**ARCH, "router_width": 4, "router_blocks": 1}

    def train(phases, resume_path):
        torch.manual_seed(0)
        model = ADVMoEResNet18(**kwargs)
        fit(model, phases, *tiny_train, cfg=cfg, seed=0, flip=False, crop_padding=2,
            resume_path=resume_path, meta={"arch": "advmoe_resnet18", "arch_kwargs": kwargs},
            device=torch.device("cpu"), progress=False)
        return model

    calls = []

    def crash_in_epoch_2(*args):
        calls.append(1)
        if len(calls) > 2:  # two batches per epoch
            raise KeyboardInterrupt
        return advmoe.expert_step(*args)

    straight = train(advmoe.phases(cfg), tmp_path / "a.resume")
    phases = advmoe.phases(cfg)
    with pytest.raises(KeyboardInterrupt):
        train([dataclasses.replace(phases[0], recipe=crash_in_epoch_2), phases[1]],
              tmp_path / "b.resume")
    assert checkpoint.load(tmp_path / "b.resume")["epoch"] == 1
    resumed = train(phases, tmp_path / "b.resume")  # both optimizer groups restored
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(),
                                                 resumed.state_dict().values()))


# ---------------------------------------------------------------- recipes


def test_at_attacks_only_the_adversarial_fraction(params):
    cfg = params.profile("digits").baselines.get("resnet18_fgsm_at")
    torch.manual_seed(0)
    model = models.build("resnet18", **ARCH).eval()
    x, y = torch.rand(10, *SHAPE), torch.arange(10)
    x_mix, y_mix = at.fgsm_at_batch(model, x, y, cfg, torch.Generator().manual_seed(0))
    k = round(cfg.adv_fraction * len(x))
    assert torch.equal(x_mix[k:], x[k:]) and torch.equal(y_mix, y)
    delta = (x_mix[:k] - x[:k]).abs()
    assert delta.max() <= cfg.fgsm_eps[0] + 1e-6 and (delta.flatten(1).amax(1) > 0).all()
    assert not model.training  # the recipe restores the caller's mode


def test_kl_adversary_stays_in_the_ball_and_is_seeded():
    torch.manual_seed(0)
    model = models.build("resnet18", **ARCH).eval()
    x = torch.rand(4, *SHAPE)

    def run(seed):
        return trades.kl_adversary(lambda z: [model(z)], x, eps=0.1, alpha=0.03, steps=3,
                                   start_std=0.001, generator=torch.Generator().manual_seed(seed))
    x_adv = run(1)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv, run(1)) and not torch.equal(x_adv, run(2))
    assert trades.trades_objective(model, x, x_adv, torch.arange(4), 6.0).loss > 0


def test_soe_loss_trains_the_confidence_heads():
    torch.manual_seed(0)
    model = models.build("soe", **ARCH, n_submodels=2)
    x, y = torch.rand(8, *SHAPE), torch.arange(8) % 10
    loss, selected = soe_loss(model, x, y, confidence_weight=1.0)
    loss.backward()
    assert selected.shape == (8, 10)
    assert all(h.weight.grad.abs().sum() > 0 for h in model.confidence)
    model.zero_grad()
    soe_loss(model, x, y, confidence_weight=0.0)[0].backward()
    assert all(h.weight.grad is None or h.weight.grad.abs().sum() == 0 for h in model.confidence)


# ---------------------------------------------------------------- CLI: train, external models


@pytest.fixture
def tiny_params(defense_data, tmp_path):
    """The repo's params with a shrunken digits section: narrow, one epoch, a short protocol."""
    raw = yaml.safe_load(STUDY.read_text())
    raw.update(datasets=["digits"], data_root=str(defense_data))
    digits = raw["digits"]
    digits["width"] = 4
    digits["baselines"]["resnet18"].update(epochs=1)
    digits["evaluate"].update(n_examples=16, batch_size=16, fgsm_eps=[0.1], pgd_steps=[2],
                              ms_steps=2, ms_restarts=2, adaptive_steps=2, strong=False,
                              autoattack=False, audit=False)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_trains_a_baseline(tiny_params, tmp_path):
    runner = CliRunner()
    out = tmp_path / "m" / "resnet18.pt"
    args = ["train", "--defense", "resnet18", "--params", str(tiny_params), "--out", str(out),
            "--history", str(tmp_path / "h.json"), "--device", "cpu", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert checkpoint.load(out)["defense"] == "resnet18"
    bad = runner.invoke(app, ["train", "--defense", "vgg", "--params", str(tiny_params), "--quiet"])
    assert bad.exit_code == 2 and "--defense" in bad.output


def test_a_new_row_is_one_registry_entry(defense_data, tmp_path, monkeypatch):
    """A made-up defense, registered only in DEFENSES: parsed from params, trained by
    `dwf train --defense`, labelled in the tables."""
    monkeypatch.setitem(DEFENSES, "made_up", Defense("Made-up net", ZooConfig, "mobilenet_v2",
                                                     "benign", ("width",)))
    raw = yaml.safe_load(STUDY.read_text())
    raw.update(datasets=["digits"], data_root=str(defense_data), baselines=["made_up"],
               evaluate_models=["dwf", "made_up"])
    raw["digits"]["baselines"] = {"made_up": {"epochs": 1, "batch_size": 64, "lr": 0.05, "width": 4}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_params(path).profile("digits").baselines.get("made_up") == ZooConfig(
        epochs=1, batch_size=64, lr=0.05, width=4)
    out = tmp_path / "made_up.pt"
    result = CliRunner().invoke(app, ["train", "--defense", "made_up", "--params", str(path),
                                      "--out", str(out), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    ckpt = checkpoint.load(out)
    assert (ckpt["defense"], ckpt["arch"], ckpt["arch_kwargs"]["width"]) == ("made_up", "mobilenet_v2", 4)
    assert "| Made-up net |" in report.table({"digits": {"made_up": {}}}, "table2", {})


def test_cli_evaluates_an_external_torchvision_model(tiny_params, tmp_path, monkeypatch):
    from torchvision.models import resnet18

    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(resnet18(num_classes=10).state_dict(), weights)
    monkeypatch.chdir(tmp_path)  # default output paths are relative
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--external", "resnet18", "--weights", str(weights),
                                 "--params", str(tiny_params), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "metrics/runs/digits/run0/eval/external_resnet18.json"  # not dwf's metrics
    from dwf.metricsfile import read

    metrics = read(out)  # the headline numbers and the details beside them
    assert metrics["external"] == "resnet18" and metrics["n_examples"] == 16
    assert 0 <= metrics["worst_case"] <= metrics["clean"] <= 100
    wrong = runner.invoke(app, ["evaluate", "--external", "vgg11", "--weights", str(weights),
                                "--params", str(tiny_params), "--out", "vgg11.json", "--quiet"])
    assert wrong.exit_code == 2 and "does not fit" in wrong.output


def test_cli_refuses_a_published_network_on_another_dataset(tiny_params, tmp_path, monkeypatch):
    """An SVHN network of [40] evaluated on digits (or CIFAR-10) is refused before any work."""
    torch.save({}, tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--external", "dadalto:resnet34", "--weights",
                                      str(tmp_path / "w.pth"), "--params", str(tiny_params), "--quiet"])
    assert result.exit_code == 2 and "trained on svhn, not digits" in result.output
