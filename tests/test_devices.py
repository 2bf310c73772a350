"""The GPU's conditions on a CPU: sharding keeps every tensor where and as it was (``meta``
stands in
for ``cuda``, float64 for a dtype other than the default), every collective's tensor lives on the
model's device (a spy on torch.distributed over a ``meta`` model), every GC-2L path trains under
bf16 autocast as the single-device model does, the process group serves CPU and CUDA tensors, and
the defaults chosen by device."""

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_on_ranks

from twolevel_dist.engine.device import resolve_amp, rng_state, set_rng_state
from twolevel_dist.engine.ema import ShardEMA
from twolevel_dist.engine.loop import average_batch_norm_statistics, train_one_epoch
from twolevel_dist.errors import ConfigError
from twolevel_dist.layers import TwoLevelGroupConv2d, to_layout
from twolevel_dist.layers.two_level import resolve_impl
from twolevel_dist.models import build_model
from twolevel_dist.parallel import (
    all_reduce_values,
    consolidate_state_dict,
    init_distributed,
    init_mesh,
    mesh,
    parallelize,
)
from twolevel_dist.parallel.grad_norm import clip_grad_norm_
from twolevel_dist.parallel.sharded import ShardedTwoLevelConv2d, resolve_overlap
from twolevel_dist.parallel.simulated import simulated_mesh

SHARDABLE = [("wrn", dict(depth=10, widen=2), conv) for conv in ("gc2l", "gc", "sc", "shuffle")] + [
    ("mobilenet_v2", dict(width_mult=0.25), "gc2l"),
    ("wrn_imagenet", {}, "gc2l"),
]


def _tensors(model):
    return list(model.named_parameters()) + list(model.named_buffers())


@pytest.mark.parametrize("name,kwargs,conv", SHARDABLE, ids=lambda v: str(v)[:20])
@pytest.mark.parametrize("groups", [2, 4])
def test_parallelize_keeps_a_meta_model_on_meta(name, kwargs, conv, groups):
    with torch.device("meta"):
        model = build_model(name, conv=conv, groups=1 if conv == "sc" else groups, **kwargs)
    shard = parallelize(model, simulated_mesh(groups))
    off = [key for key, t in _tensors(shard) if t.device.type != "meta"]
    assert not off, f"left meta: {off}"
    # Something was sharded: the stem's slice is 1/N of its output channels.
    assert len(_tensors(shard)) > 10


def test_a_meta_shard_runs_forward_and_backward_on_the_gpu_path():
    with torch.device("meta"):
        model = build_model("wrn", conv="gc2l", groups=2, depth=10, widen=2)
    shard = parallelize(model, simulated_mesh(2))
    gc2l = [m for m in shard.modules() if isinstance(m, ShardedTwoLevelConv2d)]
    assert gc2l and not any(m.overlap for m in gc2l)      # meta stands in for a GPU: fused
    logits = shard(torch.randn(4, 3, 32, 32, device="meta"))
    logits.sum().backward()
    assert logits.shape == (4, 10) and logits.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in shard.parameters())


@pytest.mark.parametrize("name,kwargs,conv", [SHARDABLE[0], SHARDABLE[4]],
                         ids=["wrn", "mobilenet_v2"])
def test_parallelize_keeps_float64_and_channels_last(name, kwargs, conv):
    model = to_layout(build_model(name, conv=conv, groups=2, **kwargs).double(),
                      torch.channels_last)
    shard = parallelize(model, simulated_mesh(2))
    floats = [(key, t.dtype) for key, t in _tensors(shard) if t.is_floating_point()]
    assert floats and all(dtype == torch.float64 for _, dtype in floats), floats
    # Every 4-D weight whose layout shows (more than one input channel, a k x k kernel): the
    # stem and the GC / SC weights the rules rebuilt or sliced are all still channels-last.
    visible = {key: t for key, t in _tensors(shard)
               if t.dim() == 4 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1}
    assert any(key.startswith(("stem", "features.0")) for key in visible), sorted(visible)
    not_kept = [key for key, t in visible.items()
                if not t.is_contiguous(memory_format=torch.channels_last)]
    assert not not_kept, not_kept


