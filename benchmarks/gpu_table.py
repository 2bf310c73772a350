"""The GPU check's tables (``benchmarks/gpu_check.sh``), each one rank's work on one GPU through
the per-rank simulation (``twolevel_dist.parallel.simulated``: one process runs exactly the
shard rank 0 holds at N, the collectives replaced by local stand-ins, as ``scaling.py sim``):

  steps   per-rank training-step time (forward, backward, SGD step; median of repetitions) of
          WRN-28-10 and WRN-28-40 at N = 1, 2, 4, 8, 16: SC on one device, SC split by output
          channels, GC, and GC-2L three ways (fused; fused padded to a multiple of 8 filters;
          taps), bf16 autocast and fp32 (TF32), NCHW and channels-last: gpu_step_time.md/.csv;
  train   images/s of a training step on one GPU, SC against one GC-2L shard (N = 2, 4, 8),
          eager and torch.compile'd: gpu_train_images_per_s.md/.csv;
  memory  the peak memory of a training step (torch.cuda.max_memory_allocated) beside
          benchmarks/memory.py's plan for the same network, batch, N and precision:
          gpu_memory.md/.csv;
  profile where a step's time goes, GC against GC-2L's fused shard (WRN-28-10, N = 2, bf16,
          channels-last): the host's time to issue a step against the step, the operators per
          step, and the operators that take the most device and host time (torch.profiler):
          gpu_profile.md/.csv. A shard whose host time is its step time is launch-bound.

Each table is rewritten after every configuration, so a run stopped at its time limit keeps what
it measured; ``--time-limit`` starts no configuration after that many seconds and says which it
left out. A failed configuration is marked "error", the others still run, and the exit code is 1.
``--tiny`` is the dry run's sizes (``TINY``: WRN-10-1, batch 2, 8x8 images, N = 1, 2, 4, one
step), with the same columns and files.

  python benchmarks/gpu_table.py steps --out benchmarks/results/gpu_check
  python benchmarks/gpu_table.py memory --tiny --device cpu --out /tmp/tables
"""

import argparse
import functools
import gc
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory  # noqa: E402  (its planning function and the networks it plans)
from common import (  # noqa: E402
    csv_text,
    machine,
    median,
    read_rows,
    time_steps,
    training_step,
    write_whole,
)
from plotting import IDEAL, log_axis, pyplot, save, style  # noqa: E402

from twolevel_dist.engine.device import autocast, configure_backends, synchronize  # noqa: E402
from twolevel_dist.parallel.compiling import prepare_for_compile  # noqa: E402
from twolevel_dist.parallel.sharded import ShardedTwoLevelConv2d, coarse_exchange  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Sizes: everything the GPU run and the dry run differ in, besides the device
@dataclass(frozen=True)
class Sizes:
    networks: tuple[tuple[str, int], ...]   # (network, batch): the step-time and memory tables
    groups: tuple[int, ...]                 # N; N = 1 is SC on one device
    image_size: int                         # step-time and images/s tables (memory: 32, its plan's)
    warmup: int                             # untimed steps (the first autotunes cuDNN)
    reps: int                               # timed steps; the median is reported
    train_network: tuple[str, int]          # the images/s table's network and batch
    train_groups: tuple[int, ...]           # its N; 1 is SC
    train_reps: int


# Batch 128 for both networks, the paper's: SC WRN-28-40 at 128 plans at 11.0 GB (bf16) and
# 15.0 GB (fp32) per benchmarks/results/memory_wrn28.md, far inside an 80 GB card.
GPU = Sizes(networks=(("wrn28_10", 128), ("wrn28_40", 128)), groups=(1, 2, 4, 8, 16),
            image_size=32, warmup=3, reps=5, train_network=("wrn28_10", 128),
            train_groups=(1, 2, 4, 8), train_reps=10)
# The dry run's: seconds on two busy CPU cores, every table's rows and columns still there.
TINY = Sizes(networks=(("wrn10_1", 2),), groups=(1, 2, 4), image_size=8, warmup=0, reps=1,
             train_network=("wrn10_1", 2), train_groups=(1, 2), train_reps=1)

