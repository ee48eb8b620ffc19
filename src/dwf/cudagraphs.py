"""PGD iterations replayed from a captured CUDA graph (docs/performance.md).

One PGD iteration (forward, input gradient, signed step, projection) has fixed shapes and no
host synchronization, so it captures whole. Training crafts PGD on drop-last batches of one
shape with one budget, so a single capture per (model, shape, budget) serves every batch: the
iteration is replayed k times instead of launching its ~100 kernels per expert each time. On an
H200 this measured 1.8x per iteration for one bf16 ResNet-18 loop (launch-bound), 1.08x for the
grouped nine-expert mixture.

Parameters, BatchNorm statistics and the batch are read from their storage at replay, so
in-place optimizer updates between calls are seen; a model moved or converted drops its
graphs. Eval mode only: crafting in train mode (`attack_bn: train`) stays eager.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch
from torch import nn

Iteration = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# model -> (its storage token, {key: captured graph}); entries go with their model (a graph
# holds no reference to it)
_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, tuple[int, dict]]" = weakref.WeakKeyDictionary()
# torch captures one graph at a time per process; threads training side by side take turns
_CAPTURE = threading.Lock()


class CapturedIteration:
    """One PGD iteration `x_adv <- iteration(x_adv, x, y)` captured on static buffers."""

    def __init__(self, iteration: Iteration, x: torch.Tensor, y: torch.Tensor, autocast_dtype):
        self.x, self.y, self.x_adv = x.clone(), y.clone(), x.clone()

        def step():
            # autocast's weight cache must be off while capturing (torch.cuda.graph docs)
            with torch.autocast("cuda", dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None, cache_enabled=False):
                nxt = iteration(self.x_adv, self.x, self.y)
            self.x_adv.copy_(nxt)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with _CAPTURE, torch.cuda.stream(side):
            for _ in range(2):  # warm up outside capture: allocator, cuDNN plans
                step()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads may keep launching work meanwhile
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                step()
        torch.cuda.current_stream().wait_stream(side)

    def run(self, start: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
        self.x.copy_(x)
        self.y.copy_(y)
        self.x_adv.copy_(start)
        for _ in range(steps):
            self.graph.replay()
        return self.x_adv.clone()


def _autocast_dtype() -> torch.dtype | None:
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def replay(model: nn.Module, iteration: Iteration, key: tuple, start: torch.Tensor,
           x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` iterations from `start`, replayed from the graph cached for (model, key, shapes).

    The model must be in eval mode throughout (no BatchNorm statistics to update: the warm-up
    passes would update them twice more than eager PGD does).

    Args:
        model: owner of the cache entry (the network `iteration` calls).
        iteration: (x_adv, x, y) -> next x_adv; a pure function of its inputs and the model.
        key: what else the iteration depends on (budget, loss ...).
    """
    if model.training:  # crafting switches the whole tree (train.crafting), so the root says
        raise ValueError("CUDA-graph PGD needs the model in eval mode")
    # the storage the graphs read: `.to()` moves every tensor, the first parameter included,
    # and then every graph of this model is stale (a pointer per call, not one per tensor)
    token = next(model.parameters()).data_ptr()
    if model not in _GRAPHS or _GRAPHS[model][0] != token:
        _GRAPHS[model] = (token, {})
    graphs = _GRAPHS[model][1]
    route = model.capture_key(x) if hasattr(model, "capture_key") else None  # e.g. grouped or loop
    full = (key, tuple(x.shape), x.dtype, x.stride(), tuple(y.shape), y.dtype, x.device,
            _autocast_dtype(), route)
    if full not in graphs:
        graphs[full] = CapturedIteration(iteration, x, y, _autocast_dtype())
    return graphs[full].run(start, x, y, steps)
