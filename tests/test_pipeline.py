"""The pipeline with real DVC and Snakemake (issue 3): no mocks.

The slow test copies the project into a temporary git repository, runs the digits pipeline
shrunk to seconds with `dvc repro`, and checks what a user relies on: a second repro does
nothing, a forced rerun is byte-identical, `dvc exp run -S seed=...` and `dvc metrics diff`
work, and a push/pull round trip through a local remote restores models without retraining.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import _tiny_section

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOP_SKIP = {".git", ".venv", "data", "models", "metrics", "reports", "logs", ".dvc", ".snakemake",
            "dvc.lock"}  # outputs and state: left out at the top level only
ANY_SKIP = {"__pycache__", ".pytest_cache"}
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t",
       "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
       "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}


def sh(cwd: Path, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=1800)
    if ok:
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def project_copy(dst: Path, params: dict | None = None) -> Path:
    """The project's sources and pipeline files in `dst`, optionally with other params."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == ROOT
        # a study's outputs (e.g. after `make demo`) and its in-repo DVC remote (.dvc/config)
        study = Path(folder).parent == ROOT / "studies"
        return [n for n in names if n in ANY_SKIP or n.endswith((".egg-info", ".resume"))
                or (top and n in TOP_SKIP) or (study and n in TOP_SKIP | {"remote"})]

    shutil.copytree(ROOT, dst, ignore=ignore)
    (dst / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", dst / ".dvc" / "config")
    if params is not None:
        (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


# dvc.yaml names the joint stage's expert checkpoints by index: it needs nine experts
NINE = ["benign", "fgsm_0", "fgsm_1", "fgsm_2", "fgsm_3", "pgd_0", "pgd_1", "pgd_2", "pgd_3"]


def tiny_digits_params(runs=(0, 1), experts=NINE) -> dict:
    return {"seed": 0, "runs": list(runs), "datasets": ["digits"], "data_root": "data",
            "cpu_threads": 2, "experts": list(experts), "baselines": ["resnet18"],
            "routings": ["top1"],  # the rerouted mixture (ablation (a)): a reroute stage too
            "ablations": ["frozen_experts"],  # DWF trained another way (ablation (b)): trained, not evaluated
            "evaluate_models": ["dwf", "experts/benign", "resnet18", "dwf_top1"],
            "digits": {**_tiny_section(), "ablations": {"frozen_experts": {"train_experts": False}}}}


def dvc_stages(repo: Path) -> dict[str, dict[str, list[str]]]:
    """Each DVC stage's resolved deps and outputs (metrics and plots files included)."""
    code = ("import json; from dvc.repo import Repo; r = Repo('.'); print(json.dumps({s.addressing:"
            " {'deps': [str(d.def_path) for d in s.deps], 'outs': [str(o.def_path) for o in s.outs]}"
            " for s in r.index.stages if s.path == r.root_dir + '/dvc.yaml'}))")  # not studies/*
    return json.loads(sh(repo, sys.executable, "-c", code).stdout)


def dvc_outputs(repo: Path) -> set[str]:
    """Every output and metrics/plots file the DVC pipeline declares."""
    return {o for s in dvc_stages(repo).values() for o in s["outs"]}


def snakemake_outputs(repo: Path) -> set[str]:
    """Every file the Snakemake DAG would produce (from its dry-run summary)."""
    out = sh(repo, str(BIN / "snakemake"), "--summary", "--cores", "1").stdout
    return {line.split("\t")[0] for line in out.splitlines()[1:] if line.strip()}


@pytest.mark.parametrize("config", ["paper", "digits"])
def test_snakemake_and_dvc_produce_the_same_outputs(tmp_path, config):
    repo = project_copy(tmp_path / "p", None if config == "paper" else tiny_digits_params())
    sh(repo, "git", "init", "-q")
    dvc = dvc_outputs(repo)
    snake = snakemake_outputs(repo)
    # Snakemake declares the file written last inside a DVC folder output (data/D/manifest.json),
    # no folder (its timestamp file would land inside); reports/ and metrics/models are written
    # with summary.json.
    # DVC alone has the params check (Snakemake's wildcard patterns refuse bad names).
    dvc.discard(".dwf/params-checked")
    inside = {o for o in snake if any(o.startswith(d + "/") for d in dvc)}
    folders = {d for d in dvc if any(o.startswith(d + "/") for o in snake)} | {"reports", "metrics/models"}
    assert dvc - folders == snake - inside, (f"only in DVC: {sorted(dvc - folders - snake)[:5]}; "
                                             f"only in Snakemake: {sorted(snake - inside - dvc)[:5]}")
    assert {o.split("/manifest.json")[0] for o in inside} == {d for d in folders if d.startswith("data/")}
    if config == "paper":
        assert sum(p.startswith("models/") and "/experts/" in p for p in dvc) == 2 * 5 * 9


def test_joint_and_evaluate_depend_on_each_expert_file(tmp_path):
    """Per-file deps (issue 15): each expert checkpoint, as DVC resolves dvc.yaml, not the folder."""
    repo = project_copy(tmp_path / "p", tiny_digits_params(runs=[3]))
    sh(repo, "git", "init", "-q")
    stages = dvc_stages(repo)
    experts = {f"models/digits/run3/experts/{e}.pt" for e in NINE}
    for name in ("joint@digits-3", "evaluate@digits-3-resnet18"):
        deps = stages[name]["deps"]
        assert experts <= set(deps) and "models/digits/run3/experts" not in deps, name
        assert {"src/dwf/cli.py", "src/dwf/paths.py"} <= set(deps), name

    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_digits_params(experts=NINE[:3])))
    r = sh(repo, sys.executable, "-c", "from dvc.repo import Repo; Repo('.').index.stages", ok=False)
    assert r.returncode != 0 and "experts[3]" in r.stderr  # fewer experts: refused, not ignored