# The step-time table's (precision, layout) pairs and schemes, most informative first, so that a
# time limit drops the least: bf16 channels-last (how a GPU trains fastest) with every scheme;
# bf16 NCHW with every GC-2L path; fp32 only SC, GC and GC-2L's default fused path.
ALL_SCHEMES = ("sc", "sc_dp", "sc_split", "gc", "gc2l_fused", "gc2l_pad8", "gc2l_taps")
COMBOS = ((("bf16", "channels_last"), ALL_SCHEMES),
          (("bf16", "NCHW"), ("sc", "gc", "gc2l_fused", "gc2l_pad8", "gc2l_taps")),
          (("fp32", "channels_last"), ("sc", "gc", "gc2l_fused")),
          (("fp32", "NCHW"), ("sc", "gc", "gc2l_fused")))
CONV_OF = {"sc": "sc", "sc_dp": "sc", "sc_split": "sc", "gc": "gc"}  # the others: gc2l


# ---------------------------------------------------------------------------------------------
# The networks
class PaddedFusedTwoLevel(nn.Module):
    """Benchmark-only, the "gc2l_pad8" scheme: a GC-2L rank layer whose fused convolution has its
    C_out/N + 1 filters padded with zero filters to a multiple of 8 (the filter counts tensor
    cores favour); the padding's outputs are dropped (one copy, in the input's layout) before
    the same coarse exchange as ``ShardedTwoLevelConv2d``'s fused path. Same numbers."""

    def __init__(self, layer: ShardedTwoLevelConv2d):
        super().__init__()
        weight = layer.weight.detach()                   # [1, C_out/N + 1, C_in/N, k, k]
        self.filters = weight.shape[1]
        padding = weight.new_zeros(1, -self.filters % 8, *weight.shape[2:])
        self.weight = nn.Parameter(torch.cat([weight, padding], dim=1))
        self.coarse_weight = layer.coarse_weight
        self.stride, self.padding, self.group = layer.stride, layer.padding, layer.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight.squeeze(0), None, self.stride, self.padding)
        layout = torch.channels_last if out.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        fused = out[:, : self.filters].contiguous(memory_format=layout)
        return coarse_exchange(fused, self.coarse_weight, self.group)


def _pad_to_eight(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ShardedTwoLevelConv2d):
                setattr(parent, name, PaddedFusedTwoLevel(child))


