"""The paper's benign baselines (Tables 2-3): nine classifiers in the CIFAR/SVHN form that the
public checkpoints use (refs. [39], [40]; docs/baselines.md), with Normalize inside.

Each network is laid out as its published checkpoint is, so `defenses.external` maps the weights
by name: ResNet and DenseNet from torchvision's blocks (the layout timm and [40] share), VGG-19,
GoogLeNet and MobileNet-V2 as kuangliu/pytorch-cifar builds them, Inception-V3 and Xception as
weiaicunzai/pytorch-cifar100 does (the code [39]'s files come from). Where torchvision has a
block, it differs from those files (GoogLeNet's 5x5 branch, MobileNet-V2's expansion-1 block and
shortcut, Inception-V3's pooling branches) or cannot be narrowed, so those are written here.

Arguments as ResNet-18's: num_classes; width, the first stage's channels (a DenseNet's growth
rate) at which every other width scales, the source's value by default, smaller for CPU runs;
mean, std; in_channels. Features are a mean over what is left of H x W, so 8x8 digits work where
the source pools a fixed 4x4 or 8x8 window (equal at 32x32). Two networks adapt at run time to
small inputs, with the same weights: VGG-19 skips a max-pool once H or W is 1 (8x8: three of
five pools), Inception-V3 pads its last stem convolution's input when H or W < 16 (8x8 would
reach 0x0 at the second grid reduction otherwise; zero-padding = padding=1).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from dwf.models.resnet import Normalize, check_channels, head

_MEAN, _STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _scaled(channels: int, scale: float) -> int:
    return max(1, round(channels * scale))


class _Zoo(nn.Module):
    """Normalize -> `trunk` -> mean over H, W -> the linear layer named `head_name`:
    [0, 1] images to logits (N, C)."""

    head_name = "classifier"  # the checkpoints' name of the last layer

    def __init__(self, mean, std, in_channels):
        super().__init__()
        check_channels(mean, std, in_channels)
        self.normalize = Normalize(mean, std)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps (N, F, h, w) of normalized images."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, F) of images x in [0, 1]."""
        return self.trunk(self.normalize(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head(getattr(self, self.head_name), self.embed(x))  # (N, C) logits


def _conv_bn_relu(c_in: int, c_out: int, k: int, bias: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias), nn.BatchNorm2d(c_out), nn.ReLU(True)]


# ------------------------------------------------------------------ VGG-19 with BatchNorm
VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
             512, 512, 512, 512, "M"]


class VGG19(_Zoo):
    """VGG-19 (BN) for 32x32: 16 conv-BN-ReLU, 5 max-pools to 1x1, one linear layer (512 -> C)."""

    def __init__(self, num_classes=10, width=64, mean=_MEAN, std=_STD, in_channels=3):
        super().__init__(mean, std, in_channels)
        layers, c = [], in_channels
        for v in VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += _conv_bn_relu(c, _scaled(v, width / 64), 3)
                c = _scaled(v, width / 64)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def trunk(self, x):
        for layer in self.features:
            if not (isinstance(layer, nn.MaxPool2d) and min(x.shape[-2:]) < 2):  # 8x8: 3 pools to 1x1
                x = layer(x)
        return x


