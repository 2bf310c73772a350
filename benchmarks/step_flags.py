"""What the per-step flags cost (``twolevel_dist.engine.step_flags``: the divergence guard and the
stop request, one all-reduce of two numbers over all ranks after each backward): the training
step of one GC-2L shard with and without them, on real ranks, interleaved, medians.

  python benchmarks/step_flags.py --ranks 2 --reps 15

On CPU ranks (gloo) the flags are read at once: their all-reduce is the whole cost. On GPUs
they are read two steps later, so that the host never waits for the device; run it there too
(``--device cuda`` with one rank per GPU) to see that cost.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_output_options, median, output_stem, write_results  # noqa: E402

from twolevel_dist.engine.step_flags import StepFlags  # noqa: E402
from twolevel_dist.models import build_model  # noqa: E402
from twolevel_dist.parallel import init_distributed, init_mesh, parallelize  # noqa: E402


def _timed_step(model, optimizer, images, labels, flags, step, device) -> float:
    dist.barrier()
    began = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    if flags is not None:
        flags.post(step, loss)
        flags.due(step)
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def rank_main(args) -> None:
    torch.set_num_threads(args.threads)
    device = init_distributed()
    mesh = init_mesh(dist.get_world_size())
    torch.manual_seed(0)
    model = parallelize(build_model("wrn", conv="gc2l", groups=dist.get_world_size(),
                                    depth=args.depth, widen=args.widen), mesh, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    flags = StepFlags(device, dist.group.WORLD)
    times = {"without": [], "with": []}
    for rep in range(args.warmup + args.reps):
        # Interleaved, in alternating order: drift and warm caches favour neither.
        for name in (("without", "with") if rep % 2 else ("with", "without")):
            seconds = _timed_step(model, optimizer, images, labels,
                                  flags if name == "with" else None, rep, device)
            if rep >= args.warmup:
                times[name].append(seconds)
    flags.drain()
    slowest = {}
    for name, values in times.items():          # the slowest rank's time, per repetition
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        slowest[name] = tensor.tolist()
    if dist.get_rank() == 0:
        without, with_flags = median(slowest["without"]), median(slowest["with"])
        row = dict(ranks=dist.get_world_size(), model=f"wrn-{args.depth}-{args.widen} gc2l shard",
                   batch=args.batch, device=device.type, reps=args.reps,
                   step_without_flags_ms=round(without * 1e3, 2),
                   step_with_flags_ms=round(with_flags * 1e3, 2),
                   flags_cost_ms=round((with_flags - without) * 1e3, 3),
                   flags_share=round(with_flags / without - 1, 4))
        stem = output_stem(args, f"step_flags_N{dist.get_world_size()}_{device.type}")
        write_results(stem, [row], "The per-step flags' cost",
                      "python benchmarks/step_flags.py " + " ".join(args.argv),
                      f"{args.threads} thread(s) per rank; every rep: one step without the "
                      f"flags and one with, in alternating order, barrier-synchronised; "
                      f"medians of the slowest rank's times.")
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--widen", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    add_output_options(parser)
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--rank-main"]
    if args.rank_main:
        rank_main(args)
        return 0
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={args.ranks}", __file__, "--rank-main",
                           *args.argv], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}).returncode


if __name__ == "__main__":
    raise SystemExit(main())
