"""How a run's end reaches its launcher.

Exit codes: 0 done; 2 refused or failed for a reason a restart cannot fix (a config error,
missing data, a divergence, a full disk); 3 another rank died or hung; 75 stopped by a signal
with a complete checkpoint, resumable (``engine.stop``); 130 interrupted before training began.

torchrun hides a worker's exit code (it exits 1 whatever failed) and restarts failed workers up
to ``--max-restarts`` times. So:

where ``TWOLEVEL_EXIT_FILE`` names a file (our launchers set it: ``launch/torchrun.sh``,
``launch/slurm.sbatch``), the job writes its exit code and its one line there for the launcher
to exit with and print last, after torchrun's own report, and a worker that ends with code 2 or
130 under torchrun also ends its agent (SIGTERM), so that the agent does not restart it into the
same refusal or past the interruption. A stop is not restarted either: when a signal reached
only the workers (``launch/torchrun.sh`` signals them, SLURM every process of a step),
torchrun restarts them, and the restarted workers find the stop recorded and end at once
(``stopped_earlier``). Under a bare torchrun nothing of this
happens, but a refusal's line is what torchrun's failure report shows (``announce``).

The line is shown once: rank 0 says an error that every rank meets (most are: a config, the
data, a check the ranks agree on), and the other ranks leave it that time (``leave_to_rank0``).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

from twolevel_dist.engine.stop import STOP_SIGNALS
from twolevel_dist.parallel.mesh import env_rank

EXIT_FILE = "TWOLEVEL_EXIT_FILE"
ERROR_FILE = "TORCHELASTIC_ERROR_FILE"      # set by torchrun for each worker
NO_RESTART = (2, 130)
RANK0_GRACE_S = 10.0


def report_exit(code: int, line: str) -> None:
    """Record ``code`` and ``line`` for the launcher (see the module docstring)."""
    path = os.environ.get(EXIT_FILE)
    if not path:
        return
    if code in (3, 130) and reported()[0] == 2:
        # The refusal stands: its rank ended torchrun's agent, whose SIGTERM interrupted this
        # rank (``stop.interrupt_before_training``) or whose end failed its collectives.
        return
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(f"{code}\n{line}\n")
    os.replace(tmp, path)
    if code in NO_RESTART and "TORCHELASTIC_RUN_ID" in os.environ:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the agent's SIGTERM back ends us
        os.kill(os.getppid(), signal.SIGTERM)       # torchrun's agent: no restart


def reported(path: str | os.PathLike | None = None) -> tuple[int | None, str]:
    """(code, line) the job recorded in its exit file (``report_exit``; default: this process's
    ``TWOLEVEL_EXIT_FILE``), or (None, "") where it recorded none."""
    path = path or os.environ.get(EXIT_FILE)
    try:
        code, line = Path(path).read_text().split("\n", 1)
        return int(code), line.strip()
    except (TypeError, OSError, ValueError):      # no exit file (yet), or a torn one
        return None, ""


def stopped_earlier() -> str | None:
    """In a torchrun restart round after this job stopped (its exit file holds code 75): the
    stop's line, to end with at once; else None."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0:
        return None
    code, line = reported()
    return line if code == 75 else None


def stop_requested_before_start() -> bool:
    """Whether the launcher asked the job to stop before this rank began training: our
    launchers note each request in ``<exit file>.stop`` before they signal the ranks, so that
    a rank the signal missed does not train on: one ``launch/torchrun.sh``'s SIGTERM killed
    while still importing (torchrun restarts it), or one that ignored ``launch/slurm.sbatch``'s
    SIGUSR2 while it set up (torchrun runs with it ignored, and its ranks inherit that)."""
    path = os.environ.get(EXIT_FILE)
    return bool(path) and Path(f"{path}.stop").exists()


def announce(code: int, line: str) -> None:
    """Record ``code`` and ``line`` for the launcher (``report_exit``) and show ``line`` once,
    as the last thing where that can be done: under our launchers they print it after torchrun's
    report; a refusal or failure (codes 2, 3) under a bare torchrun goes into this worker's
    error file, which torchrun's report prints (as the "Root Cause" where this rank failed
    first) instead of a pointer to its documentation; anything else goes to stderr (a stop's
    line too: the Ctrl-C that stopped the run also ends torchrun's agent, which then reports
    nothing)."""
    report_exit(code, line)
    if os.environ.get(EXIT_FILE):
        return
    error_file = os.environ.get(ERROR_FILE)
    if code in (2, 3) and error_file:
        # The format of torch.distributed.elastic's ErrorHandler.record_exception, with the
        # line where it puts a traceback (what the report prints).
        now = str(int(time.time()))
        Path(error_file).write_text(json.dumps(dict(message=dict(
            message=line, extraInfo=dict(py_callstack=line, timestamp=now)))))
        return
    print(line, file=sys.stderr, flush=True)


def end(code: int, line: str, only_rank0: bool = False, then=None, own: bool = False) -> None:
    """Exit with ``code`` and its one line, shown once where the user looks and reported to
    the launcher (``announce``); ``then`` runs before the exit. Rank 0 says it at once; another
    rank first leaves rank 0 the time to (``leave_to_rank0``) and says it only if still running
    then: its own error. ``only_rank0``: the others stay silent (a stop, which every rank agrees
    on); ``own``: an error only this rank met (``RankError``), said at once."""
    if env_rank() != 0 and not only_rank0 and not own:
        if reported()[0] in NO_RESTART:
            # The job's line is said (a refusal, an interruption: final, never restarted) and
            # torchrun's agent is being ended, whose SIGTERM is likely what brought this rank
            # here: nothing to wait for, and nothing to add.
            sys.exit(code)
        leave_to_rank0()
    if not only_rank0 or env_rank() == 0:
        announce(code, line)
    if then is not None:
        then()
    sys.exit(code)


def leave_to_rank0(grace_s: float = RANK0_GRACE_S) -> None:
    """On a rank other than 0 about to exit with an error: wait ``grace_s`` for the launcher to
    end this process. Rank 0 says an error every rank meets, and once it exits torchrun (srun
    ``--kill-on-bad-exit``) stops the others; exiting first instead would have torchrun stop
    rank 0, perhaps before it said why. A rank still running after ``grace_s`` met an error of
    its own (or runs without such a launcher), and then says it itself."""
    for signum in STOP_SIGNALS:         # the launcher's SIGTERM ends this process, not a stop
        signal.signal(signum, signal.SIG_DFL)
    time.sleep(grace_s)


def peer_failure(error: BaseException, then: str) -> str | None:
    """The line for a collective that failed because another rank died or hung past
    ``dist.timeout_s`` (NCCL's watchdog and torch raise DistError; gloo a RuntimeError naming
    its transport), ending with what to do ``then``; None for any other error."""
    text = str(error)
    if not (isinstance(error, dist.DistError) or "Timed out" in text or "gloo" in text or
            "Connection closed by peer" in text or "Connection reset by peer" in text):
        return None
    return (f"error: a collective failed on rank {env_rank()} "
            f"({type(error).__name__}: {text.splitlines()[0][:300] if text else ''}): another "
            f"rank died or hung for longer than dist.timeout_s; its own log says why. {then}")