def test_snakemake_config_that_dwf_would_not_see_is_refused(tmp_path):
    repo = project_copy(tmp_path / "p")
    r = sh(repo, str(BIN / "snakemake"), "-n", "--config", "experts=[benign]", ok=False)
    assert r.returncode != 0
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        "error: --config experts: the dwf commands read params.yaml; change it there "
        "(only joint_gpus may be set with --config)"]
    assert "joint" in sh(repo, str(BIN / "snakemake"), "-n", "--config", "joint_gpus=2").stdout


@pytest.mark.slow  # two trainings in fresh processes: 6-18 s on 2 busy cores
def test_cpu_results_do_not_depend_on_omp_num_threads(tmp_path, tiny_params):
    """Issue 15: a stage under OMP_NUM_THREADS=1 and =2 (as DVC and Snakemake may run it) gives
    the same weights, since `cpu_threads` in params sets the thread count."""
    params = yaml.safe_load(tiny_params.read_text()) | {"cpu_threads": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    weights = []
    for threads in ("1", "2"):
        out = tmp_path / f"benign_{threads}.pt"
        r = subprocess.run([str(BIN / "dwf"), "train-expert", "--expert", "benign", "--params", "params.yaml",
                            "--dataset", "digits", "--out", str(out), "--history", f"h{threads}.json",
                            "--quiet", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True,
                           env={**ENV, "OMP_NUM_THREADS": threads}, timeout=600)
        assert r.returncode == 0, r.stderr
        weights.append(torch.load(out, weights_only=True)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_snakemake_dry_run_lists_every_job_and_lint_passes(tmp_path):
    repo = project_copy(tmp_path / "p")
    out = sh(repo, str(BIN / "snakemake"), "-n").stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    assert counts["expert"] == "90" and counts["joint"] == "10" and counts["download"] == "2"
    assert counts["evaluate"] == str(2 * 5 * len(yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate_models"]))
    lint = sh(repo, str(BIN / "snakemake"), "--lint")
    assert "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    assert "executor: slurm" in (ROOT / "profiles" / "slurm" / "config.yaml").read_text()


# a name that runs `touch "$PWN"` wherever a shell reads it unquoted or in single quotes
HOSTILE = "x'; touch \"$PWN\"; '"


def _dvc_modes(repo: Path, stage: str, env: dict) -> dict[str, str]:
    """Every way DVC runs a stage, each tried once in this order: what each printed."""
    # the single-stage modes first: a full run reruns check_params, which (refusing the name)
    # removes the marker those stages need
    runs = {"repro -s": [["dvc", "repro", "-s", stage]],
            "repro --downstream": [["dvc", "repro", "--downstream", stage]],
            "repro": [["dvc", "repro"]], "exp run": [["dvc", "exp", "run"]],
            "queue": [["dvc", "exp", "run", "--queue"], ["dvc", "queue", "start"]]}
    out = {}
    for mode, cmds in runs.items():
        logs = [subprocess.run(c, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
                for c in cmds]
        if mode == "queue":  # the worker runs in the background: wait until nothing is queued
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                status = subprocess.run(["dvc", "queue", "status"], cwd=repo, env=env,
                                        capture_output=True, text=True).stdout
                if not re.search(r"\b(Queued|Running)\b", status):
                    break
                time.sleep(2)
            logs.append(subprocess.CompletedProcess([], 0, status, ""))
        out[mode] = "".join(r.stdout + r.stderr for r in logs)
    return out


@pytest.mark.slow
def test_no_params_value_reaches_a_shell_in_any_way_dvc_runs_a_stage(tmp_path):
    """Issue 23: a hostile expert name in params.yaml, the check-params marker and the data
    already made by a clean run; DVC's every mode runs constant commands (`--dvc`) that refuse
    the name, and no shell ever runs the `touch` it carries."""
    repo = project_copy(tmp_path / "p", tiny_digits_params(runs=[0]))
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "repro", "download@digits")  # check_params' marker and the data, clean
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_digits_params(runs=[0], experts=[*NINE[:8], HOSTILE])))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "hostile expert name")
    marker = tmp_path / "PWN"
    said = _dvc_modes(repo, f"expert@digits-0-{HOSTILE}", {**ENV, "PWN": str(marker)})
    assert not marker.exists(), said
    # the stage itself ran in `repro -s` (its deps all there) and dwf refused the name
    assert "experts: expected a name" in said["repro -s"], said["repro -s"][-2000:]


@pytest.mark.slow
def test_dvc_repro_digits_end_to_end(tmp_path):
    repo = project_copy(tmp_path / "p", tiny_digits_params())
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "remote", "add", "-d", "-f", "storage", str(tmp_path / "remote"))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny digits pipeline")

    sh(repo, "dvc", "repro")
    assert not list((repo / "models").rglob(".gitignore"))  # /models/ is ignored at the root
    summary = json.loads((repo / "metrics" / "summary.json").read_text())
    assert summary["digits"]["dwf"]["clean"]["n"] == 2
    for f in ("table2.md", "table3.tex", "comparison.md", "figures/figure6_digits.png"):
        assert (repo / "reports" / f).is_file(), f
    first = {p: p.read_bytes() for p in sorted((repo / "metrics").rglob("*.json"))}

    assert "up to date" in sh(repo, "dvc", "repro").stdout  # nothing changed, nothing runs

    sh(repo, "dvc", "repro", "--force")  # from scratch again: byte-identical metrics
    again = {p: p.read_bytes() for p in sorted((repo / "metrics").rglob("*.json"))}
    assert again == first

    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results")
    sh(repo, "dvc", "push", "dvc.yaml")

    sh(repo, "dvc", "exp", "run", "-S", "seed=3")
    shown = sh(repo, "dvc", "exp", "show", "--csv", "--no-pager").stdout
    assert re.search(r"^.*,3,", shown, flags=re.M) or ",3\n" in shown, shown
    # the paper's pipeline declares no metrics (a study does): named, its models' rows diff
    diff = sh(repo, "dvc", "metrics", "diff", "HEAD", "--json", "--targets", "metrics/models", "-R").stdout
    assert "metrics/models/digits/dwf.json" in diff

    # a fresh checkout of the committed results restores models from the remote, no retraining
    sh(repo, "git", "checkout", "-q", "--", ".")
    sh(repo, "dvc", "exp", "apply", "HEAD", ok=False)
    shutil.rmtree(repo / "models")
    shutil.rmtree(repo / ".dvc" / "cache")
    # dvc.yaml as target: without one, pull and status cover every pipeline (studies/ too)
    sh(repo, "dvc", "pull", "dvc.yaml")
    status = sh(repo, "dvc", "status", "dvc.yaml").stdout
    assert "up to date" in status, status
    assert "up to date" in sh(repo, "dvc", "repro").stdout


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["benign_`touch PWNED`", "benign_'$(touch PWNED)'"])
def test_injected_expert_name_runs_no_shell_command(tmp_path, bad):
    """Issue 11: an expert name holding a command substitution, through real `dvc repro`, fails
    before any shell sees it: the check_params stage, which every stage depends on, refuses it
    first (quoting alone cannot stop a name holding a quote). `dvc exp run` runs the same repro."""
    repo = project_copy(tmp_path / "p", tiny_digits_params(runs=[0]))
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "repro", "download@digits")  # up to date: the expert stages run next
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_digits_params(runs=[0], experts=[*NINE[1:], bad])))
    for cmd in (["dvc", "repro"], ["dvc", "repro", "joint@digits-0"]):
        r = sh(repo, *cmd, ok=False)
        assert r.returncode != 0
        assert "error: experts: expected a name matching" in r.stdout + r.stderr, r.stdout + r.stderr
        assert not list(repo.rglob("PWNED"))
    # a stage run alone: the failed check removed its marker, a dep of the stage, so DVC
    # refuses to run it; with the marker there, its constant command (`--dvc`) refuses the name
    r = sh(repo, "dvc", "repro", "--single-item", f"expert@digits-0-{bad}", ok=False)
    assert r.returncode != 0 and "params-checked" in r.stderr, r.stdout + r.stderr
    assert not list(repo.rglob("PWNED"))
    (repo / ".dwf" / "params-checked").write_text("params checked by `dwf check-params`\n")
    r = sh(repo, "dvc", "repro", "--single-item", f"expert@digits-0-{bad}", ok=False)
    assert r.returncode != 0 and "error: experts: expected a name matching" in r.stdout + r.stderr
    assert not list(repo.rglob("PWNED"))


