"""Data-parallel joint training (issue 6): `torchrun` with 2 gloo processes on CPU makes the
update 1 process makes on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dwf import distributed
from dwf.cli import app
from dwf.config import load_params
from dwf.defenses.at import fgsm_at_batch, pgd_at_batch
from dwf.defenses.dwf import fgsm_batch, joint_batch, pgd_batch, train_expert
from dwf.defenses.trades import trades_batch

from conftest import digits_arch

BIN = Path(sys.executable).parent


def _joint(tmp: Path, params: Path, experts: Path, out: str, nproc: int) -> dict[str, torch.Tensor]:
    """Run `dwf train-joint` (under torchrun when nproc > 1); return the mixture's weights."""
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "dwf"] \
        if nproc > 1 else [sys.executable, "-m", "dwf"]
    # one batch of 1024 (drop-last on 1437 digits): exactly one SGD step
    cmd += ["train-joint", "--params", str(params), "--experts-dir", str(experts), "--out",
            str(tmp / out), "--history", str(tmp / f"{out}.json"), "--quiet",
            "--set", "joint.batch_size=1024"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return torch.load(tmp / out, weights_only=True)["state_dict"]


def test_two_processes_make_the_one_process_update(tiny_params, digits, tmp_path):
    params = load_params(tiny_params, "digits", [])
    prof = params.profile("digits")
    experts = tmp_path / "experts"
    for i, name in enumerate(params.experts):
        train_expert(name.split("_")[0], digits[0], digits[1], cfg=prof.expert,
                     arch_kwargs=digits_arch(prof.width), dataset="digits", seed=i, flip=False,
                     crop_padding=2, out=experts / f"{name}.pt", device=torch.device("cpu"),
                     progress=False)
    one = _joint(tmp_path, tiny_params, experts, "one.pt", nproc=1)
    two = _joint(tmp_path, tiny_params, experts, "two.pt", nproc=2)
    start = {f"experts.{i}.{k}": v for i, name in enumerate(params.experts)
             for k, v in torch.load(experts / f"{name}.pt", weights_only=True)["state_dict"].items()}
    assert one.keys() == two.keys()
    for k in one:
        if k.endswith("num_batches_tracked"):
            assert one[k] == two[k], k
            continue
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    # the step is real: the experts' conv weights moved far more than the two runs differ
    moved = max((one[k] - start[k]).abs().max().item() for k in start if k.endswith("conv1.weight"))
    differ = max((one[k] - two[k]).abs().max().item() for k in start if k.endswith("conv1.weight"))
    assert moved > 1e-3 and differ < moved / 100, (moved, differ)


def test_sync_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ref.load_state_dict(net.state_dict())
    distributed.sync_batchnorm(net)
    assert isinstance(net[1], distributed.SyncBatchNorm2d)
    assert net.state_dict().keys() == ref.state_dict().keys()  # checkpoints load either way
    x = torch.randn(8, 3, 8, 8)
    torch.testing.assert_close(net(x), ref(x))
    torch.testing.assert_close(net[1].running_var, ref[1].running_var)


def test_world_shards_a_global_batch():
    t = torch.arange(8)
    assert [distributed.World(r, 2).shard(t).tolist() for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert distributed.World().main and not distributed.World(1, 2).main


def test_only_shardable_recipes_run_data_parallel():
    """DWF's recipes give the same batch on shards; PGD-AT (random start shaped like the
    shard), FGSM-AT (attacked fraction of the shard) and TRADES (own objective) do not."""
    two = distributed.World(0, 2)
    distributed.require_shardable([joint_batch, pgd_batch, fgsm_batch], two)
    for recipe in (pgd_at_batch, fgsm_at_batch, trades_batch):
        distributed.require_shardable([recipe], distributed.World())  # one process: anything
        with pytest.raises(ValueError, match="shards"):
            distributed.require_shardable([recipe], two)


def test_evaluation_refuses_to_run_as_several_processes(tiny_params, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(app, ["evaluate", "--model", "dwf", "--params", str(tiny_params)])
    assert res.exit_code == 2 and "torchrun" in res.output


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is outside 1.."),
    ({"WORLD_SIZE": "2", "RANK": "abc"}, "RANK='abc' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is outside 0..1"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "gpu0"}, "LOCAL_RANK='gpu0' is not an integer"),
])
def test_bad_torchrun_environment_is_one_line_and_exit_2(tiny_params, tmp_path, monkeypatch, env,
                                                         needle):
    """Checked before the process group or any work starts (issue 11, item 7)."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "never.pt"
    res = CliRunner().invoke(app, ["train-expert", "--expert", "benign", "--params",
                                   str(tiny_params), "--out", str(out), "--quiet"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.stderr
    assert not torch.distributed.is_initialized() and not out.exists()


def _sync_bn_worker(rank: int, size: int, port: int, out: str) -> None:
    """One gloo rank: SyncBatchNorm2d on its half of a fixed batch; writes grads and stats."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    try:
        world = distributed.World(rank, size)
        torch.manual_seed(0)
        net = distributed.sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        x = world.shard(_bn_batch())
        (net(x) ** 3).mean().backward()  # a loss whose gradient depends on the statistics
        bn = net[1]
        torch.save({"conv": net[0].weight.grad, "weight": bn.weight.grad, "bias": bn.bias.grad,
                    "mean": bn.running_mean, "var": bn.running_var,
                    "agree": [distributed.same_on_all_ranks(v, world, x.device) for v in (3, rank)]},
                   f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _bn_batch() -> torch.Tensor:
    """8 images whose channels sit far from 0 (mean ~100x the spread): a one-pass variance,
    E[x^2] - E[x]^2 in fp32, would be off by a percent here."""
    torch.manual_seed(1)
    return torch.randn(8, 3, 6, 6) + 100.0


def test_sync_batchnorm_over_two_gloo_processes_equals_one_batch(tmp_path):
    """The module path (the expert loop CUDA runs): statistics, running buffers and gradients
    of two half batches equal BatchNorm on the whole batch (DDP averages the rank gradients)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    torch.multiprocessing.spawn(_sync_bn_worker, args=(2, port, out), nprocs=2)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()  # the exact answer
    (ref(_bn_batch().double()) ** 3).mean().backward()
    grads = {"conv": ref[0].weight.grad, "weight": ref[1].weight.grad, "bias": ref[1].bias.grad}
    for name, grad in grads.items():  # DDP averages the ranks' gradients
        got = (ranks[0][name] + ranks[1][name]).double() / 2
        # fp32 BatchNorm itself is off by ~6e-5 of the largest gradient on this batch
        assert (got - grad).abs().max() <= 2e-4 * grad.abs().max(), name
    for r in ranks:
        torch.testing.assert_close(r["mean"].double(), ref[1].running_mean, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(r["var"].double(), ref[1].running_var, rtol=1e-4, atol=1e-6)
        assert r["agree"] == [True, False]  # the resume check: equal values agree, others not
