"""On a CUDA GPU (skipped without one; ``benchmarks/gpu_check.sh`` runs them): the layers and a
sharded network against float64 references computed from the same weights, in float32 (TF32 off)
and under bf16 autocast; a shard built and run on the GPU; two ranks on one GPU through a gloo
backend that serves CUDA tensors only, so that a CPU tensor anywhere in a collective fails as it
would under NCCL.

Errors are relative norms, |a - b| / |b| over a whole tensor, with b the float64 result: a bound
per dtype that holds for any scale of the values, where elementwise tolerances either fail on
values near zero or pass nearly anything."""

import contextlib
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed import run_on_ranks
from test_data import write_png
from test_parallel import GC2L, WRN, _cases, _matches_unsharded

from twolevel_dist.data.streaming import StreamingEpochLoader
from twolevel_dist.engine.device import rng_state, set_rng_state
from twolevel_dist.layers import make_conv, to_layout
from twolevel_dist.models import build_model
from twolevel_dist.parallel import consolidate_state_dict, init_mesh, parallelize
from twolevel_dist.parallel.sharded import ShardedTwoLevelConv2d
from twolevel_dist.parallel.simulated import simulated_mesh

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda", 0)
# The largest relative error against float64, per dtype: float32 with TF32 off keeps 24 bits of
# mantissa, bf16 8 (2^-8 = 4e-3 per rounding of the inputs, the weights and the output). The same
# layer checks on a CPU gave at most 6e-7 and 5.5e-3.
RELATIVE_ERROR = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| in float64 (``want``: the float64 reference)."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


