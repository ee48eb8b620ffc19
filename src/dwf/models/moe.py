"""The paper's soft-gated mixture: y = sum_i w_i(x) f_i(x) (eq. 1) with an MLP router (eq. 2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dwf.models import batched
from dwf.models.resnet import Normalize, check_channels

# A routing decision: the router's scores (N, E) -> the weights the experts are mixed with (N, E)
Gate = Callable[[torch.Tensor], torch.Tensor]


class Router(nn.Module):
    """Gate of section 4: flatten -> 1024 -> ReLU -> 512 -> ReLU -> 128 -> ReLU -> n -> softmax.

    Args:
        in_features: flattened input size C * H * W (3 * 32 * 32; digits 1 * 8 * 8).
        n_experts: number of gate outputs.
        hidden: hidden layer sizes (the paper's 1024, 512, 128).
    """

    def __init__(self, in_features: int, n_experts: int, hidden: Sequence[int] = (1024, 512, 128)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(in_features, h), nn.ReLU()]
            in_features = h
        layers.append(nn.Linear(in_features, n_experts))
        self.scores = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's scores before the softmax, (N, E)."""
        # fp32 under bf16 autocast too: cheap, and its first layer on the image is a second
        # path of the attacks' input gradient (besides the experts' stems)
        with torch.autocast(x.device.type, enabled=False):
            return self.scores(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)  # (N, E), rows sum to 1


# Where the grouped-convolution path is faster than the expert loop, by device type
# (docs/performance.md): "always", "never", or "channels_last" (NHWC inputs only). CPU, width
# 8: 1.8-1.9x per PGD step. H200, width 64: NHWC grouped 1.2-2.1x the loop in bf16, NCHW
# grouped 0.65-0.8x in fp32 (where the NCHW loop is fastest); training picks NHWC exactly
# for bf16 on CUDA (runtime.memory_format).
BATCHING = {"cpu": "always", "cuda": "channels_last"}


def batch_here(x: torch.Tensor, batching: dict[str, str] = BATCHING) -> bool:
    """Whether the experts should run batched on input x under a policy like BATCHING."""
    mode = batching.get(x.device.type, "never")
    return mode == "always" or (mode == "channels_last"
                                and x.is_contiguous(memory_format=torch.channels_last))


class SoftMoE(nn.Module):
    """Soft mixture of experts: every expert runs, logits are mixed by the router's weights.

    The router sees the same normalized image as the experts. `forward` returns only the
    mixed logits, so any attack library can use the model as a plain classifier; the gate
    is exposed through `gate_weights` and `expert_logits` for analysis and gate-aware attacks.
    When the experts share one ResNet18 architecture they run as one batched computation where
    that measured faster (`batch_here`; models/batched.py); `batched = False` switches to the
    expert loop, the reference it is tested against. Either way the parameters live in the
    experts (`experts.{i}.*`).

    Args:
        experts: classifiers taking [0, 1] images and returning (N, C) logits.
        mean, std: statistics for the router's input normalization.
        router_hidden: the router's hidden sizes.
        input_shape: (C, H, W) of the images (data.SHAPE): the router flattens C * H * W.
    """

    def __init__(self, experts: Sequence[nn.Module], mean: tuple[float, ...], std: tuple[float, ...],
                 router_hidden: Sequence[int] = (1024, 512, 128),
                 input_shape: Sequence[int] = (3, 32, 32)):
        super().__init__()
        check_channels(mean, std, input_shape[0])
        self.experts = nn.ModuleList(experts)
        self.normalize = Normalize(mean, std)
        c, h, w = input_shape
        self.router = Router(c * h * w, len(self.experts), router_hidden)
        self.batched = batched.batchable(self.experts)  # plain attributes: not in checkpoints
        self.batching = BATCHING  # where to batch, by device (the shared default; bench overrides)

    hard_routing = False  # w(x) is a softmax: gradient attacks already see through the gate

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights w(x), shape (N, E)."""
        return self.router(self.normalize(x))

    def route(self, x: torch.Tensor, gate: Gate) -> torch.Tensor:
        """Logits (N, C) with weights gate(s) in place of softmax(s), s the router's scores
        (the mixture interface: attacks that replace the routing decision)."""
        w, f = gate(self.router.logits(self.normalize(x))), self.expert_logits(x)  # (N, E), (N, E, C)
        with torch.autocast(x.device.type, enabled=False):  # mixing stays fp32 under bf16
            return torch.einsum("ne,nec->nc", w, f)  # (N, C)

    def capture_key(self, x: torch.Tensor) -> bool:
        """What a CUDA graph of this model depends on beyond its storage: the path x takes."""
        return bool(self.batched and batch_here(x, self.batching))

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def expert(self, i: int) -> nn.Module:
        """Expert i alone, as a classifier on [0, 1] images (the mixture interface, evaluate)."""
        return self.experts[i]

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's logits f_i(x), shape (N, E, C)."""
        if self.capture_key(x):
            return batched.expert_logits(self.experts, x)
        return torch.stack([f(x) for f in self.experts], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x, lambda s: torch.softmax(s, dim=-1))  # (N, C), eq. 1


# Ablation (a) of issue 22, on DWF's trained weights: the routing decision replaced, experts
# and router untouched. Name -> (scores (N, E) -> weights (N, E), whether it routes hard).
ROUTINGS: dict[str, tuple[Gate, bool]] = {
    # no gate: the plain average of the experts' logits
    "uniform": (lambda s: torch.full_like(s, 1.0 / s.shape[-1]), False),
    # each image to the one expert its gate weighs most: an argmax, no useful gradient
    "top1": (lambda s: nn.functional.one_hot(s.argmax(-1), s.shape[-1]).to(s.dtype), True),
}


class RoutedMoE(nn.Module):
    """A trained SoftMoE whose softmax gate is replaced by another routing decision (ROUTINGS).

    The mixture interface is the SoftMoE's, with the new decision in `forward` and
    `gate_weights`; `route(x, gate)` still takes any decision, so the router-relaxation attack
    (dwf.adaptive.relaxed_pgd) reaches through a hard one (`hard_routing`).

    Args:
        mixture: the trained mixture (its weights are this model's, under `mixture.`).
        routing: a name in ROUTINGS.
    """

    def __init__(self, mixture: SoftMoE, routing: str):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
        self.mixture, self.routing = mixture, routing
        self.decide, self.hard_routing = ROUTINGS[routing]

    @property
    def n_experts(self) -> int:
        return self.mixture.n_experts

    def expert(self, i: int) -> nn.Module:
        return self.mixture.expert(i)

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixture.expert_logits(x)  # (N, E, C)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The weights this routing gives, (N, E)."""
        return self.decide(self.mixture.router.logits(self.mixture.normalize(x)))

    def route(self, x: torch.Tensor, gate: Gate) -> torch.Tensor:
        return self.mixture.route(x, gate)

    def capture_key(self, x: torch.Tensor) -> bool:
        return self.mixture.capture_key(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixture.route(x, self.decide)  # (N, C)
