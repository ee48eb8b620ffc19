"""Training: a stage learns, the same seed gives the same bits (and the same checkpoint bytes),
a resumed run equals an unbroken one, and a resume file from other inputs is never used."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import digits_arch
from dwf import checkpoint, fingerprint, models
from dwf.cli import app
from dwf.config import TrainConfig
from dwf.defenses import dwf
from dwf.train import fit

CPU = torch.device("cpu")
# 256 images, batches of 64: 4 steps per epoch, enough to see learning and to interrupt mid-epoch
N_TRAIN = 256
TINY = TrainConfig(epochs=2, batch_size=64, lr=0.05, fgsm_eps=(0.05, 0.1), pgd_eps=0.1,
                   pgd_alpha=0.05, pgd_steps=(1, 2))


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _expert(kind, digits, out, cfg=TINY, seed=0, n=N_TRAIN, width=4):
    x, y = digits[0][:n], digits[1][:n]
    return dwf.train_expert(kind, x, y, cfg=cfg, arch_kwargs=digits_arch(width), dataset="digits",
                            seed=seed, flip=False, crop_padding=0, out=out, device=CPU,
                            progress=False)


def test_a_training_stage_reduces_the_loss(digits, tmp_path):
    """Training loss and accuracy improve over epochs (the full-data model of conftest reaches
    >= 90% test accuracy in eval mode, checked in test_attacks)."""
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05)
    history = _expert("benign", digits, tmp_path / "m.pt", cfg=cfg, n=1024)  # 16 steps an epoch
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["acc"] > history[0]["acc"]
    assert history[-1]["lr"] < cfg.lr  # the cosine schedule ran
    assert checkpoint.load(tmp_path / "m.pt")["epoch"] == 3
    assert not (tmp_path / "m.pt.resume").exists()  # the stage cleans its resume file up


@pytest.mark.parametrize("kind", ["fgsm", "pgd"])
def test_same_seed_same_bits(digits, tmp_path, kind):
    """Two trainings with one seed give bit-identical weights on CPU; another seed does not."""
    cfg = dataclasses.replace(TINY, epochs=1)
    _expert(kind, digits, tmp_path / "a.pt", cfg=cfg, seed=5)
    _expert(kind, digits, tmp_path / "b.pt", cfg=cfg, seed=5)
    _expert(kind, digits, tmp_path / "c.pt", cfg=cfg, seed=6)
    a, b, c = (checkpoint.load(tmp_path / f"{n}.pt")["state_dict"] for n in "abc")
    assert _states_equal(a, b)
    assert not _states_equal(a, c)


def test_a_retrained_checkpoint_is_byte_identical(digits, tmp_path):
    """Same inputs, same bytes (issue 15): no wall-clock time and no machine in the .pt, so DVC
    sees a forced rebuild as unchanged and nothing downstream goes stale."""
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05)
    for name in ("a.pt", "b.pt"):
        _expert("benign", digits, tmp_path / name, cfg=cfg, n=64, width=2)
    a, b = (hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.pt", "b.pt"))
    assert a == b
    ckpt = checkpoint.load(tmp_path / "a.pt")
    assert set(ckpt["history"][0]) == {"epoch", "loss", "acc", "lr"}
    assert set(ckpt["versions"]) == {"dwf", "torch"}


def test_the_cli_writes_timings_and_machine_beside_the_curve(tiny_params, tmp_path):
    """What the checkpoint leaves out is not lost: <curve>.timing.json holds it."""
    out, curve = tmp_path / "benign.pt", tmp_path / "benign.json"
    result = CliRunner().invoke(app, ["train-expert", "--params", str(tiny_params), "--expert",
                                      "benign", "--out", str(out), "--history", str(curve),
                                      "--quiet"])
    assert result.exit_code == 0, result.stderr
    timing = json.loads((tmp_path / "benign.timing.json").read_text())
    assert timing["environment"] == checkpoint.environment()
    assert len(timing["seconds"]) == 1 and timing["seconds"][0] > 0
    assert json.loads(curve.read_text()) == checkpoint.load(out)["history"]  # no seconds in either


def test_batch_larger_than_the_data_is_refused_before_any_work(digits, tmp_path):
    with pytest.raises(ValueError, match=r"batch_size 300 is larger than the training data "
                                         r"\(256 examples\)"):
        _expert("benign", digits, tmp_path / "m.pt", cfg=dataclasses.replace(TINY, batch_size=300))
    assert list(tmp_path.iterdir()) == []


class Interrupt(Exception):
    """Stands in for a crash or a cancelled cluster job."""


def _interrupting(recipe, at_call: int):
    """The recipe, raising on its `at_call`-th call (1-based)."""
    calls = [0]

    def wrapped(model, x, y, cfg, rng):
        calls[0] += 1
        if calls[0] == at_call:
            raise Interrupt
        return recipe(model, x, y, cfg, rng)
    return wrapped


def _fit(recipe, digits, resume, seed=3, width=4, n=N_TRAIN):
    """fit() on a freshly initialized model, as a new process would start it."""
    torch.manual_seed(0)
    model = models.build("resnet18", **digits_arch(width))
    meta = {"arch": "resnet18", "arch_kwargs": digits_arch(width), "dataset": "digits"}
    history = fit(model, recipe, digits[0][:n], digits[1][:n], cfg=TINY, seed=seed,
                  flip=False, crop_padding=2, resume_path=resume, meta=meta, device=CPU,
                  progress=False)
    return model, history


def _killed_after_epoch_1(digits, resume):
    """A run stopped during epoch 2: it leaves `resume` holding epoch 1."""
    with pytest.raises(Interrupt):
        _fit(_interrupting(dwf.benign_batch, at_call=N_TRAIN // TINY.batch_size + 1), digits,
             resume)
    assert checkpoint.load(resume)["epoch"] == 1


def test_resume_after_an_interruption_is_bit_identical(digits, tmp_path):
    """Stopped on step 2 of epoch 2, then re-run: the end state equals an unbroken run's.

    The FGSM recipe draws eps from the run's generator every batch, so this also checks that
    data order, augmentation and attack draws resume where they were.
    """
    steps = N_TRAIN // TINY.batch_size
    unbroken, h_unbroken = _fit(dwf.fgsm_batch, digits, tmp_path / "unbroken.resume")

    resume = tmp_path / "broken.resume"
    with pytest.raises(Interrupt):
        _fit(_interrupting(dwf.fgsm_batch, at_call=steps + 2), digits, resume)
    assert checkpoint.load(resume)["epoch"] == 1  # the last good state is epoch 1's
    resumed, h_resumed = _fit(dwf.fgsm_batch, digits, resume)

    assert _states_equal(resumed.state_dict(), unbroken.state_dict())
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]
    assert strip(h_resumed) == strip(h_unbroken)
    final = checkpoint.load(resume)
    assert _states_equal(final["optimizer"]["state"][0], checkpoint.load(
        tmp_path / "unbroken.resume")["optimizer"]["state"][0])


# each: what the re-run changes -> the part of the fingerprint the message names
OTHER_INPUTS = {
    "settings.seed": lambda mp: {"seed": 4},
    "model.arch_kwargs.width": lambda mp: {"width": 2},
    "data": lambda mp: {"n": N_TRAIN - 64},
    "code": lambda mp: mp.setattr(fingerprint, "code_version", lambda *m: "edited") or {},
}


@pytest.mark.parametrize("part", list(OTHER_INPUTS))
def test_a_resume_file_from_other_inputs_is_set_aside_saying_why(digits, tmp_path, capsys,
                                                                 monkeypatch, part):
    """Killed after epoch 1, re-run with one input changed: the re-run starts afresh (equal to
    a run that never saw the file), keeps the file as *.stale.resume and says why in one line."""
    resume = tmp_path / "m.resume"
    _killed_after_epoch_1(digits, resume)
    change = OTHER_INPUTS[part](monkeypatch)
    capsys.readouterr()
    model, history = _fit(dwf.benign_batch, digits, resume, **change)
    assert capsys.readouterr().err.splitlines() == [
        f"{resume}: not resumed: its {part} differs from this run's; set aside as "
        "m.stale.resume, starting afresh"]
    assert [h["epoch"] for h in history] == [1, 2] and (tmp_path / "m.stale.resume").is_file()
    fresh, _ = _fit(dwf.benign_batch, digits, tmp_path / "fresh.resume", **change)
    assert _states_equal(model.state_dict(), fresh.state_dict())


def test_a_resume_file_with_non_finite_weights_is_set_aside(digits, tmp_path, capsys):
    """Never resumed into a NaN final checkpoint: the file is refused, naming the tensor."""
    resume = tmp_path / "m.resume"
    _killed_after_epoch_1(digits, resume)
    ckpt = checkpoint.load(resume)
    ckpt["state_dict"]["linear.weight"][0, 0] = float("nan")
    checkpoint.save(resume, ckpt)  # the fingerprint still matches
    capsys.readouterr()
    model, history = _fit(dwf.benign_batch, digits, resume)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "not resumed: weight 'linear.weight' is not finite" in err[0], err
    assert [h["epoch"] for h in history] == [1, 2]
    unbroken, _ = _fit(dwf.benign_batch, digits, tmp_path / "unbroken.resume")
    assert _states_equal(model.state_dict(), unbroken.state_dict())
