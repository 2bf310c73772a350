"""Per-rank peak memory of one training step, measured without the hardware.

Each configuration (network, convolution, N, fp32 or bf16 autocast) is built and sharded under
torch's FakeTensorMode: every tensor has its shape, dtype and strides but no storage, and no
kernel runs, so even SC WRN-28-80 on one device (2.3G parameters) costs nothing here.
``parallelize(model, simulated_mesh(N))`` gives exactly rank 0's shard, the collectives replaced
by local stand-ins of the same shapes. A warm-up step creates the momentum buffers; then
``MemoryTracker`` (a TorchDispatchMode) follows every storage of a second full step (zero_grad
with set_to_none, forward, backward, optimizer.step) by weak reference and records the peak of
the live bytes and what they were: parameters, gradients, optimizer state, BatchNorm buffers,
bf16 casts of the weights, and everything else (activations saved for backward, temporaries).

What a GPU rank would run is set explicitly, since fake CUDA tensors need a CUDA build of torch:
GC-2L's fused convolution without overlap (what ``conv.overlap: null`` picks on GPUs), SGD's
foreach implementation (the CUDA default) with the recipe's momentum and weight decay, and the
loss under bf16 autocast with fp32 parameters. CPU autocast casts the same operations of these
networks as CUDA autocast does (convolutions, matrix products and linear to bf16, the loss fp32).

Checked twice: the same tracker on real CPU tensors of a configuration that fits here (and the
CPU allocator's own peak, from the profiler), and a closed form (4P bytes each for parameters,
gradients and momentum; the saved activations summed layer by layer).

  python benchmarks/memory.py --models wrn28_10 wrn28_40 wrn28_60 wrn28_80 --batch 128 \\
      --groups 1 2 4 8 16 --dtypes fp32 bf16 --update

(--update replaces the committed benchmarks/results/memory_wrn28.*; without it a run writes to a
fresh folder, benchmarks/results/new/<UTC time>/.)
"""

import argparse
import contextlib
import re
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_output_options, output_stem, write_results  # noqa: E402

from twolevel_dist.config import ModelConfig  # noqa: E402
from twolevel_dist.errors import ConfigError  # noqa: E402
from twolevel_dist.models import build_model  # noqa: E402
from twolevel_dist.parallel import parallelize  # noqa: E402
from twolevel_dist.parallel.simulated import simulated_mesh  # noqa: E402

GB = 1e9
DTYPES = {"fp32": None, "bf16": torch.bfloat16}        # the autocast dtype; None: no autocast
CONVS = ("gc2l", "gc", "sc")                           # at N > 1; "sc" is then split by outputs
# The paper's CIFAR recipe (configs/optim/sgd.yaml), as the training job builds its optimizer.
SGD_RECIPE = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)
IMAGE_SIZE, NUM_CLASSES = 32, 10
# Usable memory: the nominal size in decimal GB, a little below what the cards report (an
# H100 80GB reports 81559 MiB = 85.5e9 bytes), so the capacities err on the safe side.
GPUS = {"24GB": 24.0, "80GB": 80.0, "141GB": 141.0}
# What fake tensors cannot see on a real GPU: the CUDA context with the cuDNN/cuBLAS handles and
# workspaces (a fixed amount), and the caching allocator's rounding and fragmentation (a share
# of what is allocated).
HEADROOM_GB = 2.0
FRAGMENTATION = 0.10
CATEGORIES = ("params", "grads", "optimizer", "buffers", "weight_casts", "activations")
# Tolerances stated in the notes and asserted by tests/test_memory.py.
FAKE_VS_REAL_REL = 1e-3          # peak, fake tensors against real ones (same tracker)
ALLOCATOR_EXCESS_MAX = 0.15      # the CPU allocator's peak over the tracker's (kernel scratch)
CLOSED_FORM_ACTS_REL = 0.01      # saved activations at the end of the forward


