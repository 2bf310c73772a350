"""On a CUDA GPU (skipped without one; ``benchmarks/gpu_check.sh`` runs them): the layers against
F.conv2d in float32 and under bf16 autocast, a shard built and run on the GPU, and two ranks on
one GPU through a gloo backend that serves CUDA tensors only, so that a CPU tensor anywhere in a
collective fails as it would under NCCL."""

import copy

import pytest
import torch
import torch.nn.functional as F
from distributed import run_on_ranks
from test_parallel import GC2L, WRN, _cases, _matches_unsharded

from twolevel_dist.engine.device import rng_state, set_rng_state
from twolevel_dist.layers import make_conv, to_layout
from twolevel_dist.models import build_model
from twolevel_dist.parallel import parallelize
from twolevel_dist.parallel.sharded import ShardedTwoLevelConv2d
from twolevel_dist.parallel.simulated import simulated_mesh

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda", 0)
# bf16 keeps 8 bits of mantissa; float32 on a GPU may use TF32 in cuDNN (10 bits).
TOLERANCE = {torch.float32: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}


def _reference(layer, x):
    """GC(x) + A0(R0(x)) written with F.conv2d from the layer's weights."""
    n, g = layer.groups, layer.local_out_channels
    k, s = layer.kernel_size, layer.stride
    local_w = layer.weight[:, :g].reshape(n * g, -1, k, k)
    rep_w = layer.weight[:, g].reshape(n, -1, k, k)
    gc = F.conv2d(x, local_w, stride=s, padding=k // 2, groups=n)
    r0 = F.conv2d(x, rep_w, stride=s, padding=k // 2, groups=n)
    return gc + F.conv2d(r0, layer.coarse_weight[:, :, None, None])


@pytest.mark.parametrize("impl", ["fused", "taps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
def test_gc2l_layer_on_cuda_matches_the_reference(impl, dtype, layout, kernel, stride):
    torch.manual_seed(0)
    layer = to_layout(make_conv("gc2l", 64, 64, kernel, stride, 4).to(CUDA), layout)
    layer.impl = impl
    x = torch.randn(8, 64, 16, 16, device=CUDA).contiguous(memory_format=layout)
    x.requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = layer(x)
        expected = _reference(layer, x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    want = torch.autograd.grad(expected, [x, *layer.parameters()], grad)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])


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


CASES = _cases(GC2L, models=(WRN,), modes=(True,), dtype=torch.float32)


@pytest.mark.parametrize("dp,gp", [(1, 2), (2, 1)], ids=["dp1xgp2", "dp2xgp1"])
@pytest.mark.parametrize("transport", ["native", "direct"])
def test_two_ranks_on_one_gpu_through_a_cuda_only_backend_match_unsharded(dp, gp, transport):
    results = run_on_ranks(dp * gp, _matches_unsharded, dp, gp, CASES, transport, "cuda",
                           backend="cuda:gloo")
    assert all(len(r) == len(CASES) for r in results)


def test_cuda_rng_state_round_trips():
    state = rng_state(CUDA)
    assert set(state) == {"cpu", "cuda"}
    first = torch.rand(4, device=CUDA)
    set_rng_state(state, CUDA)
    assert torch.equal(torch.rand(4, device=CUDA), first)