def test_sharding_on_the_cpu_then_moving_chooses_the_target_devices_path():
    # train shards on the CPU and moves the shard: GC-2L's path follows the target device.
    model = build_model("wrn", conv="gc2l", groups=2, depth=10, widen=2)
    shard = parallelize(model, simulated_mesh(2), device=torch.device("meta"))
    assert all(t.device.type == "meta" for _, t in _tensors(shard))
    assert not any(m.overlap for m in shard.modules() if isinstance(m, ShardedTwoLevelConv2d))
    on_cpu = parallelize(build_model("wrn", conv="gc2l", groups=2, depth=10, widen=2),
                         simulated_mesh(2))
    assert all(m.overlap for m in on_cpu.modules() if isinstance(m, ShardedTwoLevelConv2d))


def test_defaults_by_device():
    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda", 0), torch.device("meta")
    assert (resolve_overlap(None, cpu), resolve_overlap(None, cuda)) == (True, False)
    assert resolve_overlap(False, cpu) is False and resolve_overlap(True, cuda) is True
    assert (resolve_impl("auto", cpu), resolve_impl("auto", cuda), resolve_impl("auto", meta)) \
        == ("taps", "fused", "fused")
    assert (resolve_amp(None, cpu), resolve_amp(None, cuda)) == (False, True)
    assert resolve_amp(True, cpu) is True and resolve_amp(False, cuda) is False


# --- every collective on the model's device -------------------------------------------------

SPIED = ["all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
         "reduce_scatter_tensor", "all_reduce", "all_to_all_single", "all_gather", "broadcast",
         "reduce_scatter", "all_to_all"]


class _Done:
    def wait(self):
        return True


def _spy_on_collectives(seen: list):
    """Patch torch.distributed so that each collective records the devices of its tensors; on
    ``meta`` tensors (nothing to send) it returns without communicating."""
    originals = {name: getattr(dist, name) for name in SPIED if hasattr(dist, name)}

    def spy(name):
        def wrapper(*args, **kwargs):
            tensors = [t for a in list(args) + list(kwargs.values())
                       for t in (a if isinstance(a, (list, tuple)) else [a])
                       if isinstance(t, torch.Tensor)]
            seen.append((name, sorted({t.device.type for t in tensors})))
            if all(t.device.type == "meta" for t in tensors):
                return _Done() if kwargs.get("async_op") else None
            return originals[name](*args, **kwargs)
        return wrapper
    for name in originals:
        setattr(dist, name, spy(name))
    return originals


def _collectives_of_a_meta_model():
    seen = []
    originals = _spy_on_collectives(seen)
    try:
        gp_mesh = init_mesh(2)
        for conv, overlap in (("gc2l", False), ("gc2l", True), ("sc", False), ("shuffle", False)):
            with torch.device("meta"):
                model = build_model("wrn", conv=conv, groups=1 if conv == "sc" else 2, depth=10,
                                    widen=4)
            shard = parallelize(model, gp_mesh, overlap=overlap)
            F.cross_entropy(shard(torch.randn(4, 3, 16, 16, device="meta")),
                            torch.zeros(4, dtype=torch.long, device="meta")).backward()
            # The recipes' tensors stay on the device too (recorded beside the collectives).
            norm = clip_grad_norm_(shard, 1.0, gp_mesh["gp"].get_group())
            ema = ShardEMA(shard, 0.9)
            ema.update()
            seen.append(("clip_grad_norm_ and ShardEMA",
                         sorted({norm.device.type} | {t.device.type for t in ema.state.values()}
                                | {p.grad.device.type for p in shard.parameters()})))
            consolidate_state_dict(shard, gp_mesh)
        dp_mesh = init_mesh(1)          # dp = 2: the loop's reductions over replicas
        with torch.device("meta"):
            model = build_model("wrn", conv="gc2l", groups=2, depth=10, widen=2)
        average_batch_norm_statistics(model, dp_mesh["dp"].get_group())
        all_reduce_values([1.0, 2.0], device=torch.device("meta"), group=dp_mesh["dp"].get_group())
        all_reduce_values([3.0], device=torch.device("meta"), group=dist.group.WORLD, op="max")
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return seen


