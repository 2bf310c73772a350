"""Accuracy against N: a sweep over convolution kinds x groups x seeds, one training run per cell.

    python benchmarks/accuracy.py benchmarks/protocols/cifar10_wrn10_2_cpu.yaml
    python benchmarks/accuracy.py benchmarks/protocols/cifar10_wrn28_10.yaml --launcher slurm \\
        --slurm-gpus-per-node 8 --slurm-partition gpu

A protocol file names the training overrides every cell shares and the grid of cells (see
``benchmarks/protocols/``). Each cell is one ``twolevel_dist.train`` run in its own directory,
``<runs>/<conv>_N<groups>_s<seed>``, so the sweep is resumable: run the same command again and
finished cells are skipped, interrupted ones resume from their last checkpoint, cells that never
wrote one start afresh. A runs folder belongs to one protocol: the overrides are recorded in
``<runs>/sweep.json`` and a different set is refused rather than mixed into the same table.
``--rerun CELL ...`` trains cells afresh, finished or committed: their earlier runs are set
aside in ``<runs>/.sweep/replaced/``.

Launchers: ``local`` runs the cells one after another (one process each, or ``--torchrun``: one
rank per group for the kinds that shard, gc, gc2l and shuffle; the numbers are the same either
way); ``slurm`` submits one job per cell through submitit and waits for them (``--no-wait``
submits and returns; a later run attaches to the jobs still queued or running).

Results: ``benchmarks/results/accuracy_<tag>.csv/.md`` (one row per cell and the error table
against N beside the paper's), ``accuracy_<tag>.png`` (test error against N, mean and spread
over seeds, SC as a line: the paper's Figure 5) and ``accuracy_<tag>_loss.png`` (training loss
of SC, GC and GC-2L at the largest N: Figure 4). ``--aggregate-only`` writes them from the cells
finished so far without running anything.

Unlike the other benchmarks, which write to a fresh folder unless told ``--update``, the sweep
writes ``accuracy_<tag>`` in place: that file is the protocol's record across sessions, and each
session's sweep adds to it. A finished cell it holds is kept unless this machine has the cell's
run directory (which then stands for it); the rows are the protocol's cells (``--out STEM``
writes elsewhere). ``benchmarks/replot.py`` redraws the two plots from the csv alone.
"""

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, git_commit, read_rows, write_results, write_whole  # noqa: E402
from plotting import log_axis, pyplot, save, style  # noqa: E402

from twolevel_dist.config import (  # noqa: E402
    CONFIG_DIR,
    ModelConfig,
    TrainConfig,
    check_config_choices,
    check_overrides,
    validate,
)
from twolevel_dist.engine.checkpoint import latest_complete, rank_file  # noqa: E402
from twolevel_dist.engine.ending import EXIT_FILE, reported  # noqa: E402
from twolevel_dist.engine.metrics import read_metrics  # noqa: E402
from twolevel_dist.engine.run_dir import RunDirLock  # noqa: E402
from twolevel_dist.errors import ConfigError  # noqa: E402
from twolevel_dist.layers import CONV_KINDS  # noqa: E402
from twolevel_dist.models import build_model, count_parameters  # noqa: E402
from twolevel_dist.paper import PAPER_CIFAR10_ERROR_WRN28_10  # noqa: E402
from twolevel_dist.parallel import parallelize  # noqa: E402
from twolevel_dist.parallel.simulated import simulated_mesh  # noqa: E402

SHARDED_KINDS = ("gc", "gc2l", "shuffle")     # one rank per group; sc and flgc run on one rank
# Overrides the sweep sets per cell: a protocol that sets them would be silently overruled.
CELL_KEYS = ("conv", "groups", "seed", "run_dir", "resume", "overwrite")
ACTIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING",
                       "RESIZING", "SUSPENDED")


class SweepError(Exception):
    """A bad protocol, runs folder or option: one ``error:`` line, exit code 2."""


# --- the protocol and its cells ---------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    conv: str
    groups: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.conv}_N{self.groups}_s{self.seed}"

    @property
    def ranks(self) -> int:
        """Ranks of a ``--torchrun`` / SLURM run: one per group where the kind shards."""
        return self.groups if self.conv in SHARDED_KINDS else 1

    def overrides(self) -> list[str]:
        return [f"conv={self.conv}", f"groups={self.groups}", f"seed={self.seed}"]


@dataclass
class Protocol:
    tag: str
    description: str
    train: list[str]
    cells: list[Cell]
    path: Path
    unsplittable: frozenset = frozenset()     # (conv, groups) whose layers N ranks cannot split

    def ranks(self, cell: Cell) -> int:
        """Ranks of the cell's ``--torchrun`` / SLURM run: one per group where the kind shards
        and its layers split so; else one (the same network, on one device)."""
        return 1 if (cell.conv, cell.groups) in self.unsplittable else cell.ranks


# The results' columns, in order.
COLUMNS = ("model", "conv", "N", "seed", "params", "params_per_rank", "final_test_error",
           "best_test_error", "final_train_loss", "epochs", "wall_time_s", "finished",
           "train_loss_per_epoch")


def _positive_ints(block: dict, key: str, where: str) -> list[int]:
    values = block.get(key)
    if not isinstance(values, list) or not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= (0 if key == "seeds" else 1)
            for v in values):
        bound = "integers >= 0" if key == "seeds" else "positive integers"
        raise SweepError(f"{where}: '{key}' must be a non-empty list of {bound} (e.g. "
                         f"{key}: [{'0, 1' if key == 'seeds' else '2, 4, 8, 16'}])")
    return values


