"""Atomic file writes: every output (datasets, checkpoints, metrics) goes through here, so a
killed stage never leaves a half-written file that DVC or Snakemake would accept. And why a
torch file did not load, said once for every loader (checkpoints, datasets, external weights)."""

from __future__ import annotations

import os
import re
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


# torch's safe unpickler names what it refused on one of many lines of advice (which suggests
# turning the safety off); keep only that cause: "unsupported GLOBAL posix.system ..."
_REFUSED = re.compile(r"unsupported (?:global|operand|class)\b[^\n]*", re.IGNORECASE)


def load_failure(e: Exception, what: str) -> str:
    """Why torch.load(weights_only=True) failed, in one line that never advises loading
    unsafely; `what` the file was expected to be ("dwf checkpoint", "state dict")."""
    text = str(e)
    refused = _REFUSED.search(text)
    if refused or "weights only load failed" in text.lower():
        cause = re.split(r"\.\s*Please use", refused.group(0))[0] if refused else "not plain data"
        return (f"refused: it needs more than tensors and plain values to load "
                f"({cause.strip()[:200]}); nothing in it was executed")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"not a loadable {what} ({(lines[0] if lines else type(e).__name__)[:200]})"
