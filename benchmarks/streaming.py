"""The streaming loader at gp > 1: every gp rank decoding each batch whole (each image decoded gp
times on the node) against each gp rank decoding 1/gp of it and gathering the uint8 slices.

    python benchmarks/streaming.py [--archive ../shared/data/cifar10-jpeg.tar.gz] [--gp 2]

Both under torchrun on this machine, gloo on CPU; ``dataset=imagenet``'s loader over an
image-folder tree (the CIFAR-10 JPEG export, resized to --image-size). Reported: training images
per second per model (one gp group), the median of --reps timed passes over --batches batches,
the two modes interleaved. Writes streaming_gp<gp>_cpu.csv/.md to a fresh folder,
benchmarks/results/new/<UTC time>/ (--update: over the committed ones in benchmarks/results/).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_output_options, median, output_stem, write_results  # noqa: E402


def _worker(args) -> None:
    """One gp rank: iterate --batches batches of the training split, --reps times."""
    import torch.distributed as dist

    from twolevel_dist.data.streaming import StreamingEpochLoader
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    loader = StreamingEpochLoader(args.root, "train", args.batch, train=True, device="cpu",
                                  image_size=args.image_size, workers=args.workers, seed=0,
                                  gp_group=dist.group.WORLD if args.mode == "split" else None)
    times = []
    for rep in range(args.reps + 1):                 # pass 0 starts the workers: not timed
        loader.set_epoch(rep)
        batches = iter(loader)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        dist.barrier()
        times.append(time.perf_counter() - start)
        del batches
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(times[1:]), flush=True)
    dist.destroy_process_group()


def _run(args, mode: str) -> list[float]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.gp}", __file__, "--worker", "--mode", mode,
               "--root", str(args.root), "--batch", str(args.batch), "--batches",
               str(args.batches), "--reps", "1", "--image-size", str(args.image_size),
               "--workers", str(args.workers)]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"error: the {mode} run failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path,
                        default=REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
    parser.add_argument("--root", type=Path, default=None, help="an extracted image folder")
    parser.add_argument("--gp", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="images per batch (per model)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="decode workers per rank")
    add_output_options(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("whole", "split"), default="split",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.gp < 2 or args.batch % args.gp:
        parser.error("--gp must be at least 2 and divide --batch")
    with tempfile.TemporaryDirectory() as scratch:
        if args.root is None:
            if not args.archive.is_file():
                parser.error(f"no archive {args.archive}; give --archive or --root")
            from twolevel_dist.data.image_folder import extract_tar
            args.root = extract_tar(args.archive, scratch)
        seconds = {"whole": [], "split": []}
        for _ in range(args.reps):                  # interleaved: drift hits both alike
            for mode in seconds:
                seconds[mode] += _run(args, mode)
    rows = []
    for mode, label in (("whole", "every gp rank decodes the whole batch (before)"),
                        ("split", f"each gp rank decodes 1/{args.gp}, uint8 all-gather")):
        step = median(seconds[mode]) / args.batches
        rows.append(dict(mode=label, images_per_s_per_model=round(args.batch / step, 1),
                         batch_s=round(step, 4), reps=len(seconds[mode])))
    rows[1]["speedup"] = round(rows[0]["batch_s"] / rows[1]["batch_s"], 2)
    rows[0]["speedup"] = 1.0
    out = output_stem(args, f"streaming_gp{args.gp}_cpu")
    write_results(out, rows, f"Streaming decode at gp = {args.gp}",
                  f"python benchmarks/streaming.py --gp {args.gp} --batch {args.batch} "
                  f"--batches {args.batches} --reps {args.reps} --image-size {args.image_size} "
                  f"--workers {args.workers}" + (" --update" if args.update else ""),
                  f"{args.gp} ranks (one model, gp = {args.gp}) under torchrun, gloo, one thread "
                  f"and {args.workers} decode worker(s) each; CIFAR-10 JPEGs resized to "
                  f"{args.image_size} px with random-resized crops; median of {args.reps} "
                  f"passes of {args.batches} batches of {args.batch}, the modes interleaved.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