def load_protocol(path: Path) -> Protocol:
    """The protocol file: ``description``, ``train`` (overrides for every cell) and ``grid`` (a
    list of ``{conv: [...], groups: [...], seeds: [...]}`` blocks whose union is the cell list,
    in the order written: put the cells you want first in the first blocks)."""
    if not path.is_file():
        found = sorted(p.name for p in (REPO / "benchmarks" / "protocols").glob("*.yaml"))
        raise SweepError(f"no protocol file {path}; the committed ones are {found} in "
                         f"benchmarks/protocols/")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:          # yaml's ScannerError, OmegaConf's own
        raise SweepError(f"{path} is not a readable protocol ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a protocol is a mapping with description, train and grid")
    unknown = sorted(set(raw) - {"description", "train", "grid"})
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {unknown}; a protocol has description, train "
                         f"and grid")
    train = raw.get("train") or []
    if not isinstance(train, list) or not all(isinstance(o, str) and "=" in o for o in train):
        raise SweepError(f"{path}: 'train' must be a list of Hydra overrides like "
                         f"'model=wrn10_2'")
    clashing = [o for o in train if o.split("=")[0].lstrip("+~") in CELL_KEYS]
    if clashing:
        raise SweepError(f"{path}: 'train' sets {clashing}, which the sweep sets per cell; give "
                         f"conv, groups and seeds in 'grid' instead")
    try:            # as train checks its command line, before any cell (or sweep.json) exists
        check_config_choices(train)
        check_overrides(train, TrainConfig)
    except ConfigError as error:
        raise SweepError(f"{path}: train: {error}") from None
    cells: list[Cell] = []
    grid = raw.get("grid")
    if not isinstance(grid, list) or not grid:
        raise SweepError(f"{path}: 'grid' must be a list of blocks like {{conv: [gc, gc2l], "
                         f"groups: [2, 4], seeds: [0]}}")
    for number, block in enumerate(grid, 1):
        where = f"{path}, grid block {number}"
        if not isinstance(block, dict) or set(block) - {"conv", "groups", "seeds"}:
            raise SweepError(f"{where}: a block has exactly the keys conv, groups and seeds")
        convs = block.get("conv")
        if not isinstance(convs, list) or not convs or not all(c in CONV_KINDS for c in convs):
            raise SweepError(f"{where}: 'conv' must be a non-empty list of {sorted(CONV_KINDS)}")
        for conv in convs:
            for groups in _positive_ints(block, "groups", where):
                for seed in _positive_ints(block, "seeds", where):
                    cell = Cell(conv, 1 if conv == "sc" else groups, seed)
                    if cell not in cells:
                        cells.append(cell)
    unsplittable = _check_configs(path, train, cells)
    return Protocol(tag=path.stem, description=str(raw.get("description", "")).strip(),
                    train=list(train), cells=cells, path=path, unsplittable=unsplittable)


def _check_configs(path: Path, train: list[str], cells: list[Cell]) -> frozenset:
    """Each cell's config composed and checked as train checks it (a rate of -1, milestones
    past the last epoch): a refusal every cell would meet is said once, before any cell runs,
    and a refusal at a cell's start is that cell's own (it fails; the others run). Returns the
    (conv, groups) whose network cannot be split one group per rank (Shuffle needs N^2 to
    divide C_out): those cells run on one rank (``Protocol.ranks``)."""
    unsplittable = set()
    with train_configs() as composed:
        for conv, groups in dict.fromkeys((c.conv, c.groups) for c in cells):
            try:
                cfg = OmegaConf.to_object(composed([*train, *Cell(conv, groups, 0).overrides()]))
                validate(cfg)
            except Exception as error:      # ConfigError, Hydra's and OmegaConf's
                raise SweepError(f"{path}: conv={conv} groups={groups}: "
                                 f"{str(error).splitlines()[0]}") from None
            if conv in SHARDED_KINDS and groups > 1:
                with torch.device("meta"):
                    try:
                        parallelize(build_model(cfg.model.name, conv=conv, groups=groups,
                                                **cfg.model.build_kwargs()),
                                    simulated_mesh(groups))
                    except ConfigError:
                        unsplittable.add((conv, groups))
    return frozenset(unsplittable)


# --- the state of a cell's run directory ------------------------------------------------------

def cell_state(run_dir: Path) -> str:
    """done (the consolidated model.pt is written last), resume (a complete checkpoint),
    restart (files but no complete checkpoint: killed in its first epoch) or new."""
    if (run_dir / "model.pt").is_file():
        return "done"
    if run_dir.is_dir() and latest_complete(run_dir) is not None:
        return "resume"
    if run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):
        return "restart"
    return "new"


def train_command(protocol: Protocol, cell: Cell, run_dir: Path, torchrun: bool) -> list[str]:
    state = cell_state(run_dir)
    extra = {"resume": ["resume=true"], "restart": ["overwrite=true"]}.get(state, [])
    module = ["-m", "twolevel_dist.train", *protocol.train, *cell.overrides(),
              f"run_dir={run_dir}", *extra]
    if torchrun and protocol.ranks(cell) > 1:
        return [sys.executable, "-m", "twolevel_dist.torchrun", "--standalone",
                f"--nproc_per_node={protocol.ranks(cell)}", *module]
    return [sys.executable, *module]


