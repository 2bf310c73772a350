"""What GC-2L's per-layer exchange costs on the backend itself: the all-gather of the
representatives (forward) and the reduce-scatter of their gradients (backward), each through the
backend's own collective ("native") and as one all-to-all ("direct", the engine's choice on
gloo), at the sizes one rank's representative channel has (B x H x W floats).

Per call, on N real ranks (torchrun): the wall time alone, the wall time when it overlaps a
matrix product of --overlap-ms (as in the engine's overlap path), and the CPU time the backend's
own threads spend, which on a CPU rank comes out of the cores that compute.

  python benchmarks/transport.py --ranks 2 --kb 8 32 128 --bind-cores
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_output_options, output_stem, write_results  # noqa: E402

from twolevel_dist.parallel import all_reduce_values, set_transport, transport  # noqa: E402

OPS = ("all_gather", "reduce_scatter")
TRANSPORTS = ("native", "direct")


def _threads_cpu_ms(main_tid: int) -> float:
    """CPU time of this process's threads other than the main one (schedstat: nanoseconds)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != main_tid:
            try:
                total += int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):   # a thread that just ended
                pass
    return total / 1e6


def _call(op: str, tensor: torch.Tensor, group, async_op: bool):
    if op == "all_gather":
        return transport.all_gather_flat_buffer(tensor, group, async_op=async_op)[1]
    return transport.reduce_scatter_dim0(tensor, group, async_op=async_op)[1]


def _worker(args) -> None:
    import torch.distributed as dist

    from twolevel_dist.parallel import init_distributed
    torch.set_num_threads(1)
    if args.bind_cores:
        local = int(os.environ.get("LOCAL_RANK", 0))
        os.sched_setaffinity(0, {local % os.cpu_count()})
    device = init_distributed()
    world, main_tid = dist.get_world_size(), threading.get_native_id()
    group = dist.group.WORLD
    # A matrix product of about --overlap-ms on this core: the compute an exchange hides behind.
    a, b = torch.randn(256, 256, device=device), torch.randn(256, 256, device=device)
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    products = max(1, round(args.overlap_ms / ((time.perf_counter() - start) / 20 * 1e3)))
    rows = []
    for kb in args.kb:
        numel = kb * 1024 // 4
        for op in OPS:
            tensor = torch.randn((numel,) if op == "all_gather" else (world, numel), device=device)
            for transport_name in TRANSPORTS:
                set_transport(transport_name)
                measured = {}
                for mode in ("alone", "overlapped"):
                    walls, cpus = [], []
                    for _ in range(args.rounds):
                        for _ in range(args.warmup):
                            _call(op, tensor, group, False)
                        dist.barrier()
                        cpu0, wall0 = _threads_cpu_ms(main_tid), time.perf_counter()
                        for _ in range(args.reps):
                            if mode == "alone":
                                _call(op, tensor, group, False)
                            else:
                                work = _call(op, tensor, group, True)
                                for _ in range(products):
                                    a @ b
                                work.wait()
                        walls.append((time.perf_counter() - wall0) / args.reps * 1e3)
                        cpus.append((_threads_cpu_ms(main_tid) - cpu0) / args.reps)
                    measured[mode] = statistics.median(walls), statistics.median(cpus)
                result = all_reduce_values(                         # the slowest rank
                    [measured["alone"][0], measured["overlapped"][0], measured["alone"][1],
                     measured["overlapped"][1]], device=device, group=group, op="max")
                rows.append(dict(op=op, transport=transport_name, KB_per_rank=kb, N=world,
                                 wall_ms=result[0].item(), overlapped_wall_ms=result[1].item(),
                                 compute_ms=args.overlap_ms,
                                 backend_threads_cpu_ms=result[2].item(),
                                 overlapped_backend_threads_cpu_ms=result[3].item()))
    set_transport("auto")
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--kb", type=int, nargs="+", default=[8, 32, 128],
                        help="KB per rank (WRN-16-4 at batch 32: 128, 32, 8 by stage)")
    parser.add_argument("--overlap-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bind-cores", action="store_true",
                        help="pin rank r to core r, as scaling.py real --bind-cores")
    add_output_options(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if not 2 <= args.ranks:
        raise SystemExit("error: --ranks must be at least 2 (an exchange needs two ranks)")
    forwarded = [a for a in (sys.argv[1:] if argv is None else argv)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.ranks}", str(Path(__file__).resolve()), "--worker", *forwarded]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit("error: the transport benchmark's ranks failed")
    rows = json.loads(lines[-1][len("RESULT "):])
    for row in rows:
        print(json.dumps(row))
    stem = output_stem(args, f"transport_N{args.ranks}_cpu")
    write_results(stem, rows, f"GC-2L's exchange on the backend: {args.ranks} ranks",
                  "python benchmarks/transport.py " + " ".join(forwarded),
                  "Per call, the slowest rank's median over rounds. native: the backend's own "
                  "all-gather / reduce-scatter; direct: one all-to-all (plus a local sum for the "
                  "reduce-scatter), what the engine uses on gloo. backend_threads_cpu_ms: CPU "
                  "time of the backend's threads, taken from the cores that compute.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
