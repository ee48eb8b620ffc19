"""The paper's benign baselines (models/zoo.py) and the loaders of their two public sources
(defenses/external.py): each network builds at CIFAR shape, takes a checkpoint in its source's
published layout, and trains on digits."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from dwf import data, models
from dwf.checkpoint import CheckpointError
from dwf.config import TrainConfig
from dwf.defenses.dwf import benign_batch
from dwf.defenses.external import PUBLISHED, build_external, load_external, to_ours
from dwf.models.zoo import ZOO
from dwf.train import fit

NINE = ["vgg19", "resnet34", "resnet50", "densenet121", "densenet169", "googlenet", "inception_v3",
        "xception", "mobilenet_v2"]
NARROW = 4  # first-stage channels (a DenseNet's growth rate) for CPU speed


def test_the_registry_holds_the_nine():
    assert set(NINE) == set(ZOO) and set(NINE) <= set(models.ARCHITECTURES)


def _calibrated(net: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """`net` in eval mode with BatchNorm statistics of the batch x (a fresh network's unit
    running statistics let a deep one's signal vanish)."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        net.train()(x)
    return net.eval()


@pytest.mark.parametrize("arch", NINE)
def test_builds_at_cifar_shape_with_normalize_inside(arch):
    torch.manual_seed(0)
    net = models.build(arch, num_classes=7, width=NARROW, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2),
                       in_channels=3)
    x = torch.rand(4, 3, 32, 32)  # [0, 1] images
    logits = _calibrated(net, x)(x)
    assert logits.shape == (4, 7) and torch.isfinite(logits).all()
    assert torch.equal(net(x), logits)  # deterministic in eval mode
    spread = (logits - logits.mean(0)).abs().max()
    net.normalize.mean.fill_(0.0)  # the statistics live inside the model and are applied
    assert (net(x) - logits).abs().max() > 0.01 * spread > 0


# ------------------------------------------------------------------ the sources' layouts
# Their names -> ours, written from their code (kuangliu/pytorch-cifar, weiaicunzai/
# pytorch-cifar100, timm via edadaltocg/detectors), used here in reverse to write files as
# they publish them.
OURS_TO_THEIRS = {
    ("juraev", "resnet50"): [(r"\.downsample\.", ".shortcut."), (r"^fc\.", "linear.")],
    ("juraev", "densenet169"): [
        (r"^features\.conv0\.", "conv1."),
        (r"^features\.denseblock(\d)\.denselayer(\d+)\.norm(\d)\.",
         lambda m: f"dense{m[1]}.{int(m[2]) - 1}.bn{m[3]}."),
        (r"^features\.denseblock(\d)\.denselayer(\d+)\.conv(\d)\.",
         lambda m: f"dense{m[1]}.{int(m[2]) - 1}.conv{m[3]}."),
        (r"^features\.transition(\d)\.norm\.", r"trans\1.bn."),
        (r"^features\.transition(\d)\.conv\.", r"trans\1.conv."),
        (r"^features\.norm5\.", "bn."), (r"^classifier\.", "linear.")],
    ("juraev", "xception"): [(r"^middle_flow\.", "middel_flow.middel_block.")],
}

# A few tensors each source's file holds, with their shapes, from the source's code.
ANCHORS = {
    ("juraev", "vgg19"): {"features.0.weight": (64, 3, 3, 3), "features.50.running_var": (512,),
                          "classifier.weight": (10, 512)},
    ("juraev", "resnet50"): {"layer1.0.shortcut.0.weight": (256, 64, 1, 1),
                             "layer4.2.conv3.weight": (2048, 512, 1, 1), "linear.weight": (10, 2048)},
    ("juraev", "densenet169"): {"conv1.weight": (64, 3, 3, 3), "dense4.31.conv2.weight": (32, 128, 3, 3),
                                "trans3.conv.weight": (640, 1280, 1, 1), "bn.weight": (1664,),
                                "linear.weight": (10, 1664)},
    ("juraev", "googlenet"): {"pre_layers.0.weight": (192, 3, 3, 3), "a3.b3.6.weight": (32, 32, 3, 3),
                              "b5.b4.1.weight": (128, 832, 1, 1), "linear.weight": (10, 1024)},
    ("juraev", "inception_v3"): {"Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
                                 "Mixed_5b.branchpool.1.conv.weight": (32, 192, 3, 3),
                                 "Mixed_6b.branch7x7.1.conv.weight": (128, 128, 7, 1),
                                 "Mixed_7c.branch3x3stack_3b.conv.weight": (384, 384, 3, 1),
                                 "linear.weight": (10, 2048)},
    ("juraev", "xception"): {"entry_flow.conv3_shortcut.0.bias": (128,),
                             "middel_flow.middel_block.7.conv3.1.pointwise.weight": (728, 728, 1, 1),
                             "exit_flow.conv.3.depthwise.weight": (1536, 1, 3, 3), "fc.weight": (10, 2048)},
    ("juraev", "mobilenet_v2"): {"layers.0.conv1.weight": (32, 32, 1, 1),
                                 "layers.0.shortcut.0.weight": (16, 32, 1, 1),
                                 "layers.16.conv3.weight": (320, 960, 1, 1), "linear.weight": (10, 1280)},
    ("dadalto", "resnet34"): {"conv1.weight": (64, 3, 3, 3), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                              "layer4.2.bn2.running_mean": (512,), "fc.weight": (10, 512)},
    ("dadalto", "resnet50"): {"layer4.2.conv3.weight": (2048, 512, 1, 1), "fc.weight": (10, 2048)},
    ("dadalto", "densenet121"): {"features.conv0.weight": (24, 3, 3, 3),
                                 "features.denseblock4.denselayer16.conv2.weight": (12, 48, 3, 3),
                                 "features.norm5.weight": (384,), "classifier.weight": (10, 384)},
}
PUBLISHED_NETS = sorted(ANCHORS)


