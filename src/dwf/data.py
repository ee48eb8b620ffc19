"""Datasets as uint8 tensors on disk, and whole-batch augmentation on the device.

Every dataset is stored as ``root/<name>/{train,test}.pt`` (a dict ``{"x": uint8 (N, C, H, W),
"y": int64 (N,)}``, (C, H, W) = ``SHAPE[name]``) plus ``manifest.json`` with each file's sha256,
so a truncated or edited file is caught before training on it. CIFAR-10 and SVHN come through
torchvision (which checks the md5 of the original archives); ``digits`` ships inside
scikit-learn and needs no network. Every dataset keeps its own shape (digits: 1 x 8 x 8, not
upsampled to look like CIFAR); models take it from ``SHAPE``.
Images stay uint8 until :func:`to_unit`; normalisation is the model's first layer, not ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dwf.fileio import atomic_write, load_failure
from dwf.fingerprint import tensor_digest

DATASETS = ("cifar10", "svhn", "digits")
NUM_CLASSES = {"cifar10": 10, "svhn": 10, "digits": 10}
# (C, H, W) of the stored images: the one source of every model's input shape.
SHAPE = {"cifar10": (3, 32, 32), "svhn": (3, 32, 32), "digits": (1, 8, 8)}
SPLITS = ("train", "test")
# Horizontal flips change a digit's meaning (SVHN, digits), not an object's class (CIFAR-10).
FLIP = {"cifar10": True, "svhn": False, "digits": False}

# Per-channel (mean, std) of the train split in [0, 1] units, one value per channel of SHAPE.
# digits: measured on our native 1x8x8 train split (1437 images, every pixel; std with 1/N):
# to_unit(x).mean() = 0.30543, .std(unbiased=False) = 0.37596.
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "digits": ((0.3054,), (0.3760,)),
}
# As printed in the paper (sec. 5), which swaps CIFAR-10's and SVHN's statistics. The paper has
# no digits; it keeps its measured values so a "paper" run of the offline demo still works.
PAPER_MEAN_STD = {
    "cifar10": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "svhn": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "digits": MEAN_STD["digits"],
}
_STATS = {"correct": MEAN_STD, "paper": PAPER_MEAN_STD}


class DataError(Exception):
    """A dataset on disk is missing, corrupt or inconsistent; the message says how to fix it."""


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _fix(name: str) -> str:
    return f"re-run `dwf download --dataset {name}`"


def mean_std(name: str, source: str = "correct") -> tuple[tuple, tuple]:
    """Channel statistics for the model's Normalize layer.

    Args:
        name: dataset name.
        source: "correct" (measured per dataset) or "paper" (as printed, swapped).
    Returns:
        (mean, std), each a tuple of one value per channel (SHAPE[name][0]) in [0, 1] units.
    """
    _check_name(name)
    if source not in _STATS:
        raise ValueError(f"unknown statistics source {source!r}; choose one of {', '.join(_STATS)}")
    return _STATS[source][name]


# --- sources: each returns {split: (x uint8 (N, *SHAPE[name]), y int64 (N,))} ---------------


@contextlib.contextmanager
def _quiet(progress: bool):
    # torchvision prints "Extracting ..." and tqdm bars; hide them unless asked for.
    if progress:
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


def _torchvision_error(name: str, raw: Path, archive: str, checks: list,
                       err: Exception) -> DataError:
    from torchvision.datasets.utils import check_integrity

    # torchvision's own message does not say which file failed; name them.
    bad = [str(path) for path, md5 in checks if not check_integrity(path, md5)]
    return DataError(
        f"torchvision could not download or verify {name} in {raw} ({err}); missing or failing "
        f"their md5: {', '.join(bad) or 'none'}. Check network access (or place the original "
        f"{archive} in {raw}), delete any corrupt file there, and {_fix(name)}"
    )


def _fetch_cifar10(raw: Path, progress: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from torchvision.datasets import CIFAR10

    out = {}
    for split in SPLITS:
        try:
            with _quiet(progress):
                ds = CIFAR10(raw, train=split == "train", download=True)
        except (RuntimeError, OSError) as err:
            meta = [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]
            files = CIFAR10.train_list + CIFAR10.test_list + [meta]
            checks = [(raw / CIFAR10.base_folder / f, md5) for f, md5 in files]
            raise _torchvision_error("cifar10", raw, CIFAR10.filename, checks, err) from err
        # torchvision holds (N, H, W, C); we store (N, C, H, W).
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out[split] = (x, torch.tensor(ds.targets, dtype=torch.int64))
    return out


def _fetch_svhn(raw: Path, progress: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from torchvision.datasets import SVHN

    out = {}
    for split in SPLITS:
        try:
            with _quiet(progress):
                ds = SVHN(raw, split=split, download=True)
        except (RuntimeError, OSError) as err:
            _, file, md5 = SVHN.split_list[split]
            raise _torchvision_error("svhn", raw, file, [(raw / file, md5)], err) from err
        # torchvision already maps label 10 to digit 0 and transposes to (N, C, H, W).
        x = torch.from_numpy(ds.data).contiguous()
        out[split] = (x, torch.from_numpy(ds.labels.astype(np.int64)))
    return out


def _fetch_digits(raw: Path, progress: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values 0..16 scaled to 0..255 and rounded: 17 distinct uint8 levels, native 8x8.
    img = torch.from_numpy(digits.images).float().unsqueeze(1) * (255 / 16)  # (N, 1, 8, 8)
    x = img.round().to(torch.uint8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    # Fixed, stratified 80/20 split: digits has no official test set.
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=0, stratify=digits.target
    )
    return {s: (x[idx], y[idx]) for s, idx in zip(SPLITS, (idx_train, idx_test))}


_SOURCES: dict[str, tuple[Callable, str]] = {
    "cifar10": (_fetch_cifar10, "torchvision.datasets.CIFAR10"),
    "svhn": (_fetch_svhn, "torchvision.datasets.SVHN (train/test, no extra)"),
    "digits": (
        _fetch_digits,
        "sklearn.datasets.load_digits, native 1x8x8, 0..16 -> 0..255 rounded, "
        "train_test_split(test_size=0.2, random_state=0, stratify=y)",
    ),
}


# --- files --------------------------------------------------------------------------------

# What each split holds, pinned where git tracks it (issue 23): a manifest travels with its
# data, so a DVC remote holding poisoned tensors beside a re-hashed manifest passes the
# manifest's own check; this does not travel with the data. The digest is
# fingerprint.tensor_digest(x, y) (dtypes, shapes, bytes: the same under any torch version,
# unlike the file's bytes), checked by every load and by download. The table is a data file
# beside this module, not code: no stage's results depend on it (it only refuses data), so
# pinning a dataset leaves every cached stage current. cifar10 and svhn are not pinned yet: no
# machine that wrote this could download them; `dwf download` prints the values to add.
SPLIT_DIGESTS: dict[str, dict[str, str]] = {
    name: splits for name, splits in json.loads(
        (Path(__file__).with_name("split_digests.json")).read_text()).items()
    if not name.startswith("_")}


def _check_pinned(name: str, split: str, where: object, x: torch.Tensor, y: torch.Tensor) -> str:
    """The split's content digest; DataError if it differs from the pinned one."""
    digest = tensor_digest(x, y)
    pinned = SPLIT_DIGESTS.get(name, {}).get(split)
    if pinned is not None and digest != pinned:
        raise DataError(f"{where}: {name} {split} is not the data this code was pinned to "
                        f"(content sha256 {digest[:16]}..., pinned in dwf/split_digests.json {pinned[:16]}...); "
                        f"{_fix(name)}")
    return digest


