"""Fault injection (issue 7): kills, numerical faults, bad parameters, leaked secrets."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dwf import checkpoint, data, models
from dwf.cli import app
from dwf.config import TrainConfig
from dwf.defenses import dwf as dwf_stages
from dwf.defenses.dwf import benign_batch, build_mixture, resume_path, train_expert, train_joint
from dwf.train import TrainingError, fit

from conftest import digits_arch

CPU = torch.device("cpu")


def _dwf(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dwf", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


def _train_args(params: Path, out: Path) -> list[str]:
    return ["train-expert", "--params", str(params), "--expert", "pgd_0", "--quiet",
            "--set", "expert.epochs=3", "--set", "expert.batch_size=32", "--out", str(out),
            "--history", str(out.with_suffix(".json"))]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.4], ids=["at-epoch-boundary", "mid-epoch"])
def test_sigkill_then_resume_is_bit_identical(tiny_params, tmp_path, delay):
    """SIGKILL during epoch 2 leaves no final checkpoint; the re-run resumes and matches."""
    ref = tmp_path / "ref" / "pgd_0.pt"
    assert _dwf(*_train_args(tiny_params, ref)).wait(timeout=300) == 0

    out = tmp_path / "killed" / "pgd_0.pt"
    proc = _dwf(*_train_args(tiny_params, out))
    deadline = time.time() + 300
    while not resume_path(out).is_file():  # epoch 1 is checkpointed
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed stage must not leave its final output"
    assert checkpoint.load(resume_path(out))["epoch"] in (1, 2)
    assert not list(out.parent.glob(".*.tmp")), "no half-written temporary file is left"

    resumed = _dwf(*_train_args(tiny_params, out))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming after epoch" in err
    a, b = checkpoint.load(ref)["state_dict"], checkpoint.load(out)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert out.read_bytes() == ref.read_bytes()  # DVC sees the same checkpoint (issue 23)
    assert not resume_path(out).exists()


def _nan_at(epoch: int, step: int):
    calls = {"n": 0}

    def recipe(model, x, y, cfg, rng):
        calls["n"] += 1
        if calls["n"] == (epoch - 1) * 2 + step:  # 2 steps per epoch below
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return benign_batch(model, x, y, cfg, rng)
    return recipe


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(digits, tmp_path):
    x, y = digits[0][:128], digits[1][:128]
    torch.manual_seed(0)
    model = models.build("resnet18", **digits_arch(4))
    ckpt = tmp_path / "m.pt.resume"
    cfg = TrainConfig(epochs=3, batch_size=64)
    with pytest.raises(TrainingError, match=r"epoch 2, step 1"):
        fit(model, _nan_at(2, 1), x, y, cfg=cfg, seed=0, flip=False, crop_padding=0,
            resume_path=ckpt, meta={"arch": "resnet18", "arch_kwargs": digits_arch(4)},
            device=CPU, progress=False)
    saved = checkpoint.load(ckpt)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())


def test_nan_in_the_gate_stops_training(digits, tmp_path):
    """A NaN router weight makes the mixed logits NaN: training stops before any update."""
    experts = []
    cfg = TrainConfig(epochs=1, batch_size=64, pgd_steps=(1,), fgsm_eps=(0.1,))
    for name in ("benign", "pgd_0"):
        path = tmp_path / f"{name}.pt"
        train_expert(name.split("_")[0], digits[0][:64], digits[1][:64], cfg=cfg,
                     arch_kwargs=digits_arch(4), dataset="digits", seed=1, flip=False,
                     crop_padding=0, out=path, device=CPU, progress=False)
        experts.append(path)
    moe, kwargs, _ = build_mixture(experts, router_hidden=(16,), seed=0, dataset="digits")
    with torch.no_grad():
        moe.router.scores[1].weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 1, step 1"):
        fit(moe, benign_batch, digits[0][:64], digits[1][:64], cfg=cfg, seed=0, flip=False,
            crop_padding=0, resume_path=tmp_path / "moe.resume",
            meta={"arch": "softmoe", "arch_kwargs": kwargs}, device=CPU, progress=False)
    assert not (tmp_path / "moe.resume").exists()


BAD_SETS = [
    ("expert.epochs=0", "expert.epochs"),
    ("expert.batch_size=5000", "batch_size 5000 is larger than the training data (1437"),
    ("expert.lr=fast", "expert.lr"),
    ("expert.pgd_eps=1.5", "pgd_eps"),
    ("expert.pgd_eps=-0.1", "pgd_eps"),
    ("expert.fgsm_eps=[]", "fgsm_eps"),
    ("evaluate.pgd_eps=2", "pgd_eps"),
    ("expert.bogus=1", "expert.bogus"),
    ("normalization=wrong", "normalization"),
    ("expert.attack_bn=sometimes", "attack_bn"),
    ("width=0", "width"),
]


@pytest.mark.parametrize("override,key", BAD_SETS, ids=[b[0] for b in BAD_SETS])
def test_bad_parameter_exits_2_with_one_line_naming_the_key(tiny_params, tmp_path, override, key):
    out = tmp_path / "never.pt"
    result = CliRunner().invoke(app, ["train-expert", "--params", str(tiny_params), "--expert", "benign",
                                      "--set", override, "--out", str(out), "--quiet"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert key in lines[0] and lines[0].startswith("error: ")
    assert not out.exists() and not resume_path(out).exists(), "no work may start"


def test_joint_training_does_not_resume_onto_retrained_experts(digits, tmp_path, monkeypatch,
                                                              capsys):
    """Issue 11, item 3: kill the joint stage after its first epoch, retrain an expert with other
    settings, run the stage again: it must start afresh and say which input changed."""
    x, y = digits[0][:64], digits[1][:64]
    cfg = TrainConfig(epochs=2, batch_size=32, pgd_steps=(1,), fgsm_eps=(0.1,))
    experts = [tmp_path / "benign.pt", tmp_path / "pgd_0.pt"]

    def expert(path, seed):
        train_expert(path.stem.split("_")[0], x, y, cfg=cfg, arch_kwargs=digits_arch(4),
                     dataset="digits", seed=seed, flip=False, crop_padding=0, out=path,
                     device=CPU, progress=False)

    def joint():
        return train_joint(experts, x, y, cfg=cfg, router_hidden=(16,), dataset="digits", seed=0,
                           flip=False, crop_padding=0, out=tmp_path / "dwf.pt", device=CPU,
                           progress=False)

    for path in experts:
        expert(path, seed=1)
    calls, joint_batch = [], dwf_stages.joint_batch

    def killed_in_epoch_2(*args):
        calls.append(1)
        if len(calls) > 2:  # two steps an epoch
            raise KeyboardInterrupt
        return joint_batch(*args)

    with monkeypatch.context() as m:
        m.setattr(dwf_stages, "joint_batch", killed_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            joint()
    resume = resume_path(tmp_path / "dwf.pt")
    assert checkpoint.load(resume)["epoch"] == 1
    expert(experts[1], seed=2)  # retrained with other settings
    capsys.readouterr()
    history = joint()
    assert capsys.readouterr().err.splitlines() == [
        f"{resume}: not resumed: its inputs.pgd_0.pt differs from this run's; set aside as "
        "dwf.pt.stale.resume, starting afresh"]
    assert [h["epoch"] for h in history] == [1, 2] and not resume.exists()


def _bad_checkpoint(path: Path, problem: str) -> None:
    """A resnet18 checkpoint for digits with one problem of issue 11's item 7."""
    arch = digits_arch(4)
    state = models.build("resnet18", **arch).state_dict()
    if problem == "nan":
        state["conv1.weight"][0, 0, 0, 0] = float("nan")
    elif problem == "not-a-tensor":
        state["linear.bias"] = "0.1"
    elif problem == "negative-classes":
        arch = {**arch, "num_classes": -10}
    torch.save({"format": checkpoint.FORMAT, "arch": "resnet18", "arch_kwargs": arch,
                "state_dict": state, "dataset": "digits"}, path)


