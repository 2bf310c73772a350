"""Closed-form communication of one training step, and a link model to turn it into time.

Per step, for N ranks and batch B (bytes of the full tensor, as ``CommStats`` counts them):
  gc2l      per layer: all-gather of the representatives, B x N x H_out x W_out, forward;
            a reduce-scatter of the same size backward.
  sc split  per layer: all-gather of the whole input, B x C_in x H x W; reduce-scatter backward.
  shuffle   per layer: all-to-all of the local output, B x C_out/N x H_out x W_out, forward and
            backward.
  gc        nothing per layer.
  every scheme: one all-reduce of the logits, B x classes, forward.
"""

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn

from twolevel_dist.layers import ShuffleGroupConv2d, StandardConv2d, TwoLevelGroupConv2d


@dataclass(frozen=True)
class LinkModel:
    """Per-rank link bandwidth (GB/s, one direction) and per-message latency (microseconds)."""

    name: str
    bandwidth_gbs: float
    latency_us: float


# Stated assumptions, override on the command line: NVLink 4 as on H100 SXM (450 GB/s per
# direction per GPU), and one InfiniBand NDR port per GPU (400 Gb/s = 50 GB/s).
LINKS = {
    "nvlink": LinkModel("nvlink", bandwidth_gbs=450.0, latency_us=3.0),
    "infiniband": LinkModel("infiniband", bandwidth_gbs=50.0, latency_us=5.0),
}

# Ring algorithms: (message steps, fraction of the full tensor each rank sends).
_RING = {
    "all_gather": lambda n: (n - 1, (n - 1) / n),
    "reduce_scatter": lambda n: (n - 1, (n - 1) / n),
    "all_reduce": lambda n: (2 * (n - 1), 2 * (n - 1) / n),
    "all_to_all": lambda n: (n - 1, (n - 1) / n),
}


def collective_seconds(kind: str, nbytes: float, ranks: int, link: LinkModel) -> float:
    if ranks == 1:
        return 0.0
    steps, fraction = _RING[kind](ranks)
    return steps * link.latency_us * 1e-6 + fraction * nbytes / (link.bandwidth_gbs * 1e9)


def modelled_seconds(calls: dict, nbytes: dict, ranks: int, link: LinkModel) -> float:
    """Time of a step's collectives, one after another (no overlap), from per-kind totals."""
    total = 0.0
    for kind, count in calls.items():
        if count:
            per_call = nbytes[kind] / count
            total += count * collective_seconds(kind, per_call, ranks, link)
    return total


def expected_comm(model: nn.Module, ranks: int, batch: int, image_size: int,
                  num_classes: int, element_size: int = 4) -> tuple[dict, dict]:
    """(calls, bytes) by kind for one forward+backward of ``model`` (single device) split over
    ``ranks`` ranks, from the shapes its replaced layers really see (forward hooks)."""
    calls, nbytes = defaultdict(int), defaultdict(int)
    hooks = []

    def hook(module, inputs, output):
        x = inputs[0]
        if isinstance(module, TwoLevelGroupConv2d):
            size = output.shape[0] * ranks * output.shape[2] * output.shape[3]
            for kind in ("all_gather", "reduce_scatter"):
                calls[kind] += 1
                nbytes[kind] += size * element_size
        elif isinstance(module, ShuffleGroupConv2d):
            calls["all_to_all"] += 2
            nbytes["all_to_all"] += 2 * output.numel() // ranks * element_size
        elif isinstance(module, StandardConv2d):
            for kind in ("all_gather", "reduce_scatter"):
                calls[kind] += 1
                nbytes[kind] += x.numel() * element_size

    for module in model.modules():
        if isinstance(module, (TwoLevelGroupConv2d, ShuffleGroupConv2d, StandardConv2d)):
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(batch, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
    calls["all_reduce"] += 1
    nbytes["all_reduce"] += batch * num_classes * element_size
    return dict(calls), dict(nbytes)
