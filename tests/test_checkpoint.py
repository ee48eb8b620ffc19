"""Checkpoints: lossless round trip, pickle payloads refused unexecuted, bad files named."""

from __future__ import annotations

import os

import pytest
import torch

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
    ckpt = checkpoint.load(path)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["epoch"] == 3
    assert ckpt["versions"]["torch"] == str(torch.__version__)
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temporary file left behind


def test_wrong_dataset_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    model = _trained_a_little("resnet18", ARCH)
    checkpoint.save(path, {"arch": "resnet18", "arch_kwargs": ARCH,
                           "state_dict": model.state_dict(), "dataset": "svhn"})
    with pytest.raises(CheckpointError, match="trained on 'svhn', not 'digits'"):
        load_model(path, dataset="digits")


class _Payload:
    """Unpickling this runs os.system: what a malicious checkpoint from a remote would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = _trained_a_little("resnet18", ARCH).state_dict()
    torch.save({"format": checkpoint.FORMAT, "arch": "resnet18", "arch_kwargs": ARCH,
                "state_dict": state, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(path) in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()


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
