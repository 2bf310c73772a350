"""Data parallelism (DDP), GC-2L group parallelism, or both: a projected training step on N GPUs.

For WRN-28-10 and WRN-28-40 at global batch 128, per scheme and link, the step time is one
rank's compute as measured on one GPU (the GPU check's ``gpu_step_time.csv``: bf16 autocast,
channels-last, per-rank simulation, no real collective) plus its communication as modelled by
``twolevel_dist/parallel/comm_model.py`` (ring collectives over ``--links``):

  sc     SC on one GPU (measured ``sc`` at N = 1): the baseline.
  ddp    N replicas of SC, each on 128/N images (measured ``sc_dp`` at N), then DDP's all-reduce
         of the fp32 gradients (4P bytes, in DDP's buckets): two bounds, no overlap with the
         backward and ideal overlap (every bucket but the last hidden behind the backward,
         taken as BACKWARD_SHARE of the measured step).
  gc2l   GC-2L, one group per GPU (measured ``gc2l_fused`` at N): per layer an all-gather of
         the representatives and a reduce-scatter backward (bf16), not overlapped (the GPU
         path), and the logits' all-reduce.
  gc     GC, one group per GPU (measured ``gc`` at N), the logits' all-reduce only: no coarse
         level, for reference (less accurate: the accuracy table).
  mix    dp x gp = N: dp replicas of a GC-2L model with gp groups, each on 128/dp images: the
         gp collectives, then DDP's all-reduce of a shard's gradients among the dp replicas.
         Its shard was measured at batch 128 only, not at 128/dp: that time stands in as an
         upper bound (a step on fewer images is taken to be no slower), so the mix's step time
         is an upper bound (marked <=) and its speedup a lower bound (>=).

Per rank also: parameters, bytes per step, and the planned peak memory (benchmarks/memory.py's
fake-tensor plan, bf16, at the rank's batch; DDP's buckets hold the gradients themselves,
gradient_as_bucket_view, so dp > 1 adds nothing to it). A
second table puts the accuracy sweep's test errors beside the projected speed.

  python benchmarks/dp_vs_gp.py --update

(--update replaces the committed benchmarks/results/dp_vs_gp_wrn28.{csv,md,png} and
dp_vs_gp_wrn28_accuracy.csv; without it a run writes to a fresh folder,
benchmarks/results/new/<UTC time>/.)
"""

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory  # noqa: E402  (the per-rank memory plan and the networks it builds)
from common import (  # noqa: E402
    RESULTS,
    add_output_options,
    at_least,
    existing_file,
    machine,
    output_stem,
    read_rows,
    run_cli,
    shown,
)
from plotting import IDEAL, log_axis, pyplot, save, style  # noqa: E402

from twolevel_dist.errors import ConfigError  # noqa: E402
from twolevel_dist.paper import PAPER_CIFAR10_ERROR_WRN28_10  # noqa: E402
from twolevel_dist.parallel.comm_model import (  # noqa: E402
    LINKS,
    ddp_bucket_bytes,
    ddp_seconds,
    expected_comm,
    modelled_seconds,
    sent_bytes,
)

STEPS_CSV = RESULTS / "gpu_check" / "20261205-193619" / "gpu_step_time.csv"
ACCURACY_CSVS = (RESULTS / "accuracy_cifar10_wrn10_2_cpu.csv",
                 RESULTS / "accuracy_cifar10_mobilenet_v2_cpu.csv")
# The backward's share of a measured step (forward, backward, SGD): a convolution's backward
# does about twice its forward's work. Only the ideal-overlap bound uses it.
BACKWARD_SHARE = 2 / 3
PRECISION, LAYOUT, DTYPE_BYTES = "bf16", "channels_last", 2    # how the compute was measured
CAPACITY_GB = 80.0                                             # one H100
NAMES = {"wrn28_10": "WRN-28-10", "wrn28_40": "WRN-28-40"}