class Ledger:
    """``<runs>/.sweep/``: the protocol the folder belongs to, each cell's log and wall time
    (summed over attempts, with the commits that ran it) and the SLURM jobs of a sweep."""

    def __init__(self, runs: Path):
        self.runs = runs
        self.folder = runs / ".sweep"

    def claim(self, protocol: Protocol, record: bool = True) -> None:
        """Refuse a runs folder that holds another protocol's cells; record this one's (unless
        ``record`` is false: only reading the folder, ``--aggregate-only``)."""
        path = self.runs / "sweep.json"
        mine = {"protocol": str(protocol.path.name), "train": protocol.train}
        if path.is_file():
            theirs = _read_json(path, {})
            if theirs.get("train") != protocol.train:
                raise SweepError(
                    f"{self.runs} holds cells trained with {theirs.get('train')}, not "
                    f"{protocol.train}: results of two protocols would be mixed; give another "
                    f"--runs (or move that folder away)")
            return
        if record:
            _write_json(path, mine, indent=1)

    def log(self, cell: Cell) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f"{cell.name}.log"

    def wall(self, cell: Cell) -> dict:
        """The cell's wall time over its attempts. An attempt killed outright (SIGKILL, a SLURM
        time limit, the machine going away) never recorded its end: it counts up to the run
        directory's last write, its last sign of life."""
        record = self._wall_record(cell)
        since = record.pop("running_since", None)
        if since is not None:
            record["seconds"] += max(0.0, _last_write(self.runs / cell.name) - since)
        return record

    @contextmanager
    def attempt(self, cell: Cell):
        """Time one attempt at a cell: its start is on disk before it runs, so a kill that
        skips the ``finally`` below still leaves it counted (see ``wall``)."""
        record = self.wall(cell)                  # an earlier attempt killed outright, folded in
        record["running_since"] = time.time()
        commit = git_commit()
        if commit not in record["commits"]:
            record["commits"].append(commit)
        self._save_wall(cell, record)
        try:
            yield
        finally:
            record["seconds"] += time.time() - record.pop("running_since")
            self._save_wall(cell, record)

    def _wall_path(self, cell: Cell) -> Path:
        return self.folder / f"{cell.name}.wall.json"

    def _wall_record(self, cell: Cell) -> dict:
        return _read_json(self._wall_path(cell), {"seconds": 0.0, "commits": []})

    def _save_wall(self, cell: Cell, record: dict) -> None:
        _write_json(self._wall_path(cell), record)

    def set_aside(self, cell: Cell) -> Path | None:
        """``--rerun``: move the cell's run directory and wall-time record out of the sweep's
        way, into ``.sweep/replaced/<cell>-<time>/`` (never deleted: the user's to remove);
        where they went, or None if the cell had neither."""
        run_dir, wall = self.runs / cell.name, self._wall_path(cell)
        if not run_dir.exists() and not wall.exists():
            return None
        aside = self.folder / "replaced" / f"{cell.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(parents=True)
        for path in (run_dir, wall):
            if path.exists():
                path.rename(aside / path.name)
        return aside

    def reruns(self) -> set[str]:
        """The cells ``--rerun`` set aside (``start_reruns``)."""
        return set(_read_json(self.folder / "reruns.json", []))

    def save_reruns(self, names: set[str]) -> None:
        _write_json(self.folder / "reruns.json", sorted(names))

    def active_job(self, cell: Cell):
        """The cell's SLURM job if it is still queued or running (submitit's view), else None."""
        job_id = self.jobs().get(cell.name)
        if not job_id:
            return None
        import submitit
        job = submitit.SlurmJob(self.folder / "submitit", job_id)
        return job if job.state in ACTIVE_SLURM_STATES else None

    def jobs(self) -> dict:
        return _read_json(self.folder / "slurm_jobs.json", {})

    def save_jobs(self, jobs: dict) -> None:
        _write_json(self.folder / "slurm_jobs.json", jobs, indent=1)


def _read_json(path: Path, default):
    """A ledger file's contents, or ``default`` where it has not been written yet."""
    return json.loads(path.read_text()) if path.is_file() else default


def _write_json(path: Path, value, indent: int | None = None) -> None:
    """A ledger file, written whole: to a temporary file renamed into place, so that a sweep
    killed mid-write leaves the previous version, never half of one."""
    write_whole(path, json.dumps(value, indent=indent) + "\n")


def _last_write(run_dir: Path) -> float:
    """When training last wrote to ``run_dir`` (its log, metrics or checkpoints); 0 if never."""
    paths = [run_dir / "train.log", run_dir / "metrics.jsonl", run_dir / "checkpoints"]
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _outcome(run_dir: Path) -> str:
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    if not records:
        return "no epoch logged"
    last, best = records[-1], max(r["test_acc"] for r in records)
    return (f"test error {100 - last['test_acc']:.2f}% (best {100 - best:.2f}%), train loss "
            f"{last['train_loss']:.3f}")


class Progress:
    """One line per finished cell: which, its outcome, cells done, and (for cells run one after
    another) the time the remaining ones should take at this sweep's pace."""

    def __init__(self, total: int, done_before: int, sequential: bool):
        self.total, self.done, self.sequential = total, done_before, sequential
        self.seconds: list[float] = []

    def finished(self, cell: Cell, run_dir: Path, seconds: float, ok: bool) -> None:
        self.done += ok
        self.seconds.append(seconds)
        left = self.total - self.done
        eta = ""
        if self.sequential and left:
            eta = f", ETA {_duration(left * sum(self.seconds) / len(self.seconds))}"
        status = _outcome(run_dir) if ok else "FAILED"
        print(f"[{self.done}/{self.total} cells done{eta}] {cell.conv} N={cell.groups} "
              f"seed={cell.seed}: {status}, {_duration(seconds)}", flush=True)