# ---------------------------------------------------------------------------------------------
# Which network
@dataclass(frozen=True)
class WrnSpec:
    """A CIFAR WRN-depth-widen: what the builder and the closed form need."""

    name: str
    depth: int
    widen: int

    def build(self, conv: str, groups: int) -> nn.Module:
        return build_model("wrn", conv=conv, groups=groups, num_classes=NUM_CLASSES,
                           depth=self.depth, widen=self.widen, dropout=0.0)

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 4) // 6

    @property
    def widths(self) -> list[int]:
        return [16 * self.widen, 32 * self.widen, 64 * self.widen]


def resolve_model(name: str) -> WrnSpec:
    """``configs/model/<name>.yaml`` if it is a CIFAR WRN, else a name ``wrn<depth>_<widen>``."""
    path = REPO / "configs" / "model" / f"{name}.yaml"
    if path.is_file():
        cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(path)))
        if cfg.name != "wrn":
            raise ConfigError(f"model {name!r} is a {cfg.name!r} network; this benchmark "
                              f"measures CIFAR WRNs (wrn<depth>_<widen>)")
        if cfg.dropout:
            raise ConfigError(f"model {name!r} has dropout {cfg.dropout}; the closed form here "
                              f"has no dropout masks: use a config with dropout 0")
        return WrnSpec(name, cfg.depth, cfg.widen)
    match = re.fullmatch(r"wrn(\d+)_(\d+)", name)
    if match is None:
        choices = sorted(p.stem for p in path.parent.glob("wrn*.yaml"))
        raise ConfigError(f"unknown model {name!r}: give a CIFAR WRN config {choices} or "
                          f"wrn<depth>_<widen>, e.g. wrn28_60")
    depth, widen = int(match[1]), int(match[2])
    if depth < 10 or (depth - 4) % 6 or widen < 1:
        raise ConfigError(f"model {name!r}: WRN depth must be 6n+4 >= 10 and widen >= 1")
    return WrnSpec(name, depth, widen)


def run_like_a_gpu(model: nn.Module) -> nn.Module:
    """GC-2L as a GPU rank runs it: one fused convolution, no overlap. (Left to the defaults,
    these CPU-side tensors would get the CPU's taps path with the all-gather overlapped.)"""
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = "fused"
        if hasattr(module, "overlap"):
            module.overlap = False
    return model


def build_shard(spec: WrnSpec, conv: str, groups: int) -> nn.Module:
    """Rank 0's shard at N = ``groups`` (N = 1: the single-device SC model), its tensors made
    by the ambient mode (fake under ``FakeTensorMode``)."""
    model = spec.build(conv, 1 if conv == "sc" else groups)
    if groups > 1:
        model = parallelize(model, simulated_mesh(groups), overlap=False)
    return run_like_a_gpu(model)


