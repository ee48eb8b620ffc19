"""Tests for dwf.data: on-disk format, integrity checks, torchvision paths offline, augmentation."""

import hashlib
import json
import pickle
import tarfile

import numpy as np
import pytest
import scipy.io
import torch
from torchvision.datasets import CIFAR10, SVHN

from dwf import data
from dwf.data import DataError


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def no_network(monkeypatch):
    """Record and refuse any network access; tests assert the record stays empty."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise RuntimeError("test tried to reach the network")

    monkeypatch.setattr("urllib.request.urlopen", refuse)
    monkeypatch.setattr("socket.create_connection", refuse)
    monkeypatch.setattr("socket.socket.connect", refuse)
    return attempts


# --- names and statistics ------------------------------------------------------------------


def test_unknown_names_are_refused(tmp_path):
    message = "unknown dataset 'mnist'; choose one of cifar10, svhn, digits"
    with pytest.raises(ValueError, match=message):
        data.download("mnist", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.mean_std("mnist")
    with pytest.raises(ValueError, match="source"):
        data.mean_std("cifar10", "guess")


def test_paper_statistics_are_swapped():
    assert data.mean_std("cifar10") == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert data.mean_std("cifar10", "paper")[0] == data.mean_std("svhn")[0]
    assert data.mean_std("svhn", "paper")[0] == data.mean_std("cifar10")[0]


# --- digits (embedded, the offline path) ---------------------------------------------------


def test_digits_download_format_and_manifest(tmp_path):
    d = data.download("digits", tmp_path, progress=False)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["dataset"] == "digits" and "load_digits" in manifest["source"]
    levels = {round(k * 255 / 16) for k in range(17)}  # sklearn's 0..16, scaled, not resampled
    for split, n in (("train", 1437), ("test", 360)):
        x, y = data.load_split("digits", tmp_path, split)
        assert x.dtype == torch.uint8 and x.shape == (n, 1, 8, 8) == (n, *data.SHAPE["digits"])
        assert set(x.unique().tolist()) == levels
        assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
        entry = manifest["splits"][split]
        assert entry["count"] == n and sum(entry["class_counts"]) == n
        assert entry["class_counts"] == torch.bincount(y, minlength=10).tolist()
        assert entry["sha256"] == hashlib.sha256((d / f"{split}.pt").read_bytes()).hexdigest()
    # Statistics written as constants match the data they describe, one value per channel.
    train = data.to_unit(data.load_split("digits", tmp_path, "train")[0])
    assert data.mean_std("digits") == ((pytest.approx(train.mean().item(), abs=1e-4),),
                                       (pytest.approx(train.std(unbiased=False).item(), abs=1e-4),))


def test_digits_split_is_fixed_and_redownload_is_noop(tmp_path):
    a = data.download("digits", tmp_path / "a", progress=False)
    b = data.download("digits", tmp_path / "b", progress=False)
    for split in data.SPLITS:
        xa, ya = data.load_split("digits", tmp_path / "a", split)
        xb, yb = data.load_split("digits", tmp_path / "b", split)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()
    files = [a / "train.pt", a / "test.pt", a / "manifest.json"]
    before = [f.stat().st_mtime_ns for f in files]
    assert data.download("digits", tmp_path / "a", progress=False) == a
    assert [f.stat().st_mtime_ns for f in files] == before


def test_corrupted_file_is_detected_and_redownload_repairs_it(tmp_path):
    d = data.download("digits", tmp_path, progress=False)
    raw = bytearray((d / "train.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d / "train.pt").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train.pt") as err:
        data.load_split("digits", tmp_path, "train")
    assert "sha256" in str(err.value) and "dwf download --dataset digits" in str(err.value)
    data.download("digits", tmp_path, progress=False)  # the advised fix
    assert data.load_split("digits", tmp_path, "train")[0].shape == (1437, 1, 8, 8)


def test_download_from_an_older_source_is_refetched(tmp_path):
    """A folder from before native digits (3x32x32, another manifest source, consistent
    checksums) is not "complete": `download` rewrites it instead of returning it."""
    d = data.download("digits", tmp_path, progress=False)
    old = {"x": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "y": torch.zeros(2, dtype=torch.int64)}
    torch.save(old, d / "test.pt")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["source"] = "sklearn.datasets.load_digits, 8x8 -> 32x32 bilinear"
    sha = hashlib.sha256((d / "test.pt").read_bytes()).hexdigest()
    manifest["splits"]["test"].update(count=2, sha256=sha)
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"does not hold x uint8 \(N, 1, 8, 8\)"):
        data.load_split("digits", tmp_path, "test")
    data.download("digits", tmp_path, progress=False)  # the advised fix works
    assert data.load_split("digits", tmp_path, "test")[0].shape == (360, 1, 8, 8)


def test_missing_manifest_is_reported(tmp_path):
    d = data.download("digits", tmp_path, progress=False)
    (d / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json is missing.*dwf download --dataset digits"):
        data.load_split("digits", tmp_path, "test")


@pytest.mark.parametrize("field", list(data.ENTRY_FIELDS))
def test_manifest_missing_a_field_names_the_file_and_the_field(tmp_path, field):
    d = data.download("digits", tmp_path, progress=False)
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["splits"]["train"][field]
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"manifest.json: splits.train lacks field '{field}'; "
                                        "re-run `dwf download --dataset digits`"):
        data.load_split("digits", tmp_path, "train")


def test_manifest_file_must_be_a_name_in_the_dataset_folder(tmp_path):
    d = data.download("digits", tmp_path, progress=False)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["splits"]["test"]["file"] = "../digits/test.pt"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"splits.test.file '../digits/test.pt' is not a file name"):
        data.load_split("digits", tmp_path, "test")


def test_the_bytes_verified_are_the_bytes_loaded(tmp_path, monkeypatch):
    """A file swapped right after its hash was checked is not what gets loaded (no TOCTOU)."""
    d = data.download("digits", tmp_path, progress=False)
    x, y = data.load_split("digits", tmp_path, "test")
    swapped = {"x": torch.zeros_like(x), "y": torch.zeros_like(y)}

    class SwapAfterHashing:
        """hashlib, except that the file is replaced as soon as it has been hashed."""

        def sha256(self, *args):
            digest = hashlib.sha256(*args)
            torch.save(swapped, d / "test.pt")
            return digest

        def file_digest(self, *args):
            digest = hashlib.file_digest(*args)
            torch.save(swapped, d / "test.pt")
            return digest

    monkeypatch.setattr(data, "hashlib", SwapAfterHashing())
    x2, y2 = data.load_split("digits", tmp_path, "test")
    assert torch.equal(x2, x) and torch.equal(y2, y)  # the verified bytes, not the swapped file


def test_bad_content_with_matching_hash_is_refused(tmp_path):
    d = data.download("digits", tmp_path, progress=False)
    floats = {"x": torch.zeros(2, 3, 32, 32), "y": torch.zeros(2, dtype=torch.int64)}
    torch.save(floats, d / "test.pt")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["splits"]["test"]["sha256"] = hashlib.sha256((d / "test.pt").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="test.pt does not hold x uint8"):
        data.load_split("digits", tmp_path, "test")


def test_tampered_data_with_a_rehashed_manifest_is_refused(tmp_path):
    """Issue 23: labels shifted in test.pt and the manifest re-hashed to match (as a poisoned
    DVC remote would serve them): the manifest's check passes, the digest git pins does not."""
    d = data.download("digits", tmp_path, progress=False)
    x, y = data.load_split("digits", tmp_path, "test")
    torch.save({"x": x, "y": (y + 1) % 10}, d / "test.pt")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["splits"]["test"]["sha256"] = hashlib.sha256((d / "test.pt").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not the data this code was pinned to"):
        data.load_split("digits", tmp_path, "test")
    data.load_split("digits", tmp_path, "train")  # the untouched split still loads


def test_the_pinned_digests_are_what_the_download_makes(tmp_path):
    data.download("digits", tmp_path, progress=False)
    from dwf.fingerprint import tensor_digest

    for split, pinned in data.SPLIT_DIGESTS["digits"].items():
        assert tensor_digest(*data.load_split("digits", tmp_path, split)) == pinned


class _Payload:
    """A class of this module: unpickling it would import and run code."""


def test_a_split_that_needs_code_to_load_is_refused_without_torch_s_advice(tmp_path):
    """Issue 23, item 6: the loader repeated torch's advice to load with weights_only=False."""
    d = data.download("digits", tmp_path, progress=False)
    torch.save({"x": _Payload(), "y": torch.zeros(2, dtype=torch.int64)}, d / "test.pt")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["splits"]["test"]["sha256"] = hashlib.sha256((d / "test.pt").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        data.load_split("digits", tmp_path, "test")
    message = str(err.value)
    assert "test.pt cannot be loaded (refused: " in message and "_Payload" in message
    assert len(message.splitlines()) == 1 and "weights_only" not in message
    assert "can still be loaded" not in message


# --- CIFAR-10 and SVHN through the real torchvision code, offline --------------------------


def _fake_cifar10(raw, monkeypatch, n=2, seed=0):
    """Write a tiny cifar-10-python.tar.gz in CIFAR-10's format; patch torchvision's md5s."""
    rng = np.random.default_rng(seed)
    folder = raw / CIFAR10.base_folder
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        # Keys are str: torchvision unpickles the original Python 2 files with encoding="latin1",
        # which turns their byte-string keys (b"data") into these.
        batches[name] = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    meta = {"label_names": [str(i) for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    tgz = raw / CIFAR10.filename
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname=CIFAR10.base_folder)
    md5 = {p.name: _md5(p) for p in folder.iterdir()}
    train_list = [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    monkeypatch.setattr(CIFAR10, "tgz_md5", _md5(tgz))
    # Only the archive stays, so torchvision must verify and extract it itself.
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return batches


def test_cifar10_converts_torchvision_files(tmp_path, monkeypatch, no_network):
    batches = _fake_cifar10(tmp_path / "cifar10" / "raw", monkeypatch)
    data.download("cifar10", tmp_path, progress=False)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    train_labels = [k for b in train for k in b["labels"]]
    expected = {
        "train": (np.concatenate([b["data"] for b in train]), train_labels),
        "test": (batches["test_batch"]["data"], batches["test_batch"]["labels"]),
    }
    for split, (flat, labels) in expected.items():
        x, y = data.load_split("cifar10", tmp_path, split)
        # CIFAR rows are 1024 red, then 1024 green, then 1024 blue values, each row-major.
        assert torch.equal(x, torch.from_numpy(flat.reshape(-1, 3, 32, 32)))
        assert torch.equal(x[0, 1, 0, :], torch.from_numpy(flat[0, 1024:1056]))
        assert y.tolist() == labels
    assert no_network == []


def test_cifar10_wrong_md5_fails_clearly_offline(tmp_path, monkeypatch, no_network):
    _fake_cifar10(tmp_path / "cifar10" / "raw", monkeypatch)
    wrong = [["data_batch_1", "0" * 32]] + CIFAR10.train_list[1:]
    monkeypatch.setattr(CIFAR10, "train_list", wrong)
    with pytest.raises(DataError, match="could not download or verify cifar10") as err:
        data.download("cifar10", tmp_path, progress=False)
    message = str(err.value)
    assert "data_batch_1" in message and "data_batch_2" not in message  # names the bad file
    assert "cifar-10-python.tar.gz" in message and "dwf download --dataset cifar10" in message
    assert not (tmp_path / "cifar10" / "manifest.json").exists()
    assert no_network == []


def test_svhn_converts_torchvision_files_and_maps_label_10(tmp_path, monkeypatch, no_network):
    raw = tmp_path / "svhn" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    split_list = {k: list(v) for k, v in SVHN.split_list.items()}
    mats = {}
    for split, n in (("train", 5), ("test", 3)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # (H, W, C, N) as in SVHN's .mat
        labels = np.array([10, 1, 9, 10, 3][:n], dtype=np.uint8).reshape(n, 1)  # 10 means digit 0
        path = raw / split_list[split][1]
        scipy.io.savemat(path, {"X": X, "y": labels})
        split_list[split][2] = _md5(path)
        mats[split] = (X, labels)
    monkeypatch.setattr(SVHN, "split_list", split_list)
    data.download("svhn", tmp_path, progress=False)
    for split, (X, labels) in mats.items():
        x, y = data.load_split("svhn", tmp_path, split)
        assert torch.equal(x, torch.from_numpy(X.transpose(3, 2, 0, 1).copy()))
        assert x[1, 2, 5, 7] == X[5, 7, 2, 1]  # example 1, blue, row 5, column 7
        assert y.tolist() == [int(v) % 10 for v in labels[:, 0]]
    assert no_network == []


# --- batches ---------------------------------------------------------------------------------


def test_augment_preserves_shape_range_and_is_seeded():
    x = torch.rand(64, 3, 32, 32)
    a = data.augment(x, flip=True, generator=torch.Generator().manual_seed(0))
    b = data.augment(x, flip=True, generator=torch.Generator().manual_seed(0))
    c = data.augment(x, flip=True, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_flips_only_when_asked():
    x = torch.zeros(256, 1, 4, 4)
    x[..., 0] = 1  # left column lit: asymmetric
    assert torch.equal(data.augment(x, flip=False, padding=0), x)
    out = data.augment(x, flip=True, padding=0, generator=torch.Generator().manual_seed(0))
    flipped = out[:, 0, 0, -1] == 1
    assert torch.equal(out[flipped], x.flip(-1)[flipped])
    assert torch.equal(out[~flipped], x[~flipped])
    assert 0.3 < flipped.float().mean() < 0.7


def test_augment_crop_shifts_content_and_pads_with_zeros():
    x = torch.arange(1, 65, dtype=torch.float32).reshape(1, 1, 8, 8).repeat(200, 1, 1, 1)
    out = data.augment(x, flip=False, padding=2, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x[0, 0], (2, 2, 2, 2))
    shifts = set()
    for img in out[:, 0]:
        # Each output is one 8x8 window of the zero-padded image.
        windows = [(r, c) for r in range(5) for c in range(5)]
        matches = [(r, c) for r, c in windows if torch.equal(img, padded[r:r + 8, c:c + 8])]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 15  # offsets vary per example (25 possible)
    assert (out == 0).any()


def test_batch_indices_cover_each_index_once():
    g = torch.Generator().manual_seed(0)
    batches = data.batch_indices(103, 10, shuffle=True, generator=g)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(torch.cat(batches).tolist()) == list(range(103))
    assert torch.cat(data.batch_indices(7, 3, shuffle=False)).tolist() == list(range(7))
    assert [len(b) for b in data.batch_indices(103, 10, shuffle=True, drop_last=True)] == [10] * 10
