"""Configuration: the real params.yaml parses, bad keys and values fail naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from typer.testing import CliRunner

from dwf import paths
from dwf.cli import app
from dwf.config import (EXPERT_KINDS, EXPERT_NAME, MODEL_NAME, NAME, ConfigError, check_name,
                        expert_kind, load_params, parse_params)

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
STUDY = Path(__file__).resolve().parents[1] / "studies" / "digits" / "params.yaml"


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(PARAMS.read_text())


def _with(raw, dotted: str, value):
    """A deep copy of raw with one dotted key set (or deleted when value is ...)."""
    out = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = out
    for k in parents:
        node = node[k]
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return out


def test_repository_params_parse(raw):
    p = parse_params(raw)  # only settings other stages do not tune are pinned here
    assert expert_kind("pgd_3") == "pgd" and all(expert_kind(e) in EXPERT_KINDS for e in p.experts)
    cifar = p.profile("cifar10")
    assert cifar.expert.pgd_eps == pytest.approx(8 / 255)  # written "8/255"
    assert cifar.evaluate.pgd_alpha == pytest.approx(2 / 255)
    assert p.profile("svhn").flip is False and cifar.flip is True  # YAML merge key + override


@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), ("2 / 255", 2 / 255), ("0.1", 0.1),
                                         (0, 0.0)])
def test_fractions_parse(raw, text, value):
    p = parse_params(_with(raw, "cifar10.evaluate.pgd_eps", text))
    assert p.profile("cifar10").evaluate.pgd_eps == pytest.approx(value)


# (dotted key, bad value, text the error must contain: the key as a user would look for it)
BAD = [
    ("cifar10.expert.epoch", 3, "cifar10.expert.epoch: unknown key"),
    ("cifar10.evaluate.n_example", 3, "cifar10.evaluate.n_example: unknown key"),
    ("seeed", 1, "seeed: unknown key"),
    ("cifar10.expert.epochs", "many", "cifar10.expert.epochs: expected an integer"),
    ("cifar10.expert.epochs", 1.5, "cifar10.expert.epochs: expected an integer"),
    ("cifar10.flip", "yes", "cifar10.flip: expected true or false"),
    ("cifar10.expert.lr", "fast", "cifar10.expert.lr: expected a number"),
    ("cifar10.expert.fgsm_eps", 0.1, "cifar10.expert.fgsm_eps: expected a list"),
    ("cifar10.expert.pgd_eps", 8, "cifar10.expert.pgd_eps"),
    ("cifar10.evaluate.pgd_eps", -0.1, "cifar10.evaluate.pgd_eps"),
    ("cifar10.joint.pgd_alpha", "3/2", "cifar10.joint.pgd_alpha"),
    ("cifar10.expert.fgsm_eps", [0.1, 1.5], "cifar10.expert.fgsm_eps"),
    ("experts", [], "experts: expected a non-empty list"),
    ("experts", ["benign", "cw_0"], "experts"),
    ("experts", ["benign", "benign"], "experts: expected unique names"),
    ("cifar10.expert.epochs", 0, "cifar10.expert.epochs: expected a value > 0"),
    ("cifar10.joint.epochs", 0, "cifar10.joint.epochs"),
    ("datasets", ["mnist"], "datasets: expected one of cifar10, svhn, digits, got 'mnist'"),
    ("mnist", {"width": 8}, "mnist: unknown key"),
    ("cifar10.expert.attack_bn", "frozen", "cifar10.expert.attack_bn"),
    ("cifar10.expert", ..., "cifar10"),  # a required section missing
    # one rule for names (issue 11): checked at load, before DVC or a shell sees them
    ("experts", ["benign", "benign_`touch PWNED`"], "experts: expected a name matching"),
    ("experts", ["benign", "fgsm_0\n"], "experts: expected a name matching"),
    ("experts", ["benign", "fgsm_0; rm -rf x"], "experts: expected a name matching"),
    ("experts", ["Benign"], "experts: expected a name matching"),
    ("experts", ["fgsm_1000"], "experts: expected a name matching"),
    ("evaluate_models", ["experts/../dwf"], "evaluate_models: expected a name matching"),
    ("runs", ["0"], "runs[0]: expected an integer"),
    # absurd numbers (issue 11 item 7): one error naming the key, before any allocation
    ("cifar10.expert.batch_size", 0, "cifar10.expert.batch_size: expected a value > 0"),
    ("cifar10.expert.batch_size", 10**7, "cifar10.expert.batch_size: expected a value <= 65536"),
    ("cifar10.expert.epochs", 10**9, "cifar10.expert.epochs: expected a value <= 10000"),
    ("cifar10.crop_padding", 100000, "cifar10.crop_padding: expected an integer in [0, 16]"),
    ("svhn.crop_padding", 17, "svhn.crop_padding: expected an integer in [0, 16]"),
    ("cifar10.width", 10**7, "cifar10.width: expected a value <= 1024"),
    ("cifar10.router_hidden", [1024, 10**7], "cifar10.router_hidden: expected values in [1, 1024]"),
    ("cifar10.expert.lr", 1e30, "cifar10.expert.lr: expected a value <= 10.0"),
    ("cifar10.joint.lr", 0, "cifar10.joint.lr: expected a value > 0"),
    ("cifar10.expert.pgd_steps", [10, 10**9], "cifar10.expert.pgd_steps: expected values in [1, 10000]"),
    ("cifar10.evaluate.batch_size", 0, "cifar10.evaluate.batch_size: expected a value > 0"),
    ("cifar10.evaluate.batch_size", 10**9, "cifar10.evaluate.batch_size: expected a value <= 65536"),
    ("cifar10.evaluate.ms_steps", 10**9, "cifar10.evaluate.ms_steps: expected a value <= 10000"),
    ("cifar10.evaluate.ms_restarts", 10**6, "cifar10.evaluate.ms_restarts: expected a value <= 100"),
    ("cifar10.evaluate.pgd_steps", [10**9], "cifar10.evaluate.pgd_steps: expected values in [1, 10000]"),
    ("cifar10.evaluate.square_queries", 10**12, "cifar10.evaluate.square_queries: expected a value <="),
    ("cifar10.baselines.trades.beta", 1e30, "cifar10.baselines.trades.beta: expected a value in [0, 1000.0]"),
    ("cifar10.baselines.soe.n_submodels", 10**6, "cifar10.baselines.soe.n_submodels: expected a value <= 64"),
    ("cifar10.baselines.advmoe.router_width", 10**7, "advmoe.router_width: expected a value <= 1024"),
    ("cifar10.baselines.advmoe.router_lr", 1e30, "advmoe.router_lr: expected a value <= 10.0"),
    ("seed", -1, "seed: expected an integer >= 0"),
    ("cpu_threads", 0, "cpu_threads: expected an integer in [1, 256]"),
    ("cpu_threads", 2.5, "cpu_threads: expected an integer"),
]


@pytest.mark.parametrize("key, value, message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_values_name_the_key(raw, key, value, message):
    with pytest.raises(ConfigError) as err:
        parse_params(_with(raw, key, value))
    assert message in str(err.value)


@pytest.mark.parametrize("pattern, good, bad", [
    (NAME, ["dwf", "digits", "resnet18_fgsm_at", "a" * 32],
     ["", "a" * 33, "1st", "Dwf", "a b", "a'b", "a`b`", "a$b", "a\n", "a/b", "..", None, 3]),
    (EXPERT_NAME, ["benign", "fgsm_0", "pgd_999"], ["benign_", "fgsm_1000", "cw_0", "pgd_0/..", "pgd_x"]),
    (MODEL_NAME, ["dwf", "experts/pgd_3", "resnet18"], ["experts/x", "experts/../../etc", "/dwf", "dwf/.."]),
])
def test_name_rule(pattern, good, bad):
    for name in good:
        check_name(name, "key", pattern)
    for name in bad:
        with pytest.raises(ConfigError, match="key: expected a name matching"):
            check_name(name, "key", pattern)


def test_paths_are_built_from_checked_names_only():
    assert str(paths.expert("digits", 2, "pgd_3")) == "models/digits/run2/experts/pgd_3.pt"
    assert paths.evaluation("svhn", 0, "external_timm_convnext_tiny.fb_in1k").parent.name == "eval"
    for build in (lambda: paths.model("digits", 0, "../../x"), lambda: paths.model("../x", 0, "dwf"),
                  lambda: paths.model("digits", -1, "dwf"), lambda: paths.expert("digits", 0, "dwf"),
                  lambda: paths.history("digits", 0, "a/b"),
                  lambda: paths.evaluation("digits", 0, "external_../../x")):
        with pytest.raises(ConfigError):
            build()


@pytest.mark.parametrize("args, key", [
    (["train-expert", "--expert", "benign_`touch PWNED`"], "--expert"),
    (["train", "--defense", "trades;touch PWNED"], "--defense"),
    (["evaluate", "--model", "experts/../../PWNED"], "--model"),
    (["audit", "--model", "../PWNED"], "--model"),
    (["train-joint", "--dataset", "../PWNED"], "--dataset"),
    (["download", "--dataset", "digits/../PWNED"], "--dataset"),
    (["train-expert", "--expert", "benign", "--set", "width=10000000"], "digits.width"),
    (["train-expert", "--expert", "benign", "--set", "expert.batch_size=0"], "digits.expert.batch_size"),
    (["train-joint", "--set", "crop_padding=100000"], "digits.crop_padding"),
    (["evaluate", "--set", "evaluate.batch_size=0"], "digits.evaluate.batch_size"),
])
def test_cli_refuses_bad_names_and_numbers_before_any_work(args, key, tiny_params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, [*args, "--params", str(tiny_params)])
    err = r.stderr.strip()
    assert r.exit_code == 2 and err.startswith(f"error: {key}: expected") and len(err.splitlines()) == 1, err
    assert [f.name for f in tmp_path.iterdir()] == ["params.yaml"]  # nothing written


def test_paper_values_stay_valid_at_the_bounds(raw):
    p = parse_params(raw)  # the paper's widths, batches, lr and attack budgets are inside them
    assert p.cpu_threads == 2 and p.profile("cifar10").evaluate.batch_size == 500
    assert p.profile("cifar10").baselines.get("soe").lr == pytest.approx(0.1)


def test_unknown_dataset_is_refused_by_profile(raw):
    with pytest.raises(ConfigError, match="dataset: expected one of cifar10, svhn, digits, got 'mnist'"):
        parse_params(raw).profile("mnist")


def test_params_are_frozen(raw):
    p = parse_params(raw)
    with pytest.raises(AttributeError):
        p.profile("cifar10").expert.epochs = 1


def test_set_overrides_one_dataset_section(tmp_path):
    p = load_params(PARAMS, "cifar10", ["expert.epochs=2", "evaluate.pgd_eps=0.1", "width=4"])
    cifar = p.profile("cifar10")
    assert cifar.expert.epochs == 2 and cifar.width == 4
    assert cifar.evaluate.pgd_eps == pytest.approx(0.1)
    # svhn shares cifar10's nested mappings through the YAML merge key: untouched all the same
    assert p.profile("svhn").expert.epochs == 150 and p.profile("svhn").width == 64
    assert cifar.joint == load_params(PARAMS).profile("cifar10").joint


def test_digits_study_params_parse_at_the_native_shape():
    digits = load_params(STUDY).profile("digits")
    assert digits.crop_padding <= 4 and digits.evaluate.pgd_eps == pytest.approx(0.2)


@pytest.mark.parametrize("item, message", [
    ("evaluate.pgd_eps=2", "digits.evaluate.pgd_eps"),
    ("expert.epochz=2", "digits.expert.epochz: unknown key"),
    ("expert.epochs", "expected key=value"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ConfigError) as err:
        load_params(STUDY, "digits", [item])
    assert message in str(err.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_params(bad)
    assert len(str(err.value).splitlines()) == 1 and "line 2" in str(err.value)


@pytest.mark.parametrize("item, says", [
    ("width=[1,", "expected the node content"),
    ("width=!!python/object:os.system x", "could not determine a constructor for the tag"),
    ("width=!!python/object/apply:os.system ['touch PWNED']", "could not determine a constructor"),
])
def test_set_values_that_are_not_plain_yaml_are_one_line(item, says, tiny_params, tmp_path,
                                                          monkeypatch):
    """Issue 23, item 6: both ended in a traceback; a tag builds nothing (safe_load)."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["train-expert", "--expert", "benign", "--set", item, "--params",
                                 str(tiny_params), "--out", "x.pt"])
    err = r.stderr.strip()
    assert r.exit_code == 2 and len(err.splitlines()) == 1, r.output
    assert err.startswith(f"error: --set {item!r}: not valid YAML (") and says in err
    assert [f.name for f in tmp_path.iterdir()] == ["params.yaml"]


