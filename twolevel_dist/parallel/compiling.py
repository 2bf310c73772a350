"""What ``torch.compile`` needs from a model of this project.

The collectives travel as custom operators (``parallel.ops``) that compiled graphs keep as
calls, so a compiled shard is one graph per step with no break at its collectives. Two pieces of
GC-2L are eager code a graph cannot hold (``twolevel_dist.eager``): the CPU taps kernel and the
overlapped exchange. ``prepare_for_compile`` therefore gives every GC-2L layer its fused path
(one convolution, the GPU default) and the synchronous exchange, on every device: what a GPU
compiles is what the CPU tests compile."""

import torch

from twolevel_dist.layers import TwoLevelGroupConv2d
from twolevel_dist.parallel.sharded import ShardedTwoLevelConv2d


def prepare_for_compile(model: torch.nn.Module) -> torch.nn.Module:
    """Every GC-2L layer of ``model`` (single-device or sharded) on its fused path, the sharded
    ones without overlap; returns ``model``. Same weights, same numbers (the paths are tested
    against each other)."""
    for module in model.modules():
        if isinstance(module, (TwoLevelGroupConv2d, ShardedTwoLevelConv2d)):
            module.impl = "fused"
        if isinstance(module, ShardedTwoLevelConv2d):
            module.overlap = False
    return model
