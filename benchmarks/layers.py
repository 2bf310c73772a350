"""Microbenchmarks of one layer (forward + backward, median of repetitions):

  rank       one rank's GC-2L layer (the engine's ShardedTwoLevelConv2d, its all-gather replaced
             by a local stand-in) against GC's local convolution alone (C_out/N filters): the
             coarse level's compute overhead per rank, for the "fused" convolution of C_out/N + 1
             filters, the same padded to a multiple of 8 filters ("fused_pad8"), the "taps" path
             (local convolution + representatives by kernel taps), and the overlap path (taps,
             the all-gather started before the local convolution).
  device     single-device group convolution (groups=N) and GC-2L against SC.
Each in NCHW and channels_last; fp32, plus bf16 where a GPU is present.

  python benchmarks/layers.py --channels 256 --size 16 --batch 32 --groups 2 4 8
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_output_options,
    at_least,
    available_device,
    default_device,
    median,
    output_stem,
    run_cli,
    time_steps,
    write_results,
)

from twolevel_dist.engine.device import configure_backends, synchronize  # noqa: E402
from twolevel_dist.layers import make_conv, to_layout  # noqa: E402
from twolevel_dist.parallel.sharded import (
    ShardedTwoLevelConv2d,  # noqa: E402
    coarse_exchange,  # noqa: E402
)
from twolevel_dist.parallel.simulated import SimulatedGroup  # noqa: E402


def _fwd_bwd(fn, x, params):
    def step():
        for p in params:
            p.grad = None
        x.grad = None
        fn(x).sum().backward()
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=at_least(1), default=256)
    parser.add_argument("--size", type=at_least(1), default=16)
    parser.add_argument("--batch", type=at_least(1), default=32)
    parser.add_argument("--kernel", type=at_least(1), default=3)
    parser.add_argument("--groups", type=at_least(1), nargs="+", default=[2, 4, 8])
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--reps", type=at_least(1), default=7)
    parser.add_argument("--device", default=None, type=available_device,
                        help="default: the GPU if there is one")
    add_output_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    configure_backends(device)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])

    def sync():
        synchronize(device)
    c, k, rows = args.channels, args.kernel, []

    def timed(step):
        return median(time_steps(step, args.warmup, args.reps, sync)) * 1e3

    for dtype in dtypes:
        for layout in (torch.contiguous_format, torch.channels_last):
            def tensor(*shape, grad=True):
                t = torch.randn(*shape, device=device, dtype=dtype)
                t = t.to(memory_format=layout) if t.dim() == 4 else t
                return t.requires_grad_(grad)
            for n in args.groups:
                g = c // n
                x_rank = tensor(args.batch, c // n, args.size, args.size)
                w_local = tensor(g, c // n, k, k)
                local = timed(_fwd_bwd(lambda x: F.conv2d(x, w_local, padding=k // 2), x_rank,
                                       [w_local]))
                rank_ms = {}
                for path, impl, overlap in (("fused", "fused", False), ("taps", "taps", False),
                                            ("overlap", "taps", True)):
                    rank = ShardedTwoLevelConv2d(tensor(1, g + 1, c // n, k, k, grad=False),
                                                 tensor(g, n, grad=False), 1, k // 2,
                                                 SimulatedGroup(n), overlap=overlap, impl=impl)
                    rank_ms[path] = timed(_fwd_bwd(rank, x_rank, list(rank.parameters())))
                # The fused convolution with its filter count padded to a multiple of 8 (zero
                # filters whose outputs are dropped), the shape tensor cores favour.
                w_pad, coarse = tensor(-(-(g + 1) // 8) * 8, c // n, k, k), tensor(g, n)
                rank_ms["fused_pad8"] = timed(_fwd_bwd(
                    lambda x: coarse_exchange(F.conv2d(x, w_pad, padding=k // 2)[:, : g + 1],
                                              coarse, SimulatedGroup(n)), x_rank, [w_pad, coarse]))
                x_full = tensor(args.batch, c, args.size, args.size)
                modules = {kind: to_layout(make_conv(kind, c, c, k, 1, 1 if kind == "sc" else n)
                                           .to(device=device, dtype=dtype), layout)
                           for kind in ("sc", "gc", "gc2l")}
                device_ms = {kind: timed(_fwd_bwd(m, x_full, list(m.parameters())))
                             for kind, m in modules.items()}
                rows.append(dict(
                    dtype=str(dtype).replace("torch.", ""),
                    layout="channels_last" if layout is torch.channels_last else "NCHW",
                    N=n, rank_gc_local_ms=local, rank_gc2l_fused_ms=rank_ms["fused"],
                    rank_gc2l_taps_ms=rank_ms["taps"],
                    rank_gc2l_overlap_ms=rank_ms["overlap"],
                    rank_gc2l_fused_pad8_ms=rank_ms["fused_pad8"],
                    rank_fused_overhead=rank_ms["fused"] / local - 1,
                    rank_taps_overhead=rank_ms["taps"] / local - 1,
                    device_sc_ms=device_ms["sc"], device_gc_ms=device_ms["gc"],
                    device_gc2l_ms=device_ms["gc2l"],
                    device_gc_speedup_vs_sc=device_ms["sc"] / device_ms["gc"]))
                print(rows[-1], flush=True)
    stem = output_stem(args, f"layers_c{c}_s{args.size}_{device.type}")
    write_results(stem, rows, f"One layer, forward+backward: C={c}, {args.size}x{args.size}, "
                  f"batch {args.batch}, k={k}",
                  "python benchmarks/layers.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  f"{args.threads} thread(s). rank_*: one rank's convolution on its C/N input "
                  "channels; device_*: the single-device layer on all C channels.")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