@contextlib.contextmanager
def fake_tensors():
    """FakeTensorMode for building, sharding and stepping. ``allow_non_fake_inputs``: a sharding
    rule may build a module on ``meta`` and then hand it (fake) slices of the original; what the
    step reads is checked to be fake by ``_require_fake``."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def _require_fake(model: nn.Module, *inputs: torch.Tensor) -> None:
    named = [*model.named_parameters(), *model.named_buffers(),
             *((f"input {i}", t) for i, t in enumerate(inputs))]
    for name, tensor in named:
        if not isinstance(tensor, FakeTensor):
            raise RuntimeError(f"{name} is a real tensor under FakeTensorMode: measuring would "
                               f"allocate it")


# ---------------------------------------------------------------------------------------------
# The tracker
@dataclass
class _Live:
    ref: weakref.ref
    nbytes: int
    category: str


class MemoryTracker(TorchDispatchMode):
    """Follows every storage an operator returns, and the ones ``register``-ed before the step
    (model, optimizer state, inputs), by weak reference: a storage counts from the operator that
    made it until it is freed; views share their base's storage and count once. ``peak`` is the
    largest sum of live bytes. Categories are settled by ``finish``, since a tensor is only known
    to be a gradient once autograd has stored it in ``.grad``."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, _Live] = {}
        self.total = self.peak = 0
        self.phase = self.peak_phase = "before"
        self.at_peak: dict[int, _Live] = {}
        self.at_phase_start: dict[str, dict[int, _Live]] = {}
        self._param_storages: set[int] = set()

    def register(self, tensor: torch.Tensor | None, category: str) -> None:
        if tensor is None:
            return
        if category == "params":
            self._param_storages.add(id(tensor.untyped_storage()))
        self._add(tensor, category)
        self._note_peak()

    def enter_phase(self, name: str) -> None:
        self.phase = name
        self.at_phase_start[name] = self._copy_live()

    def _copy_live(self) -> dict[int, _Live]:
        return {key: _Live(e.ref, e.nbytes, e.category) for key, e in self.live.items()}

    def _add(self, tensor: torch.Tensor, category: str) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = id(storage), storage.nbytes()
        entry = self.live.get(key)
        if entry is not None:
            self.total += nbytes - entry.nbytes          # resized in place (usually by 0)
            entry.nbytes = nbytes
            return
        # The callback runs while the storage is freed, before its id can be reused.
        self.live[key] = _Live(weakref.ref(storage, lambda _, key=key: self._free(key)), nbytes,
                               category)
        self.total += nbytes

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.total -= entry.nbytes

    def _note_peak(self) -> None:
        if self.total > self.peak:
            self.peak, self.peak_phase = self.total, self.phase
            self.at_peak = self._copy_live()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An autocast cast of a weight is a ``_to_copy`` reading a parameter's storage.
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        is_cast = func is torch.ops.aten._to_copy.default and source is not None and \
            id(source.untyped_storage()) in self._param_storages
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor, "weight_casts" if is_cast else "activations")
        self._note_peak()
        return out

    def finish(self, model: nn.Module) -> dict:
        """Bytes per category at the peak (they add up to it), at the start of each phase, and
        at the end of the step (parameters, gradients and optimizer state all whole)."""
        grads = {id(p.grad.untyped_storage()) for p in model.parameters() if p.grad is not None}

        def by_category(entries: dict[int, _Live]) -> dict[str, int]:
            sums = dict.fromkeys(CATEGORIES, 0)
            for key, entry in entries.items():
                # Still alive at the end and a .grad then: a gradient (ids of live storages
                # are unique, so this is the same storage).
                is_grad = entry.ref() is not None and key in grads
                sums["grads" if is_grad else entry.category] += entry.nbytes
            return sums
        return dict(peak=self.peak, peak_phase=self.peak_phase,
                    at_peak=by_category(self.at_peak), at_end=by_category(self.live),
                    **{f"at_{name}_start": by_category(entries)
                       for name, entries in self.at_phase_start.items()})


# ---------------------------------------------------------------------------------------------
# One measured step
def _autocast(dtype: str):
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=DTYPES[dtype])


def _step(model, optimizer, images, labels, dtype: str,
          tracker: MemoryTracker | None = None) -> None:
    """One training step in ``engine/loop.py``'s order: zero_grad (to None) first, the loss
    under autocast, backward and step outside it."""
    enter_phase = tracker.enter_phase if tracker is not None else (lambda name: None)
    enter_phase("forward")
    optimizer.zero_grad(set_to_none=True)
    with _autocast(dtype):
        loss = F.cross_entropy(model(images), labels)
    enter_phase("backward")
    loss.backward()
    del loss
    enter_phase("optimizer")
    optimizer.step()


def _register_state(tracker: MemoryTracker, model, optimizer, images, labels) -> None:
    for param in model.parameters():
        tracker.register(param, "params")
        tracker.register(param.grad, "grads")
    for buffer in model.buffers():
        tracker.register(buffer, "buffers")
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                tracker.register(value, "optimizer")
    tracker.register(images, "activations")
    tracker.register(labels, "activations")


