"""A short demo of a GC-2L WideResNet: on one process, or sharded one group per rank.

    python -m twolevel_dist.demo
    torchrun --standalone --nproc_per_node=4 -m twolevel_dist.demo

Under torchrun, every rank owns one group (groups = world size unless --groups is given, with
data-parallel replicas for the rest); it takes a few SGD steps on a fixed random batch and prints
the loss, the parameters held by each rank and the collectives of one step.
"""

import argparse
import os

import torch
import torch.nn.functional as F

from twolevel_dist.engine.device import clock
from twolevel_dist.models import build_model, count_parameters
from twolevel_dist.parallel import local_device
from twolevel_dist.params import format_markdown, paper_table


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=None,
                        help="groups N (default: the world size under torchrun, else 2)")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--widen", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="images per model replica")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="overlap each all-gather with the local convolution (default: by "
                             "device, on for CPUs, off for GPUs)")
    return parser.parse_args(argv)


def _batch(size, device):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(size, 3, 32, 32, generator=generator).to(device),
            torch.randint(0, 10, (size,), generator=generator).to(device))


def main(argv=None) -> int:
    args = _parse(argv)
    distributed = "WORLD_SIZE" in os.environ
    torch.manual_seed(0)
    if not distributed:
        device = local_device()
        model = build_model("wrn", conv="gc2l", groups=args.groups or 2, depth=args.depth,
                            widen=args.widen).to(device)
        images, labels = _batch(args.batch, device)
        start = clock(device)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        print(f"WRN-{args.depth}-{args.widen}, GC-2L, N={args.groups or 2} on {device}: "
              f"{count_parameters(model):,} parameters; forward+backward of {args.batch} images "
              f"in {clock(device) - start:.2f} s, loss {loss.item():.3f}\n")
        print(format_markdown(paper_table()))
        return 0

    import torch.distributed as dist

    from twolevel_dist.parallel import (
        all_reduce_values,
        count_collectives,
        init_distributed,
        init_mesh,
        parallelize,
    )
    device = init_distributed()
    world = dist.get_world_size()
    groups = args.groups or world
    mesh = init_mesh(groups)
    single = build_model("wrn", conv="gc2l", groups=groups, depth=args.depth, widen=args.widen)
    total = count_parameters(single)
    model = parallelize(single, mesh, overlap=args.overlap, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = _batch(args.batch * mesh["dp"].size(), device)
    images = images.chunk(mesh["dp"].size())[mesh["dp"].get_local_rank()]
    labels = labels.chunk(mesh["dp"].size())[mesh["dp"].get_local_rank()]
    rank = dist.get_rank()
    for step in range(args.steps):
        start = clock(device)
        with count_collectives() as comm:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
        elapsed = clock(device) - start
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}  {elapsed:.2f} s")
    # Each rank's parameter count in its own slot, summed: every rank's count on every rank.
    counts = [0.0] * world
    counts[rank] = sum(p.numel() for p in model.parameters())
    gathered = all_reduce_values(counts, device=device, group=dist.group.WORLD).tolist()
    if rank == 0:
        print(f"WRN-{args.depth}-{args.widen}, GC-2L, N={groups} on {world} ranks "
              f"(dp={mesh['dp'].size()} x gp={groups}): {total:,} parameters in all, per rank "
              f"{[int(t) for t in gathered]}")
        calls = ", ".join(f"{k}={v}" for k, v in comm.as_dict().items())
        print(f"collectives in one step (gp group): {calls}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
