"""Models: CIFAR ResNet-18 shapes, normalization inside the model, the gate and the soft mixture,
every architecture at every dataset's own input shape."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dwf import checkpoint, data, models
from dwf.cli import _arch
from dwf.models import ADVMoEResNet18, Normalize, ResNet18, Router, SoftMoE, resnet

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
SHAPES = sorted(set(data.SHAPE.values()))  # (1, 8, 8) digits, (3, 32, 32) CIFAR-10 and SVHN


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.rand(5, 3, 32, 32)


def test_resnet18_is_the_cifar_variant(x):
    w = 4
    model = ResNet18(num_classes=10, width=w)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == [2, 2, 2, 2]
    assert [s[-1].conv2.out_channels for s in stages] == [w, 2 * w, 4 * w, 8 * w]
    assert isinstance(next(iter(model.children())), Normalize)  # normalization is the first layer
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, 8 * w)


@pytest.mark.parametrize("shape, expected", [((3, 32, 32), [32, 16, 8, 4]),
                                             ((1, 8, 8), [8, 4, 2, 1])])
def test_resnet18_spatial_sizes(shape, expected):
    """The input size is kept through the stem and stage 1, then halves per stage; digits'
    8x8 ends at 1x1, where the mean over H, W is that one pixel."""
    c = shape[0]
    model = ResNet18(width=4, mean=MEAN[:c], std=STD[:c], in_channels=c).eval()
    sizes = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        stage.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    assert model(torch.rand(2, *shape)).shape == (2, 10)
    assert sizes == expected


def test_eval_mode_is_deterministic(x):
    torch.manual_seed(1)
    model = ResNet18(width=4)
    model(x)  # one train-mode pass moves BatchNorm's running statistics off their init
    model.eval()
    assert torch.equal(model(x), model(x))
    # an example's logits do not depend on its batch companions (no batch statistics in eval)
    torch.testing.assert_close(model(x[:2]), model(x)[:2], rtol=1e-5, atol=1e-5)


def test_normalization_lives_in_the_model(x):
    """[0, 1] input into the model == manually normalized input into an identity-Normalize copy."""
    torch.manual_seed(2)
    model = ResNet18(width=4, mean=MEAN, std=STD).eval()
    plain = ResNet18(width=4, mean=(0.0,) * 3, std=(1.0,) * 3).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    plain.load_state_dict(state, strict=False)
    manual = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), plain(manual), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(x), plain(x))  # the statistics matter
    # the statistics are buffers: saved with the weights, never trained
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())
    assert not any(n.startswith("normalize.") for n, _ in model.named_parameters())


def test_router_weights_are_a_distribution(x):
    torch.manual_seed(3)
    w = Router(3 * 32 * 32, n_experts=3, hidden=(16, 8))(x)
    assert w.shape == (5, 3)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(5))


def _moe(n_experts=3):
    torch.manual_seed(4)
    experts = [ResNet18(width=4, mean=MEAN, std=STD) for _ in range(n_experts)]
    return SoftMoE(experts, MEAN, STD, router_hidden=(16,)).eval()


def test_softmoe_is_the_gate_weighted_sum_of_expert_logits(x):
    moe = _moe()
    w = moe.gate_weights(x)  # (N, E)
    assert w.shape == (5, 3) and (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(5))
    f = torch.stack([e(x) for e in moe.experts], dim=1)  # (N, E, C), each expert on its own
    torch.testing.assert_close(moe.expert_logits(x), f)
    expected = sum(w[:, i:i + 1] * f[:, i] for i in range(3))
    out = moe(x)
    assert out.shape == (5, 10)  # plain logits, no tuple
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_softmoe_gate_depends_on_the_input(x):
    """A router that ignored x would make the mixture a fixed average."""
    w = _moe().gate_weights(x)
    assert not torch.allclose(w[0], w[1])


def test_rerouted_mixture_is_its_experts_under_the_new_decision(x):
    """Ablation (a): the same trained experts and router, mixed uniformly or by the gate's
    argmax; the softmax mixture is untouched."""
    from dwf.config import ROUTING_NAMES

    assert tuple(models.ROUTINGS) == ROUTING_NAMES  # config's names are the models' decisions
    moe = _moe()
    f, w = moe.expert_logits(x), moe.gate_weights(x)  # (N, E, C), (N, E)
    uniform, top1 = models.RoutedMoE(moe, "uniform"), models.RoutedMoE(moe, "top1")
    torch.testing.assert_close(uniform(x), f.mean(1), rtol=1e-5, atol=1e-6)
    best = w.argmax(1)
    torch.testing.assert_close(top1(x), f[torch.arange(len(x)), best], rtol=1e-5, atol=1e-6)
    assert (top1.gate_weights(x).argmax(1) == best).all() and top1.gate_weights(x).sum() == len(x)
    assert top1.hard_routing and not uniform.hard_routing and not moe.hard_routing
    torch.testing.assert_close(moe(x), (w.unsqueeze(-1) * f).sum(1), rtol=1e-5, atol=1e-6)
    assert set(top1.state_dict()) == {f"mixture.{k}" for k in moe.state_dict()}
    with pytest.raises(ValueError, match="unknown routing 'top2'"):
        models.RoutedMoE(moe, "top2")


def test_registry_rebuilds_both_architectures():
    mean_std = {"mean": MEAN, "std": STD}
    net = models.build("resnet18", num_classes=7, width=4, **mean_std)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    moe = models.build("softmoe", n_experts=2, expert={"num_classes": 7, "width": 4, **mean_std},
                       router_hidden=(8,))
    assert len(moe.experts) == 2 and moe.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        models.build("vgg")


# ---------------------------------------------------------------- inputs at their own shape


def _kwargs(arch: str, shape: tuple[int, int, int]) -> dict:
    """Small arguments of a registered architecture for images of `shape`."""
    c = shape[0]
    base = {"num_classes": 10, "width": 4, "mean": MEAN[:c], "std": STD[:c], "in_channels": c}
    return {"resnet18": base, "soe": {**base, "n_submodels": 2},
            "advmoe_resnet18": {**base, "n_experts": 2, "router_width": 4, "router_blocks": 1},
            "softmoe": {"n_experts": 2, "expert": base, "router_hidden": (8,),
                        "input_shape": shape},
            "routed_moe": {"routing": "top1", "n_experts": 2, "expert": base,
                           "router_hidden": (8,), "input_shape": shape},
            **dict.fromkeys(models.ZOO, base)}[arch]  # the benign baselines (models/zoo.py)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("arch", list(models.ARCHITECTURES))
def test_every_architecture_trains_at_each_input_shape(arch, shape):
    torch.manual_seed(0)
    model = models.build(arch, **_kwargs(arch, shape)).train()
    x = torch.rand(4, *shape, requires_grad=True)
    logits = model(x)
    assert logits.shape == (4, 10)
    F.cross_entropy(logits, torch.arange(4)).backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.eval()(x).shape == (4, 10)


@pytest.mark.parametrize("shape", SHAPES)
def test_gate_flattens_the_dataset_shape(shape):
    moe = models.build("softmoe", **_kwargs("softmoe", shape))
    c, h, w = shape
    assert moe.router.scores[1].in_features == c * h * w  # scores[0] is the Flatten
    torch.testing.assert_close(moe.gate_weights(torch.rand(3, *shape)).sum(1), torch.ones(3))


@pytest.mark.parametrize("build", [
    lambda: ResNet18(mean=MEAN, std=STD, in_channels=1),
    lambda: ADVMoEResNet18(mean=(0.3,), std=(0.2,)),
    lambda: SoftMoE([ResNet18(width=4, mean=(0.3,), std=(0.2,), in_channels=1)], MEAN, STD,
                    (8,), (1, 8, 8)),
])
def test_statistics_for_another_channel_count_are_refused(build):
    """A 3-channel Normalize would silently broadcast a 1-channel image to 3 channels."""
    with pytest.raises(ValueError, match="one value per input channel"):
        build()


@pytest.mark.parametrize("dataset", ["digits", "cifar10"])
def test_checkpoint_round_trip_at_the_dataset_shape(tmp_path, dataset):
    """The CLI's architecture arguments carry the data's channels, so a checkpoint rebuilds a
    mixture that takes the dataset's images as they are stored."""
    shape = data.SHAPE[dataset]
    expert = _arch(dataset, SimpleNamespace(width=4, normalization="correct"))
    assert expert["in_channels"] == shape[0]
    kwargs = {"n_experts": 2, "expert": expert, "router_hidden": (8,), "input_shape": shape}
    torch.manual_seed(0)
    model = models.build("softmoe", **kwargs)
    with torch.no_grad():
        model.train()(torch.rand(8, *shape))  # BatchNorm statistics off their defaults
    path = tmp_path / "m.pt"
    checkpoint.save(path, {"arch": "softmoe", "arch_kwargs": kwargs, "dataset": dataset,
                           "state_dict": model.state_dict()})
    loaded = checkpoint.load_model(path, dataset=dataset)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("arch", ["softmoe", "soe", "advmoe_resnet18", "routed_moe"])
