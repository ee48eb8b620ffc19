"""Configuration: the real params.yaml parses, bad keys and values fail naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from dwf.config import EXPERT_KINDS, ConfigError, expert_kind, load_params, parse_params

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


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
]


@pytest.mark.parametrize("key, value, message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_values_name_the_key(raw, key, value, message):
    with pytest.raises(ConfigError) as err:
        parse_params(_with(raw, key, value))
    assert message in str(err.value)


def test_unknown_dataset_is_refused_by_profile(raw):
    with pytest.raises(ConfigError, match="dataset: expected one of cifar10, svhn, digits, got 'mnist'"):
        parse_params(raw).profile("mnist")


def test_params_are_frozen(raw):
    p = parse_params(raw)
    with pytest.raises(AttributeError):
        p.profile("cifar10").expert.epochs = 1


def test_set_overrides_one_dataset_section(tmp_path):
    p = load_params(PARAMS, "digits", ["expert.epochs=2", "evaluate.pgd_eps=8/255", "width=4"])
    digits = p.profile("digits")
    assert digits.expert.epochs == 2 and digits.width == 4
    assert digits.evaluate.pgd_eps == pytest.approx(8 / 255)
    assert p.profile("cifar10").expert.epochs == 150  # other sections untouched
    assert digits.joint == load_params(PARAMS).profile("digits").joint


@pytest.mark.parametrize("item, message", [
    ("evaluate.pgd_eps=2", "digits.evaluate.pgd_eps"),
    ("expert.epochz=2", "digits.expert.epochz: unknown key"),
    ("expert.epochs", "expected key=value"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ConfigError) as err:
        load_params(PARAMS, "digits", [item])
    assert message in str(err.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