def _model_and_batch(spec: WrnSpec, conv: str, groups: int, batch: int):
    torch.manual_seed(0)
    model = build_shard(spec, conv, groups)
    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), foreach=True, **SGD_RECIPE)
    return model, optimizer, images, labels


def measure_step(spec: WrnSpec, conv: str, groups: int, dtype: str, batch: int,
                 fake: bool = True) -> dict:
    """The tracker's account of rank 0's step after a warm-up step, with ``params_per_rank``.
    ``fake``: under FakeTensorMode, nothing allocated; otherwise real CPU tensors."""
    with fake_tensors() if fake else contextlib.nullcontext():
        model, optimizer, images, labels = _model_and_batch(spec, conv, groups, batch)
        if fake:
            _require_fake(model, images, labels)
        _step(model, optimizer, images, labels, dtype)          # warm-up: momentum buffers
        tracker = MemoryTracker()
        _register_state(tracker, model, optimizer, images, labels)
        with tracker:
            _step(model, optimizer, images, labels, dtype, tracker)
        account = tracker.finish(model)
        account["params_per_rank"] = sum(p.numel() for p in model.parameters())
    return account


def allocator_peak(spec: WrnSpec, conv: str, groups: int, dtype: str, batch: int) -> int:
    """Real CPU tensors: the CPU allocator's peak during forward, backward and step (the
    profiler's memory events, in time order), kernels' internal buffers included, plus what was
    held before: parameters, momentum, buffers, inputs. The window opens after zero_grad, as the
    profiler cannot see frees of blocks allocated before it started."""
    model, optimizer, images, labels = _model_and_batch(spec, conv, groups, batch)
    _step(model, optimizer, images, labels, dtype)
    optimizer.zero_grad(set_to_none=True)
    held = [*model.parameters(), *model.buffers(), images, labels,
            *(v for s in optimizer.state.values() for v in s.values()
              if isinstance(v, torch.Tensor))]
    before = sum(t.untyped_storage().nbytes() for t in held)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, optimizer, images, labels, dtype)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return before + peak


# ---------------------------------------------------------------------------------------------
# The closed form
def _elements(batch: int, channels: int, size: int) -> int:
    return batch * channels * size * size


def saved_activation_elements(spec: WrnSpec, conv: str, groups: int, batch: int) -> int:
    """Elements of the activations a pre-activation WRN rank keeps for backward at the end of the
    forward, every channel count divided by N:
      the stem's output; per block its output (read by the next BN), BN1-ReLU (read by conv1 and
      the shortcut), conv1's output (read by BN2) and BN2-ReLU (read by conv2); per GC-2L layer
      its all-gathered representatives [B, N, H', W']; per split-SC layer its all-gathered
      input; the head's final BN-ReLU and pooled features.
    A BN's output feeds only a ReLU, which keeps its own output; conv2's and the shortcut's feed
    only the addition: all freed during the forward. Left out: per-channel BN statistics and the
    [B, classes] logits, a few kB."""
    channels, size = 16 // groups, IMAGE_SIZE
    total = _elements(batch, channels, size)                        # stem output
    for stage, width in enumerate(spec.widths):
        for block in range(spec.blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            out_channels, out_size = width // groups, size // stride
            projection = channels != out_channels or stride != 1
            total += _elements(batch, channels, size)                # BN1-ReLU
            total += 3 * _elements(batch, out_channels, out_size)    # conv1, BN2-ReLU, output
            if conv == "gc2l" and groups > 1:
                total += (2 + projection) * _elements(batch, groups, out_size)
            if conv == "sc" and groups > 1:                          # each conv gathers its input
                total += (1 + projection) * _elements(batch, channels * groups, size) + \
                    _elements(batch, out_channels * groups, out_size)
            channels, size = out_channels, out_size
    return total + _elements(batch, channels, size) + batch * channels   # final ReLU, pooled


def cast_elements(model: nn.Module) -> int:
    """Elements of the weights autocast copies to bf16: every convolution's and the classifier's
    (not BN's affine parameters, nor A0, whose cast is transient)."""
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor)
               and not isinstance(m, nn.modules.batchnorm._BatchNorm))