def build(network: str, scheme: str, n: int, device: torch.device) -> nn.Module:
    """Rank 0's shard of ``network`` at N = ``n`` (N = 1: the single-device model), built on
    ``device`` by memory.py's ``build_shard`` (so the memory table's plan is of the same
    network): GC-2L fused without overlap, as a GPU rank runs it; then the scheme's path."""
    with torch.device(device):     # a data-parallel replica is the whole SC network
        model = memory.build_shard(memory.resolve_model(network), CONV_OF.get(scheme, "gc2l"),
                                   1 if scheme == "sc_dp" else n)
    if scheme == "gc2l_taps":
        for module in model.modules():
            if isinstance(module, ShardedTwoLevelConv2d):
                module.impl = "taps"
    if scheme == "gc2l_pad8":
        _pad_to_eight(model)
    return model


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _release(device: torch.device) -> None:
    """Free what the last configuration left (its model, optimizer state, cached blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The tables
def step_plan(sizes: Sizes) -> list[dict]:
    return [dict(network=network, batch=batch, precision=precision, layout=layout,
                 scheme=scheme, N=n)
            for (precision, layout), schemes in COMBOS
            for network, batch in sizes.networks
            for n in sizes.groups
            for scheme in schemes if (scheme == "sc") == (n == 1)]


def rank_batch(config: dict) -> int:
    """The images one rank computes per step: a data-parallel replica (``sc_dp``) its 1/N of
    the global batch, every other scheme the whole batch (its shard of the channels)."""
    return config["batch"] // config["N"] if config["scheme"] == "sc_dp" else config["batch"]


def measure_step_time(config: dict, sizes: Sizes, device: torch.device) -> dict:
    model = build(config["network"], config["scheme"], config["N"], device)
    step = training_step(model, rank_batch(config), sizes.image_size, device=device,
                         channels_last=config["layout"] == "channels_last",
                         amp=config["precision"] == "bf16")
    times = time_steps(step, sizes.warmup, sizes.reps, lambda: synchronize(device))
    return dict(params_per_rank=parameters(model), step_ms=1e3 * median(times),
                step_min_ms=1e3 * min(times))


def train_plan(sizes: Sizes) -> list[dict]:
    """Every N eager first (seconds), then compiled (a compilation each): a time limit leaves
    out compiled rows only."""
    network, batch = sizes.train_network
    return [dict(network=network, batch=batch, precision="bf16", layout="channels_last",
                 scheme="sc" if n == 1 else "gc2l_shard", N=n, mode=mode)
            for mode in ("eager", "compiled") for n in sizes.train_groups]


def measure_images_per_s(config: dict, sizes: Sizes, device: torch.device,
                         backend: str = "inductor") -> dict:
    """Images/s from the median step, eager or ``torch.compile(prepare_for_compile(model))`` as
    ``train.compile=true`` has it; and the first step's seconds (cuDNN's autotuning; compiled:
    the compilation of forward and backward too)."""
    model = build(config["network"], "sc" if config["N"] == 1 else "gc2l_fused", config["N"],
                  device)
    if config["mode"] == "compiled":
        torch.compiler.reset()                 # no graph cached by an earlier configuration
        model = torch.compile(prepare_for_compile(model), backend=backend)
    step = training_step(model, config["batch"], sizes.image_size, device=device,
                         channels_last=True, amp=True)
    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    times = time_steps(step, sizes.warmup, sizes.train_reps, lambda: synchronize(device))
    return dict(params_per_rank=parameters(model), img_s=config["batch"] / median(times),
                first_step_s=first)


def _with_compile_speedup(rows: list[dict]) -> list[dict]:
    eager = {r["N"]: r["img_s"] for r in rows if r["mode"] == "eager" and r["status"] == "ok"}
    return [{**r, "compiled_speedup": r["img_s"] / eager[r["N"]]
             if r["mode"] == "compiled" and r["status"] == "ok" and r["N"] in eager
             else math.nan} for r in rows]


def memory_plan(sizes: Sizes) -> list[dict]:
    return [dict(network=network, batch=batch, precision=precision, conv="sc" if n == 1 else
                 "gc2l", N=n)
            for precision in ("bf16", "fp32") for network, batch in sizes.networks
            for n in sizes.groups]


def _cuda_peak(spec, conv: str, n: int, precision: str, batch: int, device) -> int:
    """Bytes the caching allocator held for tensors at the peak of a step after a warm-up step,
    above what was held before the model was built: memory.py's step (foreach SGD with its
    recipe, zero_grad to None, the loss under autocast) on the GPU."""
    _release(device)
    held_before = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = memory.build_shard(spec, conv, n)
        images = torch.randn(batch, 3, memory.IMAGE_SIZE, memory.IMAGE_SIZE)
        labels = torch.randint(0, memory.NUM_CLASSES, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), foreach=True, **memory.SGD_RECIPE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision == "bf16"):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    step()                                           # momentum buffers; cuDNN's autotuning
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - held_before


def measure_memory(config: dict, sizes: Sizes, device: torch.device) -> dict:
    spec = memory.resolve_model(config["network"])
    args = (spec, config["conv"], config["N"], config["precision"], config["batch"])
    planned = memory.measure_step(*args)["peak"]
    if device.type == "cuda":
        measured, how = _cuda_peak(*args, device), "torch.cuda.max_memory_allocated"
    else:       # the dry run: memory.py's own tracker on real CPU tensors
        measured, how = memory.measure_step(*args, fake=False)["peak"], "tracker, CPU tensors"
    return dict(measured_GB=measured / memory.GB, planned_GB=planned / memory.GB,
                measured_over_planned=measured / planned, measured_by=how)


def profile_plan(sizes: Sizes) -> list[dict]:
    network, batch = sizes.train_network
    n = max(n for n in sizes.train_groups if n <= 2)
    return [dict(network=network, batch=batch, precision="bf16", layout="channels_last",
                 scheme=scheme, N=n) for scheme in ("gc", "gc2l_fused")]


PROFILED_STEPS = 3


def _top(events, key, count: int = 6) -> str:
    """The ``count`` operators with the most ``key`` time: "name ms (calls)", by descending time."""
    ranked = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:count]
    return "; ".join(f"{e.key} {getattr(e, key, 0) / 1e3 / PROFILED_STEPS:.2f} "
                     f"({e.count // PROFILED_STEPS})" for e in ranked if getattr(e, key, 0) > 0)


def measure_profile(config: dict, sizes: Sizes, device: torch.device) -> dict:
    """One configuration's step, unprofiled then profiled: ``step_ms`` (synchronised) and
    ``host_ms`` (the time for the step's Python call to return: the host issuing its work,
    which a GPU runs behind it), then ``PROFILED_STEPS`` steps under torch.profiler: the
    operators per step and the ones with the most device and host time, in ms per step."""
    from torch.profiler import ProfilerActivity, profile
    model = build(config["network"], config["scheme"], config["N"], device)
    step = training_step(model, config["batch"], sizes.image_size, device=device,
                         channels_last=True, amp=True)
    times = time_steps(step, sizes.warmup, sizes.reps, lambda: synchronize(device))
    host = time_steps(step, 0, sizes.reps, lambda: synchronize(device), until_done=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        synchronize(device)
    events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "twolevel::"))]
    device_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return dict(step_ms=1e3 * median(times), host_ms=1e3 * median(host),
                ops_per_step=sum(e.count for e in events) // PROFILED_STEPS,
                top_device_ms=_top(events, device_key),
                top_host_ms=_top(events, "self_cpu_time_total"))


# ---------------------------------------------------------------------------------------------
# Files
def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown(columns: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] +
            ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows])


def write_table(stem: Path, rows: list[dict], title: str, notes: list[str],
                table: list[str]) -> None:
    """``stem``.csv (every column of ``rows``) and ``stem``.md (title, command, machine, notes,
    ``table``), each written whole."""
    write_whole(stem.with_suffix(".csv"), csv_text(rows))
    command = "python benchmarks/gpu_table.py " + " ".join(sys.argv[1:])
    lines = [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {_machine()}", ""]
    lines += [line for note in notes for line in (note, "")] + table
    write_whole(stem.with_suffix(".md"), "\n".join(lines) + "\n")


def _with_ratios(rows: list[dict]) -> list[dict]:
    """The step-time rows with their speedup over SC at N = 1 (same network, precision and
    layout), the ideal one (N for split SC, N^2 for GC and GC-2L: a rank does 1/N^2 of SC's
    work), the efficiency against it, and GC-2L's step over GC's at the same N."""
    def key(row, **change):
        return tuple({**row, **change}[k] for k in ("network", "precision", "layout", "scheme",
                                                    "N"))
    times = {key(r): r["step_ms"] for r in rows if r["status"] == "ok"}
    out = []
    for row in rows:
        sc1, gc = times.get(key(row, scheme="sc", N=1)), times.get(key(row, scheme="gc"))
        ideal = 1 if row["scheme"] == "sc" else row["N"] if row["scheme"] in ("sc_split",
                                                                             "sc_dp") \
            else row["N"] ** 2
        ok = row["status"] == "ok"
        speedup = sc1 / row["step_ms"] if ok and sc1 else math.nan
        out.append({**row, "speedup_vs_sc1": speedup, "ideal": ideal,
                    "efficiency": speedup / ideal,
                    "vs_gc": row["step_ms"] / gc if ok and gc and
                    row["scheme"].startswith("gc2l") else math.nan})
    return out


def step_table(rows: list[dict], plan: list[dict], groups) -> list[str]:
    """One line per network, precision, layout and scheme; per N the step's milliseconds and,
    in brackets, the speedup over SC at N = 1."""
    done = {tuple(r[k] for k in ("network", "precision", "layout", "scheme", "N")): r
            for r in rows}
    lines = list(dict.fromkeys((c["network"], c["batch"], c["precision"], c["layout"],
                                c["scheme"]) for c in plan))
    planned = {tuple(c[k] for k in ("network", "precision", "layout", "scheme", "N"))
               for c in plan}
    table = []
    for network, batch, precision, layout, scheme in lines:
        cells = []
        for n in groups:
            key = (network, precision, layout, scheme, n)
            row = done.get(key)
            if key not in planned:
                cells.append("")
            elif row is None:
                cells.append("not run")
            elif row["status"] != "ok":
                cells.append("error")
            elif math.isnan(row["speedup_vs_sc1"]):
                cells.append(f"{row['step_ms']:.3g}")
            else:
                cells.append(f"{row['step_ms']:.3g} ({row['speedup_vs_sc1']:.3g}x)")
        table.append([network, batch, precision, layout, scheme, *cells])
    return _markdown(["network", "batch", "precision", "layout", "scheme",
                      *(f"N={n}" for n in groups)], table)


def _long_table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return _markdown(columns, [[row.get(c, "") for c in columns] for row in rows])


def _compile_note(backend: str) -> str:
    if os.environ.get("TORCH_COMPILE_DISABLE") == "1":
        return "TORCH_COMPILE_DISABLE=1: torch.compile was a no-op, the compiled rows ran eagerly."
    if backend == "inductor":
        return "Compiled: torch.compile's default mode and backend (inductor), as train.py has it."
    return (f"Compiled with torch.compile's {backend!r} backend, not train.py's inductor (the dry "
            f"run: dynamo and AOTAutograd without inductor's code generation, minutes on a CPU).")


def _device_note(device: torch.device) -> str:
    if device.type != "cuda":
        return "Device: CPU (the dry run's sizes: a check of the script, not a measurement)."
    return ("Device: one GPU; fp32 with TF32 allowed (cuDNN and matrix products, as "
            "train.tf32=true), cudnn.benchmark on.")


# ---------------------------------------------------------------------------------------------
# Running a table
@dataclass(frozen=True)
class Run:
    table: str                  # a key of TABLES
    sizes: Sizes
    device: torch.device
    out: Path
    limit: float | None         # --time-limit
    backend: str                # torch.compile's, for the train table

    @property
    def stem(self) -> Path:
        return self.out / TABLES[self.table]["stem"]


TABLES = {
    "steps": dict(stem="gpu_step_time", plan=step_plan,
                  title="Per-rank training-step time on one GPU (per-rank simulation)"),
    "train": dict(stem="gpu_train_images_per_s", plan=train_plan,
                  title="Training images/s on one GPU: SC against one GC-2L shard, eager and "
                        "compiled"),
    "memory": dict(stem="gpu_memory", plan=memory_plan,
                   title="Peak memory of a training step: measured against memory.py's plan"),
    "profile": dict(stem="gpu_profile", plan=profile_plan,
                    title="Where a step's time goes: GC against GC-2L's fused shard"),
}


def measure(run: Run, config: dict) -> dict:
    if run.table == "steps":
        return measure_step_time(config, run.sizes, run.device)
    if run.table == "train":
        return measure_images_per_s(config, run.sizes, run.device, run.backend)
    if run.table == "profile":
        return measure_profile(config, run.sizes, run.device)
    return measure_memory(config, run.sizes, run.device)


def _notes(run: Run, left_out: int, why: str) -> list[str]:
    sizes, notes = run.sizes, [_device_note(run.device)]
    if run.table == "steps":
        notes += [
            "One rank's shard at N (twolevel_dist.parallel.simulated, as scaling.py sim): its "
            "compute only, the collectives replaced by local stand-ins. A step: zero_grad, "
            "forward and loss (under bf16 autocast for bf16), backward, SGD with momentum "
            f"(common.training_step); the median of {sizes.reps} timed steps after "
            f"{sizes.warmup} untimed. Cells: per-rank step ms (speedup over SC at N = 1, same "
            "network, precision and layout); the csv adds the ideal speedup (N for split and "
            "data-parallel SC, N^2 otherwise), the efficiency and GC-2L's step over GC's "
            "(`vs_gc`).",
            "Schemes: `sc` one device; `sc_dp` one data-parallel (DDP) replica's compute: SC "
            "on batch/N images (its gradient all-reduce is not in the step: one GPU); "
            "`sc_split` SC split by output channels (each layer "
            "gathers its whole input); `gc` group convolution; GC-2L `gc2l_fused` (one "
            "convolution of C_out/N + 1 filters, the GPU default), `gc2l_pad8` (the same padded "
            "with zero filters to a multiple of 8, outputs dropped by one copy; a benchmark-only "
            "layer in gpu_table.py, whose params_per_rank counts the zero filters), `gc2l_taps` "
            "(local convolution, representative by kernel taps; no overlap).",
            "Left out by design, to fit the GPU check's minutes: `sc_split` beyond bf16 "
            "channels-last, `gc2l_pad8` and `gc2l_taps` in fp32."]
        if sizes == GPU:
            notes.append("Batch 128 for both networks: SC WRN-28-40 plans at 11.0 GB (bf16) and "
                         "15.0 GB (fp32) per rank (benchmarks/memory.py).")
    elif run.table == "train":
        notes += [
            "One process, one GPU: SC (N = 1) and rank 0's GC-2L shard at N (per-rank "
            "simulation, collectives replaced by local stand-ins, the fused path), bf16 "
            f"autocast, channels-last; images/s from the median of {sizes.train_reps} steps "
            f"after {sizes.warmup} (common.training_step); `first_step_s`: the first step "
            "(cuDNN's autotuning; compiled: the compilation too); `compiled_speedup`: compiled "
            "images/s over eager at the same N. Every N eager first, then compiled.",
            _compile_note(run.backend)]
    elif run.table == "profile":
        notes += [
            "One process, one GPU, rank 0's shard (per-rank simulation), bf16 autocast, "
            "channels-last. `step_ms`: the median synchronised step; `host_ms`: the median "
            "time for the step's Python call to return (the host issuing the work, which the "
            "device runs behind it: where it equals the step, the step waits on the host, "
            "launch-bound). Then 3 steps under torch.profiler: `ops_per_step`, the aten and "
            "twolevel operators called per step (nested calls included); `top_device_ms` and "
            "`top_host_ms`, the six operators with the most self time on the device and on "
            "the host: ms per step (calls per step). On a CPU both are host time."]
    else:
        notes += [
            "memory.py's plan (FakeTensorMode, nothing allocated) against a real step on the "
            "device: the same network built by memory.build_shard, foreach SGD with the "
            "recipe, measured on the step after a warm-up step, above what was allocated "
            "before the model. torch.cuda.max_memory_allocated also counts what the plan "
            "leaves to its fixed margin: cuDNN's workspaces and the allocator's 512-byte "
            "rounding."]
    if left_out:
        notes.append(f"**{left_out} configuration(s) not run: {why}.**")
    return notes


def _write(run: Run, rows: list[dict], plan: list[dict], left_out: int = 0,
           why: str = "") -> None:
    title = TABLES[run.table]["title"]
    if run.table == "steps":
        rows = _with_ratios(rows)
        table = step_table(rows, plan, run.sizes.groups)
    else:
        rows = _with_compile_speedup(rows) if run.table == "train" else rows
        table = _long_table(rows)
    write_table(run.stem, rows, title, _notes(run, left_out, why), table)


def run_table(run: Run) -> int:
    """Every configuration of the table's plan in order, the files rewritten after each; 1 if
    any failed. Interrupted (SIGINT: gpu_check.sh's timeout), it says so in the files first."""
    plan = TABLES[run.table]["plan"](run.sizes)
    rows, failed, start = [], 0, time.perf_counter()
    try:
        for index, config in enumerate(plan):
            if run.limit is not None and time.perf_counter() - start > run.limit:
                why = f"the time limit of {run.limit:g} s was reached"
                print(f"{why}: {len(plan) - index} configuration(s) not run", file=sys.stderr)
                _write(run, rows, plan, len(plan) - index, why)
                break
            rows.append(_measured(run, config))
            failed += rows[-1]["status"] != "ok"
            print(" ".join(f"{k}={_fmt(v)}" for k, v in rows[-1].items()), flush=True)
            _write(run, rows, plan)
    except KeyboardInterrupt:
        _write(run, rows, plan, len(plan) - len(rows), "interrupted (the step's time budget)")
        raise
    if run.table == "steps":
        _plot(_with_ratios(rows), run.stem.with_suffix(".png"))
    return 1 if failed else 0


def _measured(run: Run, config: dict) -> dict:
    """The configuration's row: its measurements, or its error (one configuration fails, not
    the table; the traceback goes to the log)."""
    began = time.perf_counter()
    try:
        result = dict(status="ok", **measure(run, config))
    except Exception as error:
        traceback.print_exc()
        first_line = (str(error).strip().splitlines() or [""])[0]
        result = dict(status=f"error: {type(error).__name__}: {first_line}")
    _release(run.device)
    return {**config, **result, "seconds": time.perf_counter() - began}


def step_time_figure(plt, rows: list[dict]):
    """Per-rank step time against N, bf16 channels-last, one panel per network; None if no such
    row succeeded. Every scheme's line starts at SC on one device (N = 1)."""
    rows = [r for r in rows if r["status"] == "ok" and r["precision"] == "bf16"
            and r["layout"] == "channels_last"]
    networks = list(dict.fromkeys(r["network"] for r in rows))
    if not networks:
        return None
    fig, axes = plt.subplots(1, len(networks), figsize=(5 * len(networks), 4), squeeze=False)
    for ax, network in zip(axes[0], networks):
        ours = [r for r in rows if r["network"] == network]
        sc1 = [r["step_ms"] for r in ours if r["scheme"] == "sc"]
        for scheme in ALL_SCHEMES[1:]:
            points = sorted((r["N"], r["step_ms"]) for r in ours if r["scheme"] == scheme)
            if points and sc1:
                ax.plot(*zip((1, sc1[0]), *points), label=scheme, **style(scheme))
        ns = sorted({r["N"] for r in ours})
        if sc1:
            ax.plot(ns, [sc1[0] / n ** 2 for n in ns], label="SC / N² (ideal)", **IDEAL)
        log_axis(ax, "x", ticks=ns)
        log_axis(ax, "y", base=10)
        ax.set(xlabel="N (groups = ranks)", ylabel="per-rank step (ms)",
               title=f"{network}, bf16, channels-last")
        ax.legend(fontsize=7)
    return fig


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig = step_time_figure(plt, rows) if plt is not None else None
    if fig is not None:
        save(fig, path)


def replot(csv_path: Path, stem: Path) -> None:
    """The step-time plot from a gpu_step_time.csv alone (benchmarks/replot.py)."""
    _plot(read_rows(csv_path), stem.with_suffix(".png"))


@functools.cache
def _machine() -> str:
    return machine()         # once: it asks git for the commit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("--out", required=True, type=Path, help="folder for the .csv and .md")
    parser.add_argument("--tiny", action="store_true",
                        help="the dry run's sizes (TINY): WRN-10-1, batch 2, one step")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="start no configuration after this many seconds")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend in the train table (train.py: inductor)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; --tiny --device cpu runs the dry run's sizes",
              file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.tiny:
        print(f"error: the GPU sizes on {device.type} would take hours; add --tiny",
              file=sys.stderr)
        return 2
    configure_backends(device)
    return run_table(Run(args.table, TINY if args.tiny else GPU, device, args.out,
                         args.time_limit, args.compile_backend))


if __name__ == "__main__":
    raise SystemExit(main())