def test_every_mixture_exposes_its_experts_and_gate_the_same_way(arch):
    """DWF, SoE and ADVMoE share one interface, so the mixture-aimed attacks reach all three."""
    from dwf.config import EvalConfig
    from dwf.evaluate import is_mixture, strong_suite

    torch.manual_seed(0)
    model = models.build(arch, **_kwargs(arch, (1, 8, 8))).eval()
    x = torch.rand(5, 1, 8, 8)
    assert is_mixture(model) and model.n_experts == 2
    with torch.no_grad():
        f = model.expert_logits(x)  # (N, E, C)
        for i in range(model.n_experts):
            assert torch.allclose(model.expert(i)(x), f[:, i], atol=1e-5)
        assert model.gate_weights(x).shape == (5, 2)
        for i in range(model.n_experts):  # `route` with the decision forced to i is expert i
            forced = model.route(x, lambda s, i=i: torch.nn.functional.one_hot(
                torch.full((len(s),), i), s.shape[1]).to(s.dtype))
            assert torch.allclose(forced, f[:, i], atol=1e-5)
    suite = strong_suite(EvalConfig(pgd_eps=0.2, pgd_alpha=0.05, strong_steps=1), model, {})
    assert {"strong/gate", "strong/expert_0", "strong/expert_1"} <= set(suite)
    assert not is_mixture(models.build("resnet18", **_kwargs("resnet18", (1, 8, 8))))


