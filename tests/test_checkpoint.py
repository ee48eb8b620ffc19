"""Checkpoints: lossless round trip, pickle payloads refused unexecuted, bad files named,
the same payload always the same bytes."""

from __future__ import annotations

import hashlib
import os

from pathlib import Path

import pytest
import torch

import dwf
from dwf import checkpoint, models
from dwf.checkpoint import CheckpointError, load_model

ARCH = {"num_classes": 10, "width": 4, "mean": (0.3, 0.3, 0.3), "std": (0.3, 0.3, 0.3)}
MOE = {"n_experts": 2, "expert": ARCH, "router_hidden": (8,), "input_shape": (3, 32, 32)}


def _trained_a_little(arch: str, kwargs: dict) -> torch.nn.Module:
    """A model whose BatchNorm running statistics moved off their defaults."""
    torch.manual_seed(0)
    model = models.build(arch, **kwargs)
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("arch, kwargs", [("resnet18", ARCH), ("softmoe", MOE)])
def test_round_trip_gives_the_same_logits(tmp_path, arch, kwargs):
    model = _trained_a_little(arch, kwargs)
    path = tmp_path / "sub" / "m.pt"
    checkpoint.save(path, {"arch": arch, "arch_kwargs": kwargs, "state_dict": model.state_dict(),
                           "dataset": "digits", "epoch": 3})
    loaded = load_model(path, dataset="digits")
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    ckpt, digest = checkpoint.read(path)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["epoch"] == 3
    assert ckpt["versions"] == {"dwf": dwf.__version__, "torch": str(torch.__version__)}
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temporary file left behind