@contextlib.contextmanager
def exact_float32():
    """float32 convolutions and matrix products without TF32 (PyTorch lets cuDNN use TF32 by
    default, 10 bits of mantissa: no float32 bound near 1e-5 would hold), restored after."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _reference(weight, coarse_weight, x, groups, local_out, kernel, stride):
    """GC(x) + A0(R0(x)) written with F.conv2d: weight [N, C_out/N + 1, C_in/N, k, k] (the local
    filters, then each group's representative filter), coarse_weight A0 [C_out, N]."""
    local_w = weight[:, :local_out].reshape(groups * local_out, -1, kernel, kernel)
    rep_w = weight[:, local_out].reshape(groups, -1, kernel, kernel)
    gc = F.conv2d(x, local_w, stride=stride, padding=kernel // 2, groups=groups)
    r0 = F.conv2d(x, rep_w, stride=stride, padding=kernel // 2, groups=groups)
    return gc + F.conv2d(r0, coarse_weight[:, :, None, None])


def _layer_errors(device, impl, dtype, layout, kernel, stride) -> dict[str, float]:
    """The GC-2L layer's output and its gradients (input, filters, A0) against the float64
    reference from the same weights and input: each one's relative error."""
    torch.manual_seed(0)
    layer = to_layout(make_conv("gc2l", 64, 64, kernel, stride, 4).to(device), layout)
    layer.impl = impl
    x = torch.randn(8, 64, 16, 16, device=device).contiguous(memory_format=layout)
    x.requires_grad_(True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = layer(x)
    assert out.dtype == dtype
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, layer.weight, layer.coarse_weight], grad)
    leaves = [t.detach().double().requires_grad_(True)
              for t in (x, layer.weight, layer.coarse_weight)]
    want_out = _reference(leaves[1], leaves[2], leaves[0], layer.groups, layer.local_out_channels,
                          kernel, stride)
    want = torch.autograd.grad(want_out, leaves, grad.double())
    # Under autocast the parameters stay float32 and so do their gradients.
    assert [g.dtype for g in got[1:]] == [torch.float32, torch.float32]
    errors = {"output": relative_error(out, want_out)}
    errors.update({f"grad {name}": relative_error(g, w)
                   for name, g, w in zip(("input", "filters", "A0"), got, want)})
    return errors


@pytest.mark.parametrize("impl", ["fused", "taps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
def test_gc2l_layer_on_cuda_matches_a_float64_reference(impl, dtype, layout, kernel, stride):
    with exact_float32():
        errors = _layer_errors(CUDA, impl, dtype, layout, kernel, stride)
    bound = RELATIVE_ERROR[dtype]
    assert max(errors.values()) <= bound, (bound, errors)


def test_a_shard_is_built_and_trained_on_the_gpu():
    model = build_model("wrn", conv="gc2l", groups=4, depth=10, widen=2).to(CUDA)
    shard = parallelize(copy.deepcopy(model), simulated_mesh(4))
    assert all(t.device == CUDA for t in list(shard.parameters()) + list(shard.buffers()))
    layers = [m for m in shard.modules() if isinstance(m, ShardedTwoLevelConv2d)]
    assert layers and not any(m.overlap for m in layers)          # the fused path by default
    x, y = torch.randn(8, 3, 32, 32, device=CUDA), torch.randint(0, 10, (8,), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(shard(x), y)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in shard.parameters())


def on_the_one_gpu(fn, *args):
    """``fn(*args)`` on a rank of ``run_on_ranks`` with GPU 0 as its device. run_on_ranks gives
    rank r LOCAL_RANK=r, from which init_device_mesh picks cuda:r, an invalid device ordinal
    where there is one GPU: here every rank shares GPU 0. TF32 off: the ranks are compared with
    the unsharded network at float32 tolerances."""
    os.environ["LOCAL_RANK"] = "0"
    torch.cuda.set_device(0)
    with exact_float32():
        return fn(*args)


CASES = _cases(GC2L, models=(WRN,), modes=(True,), dtype=torch.float32)


@pytest.mark.parametrize("dp,gp", [(1, 2), (2, 1)], ids=["dp1xgp2", "dp2xgp1"])
@pytest.mark.parametrize("transport", ["native", "direct"])
def test_two_ranks_on_one_gpu_through_a_cuda_only_backend_match_unsharded(dp, gp, transport):
    results = run_on_ranks(dp * gp, on_the_one_gpu, _matches_unsharded, dp, gp, CASES, transport,
                           "cuda", backend="cuda:gloo")
    assert all(len(r) == len(CASES) for r in results)


def _bf16_step(model, images, labels):
    """One step under bf16 autocast, SGD with lr 1 and nothing else: the update is minus the
    gradient. Returns the logits."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        logits = model(images)
        F.cross_entropy(logits, labels).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    return logits


def _update(before: dict, after: dict, names) -> torch.Tensor:
    """The step's change of the named parameters, all in one float64 vector."""
    return torch.cat([(after[n].detach().double() - before[n].double()).flatten() for n in names])


def sharded_bf16_errors(device: str) -> dict[str, float]:
    """On each of 2 ranks: one step of a GC-2L WRN's shard (the exchange over the process group)
    under bf16 autocast, and of the unsharded network from the same weights and batch in
    float64, and under bf16 too. Relative errors against float64 of the logits and of the step's
    update of all parameters together (gathered by ``consolidate_state_dict``), for the shard
    and for the unsharded network: bf16 through ten layers and train-mode BN moves the
    gradients by a few percent on one device already, which the shard must not make worse."""
    device = torch.device(device)
    mesh = init_mesh(2)
    torch.manual_seed(0)
    single = build_model("wrn", conv="gc2l", groups=2, **WRN[1]).to(device)
    reference = copy.deepcopy(single).double()
    shard = parallelize(copy.deepcopy(single), mesh)
    generator = torch.Generator().manual_seed(7)      # the same batch on both ranks
    images = torch.randn(8, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (8,), generator=generator).to(device)
    names = [name for name, _ in reference.named_parameters()]
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}

    logits = _bf16_step(shard, images, labels)
    shard_update = _update(start, consolidate_state_dict(shard, mesh), names)
    single_logits = _bf16_step(single, images, labels)
    single_update = _update(start, dict(single.named_parameters()), names)
    want_logits = reference(images.double())
    F.cross_entropy(want_logits, labels).backward()
    torch.optim.SGD(reference.parameters(), lr=1.0).step()
    want_update = _update(start, dict(reference.named_parameters()), names)
    return {"shard logits": relative_error(logits, want_logits),
            "shard update": relative_error(shard_update, want_update),
            "single logits": relative_error(single_logits, want_logits),
            "single update": relative_error(single_update, want_update)}


def test_two_ranks_on_one_gpu_under_bf16_match_a_float64_reference():
    for errors in run_on_ranks(2, on_the_one_gpu, sharded_bf16_errors, "cuda",
                               backend="cuda:gloo"):
        assert errors["shard logits"] <= RELATIVE_ERROR[torch.bfloat16], errors
        # As close to float64 as the unsharded network under the same autocast (measured on
        # CPU ranks: 4.4% and 4.4%), with room for the two paths' different roundings.
        assert errors["shard update"] <= 1.5 * errors["single update"], errors


def test_cuda_rng_state_round_trips():
    state = rng_state(CUDA)
    assert set(state) == {"cpu", "cuda"}
    first = torch.rand(4, device=CUDA)
    set_rng_state(state, CUDA)
    assert torch.equal(torch.rand(4, device=CUDA), first)


def test_the_streaming_loader_never_makes_the_host_wait_for_the_gpu(tmp_path):
    # Pinned batches copied without blocking, normalised with statistics made once: a host
    # that waited here each step would leave the GPU idle while it queues the next one.
    for i in range(12):
        write_png(tmp_path / "train" / f"c{i % 2}" / f"{i}.png",
                  np.random.default_rng(i).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    loader = StreamingEpochLoader(tmp_path, "train", 4, train=True, device=CUDA,
                                  image_size=16, workers=0, seed=1)
    loader.set_epoch(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums = [x.sum() + y.sum() for x, y in loader]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(sums) == 3 and all(s.is_cuda for s in sums)