def closed_form(spec: WrnSpec, conv: str, groups: int, dtype: str, batch: int) -> dict:
    """Bytes from the formulas: parameters, gradients and momentum 4P each (P from the shard);
    saved activations at 2 bytes per element under bf16 autocast, 4 otherwise, with the fp32
    images (and under bf16 their cast); the bf16 casts of the weights, 2 bytes per element.
    The peak is the larger of two states the step surely passes through: the end of the forward
    (no gradients yet: set_to_none) and the optimizer step (gradients, momentum and foreach
    SGD's weight-decayed copy of the gradients), so the measured peak cannot be lower."""
    with fake_tensors():
        model = build_shard(spec, conv, groups)
        params = sum(p.numel() for p in model.parameters())
        casts = cast_elements(model)
        buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
    low_precision = DTYPES[dtype] is not None
    p = 4 * params
    images = batch * 3 * IMAGE_SIZE ** 2 * (6 if low_precision else 4)
    weight_casts = 2 * casts if low_precision else 0
    activations = (2 if low_precision else 4) * \
        saved_activation_elements(spec, conv, groups, batch) + images + weight_casts
    end_of_forward = p + p + buffers + activations
    optimizer_step = p + p + p + p + buffers
    return dict(params=p, grads=p, optimizer=p, buffers=buffers, activations=activations,
                weight_casts=weight_casts, peak=max(end_of_forward, optimizer_step))


# ---------------------------------------------------------------------------------------------
# Rows
def fits(peak_bytes: float, capacity_gb: float) -> bool:
    return peak_bytes * (1 + FRAGMENTATION) / GB + HEADROOM_GB <= capacity_gb


def _activations(account: dict, moment: str) -> int:
    """Activations, temporaries and weight casts: all but the model, gradients and optimizer."""
    return account[moment]["activations"] + account[moment]["weight_casts"]


def memory_row(spec: WrnSpec, conv: str, groups: int, dtype: str, batch: int) -> dict:
    account = measure_step(spec, conv, groups, dtype, batch)
    closed = closed_form(spec, conv, groups, dtype, batch)
    end, at_peak, peak = account["at_end"], account["at_peak"], account["peak"]
    row = dict(model=spec.name, conv=conv, N=groups, dtype=dtype, batch=batch,
               params_per_rank=account["params_per_rank"],
               params_GB=end["params"] / GB, grads_GB=end["grads"] / GB,
               optimizer_GB=end["optimizer"] / GB, buffers_GB=end["buffers"] / GB,
               activations_GB=_activations(account, "at_peak") / GB,
               weight_casts_GB=at_peak["weight_casts"] / GB,
               grads_at_peak_GB=at_peak["grads"] / GB,
               peak_GB=peak / GB, peak_phase=account["peak_phase"],
               saved_acts_GB=_activations(account, "at_backward_start") / GB,
               closed_form_acts_GB=closed["activations"] / GB,
               closed_form_peak_GB=closed["peak"] / GB)
    row.update({f"fits_{name}": fits(peak, capacity) for name, capacity in GPUS.items()})
    return row


