"""Training: a stage learns, the same seed gives the same bits, a resumed run equals an unbroken one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import digits_arch
from dwf import checkpoint, models
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


def _expert(kind, digits, out, cfg=TINY, seed=0, n=N_TRAIN):
    x, y = digits[0][:n], digits[1][:n]
    return dwf.train_expert(kind, x, y, cfg=cfg, arch_kwargs=digits_arch(width=4), dataset="digits",
                            seed=seed, flip=False, crop_padding=2, out=out, device=CPU,
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


def _fit(recipe, digits, resume):
    """fit() on a freshly initialized model, as a new process would start it."""
    torch.manual_seed(0)
    model = models.build("resnet18", **digits_arch(width=4))
    meta = {"arch": "resnet18", "arch_kwargs": digits_arch(width=4), "dataset": "digits"}
    history = fit(model, recipe, digits[0][:N_TRAIN], digits[1][:N_TRAIN], cfg=TINY, seed=3,
                  flip=False, crop_padding=2, resume_path=resume, meta=meta, device=CPU,
                  progress=False)
    return model, history


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


def test_resume_ignores_a_file_from_other_settings(digits, tmp_path):
    """A resume file written with another seed or config is not silently continued."""
    resume = tmp_path / "m.resume"
    _fit(dwf.benign_batch, digits, resume)
    fresh, _ = _fit(dwf.benign_batch, digits, tmp_path / "fresh.resume")
    torch.manual_seed(0)
    model = models.build("resnet18", **digits_arch(width=4))
    meta = {"arch": "resnet18", "arch_kwargs": digits_arch(width=4), "dataset": "digits"}
    history = fit(model, dwf.benign_batch, digits[0][:N_TRAIN], digits[1][:N_TRAIN], cfg=TINY,
                  seed=4, flip=False, crop_padding=2, resume_path=resume, meta=meta, device=CPU,
                  progress=False)
    assert len(history) == TINY.epochs  # trained both epochs itself
    assert not _states_equal(model.state_dict(), fresh.state_dict())
