"""The paper's parameter tables from the real models: total and per processor (rank), per
network and N, next to the paper's totals.

  python benchmarks/params.py [--update | --out STEM]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, output_stem, write_results  # noqa: E402

from twolevel_dist.models import build_model, count_parameters  # noqa: E402
from twolevel_dist.paper import NETWORKS, PAPER_PARAMS_M  # noqa: E402
from twolevel_dist.parallel import parallelize  # noqa: E402
from twolevel_dist.parallel.simulated import simulated_mesh  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_options(parser)
    args = parser.parse_args(argv)
    rows = []
    for (network, conv, n), paper in PAPER_PARAMS_M.items():
        name, kwargs, classes = NETWORKS[network]
        with torch.device("meta"):
            total = count_parameters(build_model(name, conv=conv, groups=n, num_classes=classes,
                                                 **kwargs))
            model = build_model(name, conv=conv, groups=n, num_classes=classes, **kwargs)
            shard = parallelize(model, simulated_mesh(n)) if n > 1 else model
            per_rank = sum(p.numel() for p in shard.parameters())
        rows.append(dict(network=network, conv=conv, N=n, total_M=total / 1e6,
                         paper_total_M=paper, per_processor_M=per_rank / 1e6,
                         total_over_N_M=total / n / 1e6))
    write_results(output_stem(args, "params"), rows,
                  "Parameters: total and per processor (one rank's shard)",
                  " ".join(["python benchmarks/params.py",
                            *(sys.argv[1:] if argv is None else argv)]),
                  "per_processor: parameters one rank holds (its groups' filters, its rows of "
                  "A0, its slices of stem, BN and head, plus the replicated head bias).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
