"""The cluster path on a real SLURM (issue 26): the one-node cluster of scripts/slurm-local.sh,
Snakemake's SLURM executor with profiles/slurm-local, then DVC. Skipped, with the reason, where
the cluster cannot start (not root, no Debian packages); never passed without running a job."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from test_pipeline import BIN, ROOT, dvc_stale, project_copy, sh, tiny_digits_params


def _cluster() -> None:
    up = subprocess.run([str(ROOT / "scripts" / "slurm-local.sh"), "up"], capture_output=True,
                        text=True, timeout=600)
    if up.returncode != 0:
        pytest.skip(f"no test SLURM cluster: {(up.stderr or up.stdout).strip()[-300:]}")


def _committed(repo: Path) -> Path:
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny digits pipeline")
    return repo


def _hashes(repo: Path) -> dict[str, list]:
    """Every stage's outputs as dvc.lock records them (path and md5)."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: sorted((o["path"], o["md5"]) for o in s.get("outs", [])) for name, s in stages.items()}


@pytest.mark.slow
def test_pipeline_through_slurm_is_byte_identical_to_dvc_repro(tmp_path):
    _cluster()
    params = tiny_digits_params(runs=[0])
    cluster = _committed(project_copy(tmp_path / "slurm", params))
    run = sh(cluster, str(BIN / "snakemake"), "--workflow-profile", "profiles/slurm-local")
    # every stage but the params check (no rule: the wildcards refuse names) was a SLURM job:
    # data, 9 experts, the mixture, 1 baseline, 3 evaluations, forensics, aggregate
    submitted = set(re.findall(r"SLURM jobid (\d+)", run.stdout + run.stderr))
    assert len(submitted) >= 17, (run.stdout + run.stderr)[-3000:]
    sh(cluster, "dvc", "commit", "-f", "dvc.yaml")
    assert dvc_stale(cluster) == set()

    local = _committed(project_copy(tmp_path / "dvc", params))
    sh(local, "dvc", "repro", "dvc.yaml")
    theirs, ours = _hashes(cluster), _hashes(local)
    assert theirs.keys() == ours.keys() and theirs == ours
