"""What ``torch.compile`` needs from this project.

The collectives travel as custom operators (``parallel.ops``) that compiled graphs keep as
calls, so a compiled shard is one graph per step with no break at its collectives. Two pieces of
GC-2L are eager code a graph cannot hold: the CPU taps kernel (``layers.taps``: a few small
kernels per tap sharing a gradient between two Functions) and the overlapped exchange (an
asynchronous handle between two Functions). ``prepare_for_compile`` therefore gives every GC-2L
layer its fused path (one convolution, the GPU default) and the synchronous exchange, on every
device: what a GPU compiles is what the CPU tests compile. ``run_eagerly`` marks the eager code,
so that where it does run under compile it is a clean graph break, never traced."""

import torch


def run_eagerly(fn):
    """``torch.compiler.disable(fn)``, applied at the first call. ``torch._disable_dynamo`` is
    that lazy form, the one PyTorch uses for its own code (the optimizers' ``zero_grad``):
    importing torch._dynamo is a noticeable part of start-up (about as long as importing torch),
    which every process (each rank of every job) would pay whether it compiles or not; and
    dynamo skips its wrapper, where a wrapper of ours would be traced and recompiled for every
    function it wraps."""
    return torch._disable_dynamo(fn)


def prepare_for_compile(model: torch.nn.Module) -> torch.nn.Module:
    """Every GC-2L layer of ``model`` (single-device or sharded) on its fused path, the sharded
    ones without overlap; returns ``model``. Same weights, same numbers (the paths are tested
    against each other)."""
    # Imported here: the layers import run_eagerly from this module.
    from twolevel_dist.layers import TwoLevelGroupConv2d
    from twolevel_dist.parallel.sharded import ShardedTwoLevelConv2d
    for module in model.modules():
        if isinstance(module, (TwoLevelGroupConv2d, ShardedTwoLevelConv2d)):
            module.impl = "fused"
        if isinstance(module, ShardedTwoLevelConv2d):
            module.overlap = False
    return model