# ---------------------------------------------------------------- eval-mode BatchNorm folding

def _unfolded(model: ResNet18, x: torch.Tensor) -> torch.Tensor:
    """The ResNet-18 with every BatchNorm run as its own module (the reference fold replaces)."""
    def block(b, h):
        out = F.relu(b.bn1(b.conv1(h)))
        out = b.bn2(b.conv2(out))
        return F.relu(out + (b.shortcut(h) if len(b.shortcut) else h))
    out = F.relu(model.bn1(model.conv1(model.normalize(x))))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for b in layer:
            out = block(b, out)
    return model.linear(out.mean(dim=(2, 3)))


def _trained_stats_resnet() -> ResNet18:
    torch.manual_seed(0)
    model = ResNet18(width=4)
    model.train()(torch.rand(16, 3, 16, 16))  # running statistics other than (0, 1)
    return model.eval()


def test_eval_folding_computes_the_batchnorm_network():
    model, x = _trained_stats_resnet(), torch.rand(5, 3, 16, 16)
    torch.testing.assert_close(model(x), _unfolded(model, x), atol=1e-5, rtol=1e-5)
    model.requires_grad_(False)
    torch.testing.assert_close(model(x), _unfolded(model, x), atol=1e-5, rtol=1e-5)


def test_folding_is_kept_only_while_frozen_and_unchanged():
    model, x = _trained_stats_resnet(), torch.rand(5, 3, 16, 16)
    conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
    assert resnet.fold([conv], [bn])[0] is not resnet.fold([conv], [bn])[0]  # trainable: every call
    with models.frozen(model):
        first = resnet.fold([conv], [bn])
        assert resnet.fold([conv], [bn])[0] is first[0]  # frozen: kept
        with torch.no_grad():
            bn.running_var.mul_(4)  # in place: the kept one is stale
        assert resnet.fold([conv], [bn])[0] is not first[0]
        torch.testing.assert_close(model(x), _unfolded(model, x), atol=1e-5, rtol=1e-5)
        before = model(x)
        conv.weight.data = 2 * conv.weight.data  # new storage, same Parameter (as .to() does)
        assert not torch.allclose(model(x), before)
        torch.testing.assert_close(model(x), _unfolded(model, x), atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # frozen restores the flags


def test_eval_mode_gradients_reach_every_weight():
    model, x = _trained_stats_resnet(), torch.rand(5, 3, 16, 16)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    ref = _trained_stats_resnet()
    _unfolded(ref, x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
