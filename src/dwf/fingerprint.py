"""Fingerprints of a stage's inputs: a resume file is used only by the run it belongs to.

A stage killed part-way leaves a resume file; the re-run continues from it only if every input
is the same as when it was written, so a resumed result is the one its inputs give. A
fingerprint is a plain dict of parts (settings, model, input checkpoints, data, code), stored
in the resume file and compared part by part (`difference`); one that differs, or a resume file
that cannot be trusted, is set aside (`set_aside`) with one line saying why.

Code version (`code_version`): the sha256 over the source files of the dwf modules a stage
runs (`stage_modules`: followed statically from its entry modules through every `import`
statement of each module's source, function-level ones included, and each module's parent
packages), hashed as (module name, source bytes) pairs sorted by name. It depends on the
source text alone, not on what this process happened to import, so every process computes the
same value, and an edit to a module the stage does not import (the evaluation, the report)
leaves its resume files valid. Cost: parsing about 30 files once per process (~50 ms).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

PACKAGE = "dwf"


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' dtypes, shapes and bytes (in order), wherever they live."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state (parameters and buffers, in name order): which weights ran."""
    return tensor_digest(*(t for _, t in sorted(model.state_dict().items())))


def _module_file(name: str) -> Path | None:
    """The source file of module `name` if it is one of ours (None for an attribute)."""
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # `from dwf.attacks import fgsm`: fgsm is not a module
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def _imported(name: str, source: bytes) -> set[str]:
    """Every dwf module the source of module `name` imports, parents included."""
    package = name if _module_file(name).name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return _with_parents(m for m in found if m.split(".")[0] == PACKAGE and _module_file(m))


def _with_parents(names) -> set[str]:
    """Modules and their parent packages (importing a.b.c runs a and a.b first)."""
    return {".".join(m.split(".")[:i]) for m in names for i in range(1, m.count(".") + 2)}


def stage_modules(*entry: str) -> dict[str, Path]:
    """The dwf modules a stage runs: its entry modules, their parent packages and everything
    they import, transitively, found in the source text (nothing is imported but packages).

    Args:
        entry: module names the stage starts from, e.g. "dwf.train", "dwf.defenses.dwf".
    Returns:
        module name -> source file, sorted by name.
    """
    files: dict[str, Path] = {}
    todo = sorted(_with_parents(m for m in entry if m.split(".")[0] == PACKAGE))
    while todo:
        name = todo.pop()
        if name not in files:
            files[name] = _module_file(name)
            todo.extend(_imported(name, files[name].read_bytes()) - files.keys())
    return dict(sorted(files.items()))


@functools.cache
def code_version(*entry: str) -> str:
    """sha256 of the source of `stage_modules(*entry)` (module docstring: the scheme)."""
    h = hashlib.sha256()
    for name, path in stage_modules(*entry).items():
        source = path.read_bytes()
        h.update(f"{name}\0{len(source)}\0".encode() + source)
    return h.hexdigest()


def plain(parts: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint as plain JSON values (tuples become lists), so that a stored one and a
    freshly computed one compare equal exactly when their contents do."""
    return json.loads(json.dumps(parts, sort_keys=True))


def difference(stored: Any, current: Any, where: str = "") -> str | None:
    """The first key at which two fingerprints differ ("inputs.pgd_0.pt"), or None if equal."""
    if isinstance(stored, dict) and isinstance(current, dict):
        for key in sorted(stored.keys() | current.keys()):
            key_path = f"{where}.{key}" if where else key
            found = difference(stored.get(key), current.get(key), key_path)
            if found:
                return found
        return None
    return None if stored == current else where or "fingerprint"


def set_aside(path: Path, why: str) -> Path:
    """Move a resume file (or folder) that must not be used to <name>.stale<suffix> (still
    git-ignored as *.resume, recoverable by hand) and say why in one line on stderr.

    Returns:
        where it went.
    """
    stale = path.with_suffix(".stale" + path.suffix)
    if stale.is_dir():
        shutil.rmtree(stale)
    os.replace(path, stale)
    print(f"{path}: not resumed: {why}; set aside as {stale.name}, starting afresh",
          file=sys.stderr)
    return stale
