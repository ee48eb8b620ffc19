"""The cluster path on a real SLURM (issue 26): the one-node cluster of scripts/slurm-local.sh,
Snakemake's SLURM executor with profiles/slurm-local, then DVC. Skipped, with the reason, where
the cluster cannot start (not root, no Debian packages); never passed without running a job."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_pipeline import BIN, ENV, ROOT, dvc_stale, project_copy, sh, tiny_digits_params


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


def _failing_dwf(tmp: Path, fails: int) -> tuple[dict, Path]:
    """An environment whose `dwf` fails its first `fails` calls (exit 3), then runs the real one;
    each call adds a line to the returned file. SLURM jobs inherit it (sbatch exports the
    submitting environment)."""
    fake, calls = tmp / "fakebin", tmp / "dwf-calls"
    fake.mkdir()
    (fake / "dwf").write_text(
        "#!/bin/sh\n"
        f"echo call >> '{calls}'\n"
        f"if [ \"$(wc -l < '{calls}')\" -le {fails} ]; then echo 'forced failure' >&2; exit 3; fi\n"
        f"exec '{BIN / 'dwf'}' \"$@\"\n")
    (fake / "dwf").chmod(0o755)
    return {**ENV, "PATH": f"{fake}{os.pathsep}{ENV['PATH']}"}, calls


def _snakemake(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), "--workflow-profile", "profiles/slurm-local", *args],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("fails, done", [(1, True), (5, False)])
def test_a_failed_job_is_retried_as_the_profile_says_then_reported(tmp_path, fails, done):
    """profiles/slurm-local's `retries: 1`: a job that fails once succeeds on its second
    submission; one that keeps failing runs twice, then Snakemake reports it, exit 1, and leaves
    no output behind."""
    _cluster()
    repo = project_copy(tmp_path / "p", tiny_digits_params(runs=[0]))
    env, calls = _failing_dwf(tmp_path, fails)
    run = _snakemake(repo, env, "data/digits/manifest.json")
    log = run.stdout + run.stderr
    assert len(calls.read_text().splitlines()) == 2, log[-3000:]  # the job, then its one retry
    assert len(set(re.findall(r"SLURM jobid (\d+)", log))) == 2, log[-3000:]
    assert (run.returncode == 0) == done, log[-3000:]
    assert (repo / "data" / "digits" / "manifest.json").exists() == done
    if not done:
        assert "Error in rule download" in log, log[-3000:]


@pytest.mark.slow
def test_a_gpu_request_on_a_cluster_without_gpus_is_refused_before_submission(tmp_path):
    """The rules ask for a GPU each; on the test cluster (none) that would queue forever:
    refused, in words, before any job is submitted."""
    _cluster()
    repo = project_copy(tmp_path / "p", tiny_digits_params(runs=[0]))
    run = _snakemake(repo, ENV, "models/digits/run0/experts/benign.pt",
                     "--set-resources", "expert:gpu=1")
    log = run.stdout + run.stderr
    assert run.returncode != 0
    assert "rules expert ask for a GPU, and no node of partition 'cpu' has one" in log, log[-3000:]
    assert not re.findall(r"SLURM jobid (\d+)", log), log[-3000:]
    assert not (repo / "data" / "digits").exists()  # not even the GPU-free download ran


@pytest.mark.slow
def test_a_cancelled_evaluation_leaves_nothing_done_and_resumes_from_its_saved_parts(tmp_path):
    """`scancel` of a running evaluation: no metrics file that Snakemake or DVC would take as
    done, its finished parts kept (dwf.evaluate.Resume); the rerun reads them back (their files
    untouched) and finishes."""
    _cluster()
    params = tiny_digits_params(runs=[0])
    params["digits"]["evaluate"] |= {"n_examples": 0, "ms_steps": 100, "ms_restarts": 3,
                                     "adaptive_steps": 100, "strong_steps": 100}  # a minute or so
    repo = project_copy(tmp_path / "p", params)
    sh(repo, str(BIN / "snakemake"), "--cores", "2", "models/digits/run0/resnet18.pt")
    target = repo / "metrics" / "runs" / "digits" / "run0" / "eval" / "resnet18.json"
    state = target.with_name(target.name + ".resume")
    # no retry: the cancelled job must stay cancelled for this check
    first = subprocess.Popen([str(BIN / "snakemake"), "--workflow-profile", "profiles/slurm-local",
                              "--retries", "0", str(target.relative_to(repo))], cwd=repo, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not list(state.glob("*.pt")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.5)
    jobs = subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True,
                          text=True).stdout.split()
    assert jobs and list(state.glob("*.pt")), "the evaluation ended before a part was saved"
    subprocess.run(["scancel", *jobs], check=True)
    log, _ = first.communicate(timeout=600)
    assert first.returncode != 0, log[-3000:]
    assert not target.exists() and not target.with_name("resnet18.details.json").exists()
    saved = list(state.glob("*.pt"))

    plan = sh(repo, str(BIN / "snakemake"), "-n", str(target.relative_to(repo)))
    assert "evaluate" in plan.stdout  # Snakemake takes nothing of the cancelled job as done
    sh(repo, str(BIN / "snakemake"), "--workflow-profile", "profiles/slurm-local",
       str(target.relative_to(repo)))
    assert target.exists() and not state.exists()  # finished; its parts folder cleaned up
    log = (repo / "logs" / "evaluate" / "digits" / "run0" / "resnet18.log").read_text()
    assert f"resuming: {len(saved)} saved part(s)" in log and "recomputing" not in log, log[-2000:]