@pytest.mark.parametrize("problem, needle", [
    ("nan", "weight 'conv1.weight' is not finite"),
    ("not-a-tensor", "state_dict['linear.bias'] is a str, not a tensor"),
    ("negative-classes", "arch_kwargs.num_classes = -10 is not an integer in [1, 100000]"),
])
def test_bad_checkpoint_exits_2_with_one_line_naming_the_file(tiny_params, tmp_path, problem,
                                                              needle):
    bad = tmp_path / "bad.pt"
    _bad_checkpoint(bad, problem)
    result = CliRunner().invoke(app, ["evaluate", "--params", str(tiny_params), "--checkpoint",
                                      str(bad), "--out", str(tmp_path / "m.json"), "--quiet"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {bad}: ") and needle in lines[0]


def test_more_examples_than_the_test_split_is_refused_not_recorded(tiny_params, tmp_path,
                                                                    trained_model_path):
    """Issue 23, item 6: evaluate.n_examples = 10^9 ran the 360 test digits and recorded 10^9."""
    out = tmp_path / "m.json"
    result = CliRunner().invoke(app, ["evaluate", "--params", str(tiny_params), "--checkpoint",
                                      str(trained_model_path), "--out", str(out), "--quiet",
                                      "--set", "evaluate.n_examples=1000000000",
                                      "--set", "evaluate.strong=false"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert "evaluate.n_examples: expected at most the 360 test examples" in lines[0]
    assert not out.exists()


def test_manifest_missing_a_field_exits_2_naming_file_and_field(tiny_params, tmp_path):
    root = tmp_path / "data"
    manifest = data.download("digits", root, progress=False) / "manifest.json"
    entries = json.loads(manifest.read_text())
    del entries["splits"]["train"]["count"]
    manifest.write_text(json.dumps(entries))
    params = tmp_path / "broken.yaml"
    params.write_text(yaml.safe_dump({**yaml.safe_load(tiny_params.read_text()),
                                      "data_root": str(root)}))
    result = CliRunner().invoke(app, ["train-expert", "--params", str(params), "--expert",
                                      "benign", "--out", str(tmp_path / "m.pt"), "--quiet"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert f"{manifest}: splits.train lacks field 'count'" in lines[0]


def test_no_environment_secret_reaches_any_output(tiny_params, tmp_path, monkeypatch):
    """Metrics, histories and checkpoints never carry environment variables."""
    secrets = {"AWS_SECRET_ACCESS_KEY": "sekrit-aws-4f2a", "DWF_TOKEN": "sekrit-token-9c1e"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "benign.pt"
    for args in (["train-expert", "--params", str(tiny_params), "--expert", "benign", "--quiet",
                  "--out", str(out), "--history", str(tmp_path / "h.json")],
                 ["evaluate", "--params", str(tiny_params), "--checkpoint", str(out),
                  "--out", str(tmp_path / "m.json"), "--quiet"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 3
    for p in written:
        blob = p.read_bytes()
        assert not any(s.encode() in blob for s in secrets.values()), p


def test_bad_cli_options_are_one_line_and_exit_2():
    """Through the console entry (`python -m dwf`), not only through typer's test runner."""
    for args, needle in ((["train-expert", "--run", "abc"], "--run"),
                         (["evaluate", "--run", "-1"], "--run"),
                         (["forensics", "--steps", "1000000000"], "--steps"),  # issue 23: a bound
                         (["no-such-stage"], "no-such-stage")):
        proc = _dwf(*args)
        _, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], err


# ---------------------------------------------------------------- resumes that are exact


@pytest.fixture
def threads():
    """Set torch's CPU thread count inside a test; restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_a_training_resume_file_from_another_thread_count_is_not_used(digits, threads):
    """A CPU result depends on the thread count (params cpu_threads): part of the fingerprint
    a resume file must match (issue 23: killed at 1 thread, resumed at 2, matched neither)."""
    from dwf import fingerprint, train

    x, y = digits[0][:16], digits[1][:16]
    prints = []
    for n in (1, 2):
        threads(n)
        prints.append(train._fingerprint({"epochs": 1}, {"arch": "resnet18"}, {}, x, y))
    assert fingerprint.difference(prints[0], prints[1]) == "cpu_threads"


def test_evaluation_parts_from_another_thread_count_are_recomputed(trained_model, digits, tiny_params,
                                                                   tmp_path, threads, capsys):
    from dwf.config import load_params
    from dwf.evaluate import evaluate

    cfg = load_params(tiny_params, "digits", ["evaluate.n_examples=8", "evaluate.strong=false"]
                      ).profile("digits").evaluate
    state = tmp_path / "parts"
    for n in (1, 1, 2):
        threads(n)
        evaluate(trained_model, digits[2], digits[3], cfg=cfg, seed=0, device=CPU, progress=False,
                 state=state)
    said = capsys.readouterr().err
    assert said.count("recomputing") == 1  # the second run reused every part, the third none
    assert "another model, data, setting or code version" in said


def test_equal_checkpoints_are_equal_bytes_however_their_values_were_made(tmp_path):
    """A resumed training's history is unpickled (a string object per value) where an
    uninterrupted one's shares the code's constants: the files must not differ (DVC)."""
    model = torch.nn.Linear(2, 2)
    fresh = [{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(3)]
    unpickled = [pickle.loads(pickle.dumps(d)) for d in fresh]  # same values, other objects
    paths = []
    for i, history in enumerate((fresh, unpickled)):
        paths.append(tmp_path / f"{i}.pt")
        checkpoint.save(paths[-1], {"arch": "linear", "arch_kwargs": {}, "state_dict": model.state_dict(),
                                    "epoch": 3, "config": {}, "history": history})
    assert paths[0].read_bytes() == paths[1].read_bytes()