@dataclass(frozen=True)
class Scheme:
    kind: str        # sc, ddp, gc2l, gc, mix
    dp: int          # replicas
    gp: int          # ranks per model (groups)

    @property
    def conv(self) -> str:
        return {"sc": "sc", "ddp": "sc", "gc": "gc"}.get(self.kind, "gc2l")

    @property
    def label(self) -> str:
        return {"sc": "SC, one GPU", "ddp": "DDP", "gc2l": "GC-2L", "gc": "GC"}.get(
            self.kind, f"dp {self.dp} x gp {self.gp}")

    @property
    def measured_as(self) -> tuple[str, int]:
        """The gpu_step_time.csv cell (scheme, N) that holds this scheme's per-rank compute."""
        return {"sc": ("sc", 1), "ddp": ("sc_dp", self.dp), "gc": ("gc", self.gp)}.get(
            self.kind, ("gc2l_fused", self.gp))


def schemes(n: int) -> list[Scheme]:
    if n == 1:
        return [Scheme("sc", 1, 1)]
    mixes = [Scheme("mix", n // gp, gp) for gp in (2, 4, 8) if gp < n and n % gp == 0]
    return [Scheme("ddp", n, 1), Scheme("gc2l", 1, n), Scheme("gc", 1, n), *mixes]


# ---------------------------------------------------------------------------------------------
# Inputs
STEP_COLUMNS = ("network", "scheme", "N", "step_ms", "params_per_rank", "status", "precision",
                "layout", "batch")


def read_steps(path: Path) -> dict:
    """{(network, scheme, N): (step ms, params per rank)} of the bf16 channels-last cells."""
    with open(path) as f:
        columns = csv.DictReader(f).fieldnames or []
        missing = [c for c in STEP_COLUMNS if c not in columns]
        if missing:
            raise ConfigError(f"--steps {path} is not a step-time table (no column "
                              f"{', '.join(missing)}): give the GPU check's gpu_step_time.csv")
        f.seek(0)
        return {(r["network"], r["scheme"], int(r["N"])): (float(r["step_ms"]),
                                                           int(r["params_per_rank"]))
                for r in csv.DictReader(f)
                if r["status"] == "ok" and r["precision"] == PRECISION
                and r["layout"] == LAYOUT and r["batch"] == "128"}


def steps_machine(path: Path) -> str:
    """The ``Machine:`` line of the step table's markdown beside the csv."""
    md = path.with_suffix(".md")
    lines = md.read_text().splitlines() if md.is_file() else []
    return next((line.removeprefix("Machine: ") for line in lines
                 if line.startswith("Machine: ")), "unknown (no markdown beside the csv)")


# ---------------------------------------------------------------------------------------------
# What a rank of a scheme holds and sends (independent of the link)
def rank_profile(network: str, scheme: Scheme, batch: int, with_memory: bool) -> dict:
    spec = memory.resolve_model(network)
    rank_batch = batch // scheme.dp
    with torch.device("meta"):       # shapes only: WRN-28-40 costs nothing
        shard = memory.build_shard(spec, scheme.conv, scheme.gp)
        buckets = ddp_bucket_bytes(shard) if scheme.dp > 1 else []
        calls, nbytes = expected_comm(spec.build(scheme.conv, scheme.gp), scheme.gp, rank_batch,
                                      memory.IMAGE_SIZE, memory.NUM_CLASSES, DTYPE_BYTES) \
            if scheme.gp > 1 else ({}, {})
    params = sum(p.numel() for p in shard.parameters())
    peak = None
    if with_memory:     # the plan's peak: DDP's buckets are the gradients (gradient_as_bucket_view)
        peak = memory.measure_step(spec, scheme.conv, scheme.gp, PRECISION, rank_batch)["peak"]
    return dict(params=params, buckets=buckets, calls=calls, nbytes=nbytes, peak=peak)


def project(network: str, scheme: Scheme, link_name: str, profile: dict, steps: dict,
            batch: int) -> dict:
    """One row: measured compute + modelled communication over ``link_name``."""
    link, (cell, cell_n) = LINKS[link_name], scheme.measured_as
    measured = steps.get((network, cell, cell_n))
    compute = measured[0] / 1e3 if measured else None
    source = f"{cell} N={cell_n}" if measured else f"not measured ({cell} N={cell_n})"
    if measured and scheme.kind == "mix":
        source = f"upper bound: {cell} N={cell_n} at batch {batch}, not {batch // scheme.dp}"
    gp_s = modelled_seconds(profile["calls"], profile["nbytes"], scheme.gp, link)
    dp_no, dp_ideal = ddp_seconds(profile["buckets"], scheme.dp, link,
                                  BACKWARD_SHARE * compute if compute else 0.0)
    grads = sum(profile["buckets"])
    row = dict(network=network, link=link_name, N=scheme.dp * scheme.gp, scheme=scheme.label,
               kind=scheme.kind, dp=scheme.dp, gp=scheme.gp, rank_batch=batch // scheme.dp,
               compute_ms=_ms(compute), compute_source=source, gp_comm_ms=1e3 * gp_s,
               dp_comm_no_overlap_ms=1e3 * dp_no, dp_comm_ideal_overlap_ms=1e3 * dp_ideal,
               step_no_overlap_ms=_ms(compute and compute + gp_s + dp_no),
               step_ideal_overlap_ms=_ms(compute and compute + gp_s + dp_ideal),
               speedup_no_overlap="", speedup_ideal_overlap="",
               gradient_allreduce_MB=grads / 1e6,
               gp_collectives_MB=sum(profile["nbytes"].values()) / 1e6,
               sent_MB_per_rank=(sent_bytes({"all_reduce": grads}, scheme.dp) +
                                 sent_bytes(profile["nbytes"], scheme.gp)) / 1e6,
               params_per_rank=profile["params"],
               memory_GB="" if profile["peak"] is None else profile["peak"] / memory.GB,
               fits_80GB="" if profile["peak"] is None else memory.fits(profile["peak"],
                                                                        CAPACITY_GB))
    if measured and measured[1] != profile["params"]:
        raise SystemExit(f"error: {network} {source} has {measured[1]} parameters per rank, "
                         f"the shard built here {profile['params']}: not the same network")
    return row


def _ms(seconds):
    return "" if seconds is None else 1e3 * seconds


def with_speedups(rows: list[dict]) -> list[dict]:
    """Speedup over SC on one GPU (same network), for both bounds."""
    base = {r["network"]: r["step_no_overlap_ms"] for r in rows if r["kind"] == "sc"}
    for r in rows:
        for bound in ("no_overlap", "ideal_overlap"):
            step = r[f"step_{bound}_ms"]
            r[f"speedup_{bound}"] = base[r["network"]] / step if step != "" else ""
    return rows


def projection(networks, gpus, links, steps, batch: int, with_memory: bool) -> list[dict]:
    rows = []
    for network in networks:
        for n in [1, *gpus]:
            for scheme in schemes(n):
                profile = rank_profile(network, scheme, batch, with_memory)
                for link in links if n > 1 else links[:1]:     # one GPU: no link
                    rows.append(project(network, scheme, link, profile, steps, batch))
                    rows[-1]["link"] = rows[-1]["link"] if n > 1 else "none"
    return with_speedups(rows)


# ---------------------------------------------------------------------------------------------
# Who wins
def _find(rows, network, link, n, kind):
    return next((r for r in rows if r["network"] == network and r["kind"] == kind
                 and r["N"] == n and (r["link"] == link or kind == "sc")), None)


def winners(rows: list[dict], networks, gpus, links) -> list[dict]:
    """Per network, link and N: the fastest of SC on one GPU, DDP and GC-2L (gp = N) with
    DDP's all-reduce ideally overlapped (DDP's best case) and not overlapped (its worst), by how
    much (its step against the runner-up's), and the best dp x gp mix's upper bound."""
    out = []
    for network in networks:
        for link in links:
            for n in gpus:
                cands = [_find(rows, network, link, k_n, kind)
                         for kind, k_n in (("sc", 1), ("ddp", n), ("gc2l", n))]
                entry = dict(network=network, link=link, N=n)
                for bound in ("ideal_overlap", "no_overlap"):
                    timed = sorted((r[f"step_{bound}_ms"], r["scheme"]) for r in cands
                                   if r[f"step_{bound}_ms"] != "")
                    best = f"{timed[0][1]} by {timed[1][0] / timed[0][0]:.2f}x"
                    if len(timed) < len(cands):
                        best += " (GC-2L not measured)"
                    entry[f"fastest_if_ddp_{bound}"] = best
                mixes = sorted((r["step_no_overlap_ms"], r["scheme"]) for r in rows
                               if r["network"] == network and r["link"] == link
                               and r["N"] == n and r["kind"] == "mix")
                entry["best_mix"] = f"{mixes[0][1]}: <= {mixes[0][0]:.3g} ms" if mixes else ""
                out.append(entry)
    return out


def crossover(rows: list[dict], network: str, link: str, gpus, bound: str) -> str:
    """The smallest N from which GC-2L's step is shorter than DDP's, at every larger N
    measured; or why there is none."""
    faster = []
    for n in gpus:
        gc2l, ddp = _find(rows, network, link, n, "gc2l"), _find(rows, network, link, n, "ddp")
        if gc2l[f"step_{bound}_ms"] != "":
            faster.append((n, gc2l[f"step_{bound}_ms"] < ddp[f"step_{bound}_ms"]))
    if not faster:
        return "GC-2L not measured"
    if all(f for _, f in faster):
        return f"GC-2L faster at every N measured ({', '.join(str(n) for n, _ in faster)})"
    if not any(f for _, f in faster):
        return "DDP faster at every N measured"
    wins = [n for n, f in faster if f]
    return f"GC-2L faster at N = {', '.join(map(str, wins))} only"


# ---------------------------------------------------------------------------------------------
# Accuracy beside speed
def read_accuracy(paths) -> dict:
    """{(model, conv, N): [final test error per seed]} of the finished cells."""
    cells = {}
    for path in paths:
        if not Path(path).is_file():
            continue
        with open(path) as f:
            for r in csv.DictReader(f):
                if r["finished"] == "True":
                    cells.setdefault((r["model"], r["conv"], int(r["N"])), []).append(
                        float(r["final_test_error"]))
    return cells


def _mean(values):
    return sum(values) / len(values) if values else None


def accuracy_rows(cells: dict, rows: list[dict], networks, links) -> list[dict]:
    """Per kind and N: WRN-10-2's error (the CPU sweep) and its gap to SC, the paper's
    WRN-28-10 figure and gap, MobileNetV2's where the sweep has it, and the projected step of
    that kind (gp = N) against DDP's at the same N (DDP ideally overlapped: its best case)."""
    sc = _mean(cells.get(("wrn-10-2", "sc", 1), []))
    mobile_sc = _mean(cells.get(("mobilenet_v2", "sc", 1), []))
    out = []
    for kind in ("gc2l", "gc", "shuffle", "flgc"):
        for n in (2, 4, 8, 16):
            errors = cells.get(("wrn-10-2", kind, n), [])
            mobile = _mean(cells.get(("mobilenet_v2", kind, n), []))
            paper = PAPER_CIFAR10_ERROR_WRN28_10.get((kind, n))
            row = dict(kind=kind, N=n, wrn10_2_error=_mean(errors) or "",
                       wrn10_2_seeds=len(errors),
                       wrn10_2_vs_sc=_mean(errors) - sc if errors and sc else "",
                       paper_wrn28_10_error=paper or "",
                       paper_wrn28_10_vs_sc=paper - PAPER_CIFAR10_ERROR_WRN28_10[("sc", 1)]
                       if paper else "",
                       mobilenet_v2_vs_sc=mobile - mobile_sc if mobile and mobile_sc else "")
            for network in networks:
                for link in links:
                    mine = _find(rows, network, link, n, kind)
                    ddp = _find(rows, network, link, n, "ddp")
                    ratio = ""
                    if mine and mine["step_ideal_overlap_ms"] != "":
                        ratio = ddp["step_ideal_overlap_ms"] / mine["step_ideal_overlap_ms"]
                    row[f"speed_vs_ddp_{network}_{link}"] = ratio
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Where SC stops fitting one GPU
def largest_sc_batch(network: str, capacity_gb: float = CAPACITY_GB, top: int = 1 << 16) -> int:
    """The largest batch at which SC on one GPU fits ``capacity_gb`` by the memory plan (bf16),
    by bisection on the fake-tensor plan (seconds: nothing is allocated)."""
    spec = memory.resolve_model(network)

    def fits(batch):
        return memory.fits(memory.measure_step(spec, "sc", 1, PRECISION, batch)["peak"],
                           capacity_gb)
    low, high = 1, top
    if fits(high):
        return high
    while high - low > 1:         # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# ---------------------------------------------------------------------------------------------
# Output
def _cell(row: dict) -> str:
    """'step ms (speedup)' for the markdown: DDP with both bounds, a mix as bounds."""
    if row["step_ideal_overlap_ms"] == "":
        return "not measured"
    lo, hi = row["step_ideal_overlap_ms"], row["step_no_overlap_ms"]
    up, down = row["speedup_ideal_overlap"], row["speedup_no_overlap"]
    if row["kind"] == "mix":
        return f"<= {hi:.3g} (>= {down:.2f}x)"
    if abs(hi - lo) < 0.05:
        return f"{hi:.3g} ({down:.2f}x)"
    return f"{lo:.3g}-{hi:.3g} ({up:.2f}-{down:.2f}x)"


def step_table(rows: list[dict], networks, gpus, links) -> list[str]:
    ns = [1, *gpus]
    lines = ["| network | link | scheme | " + " | ".join(f"N = {n}" for n in ns) + " |",
             "|---|---|---|" + "---|" * len(ns)]
    for network in networks:
        sc = next(r for r in rows if r["network"] == network and r["kind"] == "sc")
        lines.append(f"| {NAMES.get(network, network)} | none | {sc['scheme']} | {_cell(sc)} |"
                     + " |" * len(gpus))
        for link in links:
            labels = dict.fromkeys(r["scheme"] for r in rows if r["network"] == network
                                   and r["link"] == link)
            for label in labels:
                cells = [""]
                for n in gpus:
                    row = next((r for r in rows if r["network"] == network and r["link"] == link
                                and r["scheme"] == label and r["N"] == n), None)
                    cells.append(_cell(row) if row else "")
                lines.append(f"| {NAMES.get(network, network)} | {link} | {label} | "
                             + " | ".join(cells) + " |")
    return lines


def detail_table(rows: list[dict]) -> list[str]:
    columns = ("network", "link", "N", "scheme", "compute_ms", "gp_comm_ms",
               "dp_comm_no_overlap_ms", "dp_comm_ideal_overlap_ms", "gradient_allreduce_MB",
               "gp_collectives_MB", "sent_MB_per_rank", "params_per_rank", "memory_GB",
               "fits_80GB", "compute_source")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(
            f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |")
    return lines


def accuracy_table(acc: list[dict], networks, links) -> list[str]:
    speed_columns = [(f"speed_vs_ddp_{n}_{link}", f"{NAMES.get(n, n)} {link}")
                     for n in networks for link in links]
    lines = ["| kind | N | WRN-10-2 error % (CPU sweep) | vs SC | paper WRN-28-10 % | vs SC | "
             "MobileNetV2 vs SC | " + " | ".join(f"step vs DDP: {t}" for _, t in speed_columns)
             + " |", "|" + "---|" * (7 + len(speed_columns))]

    def fmt(value, spec):
        return "" if value == "" else format(value, spec)
    for r in acc:
        seeds = f" ({r['wrn10_2_seeds']} seeds)" if r["wrn10_2_seeds"] > 1 else ""
        cells = [r["kind"], str(r["N"]), fmt(r["wrn10_2_error"], ".2f") + seeds,
                 fmt(r["wrn10_2_vs_sc"], "+.2f"), fmt(r["paper_wrn28_10_error"], ".2f"),
                 fmt(r["paper_wrn28_10_vs_sc"], "+.2f"), fmt(r["mobilenet_v2_vs_sc"], "+.2f")]
        cells += [fmt(r[c], ".2f") + ("x" if r[c] != "" else "not measured")
                  for c, _ in speed_columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def figure(plt, rows: list[dict], networks, gpus, links, batch: int):
    """Speedup over SC on one GPU against N: a panel per network (a row) and link (a column),
    each scheme in its kind's colour (plotting.KIND_COLOURS: DDP is ``sc_dp``, the dp x gp
    mixes ``mix``), a line style per link."""
    linestyles = dict(zip(links, ("-", "--", ":", "-.")))
    fig, axes = plt.subplots(len(networks), len(links), sharex=True, sharey=True, squeeze=False,
                             figsize=(4.6 * len(links), 3.6 * len(networks) + 0.4))
    for network, row in zip(networks, axes):
        for link, ax in zip(links, row):
            _plot_link(ax, rows, network, link, linestyles[link])
            ax.axhline(1.0, color=style("sc")["color"], linewidth=1, label="SC on one GPU")
            log_axis(ax, "x", ticks=gpus)
            log_axis(ax, "y", suffix="x")
            ax.grid(True, which="major", linewidth=0.3, alpha=0.5)
            ax.set_title(f"{NAMES.get(network, network)} over {link} "
                         f"({LINKS[link].bandwidth_gbs:g} GB/s)", fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("GPUs (N)")
    for ax in axes[:, 0]:
        ax.set_ylabel("speedup over SC on one GPU (x)")
    fig.suptitle(f"Projected: one GPU's measured compute (bf16, global batch {batch}) + "
                 "modelled communication", fontsize=10)
    # One legend, in the first row's last panel (the schemes are the same in every panel).
    ax = axes[0, -1]
    handles, labels = ax.get_legend_handles_labels()
    for link, linestyle in linestyles.items():        # what a line style says
        handles += ax.plot([], [], color=IDEAL["color"], linestyle=linestyle)
        labels.append(f"line style: {link}")
    ax.legend(handles, labels, fontsize=7, loc="best", ncol=2)
    return fig


def _plot_link(ax, rows, network, link, linestyle) -> None:
    def series(kind, key):
        best = {}
        for r in rows:                       # mixes: the best gp at each N
            if r["network"] == network and r["link"] == link and r["kind"] == kind \
                    and r[key] != "":
                best[r["N"]] = max(best.get(r["N"], 0.0), r[key])
        return sorted(best.items())
    ddp = style("ddp")
    lo, hi = series("ddp", "speedup_no_overlap"), series("ddp", "speedup_ideal_overlap")
    ax.fill_between([n for n, _ in lo], [v for _, v in lo], [v for _, v in hi],
                    color=ddp["color"], alpha=0.15, linewidth=0)
    ax.plot([n for n, _ in hi], [v for _, v in hi], label="DDP (band: ideal to no overlap)",
            **{**ddp, "linestyle": linestyle})
    for kind, text in (("gc2l", "GC-2L, gp = N"), ("gc", "GC, gp = N (less accurate)"),
                       ("mix", "dp x gp, best gp (lower bound)")):
        pts = series(kind, "speedup_no_overlap")
        ax.plot([n for n, _ in pts], [v for _, v in pts], label=text,
                **{**style(kind), "linestyle": linestyle},
                linewidth=0.8 if kind == "gc" else 1.5,
                fillstyle="none" if kind == "mix" else "full")


def plot(rows: list[dict], networks, gpus, links, batch: int, path: Path) -> None:
    plt = pyplot()
    if plt is not None:
        save(figure(plt, rows, networks, gpus, links, batch), path)


def replot(csv_path: Path, stem: Path) -> None:
    """The plot from the projection's csv alone (every point is a row of it): a new look without
    planning the memory again. The accuracy csv beside it has no plot."""
    rows = read_rows(csv_path)
    if not rows or "speedup_no_overlap" not in rows[0]:
        print(f"{shown(csv_path)}: no plot for this result, skipped")
        return
    networks = list(dict.fromkeys(r["network"] for r in rows))
    links = list(dict.fromkeys(r["link"] for r in rows if r["link"] != "none"))
    gpus = sorted({r["N"] for r in rows if r["N"] > 1})
    batch = next(r["rank_batch"] for r in rows if r["kind"] == "sc")
    plot(rows, networks, gpus, links, batch, stem.with_suffix(".png"))


def notes(args, rows: list[dict], batch_limits: dict) -> list[str]:
    links = "; ".join(f"`{name}` {LINKS[name].bandwidth_gbs:g} GB/s per direction per GPU, "
                      f"{LINKS[name].latency_us:g} us per message" for name in args.links)
    limits = ", ".join(f"{NAMES.get(n, n)} up to batch {b}" for n, b in batch_limits.items())
    too_big = sorted({f"{NAMES.get(r['network'], r['network'])} {r['scheme']} N={r['N']}"
                      for r in rows if r["fits_80GB"] is False})
    fit = (f"Every configuration here fits one {CAPACITY_GB:g} GB GPU by that plan" if not
           too_big else f"Not within one {CAPACITY_GB:g} GB GPU by that plan: "
           + ", ".join(too_big))
    steps = Path(args.steps)
    return [
        "**Measured**: one rank's compute (forward, backward, SGD step) on one GPU, the per-rank "
        "simulation with the collectives replaced by local stand-ins, bf16 autocast, "
        f"channels-last, from `{shown(steps)}` "
        f"(machine: {steps_machine(steps)}). Single cells of that check varied up to "
        "1.8x between its two device calls (its NOTES.md): read margins below that as "
        "unsettled. The global batch stays 128 at every N (DDP at N = 16: 8 images per "
        "GPU). **Modelled**: all communication, ring collectives "
        "(twolevel_dist/parallel/comm_model.py): " + links + ". No real multi-GPU run has "
        "been made; NCCL reaches less than these link rates in practice.",
        "DDP: one all-reduce of every gradient per step, 4P bytes (DDP reduces in the "
        "parameters' dtype, fp32 under autocast), in DDP's default buckets (1 MiB, then 25 "
        "MiB, in the order backward makes the gradients: comm_model.ddp_bucket_bytes). Two "
        "bounds: `no overlap` (every bucket after the backward) and `ideal overlap` (all "
        "buckets but the last hidden behind the backward, taken as "
        f"{BACKWARD_SHARE:.2f} of the measured step). GC-2L and GC: their gp collectives in "
        "bf16 (counted by comm_model.expected_comm, as comm.py checks against the engine's "
        "counters), one after another, not overlapped (the GPU path). dp x gp: both, the "
        "DDP all-reduce of a shard's gradients among the dp replicas.",
        "dp x gp mixes: the GC-2L shard at gp was measured at batch 128 only; the mix runs it "
        "on 128/dp images, so its measured time is used as an upper bound (a step on fewer "
        "images taken to be no slower) and the mix's step is an upper bound (<=), its speedup "
        "a lower bound (>=). On NVLink, N = 16 assumes one NVLink domain of 16 GPUs (an "
        "8-GPU HGX node has 8).",
        "Memory: benchmarks/memory.py's plan (fake tensors, bf16, the rank's batch); with dp > 1 "
        "DDP's buckets hold the gradients themselves (gradient_as_bucket_view), nothing more. "
        f"{fit}; SC alone on one GPU fits it {limits} (the "
        "plan's largest batch, by bisection).",
    ]


def write_markdown(path: Path, args, rows, wins, acc, batch_limits) -> None:
    nets, gpus, links = args.networks, args.gpus, args.links
    cross = [f"- {NAMES.get(n, n)}, {link}: with DDP ideally overlapped, "
             f"{crossover(rows, n, link, gpus, 'ideal_overlap')}; not overlapped, "
             f"{crossover(rows, n, link, gpus, 'no_overlap')}." for n in nets for link in links]
    win_lines = ["| network | link | N | fastest, DDP ideally overlapped | fastest, DDP not "
                 "overlapped | best dp x gp mix (upper bound) |", "|---|---|---|---|---|---|"] + [
        f"| {NAMES.get(w['network'], w['network'])} | {w['link']} | {w['N']} | "
        f"{w['fastest_if_ddp_ideal_overlap']} | {w['fastest_if_ddp_no_overlap']} | "
        f"{w['best_mix']} |" for w in wins]
    lines = [f"# Data parallelism or group parallelism: {', '.join(NAMES.get(n, n) for n in nets)}"
             f", global batch {args.batch}", "", f"Command: `{args.command}`", "",
             f"Machine (this projection): {machine()}", ""]
    lines += [p + "\n" for p in notes(args, rows, batch_limits)]
    lines += ["## Step time per scheme (ms, speedup over SC on one GPU)", "",
              "Cells: the projected step in ms (speedup over SC on one GPU); DDP from its ideal-"
              "overlap to its no-overlap bound; `not measured` where the GPU check has no "
              "compute for it.", "", *step_table(rows, nets, gpus, links), "",
              "## Who is fastest: SC on one GPU, DDP or GC-2L (gp = N)", "", *win_lines, "",
              "Crossover (GC-2L's step shorter than DDP's):", "", *cross, "",
              "## Accuracy beside speed", "",
              "Test error from the accuracy sweep (WRN-10-2, CIFAR-10, 15 epochs on 20,000 "
              "images, CPU; MobileNetV2 at width 0.5 where finished: the gap to its SC only), "
              "the paper's WRN-28-10 (Table 3, 200 epochs) for scale, and the projected step "
              "of DDP at the same N over that kind's (gp = N), DDP ideally overlapped: > 1x, "
              "the kind is faster. The accuracy is of a different, smaller network than the "
              "speed: WRN-10-2 is too small to time on a GPU, WRN-28-10 too large to train "
              "here. The sweep's wall times are not used: each cell trained the whole grouped "
              "network in one CPU process, sharing two cores with other work, which says "
              "nothing about a rank's step on a GPU.", "", *accuracy_table(acc, nets, links), "",
              "## Every row", "", *detail_table(rows), ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default=str(STEPS_CSV), type=existing_file,
                        help="the GPU check's gpu_step_time.csv (per-rank compute)")
    parser.add_argument("--networks", nargs="+", default=list(NAMES))
    parser.add_argument("--gpus", type=at_least(1), nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--links", nargs="+", default=["nvlink", "ethernet100"],
                        choices=sorted(LINKS))
    parser.add_argument("--batch", type=at_least(1), default=128,
                        help="global batch (the measured one)")
    parser.add_argument("--accuracy", nargs="*", type=existing_file,
                        default=[p for p in ACCURACY_CSVS])
    add_output_options(parser)          # the committed name: dp_vs_gp_wrn28 (_default_name)
    args = parser.parse_args(argv)
    args.command = " ".join(["python benchmarks/dp_vs_gp.py",
                             *(sys.argv[1:] if argv is None else argv)])
    steps = read_steps(Path(args.steps))
    rows = projection(args.networks, args.gpus, args.links, steps, args.batch, with_memory=True)
    wins = winners(rows, args.networks, args.gpus, args.links)
    acc = accuracy_rows(read_accuracy(args.accuracy), rows, args.networks, args.links)
    limits = {network: largest_sc_batch(network) for network in args.networks}
    stem = output_stem(args, _default_name(args.networks))
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_csv(stem.with_suffix(".csv"), rows)
    write_csv(stem.parent / f"{stem.name}_accuracy.csv", acc)
    write_markdown(stem.with_suffix(".md"), args, rows, wins, acc, limits)
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {shown(stem)}.csv, .md and {stem.name}_accuracy.csv", flush=True)
    plot(rows, args.networks, args.gpus, args.links, args.batch, stem.with_suffix(".png"))
    return 0


def _default_name(networks) -> str:
    """The committed name for the default networks; another selection gets its own name, so
    that --update never replaces the committed table with part of it."""
    return "dp_vs_gp_" + ("wrn28" if list(networks) == list(NAMES) else "_".join(networks))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