def memtracker_peak(spec: WrnSpec, conv: str, groups: int, dtype: str, batch: int):
    """The same fake step's peak by torch's own (private) ``MemTracker``, where this torch has
    one; None otherwise."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    with fake_tensors():
        model, optimizer, images, labels = _model_and_batch(spec, conv, groups, batch)
        _step(model, optimizer, images, labels, dtype)
        tracker = MemTracker()
        tracker.track_external(model, optimizer, images, labels,
                               *(p.grad for p in model.parameters()))
        with tracker:
            _step(model, optimizer, images, labels, dtype)
        return sum(device["Total"] for device in tracker.get_tracker_snapshot("peak").values())


def check_row(spec: WrnSpec, conv: str, groups: int, dtype: str, batch: int) -> dict:
    """One configuration measured four ways: fake tensors, real tensors (same tracker), the
    real CPU allocator, and torch's MemTracker on fake tensors."""
    fake = measure_step(spec, conv, groups, dtype, batch, fake=True)
    real = measure_step(spec, conv, groups, dtype, batch, fake=False)
    fake_peak, real_peak = fake["peak"], real["peak"]
    allocator = allocator_peak(spec, conv, groups, dtype, batch)
    memtracker = memtracker_peak(spec, conv, groups, dtype, batch)
    return dict(model=spec.name, conv=conv, N=groups, dtype=dtype, batch=batch,
                fake_peak_MB=fake_peak / 1e6, real_peak_MB=real_peak / 1e6,
                fake_vs_real_pct=100 * (fake_peak - real_peak) / real_peak,
                allocator_peak_MB=allocator / 1e6,
                allocator_excess_pct=100 * (allocator - real_peak) / real_peak,
                memtracker_peak_MB="n/a" if memtracker is None else memtracker / 1e6)


def configurations(specs, convs, groups, dtypes=("fp32",)):
    """(spec, conv, N, dtype) in table order; N = 1 is SC on one device only."""
    for spec in specs:
        for n in groups:
            for conv in (["sc"] if n == 1 else convs):
                for dtype in dtypes:
                    yield spec, conv, n, dtype


def check_buildable(specs, convs, groups) -> None:
    """Build every shard (fake, cheap) before measuring any, so that a bad N fails up front."""
    for spec, conv, n, _ in configurations(specs, convs, groups):
        with fake_tensors():
            build_shard(spec, conv, n)


# ---------------------------------------------------------------------------------------------
# Notes
def _table(rows: list[dict]) -> str:
    columns = list(rows[0])

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] +
                     ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows])


def minimum_n_table(rows: list[dict]) -> str:
    """The smallest measured N at which each network fits each GPU, per scheme and dtype; every
    series starts with SC on one device (N = 1)."""
    keys = sorted({(r["model"], r["dtype"], r["conv"]) for r in rows if r["N"] > 1},
                  key=lambda k: (k[0], k[1], CONVS.index(k[2])))
    keys = keys or sorted({(r["model"], r["dtype"], "sc") for r in rows})
    out = []
    for model, dtype, conv in keys:
        series = sorted((r for r in rows if r["model"] == model and r["dtype"] == dtype and
                         (r["conv"] == conv or r["N"] == 1)), key=lambda r: r["N"])
        row = dict(model=model, dtype=dtype, scheme="sc split" if conv == "sc" else conv)
        for gpu in GPUS:
            fitting = [r["N"] for r in series if r[f"fits_{gpu}"]]
            row[gpu] = f"N = {min(fitting)}" if fitting else "none"
        out.append(row)
    return _table(out)


