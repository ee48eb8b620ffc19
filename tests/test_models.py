"""Models: CIFAR ResNet-18 shapes, normalization inside the model, the gate and the soft mixture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dwf import models
from dwf.models import Normalize, ResNet18, Router, SoftMoE

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


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


def test_resnet18_spatial_sizes(x):
    """32x32 input keeps 32x32 through the stem and stage 1, then halves per stage."""
    model = ResNet18(width=4).eval()
    sizes = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        stage.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    model(x)
    assert sizes == [32, 16, 8, 4]


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


def test_registry_rebuilds_both_architectures():
    mean_std = {"mean": MEAN, "std": STD}
    net = models.build("resnet18", num_classes=7, width=4, **mean_std)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    moe = models.build("softmoe", n_experts=2, expert={"num_classes": 7, "width": 4, **mean_std},
                       router_hidden=(8,))
    assert len(moe.experts) == 2 and moe.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        models.build("vgg")
