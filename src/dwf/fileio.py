"""Atomic file writes: every output (datasets, checkpoints, metrics) goes through here, so a
killed stage never leaves a half-written file that DVC or Snakemake would accept."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, write) -> None:
    """Call write(f) on a binary file object, then rename it into `path`: readers never see a
    partial file. A file object, not a path: torch.save names its zip records after a path's
    stem, which for a random temporary name would make identical payloads differ in bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are shared through DVC caches
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