# The fields of a manifest's split entry that loading relies on, and their types.
ENTRY_FIELDS = {"file": str, "sha256": str, "count": int}


def _manifest_entry(name: str, manifest: Path, split: str) -> dict:
    """A split's manifest entry, every field of ENTRY_FIELDS present and of its type."""
    try:
        entry = json.loads(manifest.read_text())["splits"][split]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{manifest} is unreadable or lacks split {split!r} ({err!r}); "
                        f"{_fix(name)}") from err
    for field, kind in ENTRY_FIELDS.items():
        if not isinstance(entry, dict) or field not in entry:
            raise DataError(f"{manifest}: splits.{split} lacks field {field!r}; {_fix(name)}")
        if not isinstance(entry[field], kind):
            raise DataError(f"{manifest}: splits.{split}.{field} is not a {kind.__name__}; "
                            f"{_fix(name)}")
    if Path(entry["file"]).name != entry["file"]:  # a name in the dataset's folder, no path
        raise DataError(f"{manifest}: splits.{split}.file {entry['file']!r} is not a file name; "
                        f"{_fix(name)}")
    return entry


def _verified_file(name: str, root: Path, split: str) -> tuple[Path, dict, bytes]:
    """Path of a split's file, its manifest entry and its bytes, after checking their sha256.

    The bytes are read once, hashed, and are what the caller loads: a file replaced between a
    check and a second read cannot slip through.
    """
    d = Path(root) / name
    manifest = d / "manifest.json"
    if not manifest.is_file():
        raise DataError(f"{manifest} is missing: {name} was never downloaded or its download "
                        f"did not finish; {_fix(name)}")
    entry = _manifest_entry(name, manifest, split)
    path = d / entry["file"]
    if not path.is_file():
        raise DataError(f"{path} is missing although {manifest} lists it; {_fix(name)}")
    blob = path.read_bytes()
    if (actual := hashlib.sha256(blob).hexdigest()) != entry["sha256"]:
        raise DataError(f"{path} is corrupt or was modified: sha256 {actual} does not match "
                        f"{entry['sha256']} in {manifest}; {_fix(name)}")
    return path, entry, blob


def _is_complete(name: str, root: Path) -> bool:
    try:
        for split in SPLITS:
            _verified_file(name, root, split)
    except DataError:
        return False
    # Written by another source (digits upsampled to 3x32x32 before issue 14): stale, refetch.
    manifest = json.loads((Path(root) / name / "manifest.json").read_text())
    return manifest.get("source") == _SOURCES[name][1]