# ---------------------------------------------------------------- names from DVC, not a shell


def _params_with(tmp_path, **lists) -> Path:
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**raw, **lists}))
    return path


@pytest.mark.parametrize("addressing, lists, item", [
    ("expert@cifar10-3-pgd_2", ("datasets", "runs", "experts"), ("cifar10", 3, "pgd_2")),
    ("studies/digits/dvc.yaml:evaluate@svhn-0-experts/benign", ("datasets", "runs", "evaluate_models"),
     ("svhn", 0, "experts/benign")),
    ("download@svhn", ("datasets",), ("svhn",)),
    ("joint@cifar10-4", ("datasets", "runs"), ("cifar10", 4)),
])
def test_dvc_stage_names_its_item(addressing, lists, item, tmp_path, monkeypatch):
    """`--dvc`: the stage DVC runs (its name in $DVC_STAGE) is one combination of the params
    lists, found there; the command line carries no params value (issue 23)."""
    from dwf.cli import _dvc_item

    monkeypatch.setenv("DVC_STAGE", addressing)
    assert _dvc_item(_params_with(tmp_path), lists) == item


@pytest.mark.parametrize("addressing, lists, experts", [
    ("expert@cifar10-9-pgd_2", ("datasets", "runs", "experts"), None),       # no run 9
    ("expert@cifar10-0-x'; touch PWN; '", ("datasets", "runs", "experts"), None),
    ("expert@cifar10-0-x'; touch PWN; '", ("datasets", "runs", "experts"),  # in params: refused there
     ["benign", "fgsm_0", "fgsm_1", "fgsm_2", "fgsm_3", "pgd_0", "pgd_1", "pgd_2", "x'; touch PWN; '"]),
    ("", ("datasets",), None),                                             # not run by DVC
])
def test_dvc_stage_that_is_no_item_is_refused(addressing, lists, experts, tmp_path, monkeypatch):
    from dwf.cli import _dvc_item

    monkeypatch.setenv("DVC_STAGE", addressing)
    params = _params_with(tmp_path, **({"experts": experts} if experts else {}))
    with pytest.raises(ValueError, match="experts: expected a name" if experts else "--dvc"):
        _dvc_item(params, lists)


def test_dvc_option_outside_dvc_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    _params_with(tmp_path)
    r = CliRunner().invoke(app, ["train-expert", "--dvc"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "$DVC_STAGE" in r.stderr
    r = CliRunner().invoke(app, ["train-expert"])
    assert r.exit_code == 2 and "--expert: required" in r.stderr