def test_wrong_dataset_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    model = _trained_a_little("resnet18", ARCH)
    checkpoint.save(path, {"arch": "resnet18", "arch_kwargs": ARCH,
                           "state_dict": model.state_dict(), "dataset": "svhn"})
    with pytest.raises(CheckpointError, match="trained on 'svhn', not 'digits'"):
        load_model(path, dataset="digits")


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint from a remote would do."""

    def __init__(self, marker, shell):
        self.marker, self.shell = marker, shell

    def __reduce__(self):
        if self.shell:  # a module torch blocks outright: "unsupported GLOBAL posix.system"
            return os.system, (f"touch '{self.marker}'",)
        return open, (str(self.marker), "w")  # a global torch does not allow


@pytest.mark.parametrize("shell, refused", [(True, "GLOBAL posix.system"),
                                            (False, "GLOBAL io.open")])
def test_pickle_payload_is_refused_and_never_runs(tmp_path_factory, shell, refused):
    folder = tmp_path_factory.mktemp("payload")  # not named after this test: no "refused" in it
    marker, path = folder / "pwned", folder / "evil.pt"
    state = _trained_a_little("resnet18", ARCH).state_dict()
    torch.save({"format": checkpoint.FORMAT, "arch": "resnet18", "arch_kwargs": ARCH,
                "state_dict": state, "extra": _Payload(marker, shell)}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and len(message.splitlines()) == 1
    said = message.removeprefix(f"{path}: ")  # the message itself, not the folder's name
    assert "refused" in said and "nothing in it was executed" in said
    assert refused in said  # names what it refused
    assert "weights_only" not in said and "False" not in said  # never advises unsafe loading
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: unsafe loading runs it
    assert marker.exists()


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "m.pt"
    checkpoint.save(path, {"arch": "resnet18", "arch_kwargs": ARCH,
                           "state_dict": _trained_a_little("resnet18", ARCH).state_dict()})
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path)


@pytest.mark.parametrize("stored_kwargs, message", [
    ({**ARCH, "width": 8}, "has shape"),                 # arguments disagree with the weights
    ({**ARCH, "num_classes": 7}, "has shape"),
    ({**ARCH, "depth": 34}, "bad architecture arguments"),
])
def test_wrong_architecture_names_the_file(tmp_path, stored_kwargs, message):
    path = tmp_path / "m.pt"
    state = _trained_a_little("resnet18", ARCH).state_dict()
    checkpoint.save(path, {"arch": "resnet18", "arch_kwargs": stored_kwargs, "state_dict": state})
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_weights_of_another_architecture_name_the_file(tmp_path):
    path = tmp_path / "m.pt"
    moe_state = _trained_a_little("softmoe", MOE).state_dict()
    checkpoint.save(path, {"arch": "resnet18", "arch_kwargs": ARCH, "state_dict": moe_state})
    with pytest.raises(CheckpointError, match=f"{path}: weights lack"):
        load_model(path)


@pytest.mark.parametrize("payload, message", [
    ({"arch": "resnet18"}, "not a dwf checkpoint"),      # a plain torch file, no format tag
    ([1, 2, 3], "not a dwf checkpoint"),
    ({"format": checkpoint.FORMAT, "arch": "vgg", "arch_kwargs": {}, "state_dict": {}},
     "unknown architecture 'vgg'"),
    ({"format": checkpoint.FORMAT, "arch": "resnet18"}, "lacks arch_kwargs, state_dict"),
])
def test_foreign_files_name_the_file(tmp_path, payload, message):
    path = tmp_path / "m.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope.pt'}: checkpoint not found"):
        load_model(tmp_path / "nope.pt")


def _saved(tmp_path, **changes) -> Path:
    """A valid resnet18 checkpoint with `changes` applied to its payload."""
    path = tmp_path / "m.pt"
    payload = {"arch": "resnet18", "arch_kwargs": ARCH,
               "state_dict": _trained_a_little("resnet18", ARCH).state_dict(), **changes}
    torch.save({"format": checkpoint.FORMAT, **payload}, path)
    return path


def test_non_tensor_weights_are_named(tmp_path):
    state = _trained_a_little("resnet18", ARCH).state_dict()
    path = _saved(tmp_path, state_dict={**state, "linear.weight": [[0.0] * 32] * 10})
    with pytest.raises(CheckpointError, match=rf"{path}: state_dict\['linear.weight'\] is a list"):
        load_model(path)
    with pytest.raises(CheckpointError, match="state_dict is not a dict"):
        load_model(_saved(tmp_path, state_dict=[1, 2]))


@pytest.mark.parametrize("key, value", [
    ("num_classes", -3), ("num_classes", 0), ("num_classes", 10**9), ("num_classes", 2.5),
    ("num_classes", True), ("width", 10**7), ("width", "64"), ("mean", (0.3, float("nan"), 0.3)),
    ("std", (0.3, 0.0, 0.3)), ("std", ()),
])
def test_absurd_architecture_arguments_are_refused_before_building(tmp_path, monkeypatch, key,
                                                                   value):
    path = _saved(tmp_path, arch_kwargs={**ARCH, key: value})
    built = []
    monkeypatch.setattr(models, "build", lambda *a, **k: built.append(a))
    with pytest.raises(CheckpointError, match=rf"{path}: arch_kwargs\.{key} = .* is not "):
        load_model(path)
    assert built == []  # refused before any model (or its memory) exists


def test_a_mixture_s_expert_arguments_are_checked_too(tmp_path):
    path = _saved(tmp_path, arch="softmoe", arch_kwargs={**MOE, "expert": {**ARCH, "width": -1}})
    with pytest.raises(CheckpointError, match=r"arch_kwargs\.expert\.width = -1"):
        load_model(path)


def test_arguments_that_disagree_with_the_weights_allocate_nothing(tmp_path, monkeypatch):
    """width 1024 passes the range check; the meta-device comparison refuses it before the
    (4 GB) real model is built."""
    path = _saved(tmp_path, arch_kwargs={**ARCH, "width": 1024})
    real, devices = models.build, []
    monkeypatch.setattr(models, "build", lambda *a, **k: devices.append(
        torch.empty(0).device.type) or real(*a, **k))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(path)
    assert devices == ["meta"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    state = _trained_a_little("resnet18", ARCH).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = bad
    path = _saved(tmp_path, state_dict=state)
    with pytest.raises(CheckpointError,
                       match=rf"{path}: weight 'layer2.0.conv1.weight' is not finite"):
        checkpoint.load(path)


def test_the_same_payload_is_the_same_bytes(tmp_path):
    """torch.save through a file object is deterministic (zip records, pickle, timestamps):
    what makes a retrained checkpoint byte-identical (tests/test_train.py)."""
    state = _trained_a_little("resnet18", ARCH).state_dict()
    for name in ("a.pt", "b.pt"):
        checkpoint.save(tmp_path / name, {"arch": "resnet18", "arch_kwargs": ARCH,
                                          "state_dict": state, "history": [{"loss": 0.5}]})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
