"""What depends on the device, decided in one place: mixed precision, the CUDA libraries'
settings, synchronised timing and the RNG state a checkpoint must keep.

Defaults by device (README, "Defaults by device"):
- ``train.amp`` unset: bf16 autocast on GPUs (tensor cores, half the activation memory; BN and
  the loss stay float32), float32 on CPUs (CPU bf16 autocast is slower on most CPUs).
- On GPUs ``cudnn.benchmark`` (every step has the same shapes, so the autotuned convolution
  algorithm is chosen once) and TF32 matrix products and convolutions (``train.tf32``).
- GC-2L's path: ``parallel.sharded.resolve_overlap`` and ``layers.two_level.resolve_impl``.
"""

import contextlib
import time

import torch


def resolve_amp(amp: bool | None, device: torch.device) -> bool:
    """``train.amp``: None (the default) means bf16 autocast on GPUs only."""
    return device.type == "cuda" if amp is None else amp


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on ``device`` when ``amp`` (a resolved bool), else nothing."""
    if amp:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_backends(device: torch.device, tf32: bool = True) -> None:
    """The CUDA libraries' settings for training on ``device`` (nothing on a CPU)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it measures that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished what was queued before."""
    synchronize(device)
    return time.perf_counter()


def peak_memory_bytes(device: torch.device) -> int | None:
    """The most memory the caching allocator has held for tensors on this GPU so far; None off
    GPUs, where there is no such counter."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def rng_state(device: torch.device) -> dict:
    """The random-number state a resumed run needs to continue exactly: the CPU generator's and,
    on a GPU, the device's (dropout masks are drawn there)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device: torch.device) -> None:
    """Restore ``rng_state``'s result (or a CPU state tensor, as older checkpoints hold)."""
    if isinstance(state, torch.Tensor):
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
