"""Training-step time against the number of groups N, two ways.

  sim   one process runs exactly one rank's shard at each N, the collectives replaced by local
        stand-ins (twolevel_dist.parallel.simulated); the measured compute per rank is reported
        with the communication modelled from the bytes each collective moves (--link).
  real  one torchrun job per N with N ranks (gloo on CPU, NCCL on GPUs), barrier-synchronised,
        the slowest rank's step per repetition, median over repetitions. With
        ``--collectives local`` the ranks run concurrently with the collectives replaced by
        local stand-ins: the same run without communication, so the difference is its cost.

Both report the speedup over SC on one rank, and GC-2L's efficiency against the ideal N^2
(N times fewer parameters per rank, each rank doing 1/N^2 of SC's work).

``real`` also runs data parallelism at the same N and the same global batch ``--batch``, when
``--convs`` names it:
  sc_dp       SC replicated on the N ranks under DDP (dp = N), each rank batch/N images of the
              global batch; ideal N.
  gc2l_dp<k>  k DDP replicas of a GC-2L model with N/k groups (dp = k, gp = N/k, at the N with
              N/k >= 2), each replica batch/k images; ideal k (N/k)^2.
Their bytes per step add DDP's gradient all-reduce (full tensors, as the engine counts its own
collectives), summed from the buckets DDP hands a comm hook on the step that is counted.

  python benchmarks/scaling.py sim --model wrn28_10 --groups 1 2 4 8 16
  python benchmarks/scaling.py real --model wrn16_4 --groups 1 2 4 --batch 32
  python benchmarks/scaling.py real --model wrn16_4 --groups 1 2 4 --convs sc sc_dp gc2l gc2l_dp2

Results go to a fresh folder, benchmarks/results/new/<UTC time>/ (--update: over the committed
ones, --out STEM: STEM.csv/.md/.png); benchmarks/replot.py redraws a plot from its csv.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    add_output_options,
    at_least,
    available_device,
    default_device,
    git_commit,
    median,
    model_from_config,
    output_stem,
    positive_number,
    read_rows,
    run_cli,
    time_steps,
    training_step,
    write_results,
)
from plotting import IDEAL, log_axis, pyplot, save, style  # noqa: E402

from twolevel_dist.engine.device import configure_backends, synchronize  # noqa: E402
from twolevel_dist.parallel import all_reduce_values, count_collectives, parallelize  # noqa: E402
from twolevel_dist.parallel.comm_model import LINKS, LinkModel, modelled_seconds  # noqa: E402
from twolevel_dist.parallel.simulated import simulated_mesh  # noqa: E402

SCHEMES = ("sc", "gc", "gc2l", "shuffle")          # the default --convs, and sim's choices
DP_SCHEMES = ("sc_dp", "gc2l_dp<k>")                 # real mode only (split_ranks)
LABELS = {"sc_dp": "sc dp (DDP)"}


def split_ranks(conv: str, n: int) -> tuple[str, int, int]:
    """(the network's conv, dp, gp) of scheme ``conv`` on ``n`` ranks: ``sc_dp`` SC replicated
    on every rank (dp = n, gp = 1); ``gc2l_dp<k>`` k replicas of GC-2L over n/k ranks each; any
    other one model over the n ranks (dp = 1, gp = n). ValueError where n ranks cannot hold it."""
    if conv == "sc_dp":
        return "sc", n, 1
    match = re.fullmatch(r"gc2l_dp(\d+)", conv)
    if match:
        dp = int(match[1])
        if dp < 2 or n % dp or n // dp < 2:
            raise ValueError(f"{conv} needs N = {dp} x gp with gp >= 2 groups, not N = {n}")
        return "gc2l", dp, n // dp
    return conv, 1, n


def rank_batch(batch: int, dp: int) -> int:
    """Images per rank of a replica when ``dp`` replicas share the global ``batch``."""
    if batch % dp:
        raise ValueError(f"the global batch {batch} does not split into {dp} equal replicas")
    return batch // dp


def ideal_speedup(conv: str, dp: int, gp: int) -> int:
    """SC split over gp ranks (and DDP's replicas): dp x gp; GC, GC-2L and Shuffle: N^2 less work
    per rank at gp = N (1/gp^2 of SC's), times dp replicas each on 1/dp of the batch."""
    return dp * gp if conv == "sc" else dp * gp * gp


def scheme_name(text: str) -> str:
    """``--convs``/``--conv`` of real mode: one of SCHEMES, sc_dp or gc2l_dp<k> (k >= 2)."""
    if text in SCHEMES or text == "sc_dp" or re.fullmatch(r"gc2l_dp([2-9]|[1-9]\d+)", text):
        return text
    raise argparse.ArgumentTypeError(
        f"invalid scheme {text!r} (choose from {', '.join(SCHEMES + DP_SCHEMES)})")


def _shard(model_name, conv, n, mesh, overlap, device):
    """Rank ``mesh``'s shard of the network at N = ``n`` groups on ``device`` (N = 1: the whole
    one), wrapped in DDP where the mesh has dp > 1. ``overlap`` is explicit (not by device), so
    that every row says which GC-2L path it ran."""
    model = model_from_config(model_name, conv, 1 if conv == "sc" else n)
    single = n == 1 and mesh["dp"].size() == 1
    return model.to(device) if single else parallelize(model, mesh, overlap=overlap,
                                                       device=device)


class DDPBytes:
    """The bytes of the buckets a DDP model reduces (``nbytes``, one entry per bucket since
    ``clear``), recorded by a comm hook that all-reduces them over the model's group as DDP's
    default does (``communicate``), or returns them as they are: a local stand-in without
    communication. DDP takes one comm hook, for good."""

    def __init__(self, ddp, communicate: bool):
        self.group, self.communicate, self.nbytes = ddp.process_group, communicate, []
        ddp.register_comm_hook(self, _recording_hook)

    def clear(self) -> None:
        self.nbytes = []


def _recording_hook(state: DDPBytes, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    buffer = bucket.buffer()
    state.nbytes.append(buffer.numel() * buffer.element_size())
    if state.communicate:
        return default_hooks.allreduce_hook(state.group, bucket)
    future = torch.futures.Future()
    future.set_result(buffer)
    return future


def build_rank(model_name: str, conv: str, collectives: str, overlap: bool, device, batch: int,
               channels_last: bool = False, amp: bool = False):
    """This rank's part of scheme ``conv`` on the job's ranks (torch.distributed initialised):
    (model, step, DDPBytes or None). A replica's ranks share its images, ``batch // dp`` of the
    global ``batch``. "local" collectives: the gp ones by local stand-ins, DDP's by a hook that
    does not communicate. "real": DDP as parallelize wraps it, no hook (the caller attaches
    ``DDPBytes(model, True)`` for the step it counts, after the timed ones)."""
    import torch.distributed as dist

    from twolevel_dist.parallel import init_mesh
    n, rank = dist.get_world_size(), dist.get_rank()
    net, dp, gp = split_ranks(conv, n)
    part, hook = None, None
    if dp == 1:
        mesh = init_mesh(n) if collectives == "real" else simulated_mesh(n, rank)
        model = _shard(model_name, net, n, mesh, overlap, device)
    else:
        mesh = init_mesh(gp, dp)
        part = (mesh["dp"].get_local_rank(), dp)
        if collectives == "real":
            model = _shard(model_name, net, gp, mesh, overlap, device)
        else:
            from twolevel_dist.parallel.parallelize import data_parallel
            shard = _shard(model_name, net, gp, simulated_mesh(gp, mesh["gp"].get_local_rank()),
                           overlap, device)
            model = data_parallel(shard, mesh["dp"].get_group())
            hook = DDPBytes(model, communicate=False)
    step = training_step(model, batch, device=device, channels_last=channels_last, amp=amp,
                         part=part)
    return model, step, hook


def _variants(convs, with_overlap: bool):
    """(conv, overlap) pairs to run: GC-2L twice with --with-overlap (without, then with)."""
    return [(conv, overlap) for conv in convs
            for overlap in ([False, True] if conv == "gc2l" and with_overlap else [False])]


def _label(conv: str, overlap: bool) -> str:
    return conv + ("+overlap" if overlap else "")


def _layout(args) -> str:
    return "channels_last" if args.channels_last else "NCHW"


def _comm_of_one_step(step):
    with count_collectives() as stats:
        step()
    return dict(stats.calls), dict(stats.bytes)


def run_sim(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configure_backends(device)
    link = LINKS[args.link] if args.bandwidth is None else LinkModel(
        "custom", args.bandwidth, args.latency)
    rows, baseline = [], None
    for n in args.groups:
        for conv, overlap in _variants(args.convs, args.with_overlap):
            if n == 1 and conv != "sc":
                continue                      # N = 1 is the SC baseline
            try:
                model = _shard(args.model, conv, n, simulated_mesh(n), overlap, device)
            except ValueError as error:       # e.g. shuffle needs N^2 | C_out
                print(f"skip {conv} N={n}: {error}", file=sys.stderr)
                continue
            step = training_step(model, args.batch, device=device,
                                 channels_last=args.channels_last, amp=args.amp)
            compute = median(time_steps(step, args.warmup, args.reps,
                                        lambda: synchronize(device)))
            calls, nbytes = _comm_of_one_step(step)
            comm = modelled_seconds(calls, nbytes, n, link)
            if n == 1:
                baseline = compute
            total = compute + comm
            speedup = baseline / total if baseline else float("nan")
            ideal = n if conv == "sc" else n * n
            rows.append(dict(model=args.model, conv=_label(conv, overlap), N=n,
                             batch=args.batch, device=device.type,
                             precision="bf16" if args.amp else "fp32", layout=_layout(args),
                             params_per_rank=sum(p.numel() for p in model.parameters()),
                             compute_s=compute, comm_MB=sum(nbytes.values()) / 1e6,
                             comm_model_s=comm, total_s=total, speedup_vs_sc1=speedup,
                             ideal=ideal, efficiency=speedup / ideal))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _worker(args) -> None:
    """One rank of a real run (under torchrun)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from twolevel_dist.parallel import init_distributed
    torch.set_num_threads(args.threads)
    if args.bind_cores:
        # Rank r on cores [r*t, (r+1)*t): set before the process group exists, so that gloo's
        # threads inherit it and never migrate onto the other rank's core.
        local, cores = int(os.environ.get("LOCAL_RANK", 0)), os.cpu_count()
        os.sched_setaffinity(0, {(local * args.threads + i) % cores for i in range(args.threads)})
    device = init_distributed()
    configure_backends(device)
    # "local": every rank runs its own shard at the same time as the others, but with the
    # collectives replaced by local stand-ins: what the step costs without communication,
    # sharing the machine as the real run does.
    model, step, hook = build_rank(args.model, args.conv, args.collectives, args.overlap, device,
                                   args.batch, args.channels_last, args.amp)

    def sync():
        synchronize(device)
        dist.barrier()
    # A step lasts as long as its slowest rank.
    times = all_reduce_values(time_steps(step, args.warmup, args.reps, sync), device=device,
                              group=dist.group.WORLD, op="max").tolist()
    if hook is None and isinstance(model, DistributedDataParallel):
        # Timed with DDP's own all-reduce; its bytes from a hook on the counted step alone.
        hook = DDPBytes(model, communicate=True)
    if hook is not None:
        hook.clear()
    calls, nbytes = _comm_of_one_step(step)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(dict(step_s=times, calls=calls, bytes=nbytes,
                                          ddp_bytes=sum(hook.nbytes) if hook else 0,
                                          params_per_rank=sum(p.numel()
                                                              for p in model.parameters()))),
              flush=True)
    dist.destroy_process_group()


def _real_job(args, n: int, conv: str, overlap: bool) -> dict:
    """One torchrun job of ``n`` ranks; its rank 0's RESULT (every step's slowest-rank time)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", str(Path(__file__).resolve()), "worker",
           "--model", args.model, "--conv", conv, "--batch", str(args.batch),
           "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--reps", str(args.reps), "--collectives", args.collectives] + \
        (["--overlap"] if overlap else []) + (["--bind-cores"] if args.bind_cores else []) + \
        (["--channels-last"] if args.channels_last else []) + (["--amp"] if args.amp else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"error: the run {conv} N={n} failed")
    return json.loads(lines[-1][len("RESULT "):])


def run_real(args) -> list[dict]:
    """Every configuration once per round, the rounds one after another, so that a slow spell
    of a shared machine falls on all configurations alike; a configuration's step time is the
    median over all its rounds' steps."""
    configs = []
    for n in args.groups:
        for conv, overlap in _variants(args.convs, args.with_overlap):
            if n == 1 and conv != "sc":
                continue                      # N = 1 is the SC baseline
            try:
                base, dp, gp = split_ranks(conv, n)
                rank_batch(args.batch, dp)
                # The split's own checks, on one simulated rank, before any job starts.
                _shard(args.model, base, gp, simulated_mesh(gp), overlap, "cpu")
            except ValueError as error:       # e.g. gc2l_dp2 at N = 2 (one group), N = 3
                print(f"skip {conv} N={n}: {error}", file=sys.stderr)
                continue
            configs.append((n, conv, overlap))
    steps = {config: [] for config in configs}
    results = {}
    for round_ in range(args.rounds):
        for config in configs:
            results[config] = _real_job(args, *config)
            steps[config] += results[config]["step_s"]
            print(f"round {round_ + 1}/{args.rounds} {config}: median "
                  f"{median(results[config]['step_s']):.4f} s", file=sys.stderr, flush=True)
    rows, baseline = [], None
    cores = os.cpu_count()
    for (n, conv, overlap) in configs:
        result, step_s = results[(n, conv, overlap)], median(steps[(n, conv, overlap)])
        if n == 1:
            baseline = step_s
        speedup = baseline / step_s if baseline else float("nan")
        net, dp, gp = split_ranks(conv, n)
        ideal = ideal_speedup(net, dp, gp)
        rows.append(dict(model=args.model, conv=_label(conv, overlap), N=n, dp=dp, gp=gp,
                         batch=args.batch, rank_batch=rank_batch(args.batch, dp),
                         precision="bf16" if args.amp else "fp32", layout=_layout(args),
                         collectives=args.collectives,
                         threads_per_rank=args.threads, oversubscribed=n * args.threads > cores,
                         params_per_rank=result["params_per_rank"], step_s=step_s,
                         step_min_s=min(steps[(n, conv, overlap)]),
                         comm_MB=(sum(result["bytes"].values()) + result["ddp_bytes"]) / 1e6,
                         ddp_allreduce_MB=result["ddp_bytes"] / 1e6,
                         speedup_vs_sc1=speedup, ideal=ideal, efficiency=speedup / ideal))
        print(json.dumps(rows[-1]), flush=True)
    return rows


_DP_NOTE = (
    " Data parallel rows (dp > 1): DDP over dp replicas, each on rank_batch = batch/dp images of "
    "the same global batch (sc_dp: SC, dp = N; gc2l_dp<k>: GC-2L over gp = N/k ranks per "
    "replica). comm_MB is the engine's counted gp collectives plus DDP's gradient all-reduce "
    "(ddp_allreduce_MB: the bytes of the buckets DDP handed a comm hook on one step after the "
    "timed ones, full tensors as the other collectives are counted; a ring all-reduce sends "
    "2(dp-1)/dp of it per rank). Ideal: dp x gp for SC (DDP, sc split), dp x gp^2 for GC-2L. "
    "Memory per rank is not reported.")


def _setting(args, rows: list[dict], commit: str) -> str:
    """What sets this run apart from the other runs of the same network and batch, in lines
    short enough for a title."""
    kind = f"{_layout(args).replace('_', '-')}, {'bf16 autocast' if args.amp else 'fp32'}"
    if args.mode == "real":
        lines = [f"real ranks, {args.threads} thread{'s' if args.threads > 1 else ''} each" +
                 (", bound to cores" if args.bind_cores else "") + f"; {kind}"]
        if args.collectives == "local":
            lines.append("collectives replaced by local stand-ins: no communication")
    else:
        # Older csv files have no device column: then the command's (or its default).
        device = rows[0].get("device") or args.device.split(":")[0]
        link = args.link if args.bandwidth is None else \
            f"{args.bandwidth:g} GB/s, {args.latency:g} us"
        lines = [f"per-rank simulation on {device}; {kind}",
                 f"communication modelled ({link} link, no overlap)"]
    return "\n".join(lines) + f"; commit {commit}"


def _look(conv: str) -> tuple[dict, str]:
    """A scheme's line style and legend label: SC at N > 1 is SC split by output channels,
    sc_dp data parallel, gc2l_dp<k> a dp x gp mix (plotting's ``mix`` colour)."""
    if conv == "sc":
        return style("sc_split"), "sc split (N = 1: sc, the baseline)"
    match = re.fullmatch(r"gc2l_dp(\d+)(\+.*)?", conv)
    if match:
        return style("mix" + conv[len("gc2l"):]), \
            f"gc2l{match[2] or ''}, dp {match[1]} x gp N/{match[1]} (DDP of GC-2L)"
    return style(conv), LABELS.get(conv, conv)


def speedup_figure(plt, rows: list[dict], title: str):
    """Speedup over SC on one rank against N, one line per scheme in its kind's colour (SC at
    N > 1 is SC split by output channels); an oversubscribed point (more threads than cores)
    hollow."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for conv in dict.fromkeys(r["conv"] for r in rows):
        # DDP's line starts at the baseline: one replica is SC on one rank.
        of = ("sc_dp", "sc") if conv == "sc_dp" else (conv,)
        points = sorted((r["N"], r["speedup_vs_sc1"], bool(r.get("oversubscribed")))
                        for r in rows if r["conv"] == of[0] or (r["conv"] in of and r["N"] == 1))
        look, label = _look(conv)
        ax.plot([n for n, _, _ in points], [s for _, s, _ in points], label=label, **look)
        hollow = [(n, s) for n, s, over in points if over]
        if hollow:
            ax.plot(*zip(*hollow), linestyle="none", marker=look["marker"],
                    markerfacecolor="white", markeredgecolor=look["color"], zorder=3)
    ns = sorted({r["N"] for r in rows})
    ax.plot(ns, [n * n for n in ns], label="ideal N² (GC, GC-2L)", **IDEAL)
    data_parallel = any(r.get("dp", 1) > 1 for r in rows)     # older csv files: no dp column
    if data_parallel:
        ax.plot(ns, ns, label="ideal N (DDP, sc split)", **{**IDEAL, "linestyle": "--"})
    crowded = sorted({r["N"] for r in rows if r.get("oversubscribed")})
    if crowded:
        ax.plot([], [], linestyle="none", marker="o", markerfacecolor="white",
                markeredgecolor="gray", label=f"hollow: oversubscribed, more threads than cores "
                                              f"(N = {', '.join(map(str, crowded))})")
    log_axis(ax, "x", ticks=ns)
    log_axis(ax, "y", suffix="x")
    ax.set_xlabel("N (ranks = dp x gp)" if data_parallel else "N (groups = ranks)")
    ax.set_ylabel("speedup over SC on one rank (x)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return fig


def plot(rows: list[dict], args, path: Path, commit: str) -> None:
    plt = pyplot()
    if plt is not None:
        save(speedup_figure(plt, rows, f"{args.model}, batch {args.batch}: speedup over SC on "
                                       f"one rank\n{_setting(args, rows, commit)}"), path)


def replot(csv_path: Path, stem: Path) -> None:
    """The plot of a result from its csv and the command and commit its md records: a new look
    without timing anything again."""
    md = csv_path.with_suffix(".md").read_text()
    command = re.search(r"^Command: `python benchmarks/scaling.py (.*)`$", md, re.M)[1]
    commit = re.search(r"twolevel_dist commit (\S+)$", md, re.M)[1]
    plot(read_rows(csv_path), _parser().parse_args(shlex.split(command)),
         stem.with_suffix(".png"), commit)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("sim", "real", "worker"):
        p = sub.add_parser(mode)
        p.add_argument("--model", default="wrn16_4", help="a configs/model/ name")
        p.add_argument("--batch", type=at_least(1), default=32,
                       help="images per step (per model)")
        p.add_argument("--threads", type=at_least(1), default=1, help="CPU threads per rank")
        p.add_argument("--warmup", type=at_least(0), default=2)
        p.add_argument("--reps", type=at_least(1), default=5)
        p.add_argument("--channels-last", action="store_true",
                       help="images and convolution weights channels-last, for every scheme")
        p.add_argument("--amp", action="store_true", help="bf16 autocast, for every scheme")
        if mode in ("worker", "real"):
            p.add_argument("--collectives", default="real", choices=("real", "local"),
                           help="'local': stand-ins instead of the collectives (no communication)")
            p.add_argument("--bind-cores", action="store_true",
                           help="pin each rank (and its communication threads) to its own cores")
        if mode == "worker":
            p.add_argument("--conv", required=True, type=scheme_name)
            p.add_argument("--overlap", action="store_true")
        else:
            p.add_argument("--groups", type=at_least(1), nargs="+", default=[1, 2, 4])
            if mode == "sim":
                p.add_argument("--convs", nargs="+", default=list(SCHEMES), choices=SCHEMES)
            else:
                p.add_argument("--convs", nargs="+", default=list(SCHEMES), type=scheme_name,
                               metavar="CONV",
                               help=f"schemes, of {', '.join(SCHEMES + DP_SCHEMES)} (default: "
                                    f"{' '.join(SCHEMES)}); sc_dp: SC under DDP on the N "
                                    f"ranks, gc2l_dp<k>: k DDP replicas of GC-2L over N/k "
                                    f"ranks, both on the same global --batch")
            add_output_options(p)
        if mode == "sim":
            p.add_argument("--link", default="nvlink", choices=sorted(LINKS))
            p.add_argument("--bandwidth", type=positive_number, default=None,
                           help="GB/s, overrides --link")
            p.add_argument("--latency", type=float, default=5.0, help="us, with --bandwidth")
        if mode in ("sim", "real"):
            p.add_argument("--with-overlap", action="store_true",
                           help="also run GC-2L with the all-gather overlapped (the taps path)")
        if mode == "sim":
            p.add_argument("--device", default=str(default_device()), type=available_device,
                           help="where the rank's shard runs (default: the GPU if there is one)")
        if mode == "real":
            p.add_argument("--rounds", type=at_least(1), default=3,
                           help="run every configuration this many times, interleaved")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.mode == "worker":
        _worker(args)
        return 0
    rows = run_sim(args) if args.mode == "sim" else run_real(args)
    on_gpu = getattr(args, "device", "cuda" if torch.cuda.is_available() else "cpu")
    device = "gpu" if on_gpu.startswith("cuda") else "cpu"
    local = "_local_collectives" if getattr(args, "collectives", "real") == "local" else ""
    layout = "_channels_last" if args.channels_last else ""
    precision = "_bf16" if args.amp else ""
    stem = output_stem(args, f"scaling_{args.mode}_{args.model}_{device}{layout}{precision}{local}")
    command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    notes = ("Per-rank simulation: measured compute of one rank's shard; communication modelled "
             f"from the counted bytes over the '{args.link}' link model "
             "(twolevel_dist/parallel/comm_model.py), without overlap."
             if args.mode == "sim" else
             "Real ranks: each step's time is its slowest rank's (barrier-synchronised); the "
             "median "
             f"over {getattr(args, 'rounds', 1)} interleaved rounds of {args.reps} steps each. "
             "'oversubscribed' marks runs with more threads than cores." +
             (_DP_NOTE if any(row["dp"] > 1 for row in rows) else ""))
    write_results(stem, rows, f"Scaling ({args.mode}): {args.model}, batch {args.batch}",
                  command, notes)
    plot(rows, args, stem.with_suffix(".png"), git_commit())
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