# ------------------------------------------------------------------ ResNet-34, ResNet-50
class CifarResNet(_Zoo):
    """ResNet with a 3x3 stride-1 stem and no max-pool; torchvision's blocks and names."""

    head_name = "fc"

    def __init__(self, block, layers, num_classes=10, width=64, mean=_MEAN, std=_STD,
                 in_channels=3):
        super().__init__(mean, std, in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        c = width
        for i, n in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            down = None
            if stride != 1 or c != planes * block.expansion:
                down = nn.Sequential(nn.Conv2d(c, planes * block.expansion, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes * block.expansion))
            blocks = [block(c, planes, stride, down)]
            c = planes * block.expansion
            blocks += [block(c, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c, num_classes)

    def trunk(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet34(**kwargs) -> CifarResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]), as [40] builds it for SVHN."""
    from torchvision.models.resnet import BasicBlock  # here: torchvision.models costs ~1.5 s to import

    return CifarResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> CifarResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]), as [39] (CIFAR-10) and [40] (SVHN) build it."""
    from torchvision.models.resnet import Bottleneck

    return CifarResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


# ------------------------------------------------------------------ DenseNet-121, DenseNet-169
class CifarDenseNet(_Zoo):
    """DenseNet-BC with a 3x3 stem of 2 x growth channels, no stem BN and no pooling;
    torchvision's dense blocks and transitions (compression 0.5, bottleneck 4 x growth)."""

    def __init__(self, block_config, num_classes=10, width=32, mean=_MEAN, std=_STD,
                 in_channels=3):
        from torchvision.models.densenet import _DenseBlock, _Transition  # see resnet34

        super().__init__(mean, std, in_channels)
        c = 2 * width  # width = growth rate
        layers = OrderedDict(conv0=nn.Conv2d(in_channels, c, 3, 1, 1, bias=False))
        for i, n in enumerate(block_config, 1):
            layers[f"denseblock{i}"] = _DenseBlock(n, c, bn_size=4, growth_rate=width, drop_rate=0)
            c += n * width
            if i < len(block_config):
                layers[f"transition{i}"] = _Transition(c, c // 2)
                c //= 2
        layers["norm5"] = nn.BatchNorm2d(c)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(c, num_classes)

    def trunk(self, x):
        return torch.relu(self.features(x))


def densenet121(width=12, **kwargs) -> CifarDenseNet:
    """DenseNet-121 ([6, 12, 24, 16]) with growth rate 12, as [40] builds it for SVHN."""
    return CifarDenseNet([6, 12, 24, 16], width=width, **kwargs)


def densenet169(width=32, **kwargs) -> CifarDenseNet:
    """DenseNet-169 ([6, 12, 32, 32]) with growth rate 32, as [39] builds it for CIFAR-10."""
    return CifarDenseNet([6, 12, 32, 32], width=width, **kwargs)


# ------------------------------------------------------------------ GoogLeNet
# (name, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection); "M": 3x3 max-pool, stride 2
GOOGLENET_CFG = [("a3", 64, 96, 128, 16, 32, 32), ("b3", 128, 128, 192, 32, 96, 64), "M",
                 ("a4", 192, 96, 208, 16, 48, 64), ("b4", 160, 112, 224, 24, 64, 64),
                 ("c4", 128, 128, 256, 24, 64, 64), ("d4", 112, 144, 288, 32, 64, 64),
                 ("e4", 256, 160, 320, 32, 128, 128), "M",
                 ("a5", 256, 160, 320, 32, 128, 128), ("b5", 384, 192, 384, 48, 128, 128)]


class InceptionV1(nn.Module):
    """GoogLeNet's module: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 (the 5x5 factorized) | maxpool-1x1."""

    def __init__(self, c_in, n1, n3r, n3, n5r, n5, pool):
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn_relu(c_in, n1, 1))
        self.b2 = nn.Sequential(*_conv_bn_relu(c_in, n3r, 1), *_conv_bn_relu(n3r, n3, 3))
        self.b3 = nn.Sequential(*_conv_bn_relu(c_in, n5r, 1), *_conv_bn_relu(n5r, n5, 3),
                                *_conv_bn_relu(n5, n5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_conv_bn_relu(c_in, pool, 1))
        self.out_channels = n1 + n3 + n5 + pool

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(_Zoo):
    """GoogLeNet for 32x32: a 3x3 conv (192) stem, nine Inception modules, two max-pools."""

    head_name = "linear"

    def __init__(self, num_classes=10, width=64, mean=_MEAN, std=_STD, in_channels=3):
        super().__init__(mean, std, in_channels)
        scale = width / 64
        c = _scaled(192, scale)
        self.pre_layers = nn.Sequential(*_conv_bn_relu(in_channels, c, 3))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.order = []
        for entry in GOOGLENET_CFG:
            if entry == "M":
                self.order.append("maxpool")
                continue
            name, *channels = entry
            block = InceptionV1(c, *(_scaled(k, scale) for k in channels))
            setattr(self, name, block)
            self.order.append(name)
            c = block.out_channels
        self.linear = nn.Linear(c, num_classes)

    def trunk(self, x):
        x = self.pre_layers(x)
        for name in self.order:
            x = getattr(self, name)(x)
        return x


# ------------------------------------------------------------------ Inception-V3
class ConvBN(nn.Module):
    """Conv (no bias) - BN - ReLU, Inception-V3's unit (BN eps 1e-5, as the source trains it)."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _avg_then(c_in, c_out, k=1):
    return nn.Sequential(nn.AvgPool2d(3, 1, 1), ConvBN(c_in, c_out, k, padding=k // 2))


class InceptionA(nn.Module):
    """35x35 module: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-3x3 (the source's 3x3 pool branch)."""

    def __init__(self, c_in, pool, s):
        super().__init__()
        n64, n48, n96 = _scaled(64, s), _scaled(48, s), _scaled(96, s)
        self.branch1x1 = ConvBN(c_in, n64, 1)
        self.branch5x5 = nn.Sequential(ConvBN(c_in, n48, 1), ConvBN(n48, n64, 5, padding=2))
        self.branch3x3 = nn.Sequential(ConvBN(c_in, n64, 1), ConvBN(n64, n96, 3, padding=1),
                                       ConvBN(n96, n96, 3, padding=1))
        self.branchpool = _avg_then(c_in, pool, 3)
        self.out_channels = 2 * n64 + n96 + pool

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5(x), self.branch3x3(x), self.branchpool(x)], 1)


class InceptionB(nn.Module):
    """Grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, c_in, s):
        super().__init__()
        n384, n64, n96 = _scaled(384, s), _scaled(64, s), _scaled(96, s)
        self.branch3x3 = ConvBN(c_in, n384, 3, stride=2)
        self.branch3x3stack = nn.Sequential(ConvBN(c_in, n64, 1), ConvBN(n64, n96, 3, padding=1),
                                            ConvBN(n96, n96, 3, stride=2))
        self.branchpool = nn.MaxPool2d(3, 2)
        self.out_channels = n384 + n96 + c_in

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3stack(x), self.branchpool(x)], 1)


def _seven(c_in, c_mid, c_out, n):
    """n convolutions alternating 7x1 and 1x7 (the source starts with 7x1), c_in -> c_out."""
    kernels = [((7, 1), (3, 0)), ((1, 7), (0, 3))]
    chans = [c_in] + [c_mid] * (n - 1) + [c_out]
    return [ConvBN(chans[i], chans[i + 1], kernels[i % 2][0], padding=kernels[i % 2][1])
            for i in range(n)]


class InceptionC(nn.Module):
    """17x17 module: 1x1 | 1x1-7x1-1x7 | 1x1-(7x1-1x7)x2 | avgpool-1x1."""

    def __init__(self, c_in, c7, s):
        super().__init__()
        n192 = _scaled(192, s)
        self.branch1x1 = ConvBN(c_in, n192, 1)
        self.branch7x7 = nn.Sequential(ConvBN(c_in, c7, 1), *_seven(c7, c7, n192, 2))
        self.branch7x7stack = nn.Sequential(ConvBN(c_in, c7, 1), *_seven(c7, c7, n192, 4))
        self.branch_pool = _avg_then(c_in, n192)
        self.out_channels = 4 * n192

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch7x7(x), self.branch7x7stack(x),
                          self.branch_pool(x)], 1)


class InceptionD(nn.Module):
    """Grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | avgpool/2 (the source averages)."""

    def __init__(self, c_in, s):
        super().__init__()
        n192, n320 = _scaled(192, s), _scaled(320, s)
        self.branch3x3 = nn.Sequential(ConvBN(c_in, n192, 1), ConvBN(n192, n320, 3, stride=2))
        self.branch7x7 = nn.Sequential(ConvBN(c_in, n192, 1), ConvBN(n192, n192, (1, 7), padding=(0, 3)),
                                       ConvBN(n192, n192, (7, 1), padding=(3, 0)),
                                       ConvBN(n192, n192, 3, stride=2))
        self.branchpool = nn.AvgPool2d(3, 2)
        self.out_channels = n320 + n192 + c_in

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch7x7(x), self.branchpool(x)], 1)


class InceptionE(nn.Module):
    """8x8 module: 1x1 | 1x1-(1x3 and 3x1) | 1x1-3x3-(1x3 and 3x1) | avgpool-1x1."""

    def __init__(self, c_in, s):
        super().__init__()
        n320, n384, n448, n192 = (_scaled(k, s) for k in (320, 384, 448, 192))
        self.branch1x1 = ConvBN(c_in, n320, 1)
        self.branch3x3_1 = ConvBN(c_in, n384, 1)
        self.branch3x3_2a = ConvBN(n384, n384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(n384, n384, (3, 1), padding=(1, 0))
        self.branch3x3stack_1 = ConvBN(c_in, n448, 1)
        self.branch3x3stack_2 = ConvBN(n448, n384, 3, padding=1)
        self.branch3x3stack_3a = ConvBN(n384, n384, (1, 3), padding=(0, 1))
        self.branch3x3stack_3b = ConvBN(n384, n384, (3, 1), padding=(1, 0))
        self.branch_pool = _avg_then(c_in, n192)
        self.out_channels = n320 + 4 * n384 + n192

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3stack_2(self.branch3x3stack_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3stack_3a(b), self.branch3x3stack_3b(b), self.branch_pool(x)], 1)


class InceptionV3(_Zoo):
    """Inception-V3 for 32x32: a stride-1 stem (32 -> 30), Mixed_5b..7c, dropout 0.5, linear.
    Two grid reductions: 30 -> 14 -> 6."""

    head_name = "linear"

    def __init__(self, num_classes=10, width=32, mean=_MEAN, std=_STD, in_channels=3):
        super().__init__(mean, std, in_channels)
        s = width / 32
        n32, n64, n80, n192 = (_scaled(k, s) for k in (32, 64, 80, 192))
        self.Conv2d_1a_3x3 = ConvBN(in_channels, n32, 3, padding=1)
        self.Conv2d_2a_3x3 = ConvBN(n32, n32, 3, padding=1)
        self.Conv2d_2b_3x3 = ConvBN(n32, n64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(n64, n80, 1)
        self.Conv2d_4a_3x3 = ConvBN(n80, n192, 3)
        blocks, c = OrderedDict(), n192
        for name, make in [("Mixed_5b", lambda c: InceptionA(c, _scaled(32, s), s)),
                           ("Mixed_5c", lambda c: InceptionA(c, n64, s)),
                           ("Mixed_5d", lambda c: InceptionA(c, n64, s)),
                           ("Mixed_6a", lambda c: InceptionB(c, s)),
                           *[(f"Mixed_6{k}", lambda c, c7=c7: InceptionC(c, _scaled(c7, s), s))
                             for k, c7 in zip("bcde", (128, 160, 160, 192))],
                           ("Mixed_7a", lambda c: InceptionD(c, s)),
                           ("Mixed_7b", lambda c: InceptionE(c, s)),
                           ("Mixed_7c", lambda c: InceptionE(c, s))]:
            blocks[name] = make(c)
            c = blocks[name].out_channels
        for name, block in blocks.items():
            setattr(self, name, block)
        self.order = list(blocks)
        self.dropout = nn.Dropout(0.5)
        self.linear = nn.Linear(c, num_classes)

    def trunk(self, x):
        x = self.Conv2d_3b_1x1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        if min(x.shape[-2:]) < 16:  # 8x8 digits: keep 8 here, or the two reductions reach 0x0
            x = F.pad(x, (1, 1, 1, 1))
        x = self.Conv2d_4a_3x3(x)
        for name in self.order:
            x = getattr(self, name)(x)
        return x

    def embed(self, x):
        return self.dropout(super().embed(x))


# ------------------------------------------------------------------ Xception
class SeparableConv2d(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, both without bias."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


def _sep_pair(c_in, c_mid, c_out, stride, pre_relu=True):
    """[ReLU] sep-BN-ReLU-sep-BN, 3x3 max-pool of `stride` (the residual path of a unit)."""
    return nn.Sequential(*([nn.ReLU()] if pre_relu else []), SeparableConv2d(c_in, c_mid),
                         nn.BatchNorm2d(c_mid), nn.ReLU(), SeparableConv2d(c_mid, c_out),
                         nn.BatchNorm2d(c_out), nn.MaxPool2d(3, stride, 1))


def _projection(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))


class EntryFlow(nn.Module):
    """Two conv-BN-ReLU, then three residual units: /2, /2 and stride 1 (32 -> 8)."""

    def __init__(self, c_in, n):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn_relu(c_in, n[32], 3, bias=False))
        self.conv2 = nn.Sequential(*_conv_bn_relu(n[32], n[64], 3, bias=False))
        self.conv3_residual = _sep_pair(n[64], n[128], n[128], 2, pre_relu=False)
        self.conv3_shortcut = _projection(n[64], n[128], 2)
        self.conv4_residual = _sep_pair(n[128], n[256], n[256], 2)
        self.conv4_shortcut = _projection(n[128], n[256], 2)
        self.conv5_residual = _sep_pair(n[256], n[728], n[728], 1)
        self.conv5_shortcut = _projection(n[256], n[728], 1)

    def forward(self, x):
        x = self.conv2(self.conv1(x))
        for k in (3, 4, 5):
            x = getattr(self, f"conv{k}_residual")(x) + getattr(self, f"conv{k}_shortcut")(x)
        return x


class MiddleFlowBlock(nn.Module):
    """Three (ReLU, sep, BN) with an identity shortcut."""

    def __init__(self, c):
        super().__init__()
        for k in (1, 2, 3):
            setattr(self, f"conv{k}", nn.Sequential(nn.ReLU(), SeparableConv2d(c, c), nn.BatchNorm2d(c)))

    def forward(self, x):
        return x + self.conv3(self.conv2(self.conv1(x)))


class ExitFlow(nn.Module):
    """A /2 residual unit (728 -> 1024), then sep-BN-ReLU to 1536 and 2048."""

    def __init__(self, n):
        super().__init__()
        self.residual = _sep_pair(n[728], n[728], n[1024], 2)
        self.shortcut = _projection(n[728], n[1024], 2)
        self.conv = nn.Sequential(SeparableConv2d(n[1024], n[1536]), nn.BatchNorm2d(n[1536]), nn.ReLU(),
                                  SeparableConv2d(n[1536], n[2048]), nn.BatchNorm2d(n[2048]), nn.ReLU())

    def forward(self, x):
        return self.conv(self.residual(x) + self.shortcut(x))


class Xception(_Zoo):
    """Xception for 32x32: entry flow (32 -> 8), eight middle blocks of 728, exit flow (-> 4)."""

    head_name = "fc"

    def __init__(self, num_classes=10, width=32, mean=_MEAN, std=_STD, in_channels=3):
        super().__init__(mean, std, in_channels)
        n = {k: _scaled(k, width / 32) for k in (32, 64, 128, 256, 728, 1024, 1536, 2048)}
        self.entry_flow = EntryFlow(in_channels, n)
        self.middle_flow = nn.Sequential(*[MiddleFlowBlock(n[728]) for _ in range(8)])
        self.exit_flow = ExitFlow(n)
        self.fc = nn.Linear(n[2048], num_classes)

    def trunk(self, x):
        return self.exit_flow(self.middle_flow(self.entry_flow(x)))


# ------------------------------------------------------------------ MobileNet-V2
# (expansion, out channels, blocks, stride of the first); strides 1, 1 where ImageNet has 2, 2
MOBILENET_V2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                    (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 project, ReLU; at stride 1 a residual (a 1x1-BN
    projection when the channels change). Unlike torchvision's, expansion 1 keeps its 1x1."""

    def __init__(self, c_in, c_out, expansion, stride):
        super().__init__()
        mid = expansion * c_in
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride == 1 and c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(out)))))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(_Zoo):
    """MobileNet-V2 for 32x32: 3x3 stride-1 stem (32), 17 inverted residuals, 1x1 to 1280."""

    head_name = "linear"

    def __init__(self, num_classes=10, width=32, mean=_MEAN, std=_STD, in_channels=3):
        super().__init__(mean, std, in_channels)
        s = width / 32
        c = _scaled(32, s)
        self.conv1 = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        blocks = []
        for expansion, out, n, stride in MOBILENET_V2_CFG:
            for i in range(n):
                blocks.append(InvertedResidual(c, _scaled(out, s), expansion, stride if i == 0 else 1))
                c = _scaled(out, s)
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(c, _scaled(1280, s), 1, bias=False)
        self.bn2 = nn.BatchNorm2d(_scaled(1280, s))
        self.linear = nn.Linear(_scaled(1280, s), num_classes)

    def trunk(self, x):
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return torch.relu(self.bn2(self.conv2(x)))


ZOO = {"vgg19": VGG19, "resnet34": resnet34, "resnet50": resnet50, "densenet121": densenet121,
       "densenet169": densenet169, "googlenet": GoogLeNet, "inception_v3": InceptionV3,
       "xception": Xception, "mobilenet_v2": MobileNetV2}
