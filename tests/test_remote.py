"""The digits study's DVC remote, carried by the repository (issue 15), and Snakemake beside it.

A clone has the study's checkpoints in `studies/digits/remote` (remote `digits` in .dvc/config;
each cached output of the study's dvc.yaml names it), so `dvc pull` needs no network and no
credentials, while the paper's pipeline keeps its own default remote. The slow test plays a
user's fresh clones with real DVC, git and Snakemake on the study shrunk to seconds.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import configobj
import pytest
import yaml
from test_pipeline import BIN, ROOT, project_copy, sh, tiny_digits_params

STUDY = Path("studies") / "digits"


def _outputs_and_remotes(repo: Path) -> dict[str, list[tuple[str, bool, str | None]]]:
    """(path, cached, remote) of each output of each pipeline, by dvc.yaml, as DVC reads them."""
    code = ("import json; from dvc.repo import Repo; r = Repo('.'); out = {}\n"
            "for s in r.index.stages:\n"
            "    out.setdefault(s.relpath, []).extend((str(o.def_path), o.use_cache, o.remote) for o in s.outs)\n"
            "print(json.dumps(out))")
    return json.loads(sh(repo, sys.executable, "-c", code).stdout)


def test_study_outputs_go_to_the_remote_the_repository_carries(tmp_path):
    repo = project_copy(tmp_path / "p")
    sh(repo, "git", "init", "-q")
    outs = _outputs_and_remotes(repo)
    study = [o for o in outs[str(STUDY / "dvc.yaml")] if o[1]]
    assert {p.split("/")[0] for p, _, _ in study} == {"data", "models"}
    assert {remote for _, _, remote in study} == {"digits"}  # checkpoints and the dataset
    assert {remote for _, _, remote in outs["dvc.yaml"]} == {None}  # the paper's: default remote

    config = configobj.ConfigObj(str(repo / ".dvc" / "config"))  # DVC's own format and reader
    url = Path(config['remote "digits"']["url"])  # relative: a clone's own folder
    assert not url.is_absolute() and (repo / ".dvc" / url).resolve() == (repo / STUDY / "remote").resolve()
    # the lead commits it: git must not ignore what `dvc push` writes there
    r = subprocess.run(["git", "check-ignore", "-q", str(STUDY / "remote" / "files" / "md5" / "ab" / "c")],
                       cwd=ROOT, capture_output=True, check=False)
    assert r.returncode == 1


def test_a_study_is_generated_only_for_a_remote_named_after_it(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("study_pipeline", ROOT / "scripts" / "study-pipeline.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    monkeypatch.setattr(generator, "ROOT", tmp_path)
    (tmp_path / "studies" / "tiny").mkdir(parents=True)
    (tmp_path / "studies" / "tiny" / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())
    with pytest.raises(SystemExit, match="no remote 'tiny'"):
        generator.main("tiny")  # its outputs would name a remote `dvc push` cannot find
    assert not (tmp_path / "studies" / "tiny" / "dvc.yaml").exists()
    with (tmp_path / ".dvc" / "config").open("a") as f:
        f.write("['remote \"tiny\"']\n    url = ../studies/tiny/remote\n")
    generator.main("tiny")
    written = (tmp_path / "studies" / "tiny" / "dvc.yaml").read_text()
    # each cached output: data, an expert, the mixture, an ablated and a rerouted mixture, a baseline
    assert written.count("remote: tiny") == 6 and "remote: digits" not in written


def _git_commit(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)


def _set_n_examples(study: Path, n: int) -> None:
    params = yaml.safe_load((study / "params.yaml").read_text())
    params["digits"]["evaluate"]["n_examples"] = n
    (study / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _ran(output: str) -> list[str]:
    return [ln.split("'")[1] for ln in output.splitlines() if ln.startswith("Running stage '")]


@pytest.mark.slow  # a tiny study (run 0) and six tiny evaluations: 10.5 min on 2 cores at load 5
def test_study_from_fresh_clones_pulls_compares_and_commits_snakemake_outputs(tmp_path):
    first = project_copy(tmp_path / "first")
    (first / STUDY / "params.yaml").write_text(yaml.safe_dump(tiny_digits_params(runs=[0]), sort_keys=False))
    sh(first, "git", "init", "-q")
    _git_commit(first, "tiny digits study")
    sh(first / STUDY, "dvc", "repro")
    sh(first / STUDY, "dvc", "push", "dvc.yaml")  # into studies/digits/remote, not `storage`
    assert list((first / STUDY / "remote").rglob("*")) and not (tmp_path / "dwf-storage").exists()
    _git_commit(first, "results and the remote")

    # a fresh clone pulls every checkpoint from the remote it carries; repro then runs nothing
    second = tmp_path / "second"
    sh(tmp_path, "git", "clone", "-q", str(first), str(second))
    assert not (second / STUDY / "models").exists()
    sh(second / STUDY, "dvc", "pull", "dvc.yaml")
    assert (second / STUDY / "models" / "digits" / "run0" / "dwf.pt").is_file()
    assert _ran(sh(second / STUDY, "dvc", "repro").stdout) == []

    # Snakemake after the pull: --touch orders the file times DVC left, then nothing is stale
    snake = [str(BIN / "snakemake"), "-s", "../../Snakefile", "--cores", "2"]
    sh(second / STUDY, *snake, "--touch")
    assert "Nothing to be done" in sh(second / STUDY, *snake, "-n").stdout
    # an evaluation-only change run by Snakemake, recorded by DVC in a script (no prompt)
    _set_n_examples(second / STUDY, 20)
    sh(second / STUDY, *snake, "--forcerun", "evaluate")
    assert "up to date" not in sh(second / STUDY, "dvc", "status", "dvc.yaml").stdout
    sh(second / STUDY, "dvc", "commit", "-f", "dvc.yaml", "--quiet")
    assert "up to date" in sh(second / STUDY, "dvc", "status", "dvc.yaml").stdout
    _git_commit(second, "evaluate 20 digits")
    # the study's declared metrics: a row a model; a run's headline numbers when named
    rows = json.loads(sh(second / STUDY, "dvc", "metrics", "diff", "HEAD~1", "--json", "--all").stdout)
    assert set(rows) == {f"metrics/models/digits/{m}.json" for m in tiny_digits_params()["evaluate_models"]}
    assert rows["metrics/models/digits/dwf.json"]["runs"] == {"old": 1, "new": 1, "diff": 0}
    diff = json.loads(sh(second / STUDY, "dvc", "metrics", "diff", "HEAD~1", "--json",
                         "--targets", "metrics/runs", "-R").stdout)
    dwf = diff["metrics/runs/digits/run0/eval/dwf.json"]  # paths from the study folder
    assert dwf["n_examples"] == {"old": 40, "new": 20, "diff": -20}
    assert all(isinstance(v["old"], (int, float)) and isinstance(v["new"], (int, float)) for v in dwf.values())

    # the same change from a clone without the models: DVC pulls what the evaluations (and the
    # forensics, which reads the evaluation settings) read and trains nothing; its numbers are
    # Snakemake's
    third = tmp_path / "third"
    sh(tmp_path, "git", "clone", "-q", str(first), str(third))
    _set_n_examples(third / STUDY, 20)
    ran = _ran(sh(third / STUDY, "dvc", "repro", "--pull", "--allow-missing").stdout)
    assert ran and all(s.startswith(("evaluate@", "forensics@", "aggregate")) for s in ran), ran
    for model in ("dwf", "experts/benign", "resnet18"):
        path = STUDY / "metrics" / "runs" / "digits" / "run0" / "eval" / f"{model}.json"
        assert (third / path).read_bytes() == (second / path).read_bytes(), model