def _closed_form_summary(rows: list[dict]) -> str:
    acts_gap = max(abs(r["saved_acts_GB"] / r["closed_form_acts_GB"] - 1) for r in rows)
    gaps = sorted(((100 * (r["peak_GB"] / r["closed_form_peak_GB"] - 1), i)
                   for i, r in enumerate(rows)))
    (typical, _), (worst, worst_index) = gaps[len(gaps) // 2], gaps[-1]
    row = rows[worst_index]
    return (
        f"Closed form. Parameters, gradients and momentum are 4P bytes each, exactly as "
        f"measured. Saved activations at the end of the forward (`saved_acts_GB` against "
        f"`closed_form_acts_GB`): within {100 * acts_gap:.2f}% in every row (tolerance "
        f"{100 * CLOSED_FORM_ACTS_REL:g}%; what the formula leaves out is BN's per-channel "
        f"statistics, the logits and the loss). The closed-form peak, the larger of the end of "
        f"the forward and the optimizer step, is a lower bound: the measured peak is "
        f"{typical:.1f}% above it in the median row and {worst:.1f}% at most ({row['model']} "
        f"{row['conv']} N={row['N']} {row['dtype']}). The gap is the start of the backward, "
        f"where the last layers' weight gradients and the gradients of their inputs exist while "
        f"nearly every saved activation still does; it grows with the last stage's weights "
        f"against its activations ({row['grads_at_peak_GB']:.3g} GB of gradients at that "
        f"peak).")


def _memtracker_summary(checks: list[dict]) -> str:
    pairs = [(c["fake_peak_MB"], c["memtracker_peak_MB"]) for c in checks
             if c["memtracker_peak_MB"] != "n/a"]
    if not pairs:
        return "torch's MemTracker is not in this torch, so it was not compared."
    worst = max(abs(theirs / ours - 1) for ours, theirs in pairs)
    agreement = "exactly the same peak" if worst == 0 else \
        f"the same peak to within {100 * worst:.3g}%"
    return f"torch's own (private) MemTracker, on the same fake steps, finds {agreement}."


def _real_check_summary(checks: list[dict]) -> str:
    excess = [c["allocator_excess_pct"] for c in checks]
    return (
        f"Fake against real, on {checks[0]['model']} at batch {checks[0]['batch']} (it fits "
        f"here): the same tracker on real CPU tensors gives the same peak to within "
        f"{max(abs(c['fake_vs_real_pct']) for c in checks):.3f}% (tolerance "
        f"{100 * FAKE_VS_REAL_REL:g}%; under bf16 the meta kernel of BatchNorm declares its "
        f"per-channel statistics bf16 where the real kernels keep them fp32, a few kB). "
        f"{_memtracker_summary(checks)} The CPU allocator itself "
        f"(the profiler's memory events, real tensors) peaks {min(excess):.1f}-{max(excess):.1f}% "
        f"higher: scratch buffers allocated inside the oneDNN kernels, below the dispatcher, "
        f"where no tracker sees them (tolerance 0 to {100 * ALLOCATOR_EXCESS_MAX:g}%). Their GPU "
        f"counterpart is cuDNN's workspace, left to the fixed margin.\n\n" + _table(checks))


def _method_note() -> str:
    recipe = ", ".join(f"{k} {v}" for k, v in SGD_RECIPE.items())
    return (
        "Rank 0's memory during one training step (N ranks, one group each, dp = 1), measured "
        "under torch's FakeTensorMode: nothing is allocated and no kernel runs. A warm-up step "
        "creates the momentum buffers; a TorchDispatchMode then follows every storage of the "
        "second step (zero_grad(set_to_none=True), forward, backward, SGD step) by weak "
        "reference. As a GPU rank runs it: GC-2L's fused convolution without overlap, foreach "
        f"SGD ({recipe}); bf16 is autocast: fp32 parameters, bf16 activations, and bf16 casts of "
        "every convolution and linear weight, saved for the backward and counted "
        "(`weight_casts_GB`). N = 1 is SC on one device; at N > 1 `gc2l` and `gc` are one "
        "group's shard, `sc` is SC split by output channels (each layer all-gathers its whole "
        "input, so its activations hardly shrink). GB = 1e9 bytes.")


def _columns_note() -> str:
    return (
        "Columns: `params/grads/optimizer/buffers_GB` whole (at the end of the step); "
        "`activations_GB` everything else live at the peak (saved activations, weight casts, "
        "backward and optimizer temporaries, the batch), of which `weight_casts_GB` are the "
        "casts; `grads_at_peak_GB` the gradients already made at the peak, so peak = params + "
        "optimizer + buffers + grads_at_peak + activations; `peak_phase` where the peak falls; "
        "`saved_acts_GB` activations and casts at the end of the forward; `closed_form_*` from "
        "the formulas below.")


def _fits_note() -> str:
    return (
        f"Fits: peak x {1 + FRAGMENTATION:g} + {HEADROOM_GB:g} GB <= capacity, the capacity "
        f"being the nominal {', '.join(GPUS)} in decimal GB (Titan RTX, H100, H200; the cards "
        "report a little more). The fake tensors see neither the CUDA context with its cuDNN "
        "and cuBLAS handles, nor cuDNN's convolution workspaces (an algorithm may ask for "
        "hundreds of MB), nor NCCL's communication buffers: the fixed margin. Nor the caching "
        f"allocator's 512-byte rounding, block splitting and fragmentation: the "
        f"{100 * FRAGMENTATION:g}%. With dp > 1 nothing is added: DDP's buckets hold the "
        "gradients themselves (gradient_as_bucket_view).")


def notes(rows: list[dict], checks: list[dict]) -> str:
    smallest_n = ("### Smallest N that fits\n\nPer scheme, the smallest measured N at which a "
                  "rank fits (N = 1 is SC on one device in every series).\n\n" +
                  minimum_n_table(rows))
    checks_section = "### Checks\n\n" + "\n\n".join(
        [_closed_form_summary(rows), _real_check_summary(checks)])
    return "\n\n".join([_method_note(), _columns_note(), _fits_note(), smallest_n,
                        checks_section])


# ---------------------------------------------------------------------------------------------
# Command line
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["wrn28_10"],
                        help="CIFAR WRN configs (configs/model/) or wrn<depth>_<widen>")
    parser.add_argument("--batch", type=int, default=128, help="images per step (per model)")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="N; N = 1 is SC on one device")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--convs", nargs="+", default=list(CONVS), choices=CONVS,
                        help="schemes at N > 1")
    # Small enough to run for real on a CPU, large enough that activations make the peak.
    parser.add_argument("--check-model", default="wrn16_4",
                        help="a network small enough to run for real here, for the checks")
    parser.add_argument("--check-batch", type=int, default=32)
    parser.add_argument("--check-groups", type=int, nargs="+", default=[1, 2, 4])
    add_output_options(parser)          # the committed name: memory_wrn<depth> (_default_name)
    return parser.parse_args(argv)


