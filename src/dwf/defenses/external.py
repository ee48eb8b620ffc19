"""Public checkpoints (Tables 2-3, "publicly available pretrained baselines") under our protocol.

An external classifier is "source:name". The paper's two sources (docs/baselines.md) load into
the CIFAR/SVHN networks of `dwf.models.zoo`, with their keys mapped to ours:

- `juraev:NAME` (ref. [39], F. Juraev's Kaggle "Trained models for CIFAR-10"): files
  `<name>_cifar10_lr01.pth` = {"net": state dict, "acc", "epoch"} (kuangliu/pytorch-cifar's
  training script), CIFAR-10 statistics (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010).
- `dadalto:NAME` (ref. [40], E. Dadalto's Hugging Face models `edadaltocg/<name>_svhn`):
  `pytorch_model.bin` = a plain timm state dict, SVHN statistics (0.4377, 0.4438, 0.4728) /
  (0.198, 0.201, 0.197).

Both bring the normalization their weights were trained with, which the model applies inside.
Any other torchvision classifier ("resnet50", "torchvision:resnet50") or, if timm is
installed, timm one ("timm:xception") is built ImageNet-shaped and gets the dataset's
normalization in front. Every file is read with weights_only=True: nothing is fetched, and
nothing in a file is executed.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dwf.checkpoint import CheckpointError, check_weights
from dwf.fileio import load_failure
from dwf.models.resnet import Normalize
from dwf.models.zoo import ZOO


def _torchvision(name: str, num_classes: int) -> nn.Module:
    from torchvision import models as tvm

    if name not in tvm.list_models(module=tvm):
        raise ValueError(f"--external: torchvision has no classifier {name!r}")
    kwargs = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):  # no auxiliary heads at test time
        kwargs.update(aux_logits=False, init_weights=False)
    return tvm.get_model(name, **kwargs)


def _timm(name: str, num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError(f"--external timm:{name}: timm is not installed (pip install timm)") from None
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


SOURCES: dict[str, Callable[[str, int], nn.Module]] = {"torchvision": _torchvision, "timm": _timm}


# ------------------------------------------------------------------ the paper's two sources
Rename = tuple[str, str]  # (regex on their key, replacement): their name -> ours


def _kuangliu_densenet(state: dict[str, torch.Tensor], blocks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """kuangliu's DenseNet concatenates each layer's output *before* its input ([new, x]);
    torchvision's after ([x, new]). Reorder the input channels of every consumer (a layer's
    norm1/conv1, a transition, norm5 and the classifier) from the new-first order to ours."""
    out = dict(state)
    c0 = state["features.conv0.weight"].shape[0]
    growth = state["features.denseblock1.denselayer1.conv2.weight"].shape[0]
    for b, n_layers in enumerate(blocks, 1):
        for i in range(1, n_layers + 2):  # layer i sees i - 1 earlier outputs; n + 1: the block's output
            consumer = _consumer(b, i, n_layers, len(blocks))
            order = _input_first(c0, growth, i - 1)
            for name, t in state.items():
                if name.startswith(consumer[0] + ".") and t.dim() == 1:
                    out[name] = t[order]
                elif name == consumer[1] + ".weight":
                    out[name] = t[:, order]
        c0 = (c0 + n_layers * growth) // 2
    return out


def _consumer(b: int, i: int, n_layers: int, n_blocks: int) -> tuple[str, str]:
    """(BatchNorm, conv or linear) reading what layer i of block b sees (i = n_layers + 1: the
    block's output, read by a transition or, after the last block, by norm5 and the classifier)."""
    if i <= n_layers:
        return f"features.denseblock{b}.denselayer{i}.norm1", f"features.denseblock{b}.denselayer{i}.conv1"
    if b < n_blocks:
        return f"features.transition{b}.norm", f"features.transition{b}.conv"
    return "features.norm5", "classifier"


def _input_first(c0: int, growth: int, n: int) -> torch.Tensor:
    """Index into the new-first channels [new_n, ..., new_1, x] that lists them as [x, new_1, ..., new_n]."""
    x = torch.arange(n * growth, n * growth + c0)
    news = [torch.arange((n - k) * growth, (n - k + 1) * growth) for k in range(1, n + 1)]
    return torch.cat([x, *news])


@dataclasses.dataclass(frozen=True)
class Published:
    """A published set of CIFAR/SVHN checkpoints: which zoo networks, how the files are laid out."""

    ref: str                                # who published them (the paper's reference)
    dataset: str                            # what they were trained on
    mean: tuple[float, ...]                 # the normalization their training used
    std: tuple[float, ...]
    wrapper: str | None                     # key holding the state dict, or None for a bare one
    renames: dict[str, tuple[Rename, ...]]  # zoo name -> renames (their keys -> ours)
    reorder: dict[str, Callable[[dict], dict]] = dataclasses.field(default_factory=dict)


_KUANGLIU_RESNET = ((r"\.shortcut\.", ".downsample."), (r"^linear\.", "fc."))
_KUANGLIU_DENSENET = ((r"^conv1\.", "features.conv0."),
                      (r"^dense(\d)\.(\d+)\.bn(\d)\.", lambda m: f"features.denseblock{m[1]}.denselayer"
                       f"{int(m[2]) + 1}.norm{m[3]}."),
                      (r"^dense(\d)\.(\d+)\.conv(\d)\.", lambda m: f"features.denseblock{m[1]}.denselayer"
                       f"{int(m[2]) + 1}.conv{m[3]}."),
                      (r"^trans(\d)\.bn\.", r"features.transition\1.norm."),
                      (r"^trans(\d)\.conv\.", r"features.transition\1.conv."),
                      (r"^bn\.", "features.norm5."), (r"^linear\.", "classifier."))

PUBLISHED: dict[str, Published] = {
    "juraev": Published(
        ref="[39] F. Juraev, Kaggle: firuzjuraev/trained-models-for-cifar10-dataset",
        dataset="cifar10", mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), wrapper="net",
        renames={"vgg19": (), "resnet50": _KUANGLIU_RESNET, "densenet169": _KUANGLIU_DENSENET,
                 "googlenet": (), "inception_v3": (), "mobilenet_v2": (),
                 "xception": ((r"^middel_flow\.middel_block\.", "middle_flow."),)},
        reorder={"densenet169": lambda s: _kuangliu_densenet(s, (6, 12, 32, 32))}),
    "dadalto": Published(
        ref="[40] E. Dadalto, Hugging Face: edadaltocg/<name>_svhn (timm)",
        dataset="svhn", mean=(0.4377, 0.4438, 0.4728), std=(0.198, 0.201, 0.197), wrapper=None,
        renames={"resnet34": (), "resnet50": (), "densenet121": ()}),
}