@pytest.mark.slow
def test_interrupted_exp_run_retrains_nothing_that_finished(tmp_path):
    """Issue 15: `dvc exp run` stopped part-way (Ctrl-C), then run again, re-runs only what had
    not finished: per-file expert deps, no DVC .gitignore inside models/ to lose."""
    repo = project_copy(tmp_path / "p", tiny_digits_params(runs=[0]))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny digits pipeline")
    lock = repo / "dvc.lock"  # what DVC records as finished, written after each stage

    def finished_experts():
        try:
            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        except (OSError, yaml.YAMLError):  # absent, or caught mid-write
            return []
        return [s for s in stages if s.startswith("expert@")]

    proc = subprocess.Popen(["dvc", "exp", "run"], cwd=repo, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    # Wait for the lock, not the checkpoint: a checkpoint on disk is written before DVC records
    # its stage, and an interrupt in between left nothing recorded (CI, stop 27).
    while not finished_experts() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the pipeline finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # DVC sometimes hangs in its exit handlers after Ctrl-C
        os.killpg(proc.pid, signal.SIGKILL)  # then the harshest interruption: kill -9
        proc.communicate()
    done = finished_experts()  # what DVC recorded as finished before the interrupt
    assert done, "no expert stage finished before the interrupt"
    again = sh(repo, "dvc", "exp", "run").stdout
    for stage in done:
        assert f"Running stage '{stage}'" not in again, again[-2000:]
    assert "Running stage 'joint@digits-0'" in again
    assert not list((repo / "models").rglob(".gitignore"))


def snakemake_jobs(repo: Path, *args: str) -> set[str]:
    """The jobs `snakemake -n` plans, named as DVC addresses the stages (rule@wildcards)."""
    out = sh(repo, str(BIN / "snakemake"), "-n", *args).stdout
    jobs, rule, wildcards = set(), None, {}
    for line in out.splitlines() + ["rule end:"]:
        start = re.match(r"(?:local)?rule (\w+):$", line)
        if start:
            if rule not in (None, "all"):
                if rule == "forensics":  # one per dataset in DVC; Snakemake names the run
                    wildcards.pop("run")
                jobs.add(rule + ("@" + "-".join(wildcards.values()) if wildcards else ""))
            rule, wildcards = start.group(1), {}
        elif line.strip().startswith("wildcards:"):
            wildcards = dict(kv.split("=", 1) for kv in line.split(":", 1)[1].strip().split(", "))
    return jobs


def dvc_stale(repo: Path) -> set[str]:
    return set(json.loads(sh(repo, "dvc", "status", "--json", "dvc.yaml").stdout))


def downstream(stages: dict[str, dict[str, list[str]]], stale: set[str]) -> set[str]:
    """`stale` and every stage that reads what they write: what `dvc repro` reruns."""
    def feeds(out: str, dep: str) -> bool:
        return out == dep or out.startswith(dep + "/") or dep.startswith(out + "/")

    closure, grown = set(stale), True
    while grown:
        outs = [o for s in closure for o in stages[s]["outs"]]
        more = {name for name, s in stages.items() if name not in closure
                and any(feeds(o, d) for o in outs for d in s["deps"])}
        closure |= more
        grown = bool(more)
    return closure


@pytest.mark.slow
def test_snakemake_plans_what_dvc_calls_stale(tmp_path):
    """Issue 24: a parameter or a source change makes `snakemake -n` plan the stages `dvc status`
    calls stale and what reads their outputs (as `dvc repro` would rerun): one truth. Outputs are
    placeholders recorded by `dvc commit`; both tools judge by hashes or times, not contents."""
    repo = project_copy(tmp_path / "p", tiny_digits_params())
    sh(repo, "git", "init", "-q")
    stages = dvc_stages(repo)
    for out in {o for s in stages.values() for o in s["outs"]}:
        path = repo / out
        folder = not path.suffix and path.name != "params-checked"  # data/digits, reports
        (path if folder else path.parent).mkdir(parents=True, exist_ok=True)
        (path / "manifest.json" if folder else path).write_text(out)

    def built():  # as after `dvc pull` and `snakemake --touch` (README)
        sh(repo, "dvc", "commit", "-f", "dvc.yaml")
        sh(repo, str(BIN / "snakemake"), "--touch", "--cores", "1")
        assert dvc_stale(repo) == set() and snakemake_jobs(repo) == set()

    built()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["digits"]["baselines"]["resnet18"]["lr"] = 0.06
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = dvc_stale(repo)
    assert stale == {"baseline@digits-0-resnet18", "baseline@digits-1-resnet18"}
    assert snakemake_jobs(repo) == downstream(stages, stale) == stale | {
        "evaluate@digits-0-resnet18", "evaluate@digits-1-resnet18", "aggregate"}

    # make study: file times that say nothing (after a touch) or everything (every source file
    # newer than every output, as in a clone) is stale; DVC's hashes decide (scripts/dvc-stale.py).
    # (Where Snakemake has its records, an input newer but unchanged does not count: it checks.)
    for scramble in ("touch", "clone"):
        if scramble == "touch":
            sh(repo, str(BIN / "snakemake"), "--touch", "--cores", "1")
            assert snakemake_jobs(repo) == set()
        else:  # a clone: no Snakemake records (which hold input checksums), sources newest
            shutil.rmtree(repo / ".snakemake")
            for source in (repo / "src").rglob("*.py"):
                source.touch()
            assert len(snakemake_jobs(repo)) > len(downstream(stages, stale))
        forced = sh(repo, sys.executable, "scripts/dvc-stale.py", "dvc.yaml").stdout.split()
        assert snakemake_jobs(repo, "--rerun-triggers", "mtime", "--forcerun", *forced) == downstream(stages, stale)

    built()
    with open(repo / "src" / "dwf" / "evaluate.py", "a") as f:
        f.write("# a comment is a change: DVC hashes the file\n")
    stale = dvc_stale(repo)
    models = tiny_digits_params()["evaluate_models"]
    assert {s.split("@")[0] for s in stale} == {"evaluate"} and len(stale) == 2 * len(models)
    assert snakemake_jobs(repo) == downstream(stages, stale) == stale | {"aggregate"}

    built()
    with open(repo / "src" / "dwf" / "models" / "resnet.py", "a") as f:  # inside a folder dep
        f.write("# a comment\n")
    stale = dvc_stale(repo)
    assert {s.split("@")[0] for s in stale} == {"expert", "joint", "ablation", "reroute", "baseline", "evaluate",
                                              "forensics"}
    assert snakemake_jobs(repo) == downstream(stages, stale)
