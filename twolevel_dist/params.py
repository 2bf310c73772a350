"""Print the paper's parameter tables from the real models, next to the paper's figures.

    python -m twolevel_dist.params

The models are built on the meta device: shapes only, no memory and no initialisation time.
"""

import argparse

import torch

from twolevel_dist.models import build_model, count_parameters
from twolevel_dist.paper import NETWORKS, PAPER_PARAMS_M, TOLERANCE_M


def count_millions(network: str, conv: str, groups: int, **overrides) -> float:
    name, kwargs, num_classes = NETWORKS[network]
    with torch.device("meta"):
        model = build_model(name, conv=conv, groups=groups, num_classes=num_classes,
                            **{**kwargs, **overrides})
    return count_parameters(model) / 1e6


def paper_table() -> list[dict]:
    rows = []
    for (network, conv, groups), paper in PAPER_PARAMS_M.items():
        ours = count_millions(network, conv, groups)
        rows.append({"network": network, "conv": conv, "N": groups, "ours_M": ours,
                     "paper_M": paper,
                     "match": abs(ours - paper) <= TOLERANCE_M[network] + 1e-9})
    return rows


def format_markdown(rows: list[dict]) -> str:
    lines = ["| network | conv | N | ours (M) | paper (M) | match |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['network']} | {r['conv']} | {r['N']} | {r['ours_M']:.3f} | "
                     f"{r['paper_M']:.2f} | {'yes' if r['match'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    rows = paper_table()
    print(format_markdown(rows))
    print("\nMobileNetV2 GC-2L keeps its final 320->1280 convolution as plain GC (the paper's "
          "figures); with coarse_last_conv=True: "
          + ", ".join(f"N={n}: "
                      f"{count_millions('MobileNetV2', 'gc2l', n, coarse_last_conv=True):.3f}M"
                      for n in (2, 4, 8)))
    return 0 if all(r["match"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