def _validate(args):
    for name, value in (("--batch", args.batch), ("--check-batch", args.check_batch)):
        if value < 1:
            raise ConfigError(f"{name} must be a positive number of images, got {value}")
    for n in [*args.groups, *args.check_groups]:
        if n < 1:
            raise ConfigError(f"N must be a positive number of groups, got {n}")
    specs = [resolve_model(name) for name in args.models]
    check_spec = resolve_model(args.check_model)
    check_buildable(specs, args.convs, args.groups)
    check_buildable([check_spec], ["gc2l"], args.check_groups)
    return specs, check_spec


def _default_name(specs) -> str:
    depths = {s.depth for s in specs}
    return "memory_" + (f"wrn{depths.pop()}" if len(depths) == 1 else
                        "_".join(s.name for s in specs))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        specs, check_spec = _validate(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = []
    for spec, conv, n, dtype in configurations(specs, args.convs, args.groups, args.dtypes):
        rows.append(memory_row(spec, conv, n, dtype, args.batch))
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()},
              flush=True)
    checks = [check_row(check_spec, conv, n, dtype, args.check_batch)
              for _, conv, n, dtype in configurations([check_spec], ["gc2l"], args.check_groups,
                                                      args.dtypes)]
    stem = output_stem(args, _default_name(specs))
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    title = (f"Per-rank peak memory of a training step: {', '.join(s.name for s in specs)}, "
             f"batch {args.batch}")
    write_results(stem, rows, title, command, notes(rows, checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
