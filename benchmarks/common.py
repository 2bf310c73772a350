"""Shared by the benchmarks: models by config name, step timing, and result files."""

import argparse
import csv
import functools
import glob
import io
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The committed results. A run writes under RESULTS / "new" unless told otherwise (output_stem).
RESULTS = REPO / "benchmarks" / "results"

from twolevel_dist.config import CONFIG_DIR, ModelConfig, check_config_choices  # noqa: E402
from twolevel_dist.engine.device import autocast  # noqa: E402
from twolevel_dist.errors import ConfigError, DataError  # noqa: E402
from twolevel_dist.layers import to_layout  # noqa: E402
from twolevel_dist.models import build_model  # noqa: E402


def model_from_config(name: str, conv: str, groups: int, num_classes: int = 10):
    """``build_model`` from ``configs/model/<name>.yaml``, so benchmarks and training agree; a
    name with no config is train's ConfigError naming the choices (``run_cli``: one line)."""
    check_config_choices([f"model={name}"])
    path = Path(CONFIG_DIR) / "model" / f"{name}.yaml"
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(path)))
    return build_model(cfg.name, conv=conv, groups=groups, num_classes=num_classes,
                       **cfg.build_kwargs())


def time_steps(step, warmup: int, reps: int, sync=lambda: None,
               until_done: bool = True) -> list[float]:
    """Wall-clock seconds of ``reps`` calls of ``step`` after ``warmup`` untimed ones; ``sync``
    runs before each start and stop (a barrier across ranks, a device synchronise). With
    ``until_done=False``, not before the stop: the time for the call to return, the host's
    share of a step whose work a GPU runs behind it."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        step()
        if until_done:
            sync()
        times.append(time.perf_counter() - start)
    sync()
    return times


def training_step(model, batch: int, image_size: int = 32, num_classes: int = 10, device="cpu",
                  channels_last: bool = False, amp: bool = False,
                  part: tuple[int, int] | None = None):
    """A closure doing one SGD step (forward, backward, optimizer) on a fixed random batch; with
    ``channels_last``, the images and the convolution weights in that layout, as
    ``train.channels_last=true`` has them; with ``amp``, the forward under bf16 autocast, as
    ``train.amp=true``. ``part=(i, k)``: the i-th of k equal slices of that batch, a data-
    parallel replica's share of the global ``batch``."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    if part is not None:
        index, count = part
        if batch % count:
            raise ValueError(f"batch {batch} does not split into {count} equal parts")
        images, labels = images.chunk(count)[index], labels.chunk(count)[index]
    images, labels = images.to(device), labels.to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
        to_layout(model, torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(torch.device(device), amp):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    return step


def default_device() -> torch.device:
    """The benchmarks run where training would: this machine's GPU if it has one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def median(values) -> float:
    return statistics.median(values)


def git_commit() -> str:
    """This checkout's short commit, "unknown" outside a git clone."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, Python "
            f"{platform.python_version()}; twolevel_dist commit {git_commit()}")


# --- the command line: bad arguments are one line, exit 2, before anything runs ------------------

def at_least(minimum: int):
    """An argparse ``type``: an integer of at least ``minimum``."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value
    return integer


def positive_number(text: str) -> float:
    """An argparse ``type``: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be above 0")
    return value


def existing_file(text: str) -> Path:
    """An argparse ``type``: a file that is there."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return Path(text)


def available_device(text: str) -> str:
    """An argparse ``type``: a torch device this machine has (cpu, cuda, cuda:1)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1)") \
            from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count or count == 0:
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {count} CUDA device(s) (torch {torch.__version__})")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: the benchmarks run on cpu or cuda")
    return text


def run_cli(main) -> int:
    """``main()`` with a refusal (ConfigError, DataError: a model name that is not there, groups
    a network cannot take) as one ``error:`` line and exit code 2, not a traceback."""
    try:
        return main()
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--out`` and ``--update``, the two ways to write anywhere but a fresh folder."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, metavar="STEM",
                       help="write STEM.csv, STEM.md (and STEM.png), replacing them")
    where.add_argument("--update", action="store_true",
                       help="replace the committed results in benchmarks/results/ (a "
                            "maintainer's deliberate step); default: a fresh folder "
                            "benchmarks/results/new/<UTC time>/")


def output_stem(args: argparse.Namespace, name: str, committed: Path | None = None) -> Path:
    """Where a run's results go: ``--out`` as given; with ``--update`` the committed
    ``committed/name`` (default folder: RESULTS); otherwise ``RESULTS/new/<UTC time>/name``, a
    folder of its own, so that a run never overwrites a committed result (the memory table once
    lost 76 of its 90 rows to a run with other arguments). The same file name as the committed
    one, to diff against it; the time stamped as gpu_check.sh stamps its folders."""
    if args.out is not None:
        return Path(args.out)
    if args.update:
        return (committed or RESULTS) / name
    stamp = _start_stamp()
    for attempt in itertools.count(1):
        folder = RESULTS / "new" / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        if not any(folder.glob(glob.escape(name) + ".*")):      # a run of the same second
            return folder / name


@functools.cache
def _start_stamp() -> str:
    """When this process first wrote: one run's files share one folder."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def shown(path: Path) -> str:
    """``path`` as a reader would type it: relative to the repository where it is inside."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def read_rows(path: Path) -> list[dict]:
    """A results csv back as rows of the types they were written from: ints, floats, booleans
    and strings (a plot redrawn from a committed csv, the accuracy sweep's kept cells)."""
    def value(text: str):
        if text in ("True", "False"):
            return text == "True"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for number, row in enumerate(rows, 2):
        if None in row or None in row.values():        # too many fields, or too few
            raise ConfigError(f"{path}, line {number}, does not have the header's "
                              f"{len(rows[0]) - (None in rows[0])} columns (a torn write, a merge "
                              f"conflict?): restore the file from git, or remove it")
    return [{key: value(text) for key, text in row.items()} for row in rows]


def write_whole(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file renamed into place: a reader, or a run
    killed mid-write, sees the previous file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def csv_text(rows: list[dict]) -> str:
    """``rows`` as csv, with every column any row has (empty where a row lacks it)."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for row in rows for k in row)),
                            restval="")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_results(stem: Path, rows: list[dict], title: str, command: str, notes: str = "") -> None:
    """``stem``.csv (all columns) and ``stem``.md (the table, the command, the machine)."""
    if not rows:
        raise ConfigError(f"no configuration ran (the lines above say why each was left out); "
                          f"nothing written to {shown(stem)}.csv")
    columns = list(rows[0])
    write_whole(stem.with_suffix(".csv"), csv_text(rows))

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine()}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    write_whole(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {shown(stem)}.csv and .md", flush=True)
