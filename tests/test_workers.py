"""An evaluation's parts in worker processes: the same results as one after another, bit for bit;
a failing part or a killed worker ends the run at once."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time

import pytest
import torch
import typer
from _models import EPS, digits_root, mixture, trained

from dwf import cli
from dwf import evaluate as ev
from dwf import workers
from dwf.config import EvalConfig
from dwf.data import load_split
from dwf.workers import Part

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return digits_root(tmp_path_factory.mktemp("digits"))


def _seeded(seed: int) -> torch.Tensor:
    return torch.randn(4, generator=torch.Generator().manual_seed(seed))


def test_parts_run_in_other_processes_and_come_back_by_name_in_order():
    parts = {f"p{i}": Part(i % 3, lambda i=i: (os.getpid(), _seeded(i))) for i in range(6)}
    done = []
    forked = workers.run(parts, 2, done.append)
    here = workers.run(parts, 1)
    assert list(forked) == list(parts) and sorted(done) == sorted(parts)
    assert {pid for pid, _ in forked.values()} != {os.getpid()}   # the pool did the work
    assert all(torch.equal(forked[k][1], here[k][1]) for k in parts)


@contextlib.contextmanager
def _within(seconds: int):
    """Fail, rather than hang, where the block outlasts `seconds` (no pytest-timeout here)."""
    def late(*_):
        raise TimeoutError(f"still running after {seconds} s")
    before = signal.signal(signal.SIGALRM, late)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def test_a_failing_part_fails_the_run_without_waiting_for_the_others():
    def broken():
        raise ValueError("part 3 broke")
    parts = {"slow": Part(2, lambda: time.sleep(600)), "bad": Part(1, broken)}
    with _within(30), pytest.raises(ValueError, match="part 3 broke"):
        workers.run(parts, 2)


def test_a_killed_worker_ends_the_run_in_seconds_and_the_finished_parts_are_kept(tmp_path, capsys):
    """kill -9 of a worker mid-part (issue 23: the OOM killer, an operator) is one line from the
    CLI, not a parent waiting forever for the part the worker held; what finished is reused."""
    pid = tmp_path / "pid"

    def stuck():  # the longest part, so the first one out: says where it runs, then waits
        pid.write_text(str(os.getpid()))
        time.sleep(600)

    def kill_after_the_short_ones(name):  # the parent's progress callback
        finished.append(name)
        if len(finished) == 2:
            while not (pid.is_file() and pid.read_text()):
                time.sleep(0.05)
            os.kill(int(pid.read_text()), signal.SIGKILL)

    resume, finished = ev.Resume(tmp_path / "state", "key"), []
    parts = {"stuck": Part(2, stuck), "a": Part(1, lambda: _seeded(1)), "b": Part(1, lambda: _seeded(2))}
    with _within(30), pytest.raises(typer.Exit) as end:
        cli.stage(workers.run)({k: resume.part(k, p) for k, p in parts.items()}, 2,
                               kill_after_the_short_ones)
    err = capsys.readouterr().err
    assert end.value.exit_code == 2 and sorted(finished) == ["a", "b"]
    assert err.startswith("error: a worker process died") and "2 of 3 parts finished" in err
    assert err.count("\n") == 1, err

    def again():
        raise AssertionError("a part that had finished ran again")
    rerun = workers.run({k: resume.part(k, Part(1, again)) for k in ("a", "b")}, 2)
    assert torch.equal(rerun["a"], _seeded(1)) and torch.equal(rerun["b"], _seeded(2))


def test_one_worker_on_a_gpu_every_cpu_otherwise():
    assert workers.count(torch.device("cuda")) == 1
    assert workers.count(CPU) == len(os.sched_getaffinity(0)) and workers.count(CPU, 3) == 3


def test_an_evaluation_in_two_workers_equals_the_serial_one(root):
    """Every attack, AutoAttack and the audit: same metrics (per-example bits included) with
    one process or two, at one thread each."""
    x, y = load_split("digits", root, "test")
    plain = trained("benign", str(root), 3)
    cfg = EvalConfig(n_examples=24, batch_size=12, fgsm_eps=(EPS,), pgd_eps=EPS, pgd_alpha=EPS / 4,
                     pgd_steps=(2, 4), ms_steps=4, ms_restarts=2, adaptive_steps=4, strong_steps=4,
                     autoattack_n=12, audit=True, audit_n=12, square_queries=20)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = dict(cfg=cfg, seed=3, device=CPU, progress=False, sources={"plain": plain})
        moe = mixture(plain, plain)
        serial = ev.evaluate(moe, x, y, **kw)
        parallel = ev.evaluate(moe, x, y, **kw, workers=2)
    finally:
        torch.set_num_threads(threads)
    serial.pop("environment"), parallel.pop("environment")
    assert parallel == serial
    assert set(serial["audit"]) >= {"converged", "attack_finds_binarized_adversarial", "in_ball"}
    assert dataclasses.asdict(cfg).items() <= serial["settings"].items()
