"""An evaluation's parts in worker processes: the same results as one after another, bit for bit."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from _models import EPS, digits_root, mixture, trained

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


def test_a_failing_part_fails_the_run():
    def broken():
        raise ValueError("part 3 broke")
    parts = {"ok": Part(1, lambda: 1), "bad": Part(2, broken)}
    with pytest.raises(ValueError, match="part 3 broke"):
        workers.run(parts, 2)


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
