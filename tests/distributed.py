"""Run a function on N gloo ranks (torch.multiprocessing, a free port), collecting each rank's
return value. Public torch API only."""

import os
import socket
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from coarse_init import use_random_coarse_operator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    use_random_coarse_operator()           # as the parent's tests have it (coarse_init.py)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Rank 0 hosts the TCP store: no rank may leave while another still needs it.
        dist.barrier()
        open(_past_the_barrier(out_dir, rank), "w").close()
    finally:
        dist.destroy_process_group()


def _past_the_barrier(out_dir, rank) -> str:
    return os.path.join(out_dir, f"rank{rank}.done")


def run_on_ranks(world: int, fn, *args, backend: str = "gloo") -> list:
    """``fn(*args)`` on ``world`` freshly spawned ranks; returns the ranks' results in order.
    ``backend="cuda:gloo"`` serves CUDA tensors only: on one GPU it stands in for NCCL, under
    which a CPU tensor in a collective fails."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_entry, args=(world, free_port(), out_dir, fn, args, backend),
                     nprocs=world, join=True)
        except mp.ProcessExitedException as error:
            # Killed by a signal once every rank had its result saved and had passed the final
            # barrier: in torch's own teardown (destroy_process_group, the interpreter's exit),
            # not in ``fn``. Seen once with torch 2.11 (gloo, "terminate called without an
            # active exception", SIGABRT); the results stand, and the warning says it happened.
            if not all(os.path.exists(_past_the_barrier(out_dir, r)) for r in range(world)):
                raise
            warnings.warn(f"rank {error.error_index} died by {error.signal_name} in torch's "
                          f"teardown, after every rank's result was in: {error}")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]
