"""Bytes and collective counts of one training step for each scheme at each N, from the
engine's own counters (one rank's shard, per-rank simulation), cross-checked against the closed
form of twolevel_dist/parallel/comm_model.py.

  python benchmarks/comm.py --model wrn28_10 --groups 2 4 8 16 --batch 128
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
    model_from_config,
    output_stem,
    run_cli,
    write_results,
)

from twolevel_dist.parallel import count_collectives, parallelize  # noqa: E402
from twolevel_dist.parallel.comm_model import expected_comm  # noqa: E402
from twolevel_dist.parallel.simulated import simulated_mesh  # noqa: E402


def measure(model_name, conv, n, batch, image_size=32):
    groups = 1 if conv == "sc" else n
    expected_calls, expected_bytes = expected_comm(
        model_from_config(model_name, conv, groups), n, batch, image_size, num_classes=10)
    shard = parallelize(model_from_config(model_name, conv, groups), simulated_mesh(n))
    with count_collectives() as stats:
        logits = shard(torch.randn(batch, 3, image_size, image_size))
        F.cross_entropy(logits, torch.randint(0, 10, (batch,))).backward()
    return dict(stats.calls), dict(stats.bytes), expected_calls, expected_bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wrn16_4")
    parser.add_argument("--groups", type=at_least(2), nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--batch", type=at_least(1), default=32)
    parser.add_argument("--convs", nargs="+", default=["gc2l", "gc", "sc", "shuffle"])
    add_output_options(parser)
    args = parser.parse_args(argv)
    rows = []
    with torch.device("cpu"):
        for n in args.groups:
            for conv in args.convs:
                try:
                    calls, nbytes, e_calls, e_bytes = measure(args.model, conv, n, args.batch)
                except ValueError as error:
                    print(f"skip {conv} N={n}: {error}", file=sys.stderr)
                    continue
                rows.append(dict(
                    model=args.model, scheme="sc split" if conv == "sc" else conv, N=n,
                    batch=args.batch,
                    all_gather=calls.get("all_gather", 0),
                    reduce_scatter=calls.get("reduce_scatter", 0),
                    all_to_all=calls.get("all_to_all", 0), all_reduce=calls.get("all_reduce", 0),
                    MB_per_step=sum(nbytes.values()) / 1e6,
                    matches_closed_form=(calls == e_calls and nbytes == e_bytes)))
    if not all(r["matches_closed_form"] for r in rows):
        print("error: the engine's counters differ from the closed form", file=sys.stderr)
    stem = output_stem(args, f"comm_{args.model}")
    write_results(stem, rows, f"Communication per training step: {args.model}, batch {args.batch}",
                  "python benchmarks/comm.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "MB: the full tensors of every collective (fp32); a ring moves (N-1)/N of each "
                  "per rank (twice for the all-reduce).")
    return 0 if all(r["matches_closed_form"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
