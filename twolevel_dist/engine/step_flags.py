"""What every rank must know after each training step, read without stalling a GPU: whether the
loss was finite on every replica (the divergence guard), and whether any rank was asked to stop
(a signal: ``engine.stop``).

The two flags are all-reduced (max) over all ranks in one small collective, so every rank sees
the same values for the same step and all act at the same step.

Reading a value computed on a GPU blocks the host until the GPU has finished that step; read at
once every step, it would keep the host from queueing the next step's kernels while the GPU
works (a host sync per step). So on CUDA each step's flag is copied into pinned host memory
without blocking and read ``lag`` steps later, when that step has long finished. On CPUs there
is nothing to run ahead of: the flag is read at once, so a bad loss is caught before its
optimizer step. ``drain`` reads every flag posted so far; the loop calls it where it syncs
anyway (a log line, a checkpoint, the epoch's end), so nothing non-finite is ever checkpointed
or logged as a result.
"""

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

CUDA_LAG = 2       # steps between a step and the reading of its flag on CUDA


@dataclass(frozen=True)
class StepFlag:
    step: int
    nonfinite: bool      # the loss was NaN or infinite on some replica
    stop_signal: int     # the (largest) number of a stop signal some rank received, or 0


class StepFlags:
    """``post(step, loss, stop_signal)`` after each backward; ``due(step)`` gives the flags to act
    on now (this step's on CPUs, step - lag's on CUDA); ``drain()`` gives every flag not yet
    read. ``group``: the ranks that must agree (None: this process alone)."""

    def __init__(self, device: torch.device, group=None, lag: int | None = None):
        self.device, self.group = device, group
        self.lag = (CUDA_LAG if device.type == "cuda" else 0) if lag is None else lag
        self._pending: deque = deque()        # (step, host tensor, CUDA event or None)

    def post(self, step: int, loss: torch.Tensor, stop_signal: int = 0) -> None:
        flag = torch.zeros(2, dtype=torch.float32, device=loss.device)
        flag[0] = (~torch.isfinite(loss.detach())).any()      # on the device: no sync
        if stop_signal:
            flag[1] = stop_signal                             # a fill from the host: no sync
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        event = None
        if self.device.type == "cuda":
            host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        self._pending.append((step, flag, event))

    def due(self, step: int) -> list[StepFlag]:
        """The flags of the steps up to ``step - lag`` not read yet."""
        return self._read(lambda posted: posted <= step - self.lag)

    def drain(self) -> list[StepFlag]:
        """Every flag not read yet (waits for the device)."""
        return self._read(lambda posted: True)

    def _read(self, ready) -> list[StepFlag]:
        out = []
        while self._pending and ready(self._pending[0][0]):
            step, flag, event = self._pending.popleft()
            if event is not None:
                event.synchronize()
            nonfinite, stop_signal = flag.tolist()
            out.append(StepFlag(step=step, nonfinite=nonfinite > 0, stop_signal=int(stop_signal)))
        return out