# --- launchers --------------------------------------------------------------------------------

def run_local(protocol: Protocol, runs: Path, todo: list[Cell], progress: Progress,
              torchrun: bool) -> list[Cell]:
    """The cells one after another; returns those that failed, each said with its own line
    (the cell's exit file: torchrun hides a worker's code and line). A cell stopped by a signal
    with a checkpoint (exit 75) stops the sweep as Ctrl-C does."""
    ledger, failed = Ledger(runs), []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if torchrun:
        env.setdefault("OMP_NUM_THREADS", "1")
    for cell in todo:
        run_dir = runs / cell.name
        command = train_command(protocol, cell, run_dir, torchrun)
        exit_file = ledger.folder / f"{cell.name}.exit"
        exit_file.unlink(missing_ok=True)
        with open(ledger.log(cell), "a") as log:
            log.write(f"\n$ {shlex.join(command)}\n")
            log.flush()
            start = time.time()
            with ledger.attempt(cell):
                code, interrupted = _run_cell(command, log, {**env, EXIT_FILE: str(exit_file)})
            seconds = time.time() - start
        said_code, said = reported(exit_file)
        exit_file.unlink(missing_ok=True)
        if interrupted or said_code == 75:
            if said:                        # the cell's own line: where its checkpoint is
                print(f"  {cell.name}: {said}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        progress.finished(cell, run_dir, seconds, code == 0)
        if code != 0:
            failed.append(cell)
            own_line = f"\n    {said}" if said and said_code != 0 else ""
            tail = ledger.log(cell).read_text().splitlines()[-5:]
            print(f"  exit code {code}{own_line}\n  the end of {ledger.log(cell)}:\n    " +
                  "\n    ".join(tail), file=sys.stderr, flush=True)
    return failed


def _run_cell(command: list[str], log, env: dict) -> tuple[int, bool]:
    """(exit code, whether the sweep was interrupted) of one cell's training. Interrupted, the
    sweep waits while the cell finishes its step and writes its checkpoint (it would lose up to
    an epoch if killed): a Ctrl-C reached the cell too (one process group); a SIGTERM, which
    reached the sweep alone (``_terminated``), is passed on. The same signal again, 2 s or more
    later, ends the cell at once."""
    child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    interrupted = False
    while True:
        try:
            return child.wait(), interrupted
        except KeyboardInterrupt:
            interrupted = True
            if _TERMINATED["pending"]:
                _TERMINATED["pending"] = False
                child.send_signal(signal.SIGTERM)


_TERMINATED = {"pending": False}


def _terminated(signum, frame) -> None:
    """SIGTERM to the sweep (``kill``): stop as Ctrl-C does, the running cell told as well."""
    _TERMINATED["pending"] = True
    raise KeyboardInterrupt


def _slurm_task(command: list[str], runs: str, cell: Cell) -> int:
    """What each SLURM task of a cell's job runs: the training command (it reads SLURM's
    variables to find its rank); task 0 times the attempt in the ledger."""
    if int(os.environ.get("SLURM_PROCID", "0")) != 0:
        return subprocess.run(command, cwd=REPO).returncode
    with Ledger(Path(runs)).attempt(cell):
        return subprocess.run(command, cwd=REPO).returncode


def slurm_layout(cell: Cell, ranks: int, args) -> tuple[int, int, int | None]:
    """(nodes, tasks per node, GPUs per node) of a cell's SLURM job. One task per rank, at most
    ``--slurm-ranks-per-node`` of them on a node (default: ``--slurm-gpus-per-node``, one rank
    per GPU, else all on one node), and a GPU for each task, no more: a one-rank cell (SC, FLGC)
    asks for one GPU, not a whole node's. The tasks must fill their nodes evenly, since SLURM
    starts ``nodes x tasks per node`` of them and every one is a rank."""
    per_node = min(ranks, args.slurm_ranks_per_node or args.slurm_gpus_per_node or ranks)
    if ranks % per_node:
        raise SweepError(f"{cell.name} runs {ranks} ranks, which {per_node} ranks per node do "
                         f"not fill evenly: give --slurm-ranks-per-node a divisor of {ranks}")
    return ranks // per_node, per_node, per_node if args.slurm_gpus_per_node else None


def run_slurm(protocol: Protocol, runs: Path, todo: list[Cell], progress: Progress,
              args) -> list[Cell]:
    """One job per cell through submitit (cells whose job is still queued or running are
    attached, not submitted again), then waits unless ``--no-wait``; returns the failed cells."""
    try:
        import submitit
    except ImportError:
        raise SweepError("--launcher slurm needs submitit: pip install -e '.[slurm]'") from None
    ledger = Ledger(runs)
    folder = ledger.folder / "submitit"
    recorded, jobs = ledger.jobs(), {}
    for cell in todo:
        if (job := ledger.active_job(cell)) is not None:
            jobs[cell] = job
            print(f"{cell.name}: attached to SLURM job {job.job_id}", flush=True)
    for cell in [c for c in todo if c not in jobs]:
        ranks = protocol.ranks(cell)
        nodes, per_node, gpus = slurm_layout(cell, ranks, args)
        executor = submitit.AutoExecutor(folder=folder)
        executor.update_parameters(
            name=f"{protocol.tag}-{cell.name}", nodes=nodes,
            tasks_per_node=per_node, cpus_per_task=args.slurm_cpus_per_task,
            gpus_per_node=gpus, timeout_min=args.slurm_timeout_min,
            slurm_partition=args.slurm_partition, mem_gb=args.slurm_mem_gb,
            # The job unpickles this script's task, which refers to its sibling modules
            # (common, plotting): they must import there as they do here.
            # SRUN_CPUS_PER_TASK: SLURM 22.05 to 23.02's srun does not take --cpus-per-task
            # from the job, and a cluster that binds tasks would give each rank one core.
            slurm_setup=["export OMP_NUM_THREADS=" + str(args.slurm_cpus_per_task),
                         "export SRUN_CPUS_PER_TASK=" + str(args.slurm_cpus_per_task),
                         f"export PYTHONPATH={Path(__file__).resolve().parent}"
                         "${PYTHONPATH:+:$PYTHONPATH}"])
        command = train_command(protocol, cell, runs / cell.name, torchrun=False)
        jobs[cell] = executor.submit(_slurm_task, command, str(runs), cell)
        recorded[cell.name] = jobs[cell].job_id
        ledger.save_jobs(recorded)
        print(f"{cell.name}: submitted SLURM job {jobs[cell].job_id} ({ranks} task(s))",
              flush=True)
    if args.no_wait:
        return []
    failed, start = [], time.time()
    while jobs:
        for cell, job in list(jobs.items()):
            if not job.done():
                continue
            del jobs[cell]
            try:
                ok = all(code == 0 for code in job.results())
            except Exception as error:          # the job died: submitit says how
                print(f"  {cell.name}: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
                ok = False
            progress.finished(cell, runs / cell.name, time.time() - start, ok)
            if not ok:
                failed.append(cell)
                print(f"  logs: {folder}/{job.job_id}_*", file=sys.stderr, flush=True)
        time.sleep(args.poll_s if jobs else 0)
    return failed


# --- results ----------------------------------------------------------------------------------

def _trained_classes(run_dir: Path) -> int | None:
    """The number of classes the run's head has (its model.pt, else rank 0's newest complete
    checkpoint; memory-mapped, so only that tensor is read), or None where it saved none yet."""
    saved = run_dir / "model.pt"
    if not saved.is_file():
        position = latest_complete(run_dir)
        saved = rank_file(run_dir, position, 0) if position is not None else None
    if saved is None:
        return None
    return torch.load(saved, map_location="cpu", weights_only=True, mmap=True)[
        "model"]["fc.bias"].numel()


def protocol_model(protocol: Protocol) -> ModelConfig:
    """The model config the protocol's cells train (its ``train`` overrides over configs/)."""
    with train_configs() as composed:
        return ModelConfig(**OmegaConf.to_container(composed(protocol.train).model))


@contextmanager
def train_configs():
    """``composed(overrides)``: train's config as train composes it (its schema, configs/)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)   # as train does
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        yield lambda overrides: compose(config_name="train", overrides=list(overrides))


def parameter_counts(model_cfg: ModelConfig, cell: Cell,
                     num_classes: int | None) -> tuple[int, int | str]:
    """(the whole network's parameters as deployed, ``count_parameters``: for FLGC the
    connections inside its groups as initialised, balanced, and its group logits; one rank's
    share with one rank per group, counted on the meta device: the whole for sc and flgc, ""
    where the layers cannot be split so). ``num_classes`` None: the network's default head."""
    torch.manual_seed(0)
    whole = count_parameters(build_model(model_cfg.name, conv=cell.conv, groups=cell.groups,
                                         num_classes=num_classes, **model_cfg.build_kwargs()))
    if cell.ranks == 1:
        return whole, whole
    with torch.device("meta"):
        model = build_model(model_cfg.name, conv=cell.conv, groups=cell.groups,
                            num_classes=num_classes, **model_cfg.build_kwargs())
        try:
            model = parallelize(model, simulated_mesh(cell.groups))
        except ConfigError:         # e.g. Shuffle across ranks needs N^2 to divide C_out
            return whole, ""
    return whole, sum(p.numel() for p in model.parameters())


def committed_cells(out: Path) -> dict[str, dict]:
    """The finished cells of the committed results ``out``.csv, by cell name: a sweep that
    spans sessions (each starts from a fresh clone, its run directories gone) keeps them
    instead of training them again."""
    path = out.with_suffix(".csv")
    if not path.is_file():
        return {}
    return {Cell(row["conv"], row["N"], row["seed"]).name: row for row in read_rows(path)
            if row["finished"] is True}


def check_committed_settings(out: Path, protocol: Protocol) -> None:
    """Refuse committed results ``out`` whose cells were trained with other ``train``
    overrides than the protocol's now: their finished rows would be kept beside new ones (the
    md records them: "Every cell: `...`")."""
    md = out.with_suffix(".md")
    found = re.search(r"^Every cell: `([^`]*)`", md.read_text(), re.M) if md.is_file() else None
    if found and found.group(1) != " ".join(protocol.train):
        raise SweepError(f"{md}'s cells were trained with `{found.group(1)}`, the protocol now "
                         f"says `{' '.join(protocol.train)}`: their results would be mixed; give "
                         f"another --out (and --runs), or move those results away")


def _committed_commits(out: Path) -> set[str]:
    """The commits the committed ``out``.md says its cells ran at."""
    md = out.with_suffix(".md")
    text = md.read_text() if md.is_file() else ""
    found = re.search(r"cells ran at commit\(s\) ([^;.]+)", text)
    return {c.strip() for c in found.group(1).split(",")} - {"unknown"} if found else set()


def collect(protocol: Protocol, runs: Path,
            kept: dict[str, dict] | None = None) -> tuple[list[dict], int]:
    """One row per cell with at least one finished epoch, in the protocol's order: from its run
    directory, or from ``kept`` (``committed_cells``) where that directory has not finished
    the cell; and how many rows came from ``kept``. Every row gets both parameter counts
    (``parameter_counts``), a kept one too: from the protocol's model, with the head of the
    runs here (all cells share their data set)."""
    rows, ledger, kept, classes, from_kept = [], Ledger(runs), kept or {}, [], []
    for cell in protocol.cells:
        run_dir = runs / cell.name
        # A finished committed row stands until a run directory here finishes the cell: an
        # unfinished one (a partial copy, a rerun in progress) never replaces it.
        if cell.name in kept and cell_state(run_dir) != "done":
            rows.append(dict(kept[cell.name]))
            from_kept.append(rows[-1])
            continue
        if not (run_dir / "metrics.jsonl").is_file() or not read_metrics(run_dir):
            continue
        records = read_metrics(run_dir)
        config = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
        model = config["model"]
        num_classes = _trained_classes(run_dir)
        classes.append(num_classes)
        params, per_rank = parameter_counts(ModelConfig(**model), cell, num_classes)
        rows.append(dict(
            model=f"{model['name']}-{model['depth']}-{model['widen']}" if model.get("depth")
            else model["name"],
            conv=cell.conv, N=cell.groups, seed=cell.seed, params=params,
            params_per_rank=per_rank,
            final_test_error=round(100 - records[-1]["test_acc"], 2),
            best_test_error=round(100 - max(r["test_acc"] for r in records), 2),
            final_train_loss=round(records[-1]["train_loss"], 4),
            epochs=f"{records[-1]['epoch']}/{config['train']['epochs']}",
            wall_time_s=round(ledger.wall(cell)["seconds"]),
            finished=cell_state(run_dir) == "done",
            train_loss_per_epoch=" ".join(f"{r['train_loss']:.4f}" for r in records)))
    if from_kept:            # counted again: an older csv may lack them, or count otherwise
        model_cfg = protocol_model(protocol)
        num_classes = next((c for c in classes if c is not None), None)
        for row in from_kept:
            row["params"], row["params_per_rank"] = parameter_counts(
                model_cfg, Cell(row["conv"], row["N"], row["seed"]), num_classes)
    return [{key: row[key] for key in COLUMNS} for row in rows], len(from_kept)


def _spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f} ({len(values)} seeds)"


def error_table(rows: list[dict], paper: bool) -> list[str]:
    """Final test error by conv kind (rows) and N (columns): mean ± half the range over seeds
    of the finished cells; with ``paper``, the paper's WRN-28-10 figure beside each."""
    done = [r for r in rows if r["finished"]]
    # The protocol's N, finished or not: SC alone still gets its column of numbers.
    ns = sorted({r["N"] for r in rows if r["conv"] != "sc"}) or [1]
    kinds = [k for k in ("sc", "gc", "flgc", "shuffle", "gc2l") if any(r["conv"] == k
                                                                        for r in done)]
    lines = ["| conv | " + " | ".join(f"N = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for kind in kinds:
        cells = []
        for n in ns:
            errors = [r["final_test_error"] for r in done
                      if r["conv"] == kind and (kind == "sc" or r["N"] == n)]
            ours = _spread(errors) if errors else "–"
            theirs = PAPER_CIFAR10_ERROR_WRN28_10.get((kind, 1 if kind == "sc" else n))
            cells.append(f"{ours} (paper {theirs:.2f})" if paper and theirs else ours)
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def parameter_table(rows: list[dict]) -> list[str]:
    """The whole network's parameters by conv kind and N (what compression compares), in
    thousands, of every cell with a row."""
    ns = sorted({r["N"] for r in rows if r["conv"] != "sc"})
    kinds = [k for k in ("sc", "gc", "flgc", "shuffle", "gc2l") if any(r["conv"] == k
                                                                        for r in rows)]
    lines = ["| conv | " + " | ".join(f"N = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for kind in kinds:
        counts = [next((r["params"] for r in rows if r["conv"] == kind
                        and (kind == "sc" or r["N"] == n)), None) for n in ns]
        lines.append(f"| {kind} | " + " | ".join(f"{c / 1e3:,.1f}k" if c else "–"
                                                 for c in counts) + " |")
    return lines


def plot_error_against_n(rows: list[dict], path: Path, title: str) -> bool:
    done = [r for r in rows if r["finished"]]
    plt = pyplot() if done else None       # nothing finished yet: no plot
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("gc", "flgc", "shuffle", "gc2l"):
        ns = sorted({r["N"] for r in done if r["conv"] == kind})
        if not ns:
            continue
        per_n = [[r["final_test_error"] for r in done if r["conv"] == kind and r["N"] == n]
                 for n in ns]
        means = [sum(e) / len(e) for e in per_n]
        ax.errorbar(ns, means, yerr=[[m - min(e) for m, e in zip(means, per_n)],
                                     [max(e) - m for m, e in zip(means, per_n)]],
                    capsize=3, label=kind, **style(kind))
    sc = [r["final_test_error"] for r in done if r["conv"] == "sc"]
    if sc:
        ax.axhline(sum(sc) / len(sc), color=style("sc")["color"], linestyle="--", linewidth=1,
                   label="sc (one network, any N)")
    log_axis(ax, "x", ticks=sorted({r["N"] for r in done if r["conv"] != "sc"}))
    _finish_plot(fig, ax, path, title, "N (groups)", "final test error (%)")
    return True


def plot_training_loss(rows: list[dict], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    largest = max((r["N"] for r in rows if r["conv"] in ("gc", "gc2l")), default=None)
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("sc", "gc", "gc2l"):
        picks = [r for r in rows if r["conv"] == kind and (kind == "sc" or r["N"] == largest)]
        if picks:
            # str(): read back from a csv, one epoch's loss is a number
            losses = [float(v) for v in str(min(picks, key=lambda r: r["seed"])
                                             ["train_loss_per_epoch"]).split()]
            ax.plot(range(1, len(losses) + 1), losses, **{**style(kind), "marker": "."},
                    label=kind if kind == "sc" else f"{kind}, N = {largest}")
    _finish_plot(fig, ax, path, title, "epoch", "training loss")
    return True


def _finish_plot(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save(fig, path)


def plots(rows: list[dict], stem: Path, tag: str) -> None:
    """``stem``.png (error against N) and ``stem``_loss.png (training loss)."""
    plot_error_against_n(rows, stem.with_suffix(".png"), f"{tag}: final test error")
    plot_training_loss(rows, stem.with_name(stem.name + "_loss.png"),
                       f"{tag}: training loss at the largest N")


def replot(csv_path: Path, stem: Path) -> None:
    """The two plots from a results csv alone (benchmarks/replot.py): nothing trained again."""
    plots(read_rows(csv_path), stem, csv_path.stem.removeprefix("accuracy_"))


def aggregate(protocol: Protocol, runs: Path, out: Path, command: str) -> list[dict]:
    """``out``.csv/.md and the two plots from the cells' run directories (and the committed
    rows of cells whose run directories are not here)."""
    kept = committed_cells(out)
    rows, from_csv = collect(protocol, runs, kept)
    if not rows:
        print(f"no cell of {protocol.path} has finished an epoch in {runs} yet: nothing to "
              f"aggregate", flush=True)
        return rows
    finished = sum(r["finished"] for r in rows)
    commits = sorted({c for cell in protocol.cells for c in Ledger(runs).wall(cell)["commits"]}
                     | (_committed_commits(out) if from_csv else set()))
    paper = "model=wrn28_10" in protocol.train or "+experiment=cifar_wrn28_10" in protocol.train
    notes = "\n".join([
        protocol.description, "",
        f"Every cell: `{' '.join(protocol.train)}`; cells ran at commit(s) "
        f"{', '.join(commits) or 'unknown'}. {finished} of {len(protocol.cells)} cells finished"
        + ("." if finished == len(protocol.cells) else
           "; the others are pending, in progress or failed (their rows show the epochs so far).")
        + (f" {from_csv} finished cell(s) kept from the committed `{out.name}.csv` (trained in "
           f"an earlier session, their run directories are not on this machine)."
           if from_csv else ""),
        "",
        "## Final test error (%) against N" + ("" if paper else
                                                " (the paper's figures: README)"),
        "", *error_table(rows, paper), "",
        "## Parameters of the whole network against N", "", *parameter_table(rows), "",
        "mean ± half the range over seeds; sc does not depend on N. params: the whole "
        "single-device network as deployed (FLGC: the connections inside its groups as "
        "initialised, balanced, and its group logits, not the dense weight it trains); "
        "params_per_rank: one rank's "
        "share with one rank per group (empty where the layers cannot be split so; Shuffle "
        "needs N^2 to divide every layer's width). Plots: "
        f"`{out.name}.png` (error against N), `{out.name}_loss.png` (training loss).", "",
        "## Every cell"])
    write_results(out, rows, f"Accuracy against N: {protocol.tag}", command, notes)
    plots(rows, out, protocol.tag)
    return rows


def start_reruns(runs: Path, cells: list[Cell]) -> set[str]:
    """``--rerun``: set aside the earlier run of each cell in ``cells`` (``Ledger.set_aside``),
    once none of them is in use (a live training in its run directory, or a SLURM job of this
    sweep still queued or running, would go on writing where the rerun starts). Returns the
    names of the cells being rerun: these, and those an earlier ``--rerun`` set aside that have
    not finished since. Those are not set aside again: run again, the same command continues a
    rerun as it continues any cell."""
    ledger = Ledger(runs)
    earlier = ledger.reruns()
    pending = {name for name in earlier if cell_state(runs / name) != "done"}
    fresh = [c for c in cells if c.name not in pending]
    for cell in fresh:
        RunDirLock(runs / cell.name).check_free()
        try:
            job = ledger.active_job(cell)
        except ImportError:         # never submitted through SLURM from here
            job = None
        if job is not None:
            raise SweepError(f"--rerun {cell.name}: its SLURM job {job.job_id} is still "
                             f"{job.state.lower()}; scancel {job.job_id} first")
    for cell in fresh:
        if (aside := ledger.set_aside(cell)) is not None:
            print(f"{cell.name}: its earlier run set aside in {aside}", flush=True)
        pending.add(cell.name)
    if pending != earlier:
        ledger.save_reruns(pending)
    return pending


# --- the command line -------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("protocol", type=Path, help="a protocol file (benchmarks/protocols/)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="the cells' run directories (default: "
                             "benchmarks/results/runs/accuracy_<tag>)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results stem (default: benchmarks/results/accuracy_<tag>)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--torchrun", action="store_true",
                        help="local: one rank per group through torchrun (gc, gc2l, shuffle)")
    parser.add_argument("--only", nargs="+", default=None, metavar="CELL",
                        help="run only these cells (names like gc2l_N16_s0)")
    parser.add_argument("--rerun", nargs="+", default=[], metavar="CELL",
                        help="train these cells afresh, finished or committed as they may be "
                             "(their earlier runs are set aside in <runs>/.sweep/replaced/)")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="write the results from the cells finished so far; run nothing")
    parser.add_argument("--no-wait", action="store_true", help="slurm: submit and return")
    parser.add_argument("--poll-s", type=float, default=15.0, help="slurm: seconds between polls")
    parser.add_argument("--slurm-partition", default=None)
    parser.add_argument("--slurm-timeout-min", type=int, default=24 * 60)
    parser.add_argument("--slurm-gpus-per-node", type=int, default=None,
                        help="the GPUs a node has: each job asks for one per rank it runs there")
    parser.add_argument("--slurm-ranks-per-node", type=int, default=None,
                        help="default: --slurm-gpus-per-node, else all of a cell's ranks on one "
                             "node")
    parser.add_argument("--slurm-cpus-per-task", type=int, default=1)
    parser.add_argument("--slurm-mem-gb", type=int, default=None)
    args = parser.parse_args(argv)
    for name in ("poll_s", "slurm_timeout_min", "slurm_cpus_per_task"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("slurm_gpus_per_node", "slurm_ranks_per_node", "slurm_mem_gb"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rerun and args.aggregate_only:
        parser.error("--rerun trains cells, --aggregate-only trains none: choose one")
    if args.torchrun and args.launcher == "slurm":
        parser.error("--torchrun is for --launcher local: under SLURM every rank is a task of "
                     "its own (--slurm-ranks-per-node of them on a node)")
    if (args.slurm_ranks_per_node or 0) > (args.slurm_gpus_per_node or math.inf):
        parser.error(f"--slurm-ranks-per-node {args.slurm_ranks_per_node} is more than "
                     f"--slurm-gpus-per-node {args.slurm_gpus_per_node}: every rank needs a GPU "
                     "of its own (NCCL refuses two ranks on one)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        protocol = load_protocol(args.protocol.resolve())
        runs = (args.runs or RESULTS / "runs" / f"accuracy_{protocol.tag}").resolve()
        out = args.out or RESULTS / f"accuracy_{protocol.tag}"
        names = {c.name for c in protocol.cells}
        for option, named in (("--only", args.only or []), ("--rerun", args.rerun)):
            if set(named) - names:
                raise SweepError(f"{option} {sorted(set(named) - names)}: not cells of "
                                 f"{args.protocol}; its cells are {sorted(names)}")
        if args.only and set(args.rerun) - set(args.only):
            raise SweepError(f"--rerun {sorted(set(args.rerun) - set(args.only))}: not among "
                             f"the --only cells")
        for cell in protocol.cells if args.launcher == "slurm" else []:
            slurm_layout(cell, protocol.ranks(cell), args)      # before any job is submitted
        check_committed_settings(out, protocol)
        committed_cells(out)                # a torn csv is said now, before any cell runs
        Ledger(runs).claim(protocol, record=not args.aggregate_only)
        reruns = set() if args.aggregate_only else start_reruns(
            runs, [c for c in protocol.cells if c.name in args.rerun])
    except (SweepError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = "python benchmarks/accuracy.py " + shlex.join(
        [os.path.relpath(protocol.path, REPO), *(["--torchrun"] if args.torchrun else []),
         *(["--launcher", "slurm"] if args.launcher == "slurm" else [])])
    failed = []
    if not args.aggregate_only:
        cells = [c for c in protocol.cells if not args.only or c.name in args.only]
        kept = committed_cells(out)
        # A committed finished row stands in only for a run directory that is not here, and
        # not for a cell being rerun (the row stands in the results until the rerun finishes).
        todo = [c for c in cells if cell_state(runs / c.name) != "done"
                and not (c.name in kept and cell_state(runs / c.name) == "new"
                         and c.name not in reruns)]
        print(f"{protocol.tag}: {len(cells)} cells, {len(cells) - len(todo)} already done; "
              f"runs in {runs}", flush=True)
        progress = Progress(len(cells), len(cells) - len(todo),
                            sequential=args.launcher == "local")
        if args.launcher == "local":        # a kill(1) stops the running cell as Ctrl-C does
            signal.signal(signal.SIGTERM, _terminated)
        try:
            failed = (run_local(protocol, runs, todo, progress, args.torchrun)
                      if args.launcher == "local" else
                      run_slurm(protocol, runs, todo, progress, args))
        except SweepError as error:
            print(f"error: {error}", file=sys.stderr)
            aggregate(protocol, runs, out, command)
            return 2
        except KeyboardInterrupt:
            print("interrupted: run the same command again to continue (finished cells are "
                  "kept, the interrupted one resumes from its last checkpoint)", file=sys.stderr)
            aggregate(protocol, runs, out, command)
            return 130
    aggregate(protocol, runs, out, command)
    if failed:
        print(f"error: {len(failed)} cell(s) failed: {', '.join(c.name for c in failed)}; their "
              f"logs are in {Ledger(runs).folder}; run the same command again to retry them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
