"""CIFAR ResNet-18 (He et al. 2016, the 3x3-stem variant used by every CIFAR robustness paper).

Normalization is the network's first layer, so the model takes images in [0, 1] and every
attack works in pixel space (DESIGN.md, threat model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """Per-channel (x - mean) / std with the statistics kept as buffers (saved in checkpoints)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def check_channels(mean: tuple[float, ...], std: tuple[float, ...], in_channels: int) -> None:
    """Refuse statistics for another channel count: (1, 3, 1, 1) buffers would silently
    broadcast a 1-channel image to 3 channels."""
    if not len(mean) == len(std) == in_channels:
        raise ValueError(f"mean and std need one value per input channel ({in_channels}), "
                         f"got {len(mean)} and {len(std)}")


def fold(convs: Sequence[nn.Conv2d], bns: Sequence[nn.BatchNorm2d]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm folded into the convolution before it: the (weight, bias) of one
    convolution computing bns[i](convs[i](x)) for every i, the pairs side by side along the
    output channels (a grouped convolution for several; models/batched.py). In eval mode
    BatchNorm is a per-channel affine map, so this is the same function up to float rounding,
    with one pass over the activation instead of three (forward and backward).

    A frozen model (no weight or statistic needs a gradient: `frozen`, under evaluation) keeps
    the result on the first convolution while those tensors hold the same data (storage and
    version: an in-place update, `.to()`, `.half()` or a load rebuilds it), so an attack does
    not rebuild it at every step; one that trains rebuilds it at every call, and gradients
    reach every weight.
    """
    tensors = [t for c, b in zip(convs, bns)
               for t in (c.weight, b.weight, b.bias, b.running_mean, b.running_var)]
    cache = None if any(t.requires_grad for t in tensors) else convs[0].__dict__.setdefault("_folded", {})
    key = tuple(id(t) for t in tensors)
    if cache is not None and key in cache:
        # `held` keeps the tensors and their storages alive: no id or address is reused
        held, versions, folded = cache[key]
        if (versions == tuple(t._version for t in tensors)
                and all(h.data_ptr() == t.data_ptr() for h, t in zip(held[1], tensors))):
            return folded
    b = bns[0]
    scale = torch.cat([m.weight for m in bns]) * torch.rsqrt(torch.cat([m.running_var for m in bns]) + b.eps)
    bias = torch.cat([m.bias for m in bns]) - torch.cat([m.running_mean for m in bns]) * scale
    weight = torch.cat([c.weight for c in convs]) * scale.view(-1, 1, 1, 1)
    if cache is not None:
        held = (tensors, [t.detach() for t in tensors])
        cache[key] = (held, tuple(t._version for t in tensors), (weight, bias))
    return weight, bias


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)); in eval mode as one convolution (`fold`)."""
    if bn.training or bn.running_var is None:
        return bn(conv(x))
    weight, bias = fold([conv], [bn])
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def stem(conv: nn.Conv2d, normalize: Normalize, x: torch.Tensor, bn: nn.BatchNorm2d | None = None
         ) -> torch.Tensor:
    """conv(normalize(x)), then bn if given, in fp32 even under bf16 autocast: the attacks'
    input gradient ends here, and a 1- or 3-channel convolution gains nothing from bf16."""
    with torch.autocast(x.device.type, enabled=False):
        x = normalize(x.float())
        return conv(x) if bn is None else conv_bn(conv, bn, x)


def head(linear: nn.Linear, feats: torch.Tensor) -> torch.Tensor:
    """linear(feats) in fp32 even under bf16 autocast: logits (and every loss on them) exact."""
    with torch.autocast(feats.device.type, enabled=False):
        return linear(feats.float())


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(conv_bn(self.conv1, self.bn1, x))
        out = conv_bn(self.conv2, self.bn2, out)
        short = conv_bn(*self.shortcut, x) if len(self.shortcut) else x
        return F.relu(out + short)


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, stages [2, 2, 2, 2] of widths w, 2w, 4w, 8w.

    Any H x W works: the stages stride 1, 2, 2, 2 (32x32 input: 32, 16, 8, 4; digits' 8x8:
    8, 4, 2, 1) and the features are a mean over what is left.

    Args:
        num_classes: number of logits.
        width: channels of the first stage (64 in the paper; smaller for CPU runs).
        mean, std: per-channel statistics of the dataset, applied inside the model.
        in_channels: image channels (data.SHAPE; 1 for digits), the stem's input.
    """

    def __init__(self, num_classes: int = 10, width: int = 64,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 in_channels: int = 3):
        super().__init__()
        check_channels(mean, std, in_channels)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers, c_in = [], width
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(widths[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 8w) of images x in [0, 1]."""
        out = F.relu(stem(self.conv1, self.normalize, x, self.bn1))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # mean over H, W instead of adaptive_avg_pool2d: its CUDA backward is non-deterministic
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head(self.linear, self.features(x))  # (N, C) logits