def _check_tensors(name: str, where: object, x: object, y: object) -> None:
    ok = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
          and x.dtype == torch.uint8 and x.dim() == 4 and tuple(x.shape[1:]) == SHAPE[name]
          and y.dtype == torch.int64 and y.shape == (len(x),))
    if not ok:
        raise DataError(f"{where} does not hold x uint8 (N, {', '.join(map(str, SHAPE[name]))}) "
                        f"and y int64 (N,); {_fix(name)}")
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < NUM_CLASSES[name]:
        raise DataError(f"{where} has labels outside 0..{NUM_CLASSES[name] - 1}; {_fix(name)}")


def download(name: str, root: Path, *, progress: bool = True) -> Path:
    """Fetch a dataset and store it as verified uint8 tensors (a no-op if already complete).

    Args:
        name: dataset name.
        root: data directory; originals go to root/name/raw/ (cifar10, svhn).
        progress: show download progress and status lines.
    Returns:
        root/name, holding train.pt, test.pt and manifest.json.
    """
    _check_name(name)
    d = Path(root) / name
    if _is_complete(name, root):
        return d
    d.mkdir(parents=True, exist_ok=True)
    # Drop a stale manifest first so an interrupted rewrite reads as "not downloaded".
    (d / "manifest.json").unlink(missing_ok=True)
    fetch, source = _SOURCES[name]
    manifest = {"dataset": name, "source": source, "splits": {}}
    for split, (x, y) in fetch(d / "raw", progress).items():
        _check_tensors(name, f"{source} {split}", x, y)
        digest = _check_pinned(name, split, source, x, y)
        path = d / f"{split}.pt"
        buffer = io.BytesIO()
        torch.save({"x": x, "y": y}, buffer)
        blob = buffer.getvalue()  # the bytes hashed are the bytes written
        atomic_write(path, lambda f: f.write(blob))
        manifest["splits"][split] = {
            "file": path.name,
            "count": len(y),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "class_counts": torch.bincount(y, minlength=NUM_CLASSES[name]).tolist(),
        }
        if progress:
            print(f"wrote {path} ({len(y)} examples, content sha256 {digest})")
    atomic_write(d / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    return d


def load_split(name: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one verified split.

    Args:
        name: dataset name.
        root: data directory given to :func:`download`.
        split: "train" or "test".
    Returns:
        (x, y): uint8 (N, *SHAPE[name]) and int64 (N,).
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path, entry, blob = _verified_file(name, root, split)
    try:
        tensors = torch.load(io.BytesIO(blob), weights_only=True)  # the bytes just verified
        x, y = tensors["x"], tensors["y"]
    except Exception as err:  # any unpickling failure means the same thing: a bad file
        raise DataError(f"{path} cannot be loaded ({load_failure(err, 'tensor file')}); "
                        f"{_fix(name)}") from err
    _check_tensors(name, path, x, y)
    if name in SPLIT_DIGESTS:  # hashing an unpinned split (CIFAR-10's 150 MB) would buy nothing
        _check_pinned(name, split, path, x, y)
    if len(y) != entry["count"]:
        raise DataError(f"{path} has {len(y)} examples, manifest says {entry['count']}; "
                        f"{_fix(name)}")
    return x, y


# --- batches ------------------------------------------------------------------------------


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images 0..255 -> float32 in [0, 1] (the threat model's pixel units)."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_unit expects uint8 images, got {x_uint8.dtype}")
    return x_uint8.to(torch.float32) / 255


def augment(x: torch.Tensor, *, flip: bool, padding: int = 4,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding, and optional horizontal flip, per example.

    Args:
        x: float images (N, C, H, W), on any device.
        flip: flip each example left-right with probability 0.5.
        padding: zero padding in pixels on each side; offsets are uniform in 0..2*padding.
        generator: RNG for the draws (on x's device, or on the CPU).
    Returns:
        Augmented images, same shape, dtype and device as x.
    """
    n, c, h, w = x.shape
    dev = generator.device if generator is not None else x.device  # where the draws happen
    off = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=dev).to(x.device)
    rows = off[0, :, None] + torch.arange(h, device=x.device)  # (N, H) rows of the padded image
    cols = torch.arange(w, device=x.device).expand(n, w)  # (N, W)
    if flip:
        flipped = (torch.rand(n, generator=generator, device=dev) < 0.5).to(x.device)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    cols = off[1, :, None] + cols
    padded = F.pad(x, (padding,) * 4)  # (N, C, H + 2p, W + 2p), zeros outside the image
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def batch_indices(n: int, batch_size: int, *, shuffle: bool,
                  generator: torch.Generator | None = None,
                  drop_last: bool = False) -> list[torch.Tensor]:
    """Index batches covering range(n) once (one epoch).

    Args:
        n: number of examples.
        batch_size: examples per batch.
        shuffle: random order (from `generator`) instead of 0..n-1.
        generator: RNG; the indices live on its device (CPU if None).
        drop_last: drop a final batch smaller than batch_size.
    Returns:
        List of int64 index tensors.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dev = generator.device if generator is not None else torch.device("cpu")
    order = (torch.randperm(n, generator=generator, device=dev) if shuffle
             else torch.arange(n, device=dev))
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