def _theirs(source: str, arch: str, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict in the source's names with the shapes of `net`: random values of unit
    gain (weights / sqrt(fan-in), positive running variances), so a forward stays finite."""
    out = {}
    for name, t in net.state_dict().items():
        if name.startswith("normalize."):
            continue
        for pattern, repl in OURS_TO_THEIRS.get((source, arch), []):
            name = re.sub(pattern, repl, name)
        if not t.is_floating_point():
            out[name] = torch.zeros(t.shape, dtype=t.dtype)
        elif name.endswith("running_var"):
            out[name] = torch.rand(t.shape) + 0.5
        else:
            out[name] = torch.randn(t.shape) / (t[0].numel() ** 0.5 if t.dim() > 1 else 1.0)
    return out


def _save(path, source: str, state: dict) -> None:
    """Write `state` as the source publishes it: [39] {"net": ..., "acc", "epoch"}, [40] bare."""
    torch.save({"net": state, "acc": 95.3, "epoch": 199} if source == "juraev" else state, path)


def test_every_published_network_is_pinned():
    assert {(s, a) for s, p in PUBLISHED.items() for a in p.renames} == set(ANCHORS)
    assert {a for _, a in ANCHORS} == set(NINE)  # every one of the nine has a public source


@pytest.mark.parametrize("source,arch", PUBLISHED_NETS)
def test_loads_a_checkpoint_in_its_sources_layout(source, arch, tmp_path):
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = ZOO[arch](num_classes=10)  # the source's widths
    state = _theirs(source, arch, shapes)
    assert {k: tuple(state[k].shape) for k in ANCHORS[source, arch] if k in state} == ANCHORS[source, arch]
    path = tmp_path / "weights.pth"
    _save(path, source, state)
    net = load_external(f"{source}:{arch}", path, num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert not net.training
    pub = PUBLISHED[source]  # the normalization the weights were trained with, not the caller's
    assert net.normalize.mean.flatten().tolist() == pytest.approx(pub.mean)
    last = ours = list(ANCHORS[source, arch])[-1].replace("weight", "bias")  # renamed, never reordered
    for pattern, repl in pub.renames[arch]:
        ours = re.sub(pattern, repl, ours)
    assert torch.equal(net.state_dict()[ours], state[last])  # their values, loaded
    assert torch.isfinite(net(torch.rand(2, 3, 32, 32))).all()  # runs at the source's input shape


def test_a_dataparallel_prefix_and_a_state_dict_wrapper_are_accepted(tmp_path):
    with torch.device("meta"):
        shapes = ZOO["densenet121"](num_classes=10)
    state = {"module." + k: v for k, v in _theirs("dadalto", "densenet121", shapes).items()}
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    assert load_external("dadalto:densenet121", tmp_path / "w.pth", num_classes=10, mean=(0.5,) * 3,
                         std=(0.5,) * 3)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("features.norm5.running_var"), "weights lack 'features.norm5.running_var'"),
    (lambda s: s.update(extra=torch.zeros(1)), "unexpected weights ['extra']"),
    (lambda s: s.update({"classifier.weight": torch.zeros(100, 384)}),
     "'classifier.weight' has shape (100, 384), the network expects (10, 384)"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(edit, message, tmp_path):
    with torch.device("meta"):
        shapes = ZOO["densenet121"](num_classes=10)
    state = _theirs("dadalto", "densenet121", shapes)
    edit(state)
    _save(tmp_path / "w.pth", "dadalto", state)
    with pytest.raises(CheckpointError) as e:
        load_external("dadalto:densenet121", tmp_path / "w.pth", num_classes=10, mean=(0.5,) * 3,
                      std=(0.5,) * 3)
    assert message in str(e.value) and "\n" not in str(e.value) and "dadalto:densenet121" in str(e.value)


def test_a_network_the_source_does_not_publish_is_named(tmp_path):
    torch.save({}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="dadalto publishes resnet34, resnet50, densenet121"):
        load_external("dadalto:vgg19", tmp_path / "w.pth", num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="dadalto:resnet34: trained on svhn, not cifar10"):
        load_external("dadalto:resnet34", tmp_path / "w.pth", num_classes=10, mean=(0.5,) * 3,
                      std=(0.5,) * 3, dataset="cifar10")


class Payload:
    """A class of this module: unpickling it would import and run code."""


def test_a_file_that_needs_code_to_load_is_refused(tmp_path):
    torch.save({"net": {"classifier.weight": torch.zeros(10, 512)}, "acc": Payload()}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as err:
        load_external("juraev:vgg19", tmp_path / "w.pth", num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)
    message = str(err.value).removeprefix(f"{tmp_path / 'w.pth'}: ")
    assert message.startswith("refused: ") and "Payload" in message and len(message.splitlines()) == 1
    # torch's advice (issue 23): "This file can still be loaded ... weights_only=False"
    assert "can still be loaded" not in message and "weights_only" not in message


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    """Issue 23, item 6: a NaN weight was evaluated (clean 0.00%, exit 0)."""
    state = build_external("resnet18", 10).state_dict()
    state["fc.bias"][3] = float("nan")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"w.pth: weight 'fc.bias' is not finite"):
        load_external("resnet18", tmp_path / "w.pth", num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)


def _kuangliu_densenet(sd: dict, x: torch.Tensor, blocks) -> torch.Tensor:
    """kuangliu's DenseNet forward (eval mode) over its own state dict: each layer's output is
    concatenated before its input."""
    def bn(h, p):
        return F.batch_norm(h, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"])
    h = F.conv2d(x, sd["conv1.weight"], padding=1)
    for b, n in enumerate(blocks, 1):
        for i in range(n):
            p = f"dense{b}.{i}"
            out = F.conv2d(F.relu(bn(h, p + ".bn1")), sd[p + ".conv1.weight"])
            h = torch.cat([F.conv2d(F.relu(bn(out, p + ".bn2")), sd[p + ".conv2.weight"], padding=1), h], 1)
        if b < len(blocks):
            h = F.avg_pool2d(F.conv2d(F.relu(bn(h, f"trans{b}.bn")), sd[f"trans{b}.conv.weight"]), 2)
    return F.linear(F.relu(bn(h, "bn")).mean((2, 3)), sd["linear.weight"], sd["linear.bias"])


def test_densenet169_from_juraev_computes_what_its_source_computes():
    torch.manual_seed(0)
    net = ZOO["densenet169"](num_classes=10, width=NARROW, mean=(0.0,) * 3, std=(1.0,) * 3).eval()
    theirs = _theirs("juraev", "densenet169", net)
    net.load_state_dict({**to_ours("juraev", "densenet169", theirs, net, "test"),
                         "normalize.mean": net.normalize.mean, "normalize.std": net.normalize.std})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), _kuangliu_densenet(theirs, x, (6, 12, 32, 32)), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ training on digits
@pytest.mark.parametrize("arch", NINE)
def test_trains_one_epoch_on_digits(arch, digits, tmp_path):
    x, y = digits[0], digits[1]  # all 1437 training digits, 1x8x8
    mean, std = data.mean_std("digits")
    torch.manual_seed(0)
    net = models.build(arch, num_classes=10, width=NARROW, mean=mean, std=std, in_channels=1)
    history = fit(net, benign_batch, x, y, cfg=TrainConfig(epochs=1, batch_size=64, lr=0.05), seed=0,
                  flip=False, crop_padding=0, resume_path=tmp_path / "resume.pt",
                  meta={"arch": arch, "arch_kwargs": {}}, device=torch.device("cpu"), progress=False)
    # above chance (10%) by 5 standard deviations of a guess over 1408 images: it learns
    assert len(history) == 1 and history[0]["acc"] > 0.15
