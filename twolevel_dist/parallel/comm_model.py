"""Closed-form communication of one training step, and a link model to turn it into time.

Per step, for N ranks and batch B (bytes of the full tensor, as ``CommStats`` counts them):
  gc2l      per layer: all-gather of the representatives, B x N x H_out x W_out, forward;
            a reduce-scatter of the same size backward.
  sc split  per layer: all-gather of the whole input, B x C_in x H x W; reduce-scatter backward.
  shuffle   per layer: all-to-all of the local output, B x C_out/N x H_out x W_out, forward and
            backward.
  gc        nothing per layer.
  every scheme: one all-reduce of the logits, B x classes, forward.
Under bf16 autocast every one of these tensors is bf16 (``element_size=2``).

Data parallelism (DDP, dp replicas, each a model or a gp-rank shard of one): one all-reduce of
the gradients per step, 4P bytes for P parameters per rank, as DDP reduces each gradient in its
parameter's dtype (fp32, also under autocast). It runs in C++ (DDP's Reducer), not through
``parallel.transport``, so ``count_collectives`` does not see it: ``ddp_bucket_bytes`` computes
it from the parameters, bucket by bucket as DDP cuts it (checked against a DDP comm hook's
buckets on real gloo ranks, tests/test_dp_vs_gp.py).
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
# direction per GPU), one InfiniBand NDR port per GPU (400 Gb/s = 50 GB/s), and a 100 Gb/s
# Ethernet port per GPU (12.5 GB/s; 10 us per message assumes RDMA, RoCE: TCP sockets add more).
LINKS = {
    "nvlink": LinkModel("nvlink", bandwidth_gbs=450.0, latency_us=3.0),
    "infiniband": LinkModel("infiniband", bandwidth_gbs=50.0, latency_us=5.0),
    "ethernet100": LinkModel("ethernet100", bandwidth_gbs=12.5, latency_us=10.0),
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


def sent_bytes(nbytes: dict, ranks: int) -> float:
    """Bytes one rank sends over its link for per-kind totals of full tensors (a ring's share)."""
    return sum(_RING[kind](ranks)[1] * total for kind, total in nbytes.items()) if ranks > 1 \
        else 0.0


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


# ---------------------------------------------------------------------------------------------
# Data parallelism: DDP's gradient all-reduce
# DDP's defaults (torch.nn.parallel.DistributedDataParallel, bucket_cap_mb=None): the bucket
# reduced first (the last layers' gradients) closes at 1 MiB (torch.distributed's
# _DEFAULT_FIRST_BUCKET_BYTES), every later one at 25 MiB.
DDP_FIRST_BUCKET_BYTES = 1024 * 1024
DDP_BUCKET_BYTES = 25 * 1024 * 1024


def gradient_ready_order(model: nn.Module, image_size: int = 32) -> list[int]:
    """Indices into ``model.parameters()`` in the order one backward makes their gradients:
    the order DDP rebuilds its buckets in after the first step. Runs a forward and backward of
    2 blank images where the model lives (a ``meta`` model costs nothing), in eval mode so that
    no BatchNorm statistic moves; the gradients are restored after."""
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    saved, was_training, order = [p.grad for p in params], model.training, []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: order.append(index[id(p)]))
             for p in params if p.requires_grad]
    try:
        model.eval()
        device = params[0].device
        model(torch.zeros(2, 3, image_size, image_size, device=device)).float().sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
        for p, grad in zip(params, saved):
            p.grad = grad
        model.train(was_training)
    return order


def ddp_bucket_bytes(model: nn.Module, image_size: int = 32,
                     first_bucket_bytes: int = DDP_FIRST_BUCKET_BYTES,
                     bucket_bytes: int = DDP_BUCKET_BYTES) -> list[int]:
    """Bytes of each all-reduce DDP issues per step (after its first, which reduces all the
    gradients as one bucket), in the order it issues them: the gradients in the order backward
    makes them, cut as DDP's Reducer cuts them (for one dtype): a bucket closes as soon as it
    reaches its cap, so one large gradient makes a bucket larger than the cap. DDP with
    ``bucket_cap_mb=C``: both caps C MiB."""
    params = list(model.parameters())
    buckets, current = [], 0
    for i in gradient_ready_order(model, image_size):
        current += params[i].numel() * params[i].element_size()
        if current >= (bucket_bytes if buckets else first_bucket_bytes):
            buckets.append(current)
            current = 0
    return buckets + [current] if current else buckets


def ddp_seconds(buckets: list[int], ranks: int, link: LinkModel,
                backward_s: float) -> tuple[float, float]:
    """(no overlap, ideal overlap): seconds a step waits for DDP's ring all-reduces of
    ``buckets`` among ``ranks`` replicas. No overlap: every bucket after the backward, one after
    another. Ideal overlap: every bucket but the last reduced during the backward, hidden up to
    the backward's length ``backward_s``; the last (the first layers' gradients, ready only when
    the backward ends) after it. A real step lies between (buckets wait for their gradients, and
    NCCL shares the GPU with the backward's kernels)."""
    times = [collective_seconds("all_reduce", b, ranks, link) for b in buckets]
    if not times:
        return 0.0, 0.0
    return sum(times), times[-1] + max(0.0, sum(times[:-1]) - backward_s)
