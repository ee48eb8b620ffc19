"""Independent parts of an evaluation, run side by side in worker processes.

Every part is a function of the model, the data and its own seed only (attacks derive their
seeds from their names, dwf.runtime.derive_seed), so its result does not depend on which
process ran it or when: `run` with several workers returns what running the parts one after
another in this process returns, bit for bit, at the same thread count per process
(tests/test_workers.py). That is why the parts, not the threads, are parallel: a CPU result
depends on the thread count (params `cpu_threads`), never on the number of workers.

Workers are forked: they share the model and data with this process and send back only their
results. Fork is unsafe once CUDA is initialized, so `count` gives one worker on a GPU.

A worker that dies mid-part (kill -9, the OOM killer) ends `run` within moments with a one-line
WorkerDied: concurrent.futures notices the death, where a multiprocessing.Pool waits forever
for the part the worker held (issue 23). The parts finished before are the caller's to
keep (dwf.evaluate.Resume saves each one in the worker that ran it).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable

import torch


class WorkerDied(ValueError):
    """A worker process ended mid-run (kill -9, the OOM killer), losing its part. A ValueError so
    that the CLI's stages print it as one line and exit code 2 (dwf.cli.stage)."""


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


def _call(i: int) -> Any:
    return _PARTS[i].run()


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
            results = _in_workers(names, min(workers, len(names)), done)
        finally:
            _PARTS = []
    return {name: results[name] for name in parts}


def _in_workers(names: list[str], workers: int, done: Callable[[str], None] | None) -> dict[str, Any]:
    """_PARTS (named `names`) in `workers` forked processes, each result as it comes."""
    results: dict[str, Any] = {}
    # fork: the workers inherit _PARTS' closures (they do not pickle) and the model, uncopied
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start, initargs=(torch.get_num_threads(),))
    try:
        futures = {pool.submit(_call, i): name for i, name in enumerate(names)}  # the first forks all
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if done:
                done(futures[future])
    except BrokenProcessPool:  # the pool has already ended the other workers
        raise WorkerDied(f"a worker process died (killed, or out of memory?) with "
                         f"{len(results)} of {len(names)} parts finished") from None
    except BaseException:  # a part failed, or Ctrl-C: end the parts still running, not wait
        _terminate(pool)
        raise
    finally:
        pool.shutdown(cancel_futures=True)
    return results


def _terminate(pool: ProcessPoolExecutor) -> None:
    # what Pool's exit did and ProcessPoolExecutor.terminate_workers does from Python 3.14;
    # before it, the worker processes are only reachable through this attribute
    for process in list((pool._processes or {}).values()):
        process.terminate()