def test_every_collective_takes_tensors_on_the_models_device():
    for seen in run_on_ranks(2, _collectives_of_a_meta_model):
        off = [(name, devices) for name, devices in seen if devices != ["meta"]]
        assert not off, off
        kinds = {name for name, _ in seen}
        # The spy saw each kind of collective the engine issues (so it cannot pass vacuously).
        assert {"all_to_all_single", "all_reduce", "all_gather"} <= kinds, kinds
        assert len(seen) > 50


# --- bf16 autocast: a rank's shard against the single-device model ---------------------------

BF16_PATHS = {"fused": ("fused", False), "taps": ("taps", False), "overlap": ("taps", True)}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _bf16_gradients_on_every_path():
    mesh_ = init_mesh(2)
    return {path: _bf16_gradients_match(path, mesh_) for path in sorted(BF16_PATHS)}


def _bf16_gradients_match(path, mesh_):
    impl, overlap = BF16_PATHS[path]
    torch.manual_seed(0)
    single = build_model("wrn", conv="gc2l", groups=2, depth=10, widen=2)
    for m in single.modules():
        if isinstance(m, TwoLevelGroupConv2d):
            m.impl = impl
    shard = parallelize(copy.deepcopy(single), mesh_, overlap=overlap)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    losses = []
    for model in (single, shard):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        assert logits.dtype == torch.bfloat16
        loss.backward()
        losses.append(loss.item())
    # The single-device gradients, sharded like the parameters: the shard of a copy that holds
    # the gradients as its parameters.
    grads = copy.deepcopy(single)
    for p, original in zip(grads.parameters(), single.parameters()):
        p.data = original.grad
    expected = dict(parallelize(grads, mesh_, overlap=overlap).named_parameters())
    errors = {name: _relative_error(p.grad, expected[name]) for name, p in shard.named_parameters()}
    dtypes = {p.grad.dtype for p in shard.parameters()}
    return losses, errors, dtypes


def test_a_ranks_shard_trains_under_bf16_autocast_like_the_single_device_model():
    results = [(path, *result) for by_path in run_on_ranks(2, _bf16_gradients_on_every_path)
               for path, result in by_path.items()]
    assert {path for path, *_ in results} == set(BF16_PATHS)
    for path, (single_loss, shard_loss), errors, dtypes in results:
        assert dtypes == {torch.float32}, path     # parameters and gradients stay float32
        assert abs(single_loss - shard_loss) < 0.02 * abs(single_loss)
        # bf16 keeps 8 bits of mantissa: gradients within a few percent. A wrong exchange (a
        # gather whose backward drops the other ranks' share) is off by tens of percent (halving
        # the representative's gradient on the fused path: 79% worst, 46% on average).
        worst = max(errors, key=errors.get)
        assert errors[worst] < 0.08, (path, worst, errors[worst])
        assert sum(errors.values()) / len(errors) < 0.03, path


# --- the process group and the device of each rank ---------------------------------------------

class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


class _FakeStore:
    """What init_distributed asks of the rendezvous store, recorded."""

    made: list = []

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.keys, self.waits, self.timeouts = args, kwargs, [], [], []
        _FakeStore.made.append(self)

    def set(self, key, value):
        self.keys.append(key)

    def wait(self, keys, timeout):
        self.waits.append((keys, timeout))

    def set_timeout(self, timeout):
        self.timeouts.append(timeout)


@pytest.mark.parametrize("visible,local_rank,device,expected,local_ranks", [
    (0, 0, "auto", "cpu", 2), (4, 3, "auto", "cuda:3", 4),
    (1, 3, "auto", "cuda:0", None),     # srun --gpus-per-task: each rank sees its own GPU
    (4, 5, "auto", "LOCAL_RANK=5 but this process sees only 4 GPUs", None),
    (1, 0, "auto", r"2 ranks on this node \(torchrun --nproc_per_node=2\) but only 1 GPU\(s\) "
                   "visible, and NCCL cannot give two ranks one GPU", 2),
    (4, 3, "cpu", "cpu", 8),          # device=cpu: the CPU and gloo alone, GPUs or not
    (1, 0, "cuda", "cuda:0", 1),
    (0, 0, "cuda", "device=cuda but no CUDA device is visible to this process .*; use "
                   "device=cpu or device=auto", None)])
