"""CIFAR ResNet-18 (He et al. 2016, the 3x3-stem variant used by every CIFAR robustness paper).

Normalization is the network's first layer, so the model takes images in [0, 1] and every
attack works in pixel space (DESIGN.md, threat model).
"""

from __future__ import annotations

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


def stem(conv: nn.Conv2d, normalize: Normalize, x: torch.Tensor) -> torch.Tensor:
    """conv(normalize(x)) in fp32 even under bf16 autocast: the attacks' input gradient ends
    here, and a 1- or 3-channel convolution gains nothing from bf16."""
    with torch.autocast(x.device.type, enabled=False):
        return conv(normalize(x.float()))


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
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


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
        out = F.relu(self.bn1(stem(self.conv1, self.normalize, x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # mean over H, W instead of adaptive_avg_pool2d: its CUDA backward is non-deterministic
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head(self.linear, self.features(x))  # (N, C) logits
