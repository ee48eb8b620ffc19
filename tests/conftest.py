"""Shared fixtures of the fast tier: digits on disk, a small trained model, a shrunken params file.

Session fixtures are built once per test run, not once per pytest-xdist worker: the first worker
writes them under the run's shared base temp folder while holding a file lock (the pattern the
xdist docs give), the others wait and read. Both are seeded, so whoever builds them gets the
same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock  # a dependency of torch itself

from dwf import data
from dwf.checkpoint import load_model
from dwf.config import TrainConfig
from dwf.defenses.dwf import train_expert

# The attack-strength model: ResNet-18 of width 8, 3 benign epochs on native 1x8x8 digits, no
# crop (~1 s on one CPU core, ~97% clean test accuracy; under PGD-20 ~77% at eps 0.05, ~31% at
# 0.1, a few percent at 0.15).
MODEL_WIDTH = 8
MODEL_CFG = TrainConfig(epochs=3, batch_size=64, lr=0.05)
MODEL_SEED = 0


if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: `pytest -n auto` already runs a worker per core, and two threads
    # each would oversubscribe the cores several times over
    torch.set_num_threads(1)


def _shared_dir(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (the base temp's parent under xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def digits_arch(width: int = MODEL_WIDTH) -> dict:
    """ResNet18 arguments for digits, as the CLI builds them."""
    mean, std = data.mean_std("digits")
    return {"num_classes": 10, "width": width, "mean": mean, "std": std,
            "in_channels": data.SHAPE["digits"][0]}


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """A data root holding digits (downloaded once per test run)."""
    root = _shared_dir(tmp_path_factory) / "dwf-data"
    with FileLock(str(root) + ".lock"):
        data.download("digits", root, progress=False)
    return root


@pytest.fixture(scope="session")
def digits(digits_root):
    """(x_train, y_train, x_test, y_test): uint8 images and labels."""
    return (*data.load_split("digits", digits_root, "train"),
            *data.load_split("digits", digits_root, "test"))


@pytest.fixture(scope="session")
def trained_model_path(tmp_path_factory, digits) -> Path:
    """Checkpoint of a small benign ResNet-18 trained on digits (seeded; built once per run)."""
    path = _shared_dir(tmp_path_factory) / "dwf-models" / "benign_w8.pt"
    with FileLock(str(path.parent) + ".lock"):
        if not path.is_file():
            x, y = digits[0], digits[1]
            train_expert("benign", x, y, cfg=MODEL_CFG, arch_kwargs=digits_arch(), dataset="digits",
                         seed=MODEL_SEED, flip=False, crop_padding=0, out=path,
                         device=torch.device("cpu"), progress=False)
    return path


@pytest.fixture(scope="session")
def trained_model(trained_model_path):
    """The small trained digits model, in eval mode."""
    return load_model(trained_model_path, dataset="digits")


@pytest.fixture
def test_batch(digits):
    """First 100 digits test images in [0, 1] and their labels."""
    return data.to_unit(digits[2][:100]), digits[3][:100]


def _tiny_section() -> dict:
    train = {"epochs": 1, "batch_size": 128, "lr": 0.05, "fgsm_eps": [0.05, 0.1],
             "pgd_eps": 0.1, "pgd_alpha": 0.05, "pgd_steps": [1, 2]}
    return {
        "width": 4, "normalization": "correct", "flip": False, "crop_padding": 2,
        "router_hidden": [32],
        "expert": train,
        "joint": {**train, "pgd_steps": [1]},  # the costliest stage: 2 experts, 3 views
        "baselines": {"resnet18": {"epochs": 1, "batch_size": 128, "lr": 0.05}},
        "evaluate": {"n_examples": 40, "batch_size": 40, "fgsm_eps": ["8/255", 0.1],
                     "pgd_eps": 0.1, "pgd_alpha": 0.025, "pgd_steps": [2, 3],
                     "ms_steps": 3, "ms_restarts": 2, "adaptive_steps": 3,
                     # the mixture-aimed attacks stay on but tiny; AutoAttack and the audit
                     # have their own tests (test_strong_eval.py, test_audit.py)
                     "strong_steps": 3, "autoattack": False, "audit": False},
    }


@pytest.fixture
def tiny_params(tmp_path, digits_root) -> Path:
    """A shrunken params.yaml (digits only, width 4, 1 epoch, 2 experts, tiny evaluation).

    Its data_root is the session's digits folder, so stages find the data already there.
    """
    raw = {"seed": 0, "runs": [0], "datasets": ["digits"], "data_root": str(digits_root),
           "experts": ["benign", "pgd_0"], "digits": _tiny_section()}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