def test_init_asks_for_a_backend_for_cpu_and_cuda_tensors(monkeypatch, visible, local_rank,
                                                          device, expected, local_ranks):
    init, store = _Recorder(), _FakeStore
    _FakeStore.made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(dist, "TCPStore", store)
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, s: s)
    for key, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29500", LOCAL_RANK=str(local_rank)).items():
        monkeypatch.setenv(key, value)
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    if expected not in ("cpu", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError, match=expected):
            init_distributed(timeout_s=77, startup_timeout_s=11, device=device)
        assert not init.calls                   # refused before any process group
        return
    assert str(init_distributed(timeout_s=77, startup_timeout_s=11, device=device)) == expected
    (backend,), kwargs = init.calls[0]
    assert backend == ("gloo" if expected == "cpu" else "cpu:gloo,cuda:nccl")
    assert kwargs["timeout"] == timedelta(seconds=77)
    # Rank 0 hosts the store; every rank announces itself and waits for the others no longer
    # than the start-up timeout; later waits on the store get the job's timeout.
    (made,) = store.made
    assert made.kwargs["is_master"] and made.kwargs["timeout"] == timedelta(seconds=11)
    assert made.keys == ["twolevel/rank_0"]
    assert made.waits == [(["twolevel/rank_0", "twolevel/rank_1"], timedelta(seconds=11))]
    assert made.timeouts == [timedelta(seconds=77)]
    assert mesh.backend_for(torch.device(expected)) == backend


def test_rng_state_restores_the_stream_and_reads_older_checkpoints():
    cpu = torch.device("cpu")
    state = rng_state(cpu)
    assert set(state) == {"cpu"}                # no CUDA state where there is no GPU
    first = torch.rand(3)
    set_rng_state(state, cpu)
    assert torch.equal(torch.rand(3), first)
    set_rng_state(state["cpu"], cpu)            # a checkpoint from before (the CPU state alone)
    assert torch.equal(torch.rand(3), first)


def test_the_loop_reports_every_log_every_steps_with_global_step_numbers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(7)]
    logged, stepped = [], []
    result = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1),
                             device=torch.device("cpu"), amp=False, first_step=100, log_every=3,
                             on_log=logged.append, on_step=lambda step, sums: stepped.append(step))
    assert result.steps == 7 and stepped == list(range(101, 108))
    assert [s["step"] for s in logged] == [102, 105]          # global steps log_every divides
    assert all(s["step_time_s"] > 0 and s["images_per_s"] > 0 and s["loss"] > 0 for s in logged)
    assert [s["epoch_step"] for s in logged] == [2, 5]
    assert all(0 <= s["data_wait_s"] <= s["step_time_s"] for s in logged)
    assert all(s["peak_memory_bytes"] is None for s in logged)         # no counter off GPUs


def test_evaluation_counts_top1_and_top5_and_the_step_line_reads_like_a_cluster_log():
    from twolevel_dist.engine.loop import evaluate
    from twolevel_dist.engine.metrics import step_line

    class Fixed(torch.nn.Module):          # class 0 scores highest, then 1, 2, ...
        def forward(self, x):
            return torch.arange(8.0, 0.0, -1.0).expand(x.shape[0], 8)
    labels = torch.tensor([0, 1, 4, 5, 7])                 # top-1: 1 of 5, top-5: 3 of 5
    batches = [(torch.zeros(5, 1), labels)]
    loss, top1, top5 = evaluate(Fixed(), batches, device=torch.device("cpu"), amp=False,
                                dp_group=None)
    assert (top1, top5) == (20.0, 60.0) and loss > 0
    stats = dict(step=250, epoch_step=50, loss=1.5, step_time_s=0.5, data_wait_s=0.1,
                 images_per_s=256.0, peak_memory_bytes=3 * 2**30)
    line = step_line(stats, label="epoch 2/10", steps_in_epoch=200, total_steps=2000, lr=0.05,
                     replicas=2, evaluation_s=5.0)
    # 1750 steps left at 0.5 s and 9 evaluations at 5 s: 15 min 20 s.
    assert line == ("epoch 2/10 [50/200] step 250/2000 loss 1.5000 lr 0.05 | 512 img/s, step "
                    "0.500 s (data wait 0.100 s) | ETA 0:15:20 | peak memory 3.00 GiB")
