"""Independent parts of an evaluation, run side by side in worker processes.

Every part is a function of the model, the data and its own seed only (attacks derive their
seeds from their names, dwf.runtime.derive_seed), so its result does not depend on which
process ran it or when: `run` with several workers returns what running the parts one after
another in this process returns, bit for bit, at the same thread count per process
(tests/test_workers.py). That is why the parts, not the threads, are parallel: a CPU result
depends on the thread count (params `cpu_threads`), never on the number of workers.

Workers are forked: they share the model and data with this process and send back only their
results. Fork is unsafe once CUDA is initialized, so `count` gives one worker on a GPU.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch


def _any(result: Any) -> bool:
    return True


@dataclass(frozen=True)
class Part:
    """One independent piece of work: `run()` -> its result; `cost`, in attack iterations
    through the model, orders the parts longest first; `valid(result)` says whether a result
    (one read back from disk, say) is of the kind `run` returns."""
    cost: float
    run: Callable[[], Any]
    valid: Callable[[Any], bool] = _any


_PARTS: list[Part] = []  # set before the pool forks: the workers inherit the closures


def _start(threads: int) -> None:
    torch.set_num_threads(threads)


def _call(i: int) -> tuple[int, Any]:
    return i, _PARTS[i].run()


def count(device: torch.device, requested: int = 0) -> int:
    """Workers for an evaluation on `device`: `requested`, or (0) every CPU this process may
    use; 1 on a GPU."""
    if device.type != "cpu":
        return 1
    return requested or len(os.sched_getaffinity(0))


def run(parts: dict[str, Part], workers: int = 1, done: Callable[[str], None] | None = None
        ) -> dict[str, Any]:
    """Every part's result, by name, in the order of `parts`.

    Args:
        parts: name -> Part. workers: processes (1: in this process, in order).
        done: called with each part's name as it finishes (progress).
    """
    global _PARTS
    names = sorted(parts, key=lambda k: -parts[k].cost)  # longest first: the last to finish are short
    results: dict[str, Any] = {}
    if workers <= 1 or len(parts) <= 1:
        for name in names:
            results[name] = parts[name].run()
            if done:
                done(name)
    else:
        _PARTS = [parts[name] for name in names]
        try:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(min(workers, len(names)), initializer=_start,
                          initargs=(torch.get_num_threads(),)) as pool:
                for i, result in pool.imap_unordered(_call, range(len(names))):
                    results[names[i]] = result
                    if done:
                        done(names[i])
        finally:
            _PARTS = []
    return {name: results[name] for name in parts}