def to_ours(source: str, arch: str, state: dict[str, torch.Tensor], net: nn.Module,
            where: str) -> dict[str, torch.Tensor]:
    """Map a published state dict onto the zoo network `net`: names, then channel order.

    Args:
        source: key of PUBLISHED; arch: one of its zoo networks; net: that network, built.
        state: the state dict as the file holds it (wrapper and "module." already removed).
        where: the file, for messages.
    Returns:
        the state dict under our names, without our Normalize buffers.
    Raises:
        CheckpointError: naming the first missing, unexpected or misshapen tensor (their name).
    """
    pub = PUBLISHED[source]
    mapped, theirs = {}, {}
    for key, t in state.items():
        ours = key
        for pattern, repl in pub.renames[arch]:
            ours = re.sub(pattern, repl, ours)
        mapped[ours], theirs[ours] = t, key
    _fit(net, mapped, theirs, where)  # names and shapes first: a reorder then cannot fail
    return pub.reorder[arch](mapped) if arch in pub.reorder else mapped


def _fit(net: nn.Module, state: dict[str, torch.Tensor], theirs: dict[str, str], where: str) -> None:
    """Refuse a state dict that does not cover `net` exactly, naming the first offending tensor."""
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith("normalize.")}
    for name, t in expected.items():
        if name not in state:
            raise CheckpointError(f"{where}: weights lack {name!r} (another architecture or source?)")
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: {theirs[name]!r} has shape "
                                  f"{tuple(state[name].shape)}, the network expects {tuple(t.shape)}")
    extra = sorted(theirs[k] for k in set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected weights {extra[:3]} (another architecture or source?)")


def load_published(source: str, arch: str, weights: Path, *, num_classes: int = 10,
                   dataset: str | None = None) -> nn.Module:
    """A zoo network with a published checkpoint's weights, in eval mode, taking [0, 1] images
    (the source's normalization inside).

    Args:
        source: "juraev" ([39], CIFAR-10) or "dadalto" ([40], SVHN).
        arch: a zoo network that source publishes, e.g. "vgg19", "densenet121".
        weights: the downloaded file, as published.
        num_classes: size of the classifier's output (10 for both sources).
        dataset: if given, refuse a source trained on another dataset.
    """
    pub = PUBLISHED[source]
    if arch not in pub.renames:
        raise ValueError(f"--external {source}:{arch}: {source} publishes {', '.join(pub.renames)}")
    if dataset not in (None, pub.dataset):
        raise ValueError(f"--external {source}:{arch}: trained on {pub.dataset}, not {dataset}")
    net = ZOO[arch](num_classes=num_classes, mean=pub.mean, std=pub.std)
    state = to_ours(source, arch, _state_dict(weights, pub.wrapper), net, f"{weights} ({source}:{arch})")
    net.load_state_dict({**state, "normalize.mean": net.normalize.mean,
                         "normalize.std": net.normalize.std})
    return net.eval()


# ------------------------------------------------------------------ any other classifier
class External(nn.Module):
    """A third-party classifier behind our Normalize layer: [0, 1] images -> logits (N, C)."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # public classifiers take 3 channels: grey images (native digits) are copied to all three
        return self.net(self.normalize(x).expand(-1, 3, -1, -1))


def build_external(arch: str, num_classes: int) -> nn.Module:
    """The bare network `arch` ("name" = torchvision, or "source:name"), randomly initialized."""
    source, _, name = arch.rpartition(":")
    source = source or "torchvision"
    if source not in SOURCES:
        raise ValueError(f"--external {arch!r}: unknown source {source!r}; use "
                         f"{', '.join([*SOURCES, *PUBLISHED])}")
    return SOURCES[source](name, num_classes)


def _state_dict(weights: Path, wrapper: str | None = None) -> dict[str, torch.Tensor]:
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code is refused, not run
        raise CheckpointError(f"{weights}: {load_failure(e, 'state dict')}") from None
    for key in (wrapper, "state_dict"):
        if key and isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{weights}: expected a state dict"
                              + (f" (or {{{wrapper!r}: state dict}})" if wrapper else ""))
    check_weights(state, weights)  # a NaN weight would be evaluated as a model at 0%
    # checkpoints saved from DataParallel prefix every name with "module."
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_external(arch: str, weights: Path, *, num_classes: int, mean: tuple[float, ...],
                  std: tuple[float, ...], device: str | torch.device = "cpu",
                  dataset: str | None = None) -> nn.Module:
    """An external classifier with its weights, in eval mode, taking [0, 1] images.

    Args:
        arch: "juraev:vgg19", "dadalto:resnet34" (the paper's sources), or a torchvision /
            timm name: "vgg19_bn", "torchvision:densenet121", "timm:xception".
        weights: the downloaded weights file (for torchvision/timm a state dict whose names
            match the architecture exactly).
        num_classes: size of the classifier's output.
        mean, std: the dataset's normalization, put in front of a torchvision/timm network
            (a published source brings its own).
        dataset: if given, refuse a published source trained on another dataset.
    """
    source, _, name = arch.rpartition(":")
    if source in PUBLISHED:
        return load_published(source, name, weights, num_classes=num_classes, dataset=dataset).to(device)
    net = build_external(arch, num_classes)
    try:
        net.load_state_dict(_state_dict(weights))
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: does not fit {arch!r} ({str(e).splitlines()[0][:200]})") from None
    return External(net, mean, std).to(device).eval()
