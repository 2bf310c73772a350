"""Group parallelism on gloo: the sharded network equals the single-device one (logits, loss,
one SGD-with-momentum step, the consolidated state), with exactly the promised collectives."""

import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_on_ranks

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers import ShuffleGroupConv2d, TwoLevelGroupConv2d, to_layout
from twolevel_dist.models import build_model
from twolevel_dist.parallel import (
    consolidate_state_dict,
    count_collectives,
    init_mesh,
    parallelize,
    set_transport,
    shard_state_dict,
)
from twolevel_dist.parallel.rules import _shard_shuffle
from twolevel_dist.parallel.sharded import ShardedTwoLevelConv2d
from twolevel_dist.parallel.simulated import simulated_mesh

WRN = ("wrn", dict(depth=10, widen=2, num_classes=10), 32)
MOBILENET = ("mobilenet_v2", dict(width_mult=0.25, dropout=0.0, num_classes=10), 64)
BATCH = 4
# float64 pins the sharded network to the single-device one almost exactly; float32 is checked on
# WRN. (MobileNetV2 at batch 4 has BN biases with a true gradient of zero, which a following
# train-mode BN cancels; in float32 their rounding noise alone differs by more than 1e-4.)
TOLERANCE = {torch.float64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def _batch(dp, size):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(dp * BATCH, 3, size, size, generator=g)
    y = torch.randint(0, 10, (dp * BATCH,), generator=g)
    return x.chunk(dp), y.chunk(dp)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _reference_step(single, xs, ys, train):
    """What DDP over dp replicas computes: each replica's forward on its own shard (its own BN
    batch statistics), gradients averaged, the same SGD step on every replica."""
    replicas = [copy.deepcopy(single).train(train) for _ in xs]
    logits = [m(x) for m, x in zip(replicas, xs)]
    losses = [F.cross_entropy(lg, y) for lg, y in zip(logits, ys)]
    (sum(losses) / len(losses)).backward()
    for params in zip(*(m.parameters() for m in replicas)):
        mean_grad = sum(p.grad for p in params)
        for p in params:
            p.grad = mean_grad.clone()
    for m in replicas:
        _sgd(m.parameters()).step()
    return replicas, logits, losses


def _use_transport(transport):
    """"direct": gloo's all-gathers and reduce-scatters travel as all-to-all (what "auto" picks
    on gloo); "native": as gloo's own collectives, the path every other backend takes."""
    set_transport(transport)


def _matches_unsharded(dp, gp, cases, transport="direct", device="cpu"):
    _use_transport(transport)
    mesh = init_mesh(gp, dp)
    dp_rank = mesh["dp"].get_local_rank()
    checked = []
    for name, kwargs, size, conv, overlap, train, dtype in cases:
        torch.set_default_dtype(dtype)
        TOL = TOLERANCE[dtype]
        torch.manual_seed(1234)
        groups = 1 if conv == "sc" else max(gp, 2)
        single = build_model(name, conv=conv, groups=groups, **kwargs).to(device)
        xs, ys = (tuple(t.to(device) for t in ts) for ts in _batch(dp, size))
        sharded = parallelize(copy.deepcopy(single), mesh, overlap=overlap).train(train)
        opt = _sgd(sharded.parameters())
        logits = sharded(xs[dp_rank])
        loss = F.cross_entropy(logits, ys[dp_rank])
        loss.backward()
        opt.step()
        logits_after = sharded(xs[dp_rank])
        state = consolidate_state_dict(sharded, mesh)

        replicas, ref_logits, ref_losses = _reference_step(single, xs, ys, train)
        reference = replicas[dp_rank]
        ref_after = reference(xs[dp_rank])
        label = case_label((name, kwargs, size, conv, overlap, train, dtype))
        torch.testing.assert_close(logits, ref_logits[dp_rank], **TOL,
                                   msg=lambda m: f"{label}: {m}")
        torch.testing.assert_close(loss, ref_losses[dp_rank], **TOL)
        torch.testing.assert_close(logits_after, ref_after, **TOL, msg=lambda m: f"{label}: {m}")
        ref_state = reference.state_dict()
        assert state.keys() == ref_state.keys(), label
        for key in ref_state:
            torch.testing.assert_close(state[key], ref_state[key], **TOL,
                                       msg=lambda m: f"{label} {key}: {m}")
        build_model(name, conv=conv, groups=groups, **kwargs).to(device).load_state_dict(
            state, strict=True)
        checked.append(label)
    return checked


def case_label(case) -> tuple:
    """What names a case in messages and results: (model, conv, overlap, train, dtype)."""
    name, _, _, conv, overlap, train, dtype = case
    return (name, conv, overlap, train, str(dtype))


def _cases(convs, models=(WRN, MOBILENET), modes=(True, False), dtype=torch.float64):
    return [(name, kwargs, size, conv, overlap, train, dtype)
            for name, kwargs, size in models for conv, overlap in convs for train in modes]


GC2L = [("gc2l", False), ("gc2l", True)]
ALL_SCHEMES = GC2L + [("gc", False), ("sc", False), ("shuffle", False)]


@pytest.mark.parametrize("dp,gp,cases", [
    (1, 1, _cases([("gc2l", False)])),
    (1, 2, _cases(ALL_SCHEMES, models=(WRN,)) + _cases(GC2L, models=(MOBILENET,))
     + _cases(GC2L, models=(WRN,), dtype=torch.float32)),
], ids=["gp1", "gp2"])
def test_matches_unsharded(dp, gp, cases):
    results = run_on_ranks(dp * gp, _matches_unsharded, dp, gp, cases)
    assert all(len(r) == len(cases) for r in results)


# gp = 4 and dp x gp = 2 x 2 are checked in the one 4-rank job below (``four_ranks``).
GP4_CASES = (_cases(ALL_SCHEMES, models=(WRN,), modes=(True,))
             + _cases(GC2L[:1], models=(WRN, MOBILENET), modes=(False,))
             + _cases(GC2L[:1], models=(MOBILENET,), modes=(True,)))
NATIVE_CASES = (_cases(GC2L, models=(WRN,), modes=(True,))
                + _cases(ALL_SCHEMES[2:], models=(WRN,), modes=(True,)))
DP2_GP2_CASES = _cases(GC2L[:1]) + _cases(GC2L[:1], models=(WRN,), modes=(True,),
                                          dtype=torch.float32)


def test_matches_unsharded_on_four_ranks(four_ranks):
    assert all(r["gp4"] == [case_label(c) for c in GP4_CASES] for r in four_ranks)


def test_matches_unsharded_on_two_replicas_of_two_groups(four_ranks):
    assert all(r["dp2xgp2"] == [case_label(c) for c in DP2_GP2_CASES] for r in four_ranks)


def test_matches_unsharded_through_the_backends_own_collectives(four_ranks):
    assert all(r["native"] == [case_label(c) for c in NATIVE_CASES] for r in four_ranks)


DIST_FUNCTIONS = ["all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                  "reduce_scatter_tensor", "all_reduce",
                  "all_to_all_single", "all_gather", "broadcast", "reduce", "reduce_scatter",
                  "all_to_all", "scatter", "gather", "send", "recv", "isend", "irecv", "barrier"]


def _count_collectives(overlap, transport):
    """Counts every torch.distributed call (by patching the module) and the engine's own counter
    during one forward and one backward of a GC-2L WRN on 4 ranks."""
    _use_transport(transport)
    mesh = init_mesh(4)
    torch.manual_seed(0)
    model = build_model("wrn", conv="gc2l", groups=4, depth=10, widen=2)
    layers = sum(isinstance(m, TwoLevelGroupConv2d) for m in model.modules())
    param_shapes = {tuple(p.shape) for p in model.parameters()}
    sharded = parallelize(model, mesh, overlap=overlap)
    param_shapes |= {tuple(p.shape) for p in sharded.parameters()}
    calls, shapes = Counter(), []
    # Each torch version has its own subset (2.11 lacks the *_single names of 2.13).
    originals = {name: getattr(dist, name) for name in DIST_FUNCTIONS if hasattr(dist, name)}

    def spy(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            shapes.extend(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            return originals[name](*args, **kwargs)
        return wrapper

    x, y = _batch(1, 32)
    for name in originals:
        setattr(dist, name, spy(name))
    try:
        with count_collectives() as forward_stats:
            loss = F.cross_entropy(sharded(x[0]), y[0])
        forward_calls = dict(calls)
        calls.clear()
        with count_collectives() as backward_stats:
            loss.backward()
        backward_calls = dict(calls)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return dict(layers=layers, forward=forward_calls, backward=backward_calls,
                forward_stats=dict(forward_stats.calls), backward_stats=dict(backward_stats.calls),
                gather_shapes=forward_stats.shapes["all_gather"],
                reduce_shapes=forward_stats.shapes["all_reduce"],
                parameter_shapes_communicated=sorted(set(shapes) & param_shapes))


COUNTED = [(False, "direct"), (True, "direct"), (False, "native"), (True, "native")]


def _on_four_ranks():
    """Every check of this file on 4 ranks (gp = 4), in one job: starting 4 ranks takes longer
    than most of the checks. Each check sets the transport and dtype it needs."""
    results = dict(gp4=_matches_unsharded(1, 4, GP4_CASES),
                   native=_matches_unsharded(1, 4, NATIVE_CASES, "native"),
                   dp2xgp2=_matches_unsharded(2, 2, DP2_GP2_CASES))
    torch.set_default_dtype(torch.float32)
    for overlap, transport in COUNTED:
        results[overlap, transport] = _count_collectives(overlap, transport)
    results["per_rank"] = _parameters_per_rank()
    return results


@pytest.fixture(scope="module")
def four_ranks():
    return run_on_ranks(4, _on_four_ranks)


@pytest.mark.parametrize("overlap,transport", COUNTED)
def test_one_all_gather_per_gc2l_layer_and_nothing_else(four_ranks, overlap, transport):
    for r in (ranks[overlap, transport] for ranks in four_ranks):
        layers = r["layers"]
        assert layers == 9   # 3 stages x (2 convolutions) + 3 projection shortcuts
        gather, scatter = (("all_gather_single", "reduce_scatter_single")
                           if hasattr(dist, "all_gather_single")
                           else ("all_gather_into_tensor", "reduce_scatter_tensor"))
        if transport == "direct":       # on gloo each is one all-to-all
            gather = scatter = "all_to_all_single"
        assert r["forward"] == {gather: layers, "all_reduce": 1}
        assert r["backward"] == {scatter: layers}
        assert r["forward_stats"] == {"all_gather": layers, "all_reduce": 1}
        assert r["backward_stats"] == {"reduce_scatter": layers}
        # What travels: 4 representatives of B x 1 x H x W per layer, and the [B, 10] logits.
        assert all(s[:2] == (4 * BATCH, 1) for s in r["gather_shapes"]), r["gather_shapes"]
        assert r["reduce_shapes"] == [(BATCH, 10)]
        assert r["parameter_shapes_communicated"] == []


def _parameters_per_rank():
    mesh = init_mesh(4)
    model = build_model("wrn", conv="gc2l", groups=4, depth=10, widen=2)
    total = sum(p.numel() for p in model.parameters())
    replicated = model.fc.bias.numel()
    layer = model.stages[1][0].conv2
    sharded = parallelize(model, mesh)
    shard_layer = sharded.stages[1][0].conv2
    return dict(total=total, replicated=replicated,
                per_rank=sum(p.numel() for p in sharded.parameters()),
                layer=(layer.in_channels, layer.out_channels, layer.kernel_size),
                layer_per_rank=sum(p.numel() for p in shard_layer.parameters()))


def test_parameters_per_rank_follow_the_papers_per_processor_count(four_ranks):
    for r in (ranks["per_rank"] for ranks in four_ranks):
        n = 4
        assert r["per_rank"] == (r["total"] - r["replicated"]) // n + r["replicated"]
        cin, cout, k = r["layer"]
        # C_in C_out k^2 / N^2 + C_in k^2 / N + C_out: GC's share, the representative filter,
        # A0's rows.
        assert r["layer_per_rank"] == cin * cout * k * k // n ** 2 + cin * k * k // n + cout


def _state_round_trip():
    mesh = init_mesh(2)
    torch.manual_seed(3)
    single = build_model("mobilenet_v2", conv="gc2l", groups=2, width_mult=0.25)
    full = single.state_dict()
    sharded = parallelize(build_model("mobilenet_v2", conv="gc2l", groups=2, width_mult=0.25),
                          mesh)
    sharded.load_state_dict(shard_state_dict(full, sharded, mesh), strict=True)
    back = consolidate_state_dict(sharded, mesh)
    return all(torch.equal(back[k], full[k]) for k in full) and back.keys() == full.keys()


def test_state_dict_moves_between_one_device_and_n_ranks():
    assert run_on_ranks(2, _state_round_trip) == [True, True]


BAD_CONFIGURATIONS = {
    "world_not_multiple": (lambda: init_mesh(3), "not a multiple of groups=3"),
    "groups_mismatch": (lambda: parallelize(build_model("wrn", conv="gc2l", groups=4, depth=10),
                                            init_mesh(2)),
                        "groups=4 but the gp mesh dimension has 2 ranks"),
    "flgc": (lambda: parallelize(build_model("wrn", conv="flgc", groups=2, depth=10),
                                 init_mesh(2)), "flgc cannot be split across ranks"),
    "shuffle_too_narrow": (lambda: _shard_shuffle(ShuffleGroupConv2d(6, 6, 3, 1, 2), 0, 2,
                                                  None, False), "N^2 must divide C_out"),
    "dp_mismatch": (lambda: init_mesh(1, dp=3), "does not equal the world size"),
}


def _expect_errors():
    """Each bad configuration, in turn, on every rank (each fails the same way on all ranks
    before any collective could mismatch)."""
    messages = {}
    for name, (call, _) in BAD_CONFIGURATIONS.items():
        try:
            call()
            messages[name] = None
        except ConfigError as e:
            messages[name] = str(e)
    return messages


def test_bad_parallel_configurations_fail_early():
    for messages in run_on_ranks(2, _expect_errors):
        for name, (_, expected) in BAD_CONFIGURATIONS.items():
            assert messages[name] is not None and expected in messages[name], (name, messages)


def test_torchrun_demo_runs_sharded_on_four_cpu_ranks():
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=4", "-m", "twolevel_dist.demo",
         "--depth", "10", "--widen", "2", "--steps", "2", "--batch", "8"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dp=1 x gp=4" in out.stdout
    assert "per rank [20942, 20942, 20942, 20942]" in out.stdout
    assert "all_gather_calls=9, all_reduce_calls=1, reduce_scatter_calls=9" in out.stdout


@pytest.mark.parametrize("overlap,impl", [(False, "taps"), (True, "taps"), (False, "fused")])
def test_sharded_gc2l_in_channels_last_equals_nchw(overlap, impl):
    # One rank's shard (per-rank simulation, no processes): with channels-last images and weights
    # the coarse level takes its own code path; the numbers must not change, and no layer turns
    # the activations back to NCHW (a layout copy at every layer), forward or backward: every
    # 4-D activation and the gradient reaching every convolution stay channels-last, on the
    # fused path (the GPU default) too.
    torch.manual_seed(0)
    model = build_model("wrn", conv="gc2l", groups=2, depth=10, widen=2)
    for module in model.modules():
        if isinstance(module, TwoLevelGroupConv2d):
            module.impl = impl
    shard = parallelize(model, simulated_mesh(2), overlap=overlap)
    shard_cl = to_layout(copy.deepcopy(shard), torch.channels_last)
    layouts, grad_layouts = {}, {}

    def channels_last(t):
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    for name, module in shard_cl.named_modules():
        if not list(module.children()) and name not in ("pool", "fc"):   # [B, C, 1, 1]: both
            module.register_forward_hook(
                lambda m, i, o, name=name: layouts.__setitem__(name, channels_last(o)))
        if isinstance(module, ShardedTwoLevelConv2d):
            module.register_full_backward_hook(
                lambda m, gi, go, name=name: grad_layouts.__setitem__(name, channels_last(go[0])))
    x = torch.randn(4, 3, 16, 16)
    out, out_cl = shard(x), shard_cl(x.contiguous(memory_format=torch.channels_last))
    assert sum(isinstance(m, ShardedTwoLevelConv2d) for m in shard_cl.modules()) == 9
    assert layouts and all(layouts.values()), [n for n, ok in layouts.items() if not ok]
    torch.testing.assert_close(out_cl, out, **TOLERANCE[torch.float32])
    grad = torch.randn_like(out)
    out.backward(grad)
    out_cl.backward(grad)
    assert len(grad_layouts) == 9 and all(grad_layouts.values()), grad_layouts
    for (name, p), p_cl in zip(shard.named_parameters(), shard_cl.parameters()):
        torch.testing.assert_close(p_cl.grad, p.grad, **TOLERANCE[torch.float32],
                                   msg=lambda m: f"{name}: {m}")


def _rank_0_aborts(when: str) -> int:
    """Rank 0 dies by SIGABRT in ``fn`` itself, or at its exit (after the helper's barrier)."""
    import atexit
    import os
    if dist.get_rank() == 0:
        if when == "in fn":
            os.abort()
        atexit.register(os.abort)
    return dist.get_rank()


def test_the_rank_helper_forgives_a_crash_only_in_torchs_teardown():
    """tests/distributed.run_on_ranks: a rank killed after every result is in (torch 2.11's
    gloo teardown, rarely) leaves the results standing, with a warning; one killed in the
    function under test fails the test."""
    with pytest.warns(UserWarning, match="rank 0 died by SIGABRT in torch's teardown"):
        assert run_on_ranks(2, _rank_0_aborts, "at exit") == [0, 1]
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGABRT"):
        run_on_ranks(2, _rank_0_aborts, "in fn")
