"""The CLI end to end on a shrunken digits config, where ad-hoc commands write (never over the
pipeline's outputs or their own inputs), and its one-line, exit-code-2 input errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dwf import paths
from dwf.checkpoint import load_model
from dwf.cli import app
from dwf.metricsfile import details_path, read

from conftest import _tiny_section


def dwf(*args: str):
    """Run `dwf ARGS` in this process; returns the click Result (stdout and stderr apart)."""
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _ok(result):
    assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Stages write models/ and metrics/ relative to the working directory, as under DVC."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_root) -> Path:
    """A project after the training stages (experts benign and pgd_0, the mixture): built once
    per module by the CLI, as `dvc repro` runs it; tests work on copies (`project`)."""
    root = tmp_path_factory.mktemp("trained")
    raw = {"seed": 0, "runs": [0], "datasets": ["digits"], "data_root": str(digits_root),
           "experts": ["benign", "pgd_0"], "digits": _tiny_section()}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        p = ["--params", "params.yaml", "--dataset", "digits", "--quiet"]
        _ok(dwf("download", "--params", "params.yaml", "--quiet"))
        for expert in ("benign", "pgd_0"):
            assert "wrote" in _ok(dwf("train-expert", "--expert", expert, *p)).stdout
        _ok(dwf("train-joint", *p))
    return root


@pytest.fixture
def project(trained, tmp_path, monkeypatch) -> Path:
    """A copy of the trained project, as the working directory."""
    root = shutil.copytree(trained, tmp_path / "project")
    monkeypatch.chdir(root)
    return root


P = ["--params", "params.yaml", "--dataset", "digits", "--quiet"]


def test_every_stage_end_to_end(project):
    models = sorted(f.name for f in (project / "models").rglob("*.pt"))
    assert models == ["benign.pt", "dwf.pt", "pgd_0.pt"]
    assert len(load_model(paths.model("digits", 0, "dwf")).experts) == 2

    _ok(dwf("evaluate", "--model", "dwf", *P))  # default paths, as dvc.yaml runs it
    out = paths.evaluation("digits", 0, "dwf")
    headline = json.loads(out.read_text())  # what dvc.yaml declares as metrics: flat numbers
    assert all(type(v) in (int, float) for v in headline.values()), headline
    assert {"n_examples", "clean", "fgsm", "pgd", "strong", "worst_case"} <= set(headline)
    metrics = read(out)  # with the details beside it
    assert metrics["n_examples"] == 40
    assert set(metrics["pgd"]) == {"2", "3"} and len(metrics["fgsm"]) == 2
    attacked = [v for g in ("fgsm", "pgd") for v in metrics[g].values()]
    attacked += [metrics["pgd3_ms"], metrics["pgd3_adaptive"]]
    assert metrics["worst_case"] <= min(attacked) <= max(attacked) <= 100
    assert headline["pgd"] <= min(metrics["pgd"].values())
    assert len(metrics["gate_mean_weight"]) == 2
    assert len(metrics["per_example"]["worst_case_correct"]) == 40

    table = _ok(dwf("table", str(out))).stdout
    assert "dwf" in table and "|" in table
    _ok(dwf("aggregate", "--params", "params.yaml"))
    assert json.loads((project / "metrics/summary.json").read_text())
    assert any((project / "reports").iterdir())


def test_reroute_writes_dwf_under_another_routing_and_evaluate_attacks_it(project):
    """Ablation (a): `dwf reroute` writes the trained mixture's weights under top-1 routing as
    a model of its own (same bytes on a rerun: DVC caches it); its evaluation adds the
    relaxed-router attacks a hard routing needs, and records DWF's training cost."""
    import hashlib

    _ok(dwf("reroute", "--routing", "top1", "--params", "params.yaml", "--dataset", "digits"))
    path = paths.model("digits", 0, "dwf_top1")
    first = hashlib.sha256(path.read_bytes()).hexdigest()
    _ok(dwf("reroute", "--routing", "top1", "--params", "params.yaml", "--dataset", "digits"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == first
    routed, mixture = load_model(path), load_model(paths.model("digits", 0, "dwf"))
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        best = mixture.gate_weights(x).argmax(1)
        assert torch.equal(routed(x), mixture.expert_logits(x)[torch.arange(6), best])

    _ok(dwf("evaluate", "--model", "dwf_top1", *P))
    routed_m = read(paths.evaluation("digits", 0, "dwf_top1"))
    assert {"relaxed_ce", "relaxed_margin"} <= set(routed_m["strong"])
    _ok(dwf("evaluate", "--model", "dwf", *P))
    dwf_m = read(paths.evaluation("digits", 0, "dwf"))
    assert routed_m["train_tmacs"] == dwf_m["train_tmacs"] and routed_m["params_m"] == dwf_m["params_m"]


@pytest.mark.parametrize("args, says", [
    (["--routing", "top2"], "--routing"),
    (["--routing", "uniform", "--mixture", "models/digits/run0/experts/benign.pt", "--out", "u.pt"],
     "not a DWF mixture"),
])
def test_reroute_refuses_what_it_cannot_reroute(project, args, says):
    r = dwf("reroute", *args, "--params", "params.yaml", "--dataset", "digits")
    assert r.exit_code == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr


# ---------------------------------------------------------------- where ad-hoc commands write


def test_adhoc_training_and_evaluation_write_beside_their_files(workdir, tiny_params):
    p = ["--params", str(tiny_params), "--dataset", "digits", "--quiet"]
    pipeline = [paths.history("digits", 0, "benign"), paths.evaluation("digits", 0, "dwf")]
    for f in pipeline:  # the pipeline's own outputs, which no ad-hoc command may touch
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("pipeline's")
    ckpt = workdir / "e.pt"
    _ok(dwf("train-expert", "--expert", "benign", "--out", str(ckpt), *p))
    assert json.loads((workdir / "e.history.json").read_text())[0]["epoch"] == 1
    _ok(dwf("evaluate", "--checkpoint", str(ckpt), *p, "--set", "evaluate.n_examples=20"))
    metrics = read(workdir / "e.eval.json")
    assert metrics["n_examples"] == 20 and "gate_mean_weight" not in metrics
    assert all(f.read_text() == "pipeline's" for f in pipeline)


def _fake_training(monkeypatch, seen: list):
    """Replace every trainer by one that records its first argument and returns a curve."""
    from dwf import defenses
    from dwf.defenses import dwf as mixture

    def fake(*args, **kwargs):
        seen.append(args[0])  # the joint stage's: its expert checkpoints
        return [{"epoch": 1, "loss": 1.0, "seconds": 0.5}]

    for module, name in ((mixture, "train_expert"), (mixture, "train_joint"),
                         (defenses, "train_defense")):
        monkeypatch.setattr(module, name, fake)


TRAIN = {"train-expert": ["--expert", "benign"], "train-joint": [], "train": ["--defense", "resnet18"]}


@pytest.mark.parametrize("command", TRAIN)
def test_training_with_out_writes_its_curve_beside_it(project, monkeypatch, command):
    seen = []
    _fake_training(monkeypatch, seen)
    name = {"train-expert": "benign", "train-joint": "dwf", "train": "resnet18"}[command]
    curve = paths.history("digits", 0, name)
    curve.parent.mkdir(parents=True, exist_ok=True)
    curve.write_text("pipeline's")
    _ok(dwf(command, *TRAIN[command], "--out", "x.pt", *P))
    assert json.loads(Path("x.history.json").read_text()) == [{"epoch": 1, "loss": 1.0}]
    assert curve.read_text() == "pipeline's"
    if command == "train-joint":  # experts named so that any working directory finds them
        assert all(e.is_absolute() for e in seen[-1])
        _ok(dwf(command, *P))  # the pipeline's mixture: relative to its project root
        assert seen[-1][0] == paths.expert("digits", 0, "benign")


@pytest.mark.parametrize("command", TRAIN)
@pytest.mark.parametrize("outputs, says", [
    (["--history", "h.json"], "--history needs --out"),  # the pipeline's checkpoint, another curve
    (["--out", "x.pt", "--history", "x.pt"], "two outputs"),
    (["--out", "params.yaml"], "overwrite params.yaml"),  # an input
    (["--out", "x.pt", "--history", "params.yaml"], "overwrite params.yaml"),
])
def test_training_outputs_that_clash_are_refused(project, monkeypatch, command, outputs, says):
    _fake_training(monkeypatch, [])
    _one_line_error(dwf(command, *TRAIN[command], *outputs, *P), says)
    assert not Path("x.pt").exists() and yaml.safe_load(Path("params.yaml").read_text())["runs"] == [0]


def test_joint_training_out_over_an_expert_is_refused(project, monkeypatch):
    _fake_training(monkeypatch, [])
    expert = str(paths.expert("digits", 0, "pgd_0"))
    _one_line_error(dwf("train-joint", "--out", expert, *P), "pgd_0.pt")


@pytest.mark.parametrize("victim", ["checkpoint", "surrogate", "params", "data", "weights"])
def test_evaluate_out_equal_to_an_input_is_refused(project, digits_root, victim):
    ckpt = str(paths.model("digits", 0, "dwf"))
    inputs = {"checkpoint": ckpt, "surrogate": str(paths.expert("digits", 0, "benign")),
              "params": "params.yaml", "data": str(digits_root / "digits"), "weights": "w.pth"}
    Path("w.pth").write_bytes(b"weights")
    before = {k: Path(v).stat().st_mtime_ns for k, v in inputs.items()}
    given = (["--external", "resnet18", "--weights", "w.pth"] if victim == "weights"
             else ["--checkpoint", ckpt, "--surrogate", inputs["surrogate"]])
    _one_line_error(dwf("evaluate", *given, "--out", inputs[victim], *P), inputs[victim])
    assert before == {k: Path(v).stat().st_mtime_ns for k, v in inputs.items()}


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


EVAL = str(paths.evaluation("digits", 0, "dwf"))


@pytest.mark.parametrize("args, says", [
    # issue 23, item 5: what overwrote the digits study
    (["evaluate", "--model", "dwf", "--set", "evaluate.n_examples=20"],
     f"--set makes this an ad-hoc run, which may not write {EVAL}"),
    (["evaluate", "--model", "experts/benign", "--out", "models/digits/run0/dwf.pt"],
     "not this command's own output"),
    (["train-expert", "--expert", "benign", "--set", "expert.epochs=1"],
     "benign.pt (the pipeline's models/)"),
    # an --out among the pipeline's, its own default included, once the run is ad hoc
    (["train-expert", "--expert", "benign", "--set", "expert.epochs=1", "--out", "models/x.pt"], "--set"),
    (["evaluate", "--checkpoint", "models/digits/run0/dwf.pt", "--out", EVAL], "--checkpoint"),
    (["evaluate", "--checkpoint", "models/digits/run0/dwf.pt"], "dwf.eval.json (the pipeline's models/)"),
    (["train-joint", "--experts-dir", "models/digits/run0/experts"], "--experts-dir"),
    (["forensics", "--steps", "1"], "--steps"),
    (["reroute", "--routing", "top1", "--mixture", "models/digits/run0/dwf.pt"], "--mixture"),
    (["audit", "--model", "experts/benign", "--out", "reports/audit.json"], "reports/"),
    (["aggregate", "--summary", "s.json"], "models (the pipeline's models/)"),  # its rows beside it
    (["plan", "--json", "metrics/runs/plan.json"], "metrics/runs/"),
])
def test_adhoc_runs_do_not_write_pipeline_outputs(project, monkeypatch, args, says):
    """Only the pipeline's own invocation writes where the pipeline does: a run with --set or
    an input of its own choosing names --out outside the pipeline's folders, and no command
    writes a pipeline output that is another's. Refused in one line before any work."""
    _fake_training(monkeypatch, [])
    Path(EVAL).parent.mkdir(parents=True, exist_ok=True)
    Path(EVAL).write_text("pipeline's")
    before = _files(project)
    _one_line_error(dwf(*args, "--params", "params.yaml"), says)
    assert _files(project) == before


def test_the_pipeline_s_invocation_may_name_its_own_output(project):
    own = paths.model("digits", 0, "dwf_uniform")
    _ok(dwf("reroute", "--routing", "uniform", "--out", str(own), "--params", "params.yaml"))
    assert load_model(own).routing == "uniform"


def test_the_pipeline_s_commands_are_its_own_invocation():
    """The refusals above never meet the pipeline: dvc.yaml (the paper's, each study's) and the
    Snakefile run every dwf command with no --set and no input of their choosing (`dvc exp run
    -S` edits params.yaml instead)."""
    root = Path(__file__).resolve().parents[1]
    commands = [stage.get("cmd") or stage["do"]["cmd"]  # a foreach stage's is under do:
                for f in (root / "dvc.yaml", *root.glob("studies/*/dvc.yaml"))
                for stage in yaml.safe_load(f.read_text())["stages"].values()]
    commands += re.findall(r'shell:\s*((?:"[^"\n]*"\s*)+)', (root / "Snakefile").read_text())
    assert len(commands) >= 26  # 9 stages a dvc.yaml, 8 rules
    for c in commands:
        for option in ("--set", "--checkpoint", "--experts-dir", "--mixture", "--surrogate", "--steps"):
            assert option not in c, c


# ---------------------------------------------------------------- transfer sources


def test_transfer_sources_do_not_depend_on_the_working_directory(project, monkeypatch):
    ckpt = project / paths.model("digits", 0, "dwf")
    sources = []
    for i, cwd in enumerate((project, project / "models")):
        monkeypatch.chdir(cwd)
        out = project / f"e{i}.json"
        _ok(dwf("evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--params",
                str(project / "params.yaml"), "--quiet", "--set", "evaluate.n_examples=8"))
        sources.append(read(out)["settings"]["transfer_sources"])
    assert sources[0] == sources[1] == ["pretrained_benign", "pretrained_pgd_0"]


def test_missing_transfer_source_is_exit_2(project):
    paths.expert("digits", 0, "pgd_0").unlink()
    _one_line_error(dwf("evaluate", *P), "pgd_0.pt", "not found")
    assert not paths.evaluation("digits", 0, "dwf").exists()
    assert not details_path(paths.evaluation("digits", 0, "dwf")).exists()


@pytest.mark.parametrize("listed", ["/etc/hostname", "../outside.txt",
                                    "models/digits/run0/experts/../../../../../outside.txt",
                                    "/x/models/digits/run0/experts/../../../../../etc/hostname"])
def test_a_mixture_s_listed_experts_are_checked_before_any_is_opened(project, monkeypatch, listed):
    """Issue 23, item 6: a mixture from elsewhere listing another file as its expert is refused
    in one line, and that file is never read (torch's complaint about it would leak its bytes)."""
    from dwf import checkpoint

    Path("../outside.txt").write_text("secret")
    ckpt = checkpoint.load(paths.model("digits", 0, "dwf"))
    ckpt["experts"] = [str(paths.expert("digits", 0, "benign")), listed]
    evil = paths.model("digits", 0, "evil")
    torch.save(ckpt, evil)
    read, opened = checkpoint.read, []
    monkeypatch.setattr(checkpoint, "read", lambda path: opened.append(Path(path)) or read(path))
    _one_line_error(dwf("evaluate", "--checkpoint", str(evil), "--out", "e.json", *P),
                    f"lists {listed!r} as an expert", "nothing opened")
    assert opened == [evil]


def test_surrogate_with_the_strong_suite_off_is_refused(project):
    """Issue 23, item 6: --surrogate asks for transfer attacks, which evaluate.strong = false
    leaves out; a missing file was ignored and the metrics said nothing of it."""
    _one_line_error(dwf("evaluate", "--model", "experts/benign", "--surrogate", "nope.pt", "--set",
                        "evaluate.strong=false", "--out", "e.json", *P), "--surrogate")
    assert not Path("e.json").exists()


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err
    return err


def test_unknown_dataset_is_exit_2(workdir, tiny_params):
    r = dwf("train-expert", "--expert", "benign", "--params", str(tiny_params), "--dataset", "mnist")
    _one_line_error(r, "mnist")


def test_eps_outside_unit_range_via_set_is_exit_2(workdir, tiny_params):
    r = dwf("evaluate", "--params", str(tiny_params), "--dataset", "digits", "--checkpoint", "x.pt",
            "--out", "m.json", "--set", "evaluate.pgd_eps=8")
    _one_line_error(r, "digits.evaluate.pgd_eps")
    assert not (workdir / "m.json").exists()


def test_missing_checkpoint_is_exit_2(workdir, tiny_params):
    r = dwf("evaluate", "--params", str(tiny_params), "--dataset", "digits",
            "--checkpoint", str(workdir / "nope.pt"), "--out", "m.json")
    _one_line_error(r, "nope.pt", "not found")


def test_missing_experts_for_joint_training_is_exit_2(workdir, tiny_params):
    r = dwf("train-joint", "--params", str(tiny_params), "--dataset", "digits", "--quiet")
    _one_line_error(r, "benign.pt")


def test_expert_not_in_params_is_exit_2(workdir, tiny_params):
    r = dwf("train-expert", "--expert", "fgsm_7", "--params", str(tiny_params), "--dataset", "digits")
    _one_line_error(r, "fgsm_7")


def test_module_entry_point(workdir, tiny_params):
    """`python -m dwf` is the same app, with the same exit code and single error line."""
    r = subprocess.run([sys.executable, "-m", "dwf", "train-expert", "--expert", "benign",
                        "--params", str(tiny_params), "--dataset", "mnist"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1



def _words(text: str) -> str:
    return " ".join(text.split())


def _commands():
    import typer.main

    return typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_help_text_prints_as_written(name):
    """`dwf NAME --help` shows the command's docstring and each option's help word for word:
    nothing taken as console markup ("[clean, FGSM, PGD]" once vanished) or dropped."""
    command = _commands()[name]
    shown = _words(CliRunner().invoke(app, [name, "--help"], terminal_width=100).stdout)
    assert _words(command.help) in shown
    for param in command.params:
        if getattr(param, "help", None):
            assert _words(param.help) in shown, (param.name, param.help)


def test_the_command_list_shows_each_summary_as_written():
    """`dwf --help`: each command's line is the start of its docstring (click cuts a long one
    with "..."), brackets and all."""
    shown = CliRunner().invoke(app, ["--help"], terminal_width=100).stdout
    listed = dict(line.split(None, 1) for line in shown.split("Commands:")[1].splitlines()
                  if line.strip())
    assert set(listed) == set(_commands())
    for name, summary in listed.items():
        start = _words(summary).removesuffix("...")
        assert len(start) > 20 and _words(_commands()[name].help).startswith(start), (name, summary)
    assert "[clean, FGSM, PGD]" in shown
