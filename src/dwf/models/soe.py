"""Synergy-of-Experts (Cui et al., NeurIPS 2022): sub-models that each say how sure they are.

Every sub-model i is a ResNet-18 with, besides its classifier z_i, a confidence head a_i (one
logit) on the same pooled features (the official code's "simple" head). Its *rectified
confidence* is r_i = max_k softmax(z_i)_k * sigmoid(a_i); the sub-model with the highest r_i
answers alone. The selection is hard (argmax, no gradient), so white-box gradients flow only
through the answering sub-model: the evaluation attacks it through `route` with the argmax
relaxed to a softmax of log r (dwf.adaptive.relaxed_pgd).
"""

from __future__ import annotations

import torch
from torch import nn

from dwf.models import resnet
from dwf.models.moe import Gate
from dwf.models.resnet import ResNet18


class SoE(nn.Module):
    """Hard-selected ensemble of ResNet-18 sub-models with confidence heads.

    `forward` returns the selected sub-model's logits (N, C); `gate_weights` exposes the
    selection as one-hot weights (N, M) so that forward == sum_i w_i * expert_logits_i.

    Args:
        n_submodels: M, the number of sub-models (official code: 3).
        num_classes, width, mean, std, in_channels: ResNet18 arguments shared by every sub-model.
    """

    def __init__(self, n_submodels: int = 3, num_classes: int = 10, width: int = 64,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 in_channels: int = 3):
        super().__init__()
        self.submodels = nn.ModuleList(
            ResNet18(num_classes, width, mean, std, in_channels) for _ in range(n_submodels))
        self.confidence = nn.ModuleList(nn.Linear(8 * width, 1) for _ in range(n_submodels))

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sub-model's class logits (N, M, C) and confidence logits (N, M)."""
        logits, aux = [], []
        for net, conf in zip(self.submodels, self.confidence):
            h = net.features(x)  # (N, 8w), shared by both heads
            logits.append(resnet.head(net.linear, h))  # fp32 under bf16 autocast, as ResNet18
            aux.append(resnet.head(conf, h).squeeze(1))
        return torch.stack(logits, 1), torch.stack(aux, 1)

    @staticmethod
    def rectified_confidence(logits: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """r = max softmax(z) * sigmoid(a), shape (N, M)."""
        return logits.softmax(-1).amax(-1) * torch.sigmoid(aux)

    @staticmethod
    def mix(logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_i w_i z_i, (N, C): a masked sum, not gather/indexing (deterministic backward on
        CUDA)."""
        return (w[:, :, None] * logits).sum(1)

    @staticmethod
    def select(logits: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) of the sub-model with the highest rectified confidence."""
        return SoE.mix(logits, nn.functional.one_hot(r.detach().argmax(1), logits.shape[1]).to(logits.dtype))

    hard_routing = True  # the argmax has no gradient: attacks relax it (mixture interface)

    def route(self, x: torch.Tensor, gate: Gate) -> torch.Tensor:
        """Logits (N, C) mixed by gate(log r) in place of the argmax of r (the mixture
        interface: attacks that replace the routing decision)."""
        logits, aux = self.outputs(x)
        return self.mix(logits, gate(self.rectified_confidence(logits, aux).log()))  # log: monotone

    @property
    def n_experts(self) -> int:
        return len(self.submodels)

    def expert(self, i: int) -> nn.Module:
        """Sub-model i alone, as a classifier on [0, 1] images (the mixture interface, evaluate)."""
        return self.submodels[i]

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every sub-model's logits, shape (N, M, C)."""
        return self.outputs(x)[0]

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The hard selection as one-hot weights, shape (N, M) (for analysis, no gradient)."""
        logits, aux = self.outputs(x)
        best = self.rectified_confidence(logits, aux).argmax(1)
        return nn.functional.one_hot(best, len(self.submodels)).to(logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, aux = self.outputs(x)
        return self.select(logits, self.rectified_confidence(logits, aux))  # (N, C)
