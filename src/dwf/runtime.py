"""Device choice, determinism switches and seed derivation, in one place."""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or the device asked for); ValueError (the CLI's one line, exit 2) for
    a name torch does not know or a CUDA device this machine does not have."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device {requested}: not a device name (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {requested}: no CUDA device on this machine")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {requested}: this machine has {count} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {requested}: dwf runs on cpu or cuda")
    return dev


def configure_determinism() -> None:
    """Everything PyTorch needs for bit-reproducible runs (CPU and CUDA).

    CUBLAS_WORKSPACE_CONFIG must be set before the first cuBLAS call, so the CLI calls this
    before touching CUDA; the Dockerfile sets it too.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    # deterministic mode also fills every fresh allocation with NaN (a debugging aid: ~13% of a
    # CPU attack step); nothing here reads uninitialized memory, so results do not change
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def memory_format(device: torch.device, precision: str) -> torch.memory_format:
    """The memory format training uses (a layout; on CUDA it also routes the mixture to the
    grouped experts, models.moe.BATCHING: the same function up to float rounding).

    NHWC for bf16 on CUDA, where cuDNN's NHWC kernels are faster and make the grouped experts
    beat the loop (models.moe.BATCHING); NCHW otherwise: in fp32 on an H200 the NCHW loop
    measured fastest, and oneDNN on CPU gains nothing measurable (docs/performance.md).
    """
    if device.type == "cuda" and precision == "bf16":
        return torch.channels_last
    return torch.contiguous_format


def autocast(precision: str, device: torch.device):
    """The arithmetic of a training step: "fp32" (a no-op) or "bf16" autocast.

    Under bf16 the experts' inner convolutions run in bfloat16; what must stay exact stays fp32
    by construction: the images and their perturbation (fp32 tensors, elementwise updates),
    each expert's stem and final linear layer (`models.resnet`, `models.batched`), the whole
    gate and the mixing (`models.moe`), hence the logits and every loss.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def derive_seed(base: int, *keys: int | str) -> int:
    """A 31-bit seed for (base, run, role ...): distinct streams, stable across machines."""
    spawn = tuple(k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys)
    ss = np.random.SeedSequence(entropy=base, spawn_key=spawn)
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def choice(options, generator: torch.Generator):
    """One element of `options`, drawn uniformly with a torch generator (so it is checkpointed)."""
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def draw_seed(rng: torch.Generator) -> int:
    """A seed for an attack's random start, drawn from the (checkpointed) training generator."""
    return int(torch.randint(2**31 - 1, (1,), generator=rng))
