"""The batched experts (models/batched.py) against the expert loop, their oracle.

Each test builds one SoftMoE, perturbs its BatchNorm state so the comparison is not between
identity layers, copies it, and runs the copy with `batched = False`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dwf import checkpoint, models
from dwf.models import ResNet18, SoftMoE, batched

N_EXPERTS, WIDTH, N = 3, 4, 6
ATOL = 1e-5  # float32; grouped convolutions sum in another order than the loop's
CIFAR, DIGITS = (3, 32, 32), (1, 8, 8)  # data.SHAPE: each dataset's own input shape


def _mixture(seed: int = 0, shape: tuple[int, int, int] = CIFAR) -> SoftMoE:
    torch.manual_seed(seed)
    c = shape[0]
    arch = {"num_classes": 10, "width": WIDTH, "mean": (0.4, 0.5, 0.6)[:c],
            "std": (0.2, 0.25, 0.3)[:c], "in_channels": c}
    moe = models.build("softmoe", n_experts=N_EXPERTS, expert=arch, router_hidden=(16,),
                       input_shape=shape)
    with torch.no_grad():  # non-trivial BatchNorm affine parameters and running statistics
        for m in moe.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    return moe


def _pair(train: bool, shape: tuple[int, int, int] = CIFAR) -> tuple[SoftMoE, SoftMoE]:
    fast = _mixture(shape=shape).train(train)
    ref = copy.deepcopy(fast)
    ref.batched = False
    assert fast.batched, "homogeneous ResNet18 experts must take the batched path"
    return fast, ref


def _inputs(seed: int = 1, shape: tuple[int, int, int] = CIFAR) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, *shape, generator=g), torch.randint(0, 10, (N,), generator=g)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("shape", [CIFAR, DIGITS])
@pytest.mark.parametrize("train", [False, True])
def test_outputs_and_input_gradients_match_loop(train, shape):
    fast, ref = _pair(train, shape)
    x, y = _inputs(shape=shape)
    grads = []
    for model in (fast, ref):
        xx = x.clone().requires_grad_(True)
        logits = model.expert_logits(xx)  # (N, E, C)
        assert logits.shape == (N, N_EXPERTS, 10)
        (g,) = torch.autograd.grad(F.cross_entropy(logits.sum(1), y), xx)
        grads.append((logits.detach(), g))
    _close(grads[0][0], grads[1][0])
    _close(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0


def test_train_mode_updates_running_statistics_like_loop():
    fast, ref = _pair(train=True)
    x, _ = _inputs()
    for model in (fast, ref):
        model(x)
        model(x * 0.5)  # two updates: the momentum average compounds
    ref_buffers = dict(ref.named_buffers())
    for name, buf in fast.named_buffers():
        _close(buf.float(), ref_buffers[name].float())
    before = _mixture().experts[0].bn1.running_mean
    assert not torch.allclose(fast.experts[0].bn1.running_mean, before)


def test_eval_mode_leaves_running_statistics():
    fast, _ = _pair(train=False)
    before = copy.deepcopy(fast.state_dict())
    fast(_inputs()[0])
    for name, buf in fast.state_dict().items():
        assert torch.equal(buf, before[name]), name


@pytest.mark.parametrize("shape", [CIFAR, DIGITS])
def test_one_sgd_step_matches_loop(shape):
    fast, ref = _pair(train=True, shape=shape)
    x, y = _inputs(shape=shape)
    for model in (fast, ref):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for _ in range(2):  # the second step uses the momentum buffer
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        _close(p, ref_params[name])
    moved = (fast.experts[1].layer3[0].conv1.weight
             - _mixture(shape=shape).experts[1].layer3[0].conv1.weight)
    assert moved.abs().max() > 0


def test_checkpoint_layout_unchanged_and_loads_batched(tmp_path):
    fast, ref = _pair(train=False)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert all(k.startswith(("experts.", "router.", "normalize.")) for k in fast.state_dict())
    path = tmp_path / "moe.pt"
    arch = {"n_experts": N_EXPERTS, "router_hidden": (16,), "input_shape": (3, 32, 32),
            "expert": {"num_classes": 10, "width": WIDTH, "mean": (0.4, 0.5, 0.6),
                       "std": (0.2, 0.25, 0.3)}}
    checkpoint.save(path, {"arch": "softmoe", "arch_kwargs": arch, "state_dict": ref.state_dict()})
    loaded = checkpoint.load_model(path)
    assert loaded.batched and not loaded.training
    x, _ = _inputs()
    with torch.no_grad():
        _close(loaded(x), ref(x))


def test_mixed_experts_fall_back_to_loop():
    arch = {"num_classes": 10, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    experts = [ResNet18(width=4, **arch), ResNet18(width=8, **arch)]
    assert not batched.batchable(experts)
    moe = SoftMoE(experts, arch["mean"], arch["std"], (16,))
    assert not moe.batched
    assert moe(_inputs()[0]).shape == (N, 10)


def test_where_the_experts_batch(monkeypatch):
    """moe.BATCHING: always on CPU; on CUDA only for NHWC inputs (the mode tried here on CPU),
    and training picks NHWC exactly for bf16 on CUDA (runtime.memory_format)."""
    from dwf.models import moe
    from dwf.runtime import memory_format

    x = torch.rand(2, 3, 8, 8)
    assert moe.batch_here(x)
    monkeypatch.setitem(moe.BATCHING, "cpu", "channels_last")
    assert not moe.batch_here(x)
    assert moe.batch_here(x.contiguous(memory_format=torch.channels_last))
    monkeypatch.setitem(moe.BATCHING, "cpu", "never")
    assert not moe.batch_here(x.contiguous(memory_format=torch.channels_last))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert memory_format(cuda, "bf16") == torch.channels_last
    assert memory_format(cuda, "fp32") == memory_format(cpu, "bf16") == torch.contiguous_format
