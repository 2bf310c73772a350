"""``run_eagerly``: code that ``torch.compile`` must not trace runs as a clean graph break: the
CPU taps kernel of GC-2L (a few small kernels per tap sharing a gradient between two Functions)
and the overlapped exchange (an asynchronous handle between two Functions). Compiled models do
not take either path (``parallel.compiling.prepare_for_compile``); where they do run under
compile, this keeps them eager."""

import torch


def run_eagerly(fn):
    """``torch.compiler.disable(fn)``, applied at the first call. ``torch._disable_dynamo`` is
    that lazy form, the one PyTorch uses for its own code (the optimizers' ``zero_grad``):
    importing torch._dynamo is a noticeable part of start-up (about as long as importing torch),
    which every process (each rank of every job) would pay whether it compiles or not; and
    dynamo skips its wrapper, where a wrapper of ours would be traced and recompiled for every
    function it wraps."""
    return torch._disable_dynamo(fn)
