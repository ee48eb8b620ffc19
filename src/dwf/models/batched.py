"""The E experts of a SoftMoE as one batched computation (grouped convolutions).

The experts keep their own modules and parameters (the checkpoint layout `experts.{i}.*` is
unchanged); this file only *computes* with them differently. Expert i's channels occupy block i
of a wide activation (N, E*C, H, W): a convolution with `groups=E` is E independent
convolutions, and a BatchNorm over E*C channels is E independent BatchNorms, since BatchNorm
statistics are per channel. So outputs, gradients and running statistics equal the expert loop
up to float rounding; tests/test_batched.py checks that against the loop.

Weights are concatenated at every call (torch.cat is differentiable, so parameter gradients
reach each expert's own tensors); that copy is one pass over the weights, small next to the
convolutions at any batch size used for training or attacks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dwf import distributed
from dwf.models.resnet import BasicBlock, ResNet18, fold


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(tensors), dim=0)


def _conv(convs: Sequence[nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
    """E convolutions on (N, E*C_in, H, W) as one grouped convolution -> (N, E*C_out, H', W')."""
    c = convs[0]
    return F.conv2d(x, _cat([m.weight for m in convs]), None, c.stride, c.padding, c.dilation,
                    groups=len(convs))


def _batch_norm(bns: Sequence[nn.BatchNorm2d], x: torch.Tensor) -> torch.Tensor:
    """E BatchNorms over (N, E*C, H, W), updating each expert's running statistics in train mode.

    F.batch_norm updates the concatenated buffers in place; they are copied back to the
    experts' own buffers (a few thousand floats), as the looped forward would have updated them.
    """
    b = bns[0]
    training = b.training
    mean, var = _cat([m.running_mean for m in bns]), _cat([m.running_var for m in bns])
    # F.batch_norm, or over the global batch when data-parallel (dwf.distributed)
    out = distributed.batch_norm(x, mean, var, _cat([m.weight for m in bns]),
                                 _cat([m.bias for m in bns]), training, b.momentum, b.eps)
    if training:
        with torch.no_grad():
            for m, mu, v in zip(bns, mean.chunk(len(bns)), var.chunk(len(bns))):
                m.running_mean.copy_(mu)
                m.running_var.copy_(v)
                m.num_batches_tracked.add_(1)
    return out


def _conv_bn(convs: Sequence[nn.Conv2d], bns: Sequence[nn.BatchNorm2d], x: torch.Tensor
             ) -> torch.Tensor:
    """BatchNorm(conv(x)) for E experts; in eval mode one grouped convolution with each
    BatchNorm folded in (resnet.fold: cached for a frozen model), which matters for attacks,
    memory-bound at small widths."""
    if bns[0].training:
        return _batch_norm(bns, _conv(convs, x))
    weight, bias = fold(convs, bns)
    c = convs[0]
    return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, groups=len(convs))


def _block(blocks: Sequence[BasicBlock], x: torch.Tensor) -> torch.Tensor:
    """E BasicBlocks (see resnet.BasicBlock) on the wide activation."""
    out = F.relu(_conv_bn([b.conv1 for b in blocks], [b.bn1 for b in blocks], x))
    out = _conv_bn([b.conv2 for b in blocks], [b.bn2 for b in blocks], out)
    if len(blocks[0].shortcut) == 0:
        return F.relu(out + x)
    short = _conv_bn([b.shortcut[0] for b in blocks], [b.shortcut[1] for b in blocks], x)
    return F.relu(out + short)


def expert_logits(experts: Sequence[ResNet18], x: torch.Tensor) -> torch.Tensor:
    """Every expert's logits f_i(x) in one pass, shape (N, E, C); equals the expert loop.

    Args:
        experts: ResNet18s of one architecture (check with `batchable`).
        x: images (N, C, H, W) in [0, 1].
    """
    n_exp = len(experts)
    mean = _cat([f.normalize.mean.flatten() for f in experts]).view(1, -1, 1, 1)  # (1, E*C, 1, 1)
    std = _cat([f.normalize.std.flatten() for f in experts]).view(1, -1, 1, 1)
    with torch.autocast(x.device.type, enabled=False):  # the stem stays fp32 (resnet.stem)
        out = (x.float().repeat(1, n_exp, 1, 1) - mean) / std  # (N, E*C, H, W): expert i: block i
        out = F.relu(_conv_bn([f.conv1 for f in experts], [f.bn1 for f in experts], out))
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        stages = [getattr(f, layer) for f in experts]
        for j in range(len(stages[0])):
            out = _block([s[j] for s in stages], out)
    feats = out.mean(dim=(2, 3)).view(len(x), n_exp, -1)  # (N, E, F), mean as in ResNet18.features
    weight = torch.stack([f.linear.weight for f in experts])  # (E, C, F)
    bias = torch.stack([f.linear.bias for f in experts])  # (E, C)
    with torch.autocast(x.device.type, enabled=False):  # fp32 logits, as ResNet18.forward
        return torch.einsum("nef,ecf->nec", feats.float(), weight) + bias  # (N, E, C)


def _bn_settings(m: nn.BatchNorm2d) -> tuple:
    return (m.eps, m.momentum, m.affine, m.track_running_stats)


def batchable(experts: Sequence[nn.Module]) -> bool:
    """Whether `expert_logits` computes exactly what the loop does for these experts.

    True for ResNet18s with identical parameter shapes whose BatchNorms all use running
    statistics with a fixed momentum (the default): then one momentum and eps serve all.
    """
    if not experts or not all(type(f) is ResNet18 for f in experts):
        return False
    shapes = [{k: v.shape for k, v in f.state_dict().items()} for f in experts]
    if any(s != shapes[0] for s in shapes):
        return False
    bns = [m for f in experts for m in f.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    settings = {_bn_settings(m) for m in bns}
    return len(settings) == 1 and all(m.momentum is not None and m.affine and m.track_running_stats
                                      for m in bns)
