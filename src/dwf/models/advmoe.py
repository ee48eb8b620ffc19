"""ADVMoE's MoE-CNN (Zhang et al., ICCV 2023): a ResNet-18 whose block convolutions are MoE
convolutions, routed top-1 per image by one router network.

An MoE convolution holds E experts as E contiguous blocks of output filters; a sample uses the
block its expert index selects. As in the official code, one router on the input image
chooses the expert of every MoE layer, the chosen output is not scaled by the router, and the
router receives a straight-through gradient: the selected expert's score gets d(loss)/d(mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dwf.models.moe import Gate
from dwf.models.resnet import BasicBlock, Normalize, check_channels, head, stem


def straight_through_gate(scores: torch.Tensor) -> torch.Tensor:
    """Top-1 one-hot (N, E) whose gradient w.r.t. the selected score is that of the mask."""
    one_hot = F.one_hot(scores.argmax(1), scores.shape[1]).to(scores.dtype)
    return one_hot + one_hot * (scores - scores.detach())  # value: one_hot


class MoEConv2d(nn.Module):
    """3x3 convolution with E experts of c_out filters each; a sample keeps its expert's block."""

    def __init__(self, c_in: int, c_out: int, stride: int, n_experts: int):
        super().__init__()
        self.n_experts, self.c_out = n_experts, c_out
        self.conv = nn.Conv2d(c_in, n_experts * c_out, 3, stride, 1, bias=False)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # (N, E * c_out, H, W): every expert; E x ratio = the dense cost
        y = y.view(len(x), self.n_experts, self.c_out, *y.shape[-2:])
        return (gate[:, :, None, None, None] * y).sum(1)  # (N, c_out, H, W)


class MoEBlock(nn.Module):
    """BasicBlock with both 3x3 convolutions MoE; BatchNorm and the shortcut stay dense."""

    def __init__(self, c_in: int, c_out: int, stride: int, n_experts: int):
        super().__init__()
        self.conv1 = MoEConv2d(c_in, c_out, stride, n_experts)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = MoEConv2d(c_out, c_out, 1, n_experts)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x, gate)))
        out = self.bn2(self.conv2(out, gate))
        return F.relu(out + self.shortcut(x))


class RouterNet(nn.Module):
    """The router: a small CIFAR ResNet (ResNet-20 at width 16, 3 blocks) -> E raw scores."""

    def __init__(self, n_experts: int, width: int = 16, blocks: int = 3, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, c_in = [], width
        for i, c_out in enumerate([width, 2 * width, 4 * width]):
            for b in range(blocks):
                layers.append(BasicBlock(c_in, c_out, 2 if i > 0 and b == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.linear = nn.Linear(c_in, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.blocks(self.stem(x)).mean(dim=(2, 3)))  # (N, E) logits


class ADVMoEResNet18(nn.Module):
    """CIFAR ResNet-18 with MoE block convolutions and one image-level top-1 router.

    Args:
        n_experts: E experts per MoE layer (official example: 2).
        ratio: expert width / dense width (official example: 0.5); stem and classifier dense.
        num_classes, width, mean, std, in_channels: as ResNet18 (the router sees the same image).
        router_width, router_blocks: the router CNN's size.
    """

    def __init__(self, n_experts: int = 2, ratio: float = 0.5, num_classes: int = 10,
                 width: int = 64, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5), router_width: int = 16,
                 router_blocks: int = 3, in_channels: int = 3):
        super().__init__()
        check_channels(mean, std, in_channels)
        self.n_experts = n_experts
        self.normalize = Normalize(mean, std)
        self.router = RouterNet(n_experts, router_width, router_blocks, in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, c_in = [], width
        for i, mult in enumerate([1, 2, 4, 8]):
            c_out = max(1, int(ratio * width * mult))
            blocks += [MoEBlock(c_in, c_out, 1 if i == 0 else 2, n_experts),
                       MoEBlock(c_out, c_out, 1, n_experts)]
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.linear = nn.Linear(c_in, num_classes)

    def router_parameters(self):
        return self.router.parameters()

    def expert_parameters(self):
        """Everything but the router: experts, stem, BatchNorms, shortcuts, classifier."""
        return (p for name, p in self.named_parameters() if not name.startswith("router."))

    def router_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The router's raw scores (N, E) for images x in [0, 1]."""
        return self.router(self.normalize(x))

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The top-1 routing as one-hot weights (N, E) (for analysis)."""
        scores = self.router_scores(x)
        return F.one_hot(scores.argmax(1), self.n_experts).to(scores.dtype)

    def routed(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) of images x in [0, 1] through the experts `gate` (N, E) selects."""
        out = F.relu(stem(self.conv1, self.normalize, x, self.bn1))  # fp32 stem under bf16
        for block in self.blocks:
            out = block(out, gate)
        return head(self.linear, out.mean(dim=(2, 3)))  # fp32 logits

    hard_routing = True  # top-1: the attack sees only the straight-through estimate (relaxed)

    def route(self, x: torch.Tensor, gate: Gate) -> torch.Tensor:
        """Logits (N, C) through the experts gate(router scores) weighs (the mixture interface:
        attacks that replace the routing decision); straight_through_gate is `forward`."""
        return self.routed(x, gate(self.router_scores(x)))

    def expert(self, i: int) -> nn.Module:
        """Every sample routed through expert i, as a classifier on [0, 1] images (the mixture
        interface, evaluate): the experts share the stem, the shortcuts and the head."""
        return ForcedRoute(self, i)

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits with every sample forced through expert e, for each e: (N, E, C)."""
        eye = torch.eye(self.n_experts, device=x.device, dtype=x.dtype)
        return torch.stack([self.routed(x, eye[e].expand(len(x), -1))
                            for e in range(self.n_experts)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x, straight_through_gate)  # (N, C)


class ForcedRoute(nn.Module):
    """An ADVMoE network with its router replaced by a fixed choice of expert (a view: it shares
    the network's parameters and follows its train/eval mode)."""

    def __init__(self, moe: ADVMoEResNet18, expert: int):
        super().__init__()
        self.moe, self.index = moe, expert
        self.train(moe.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.one_hot(torch.full((len(x),), self.index, device=x.device), self.moe.n_experts)
        return self.moe.routed(x, gate.to(x.dtype))  # (N, C)
