"""How a run's end reaches its launcher.

Exit codes: 0 done; 2 refused or failed for a reason a restart cannot fix (a config error,
missing data, a divergence, a full disk); 3 another rank died or hung; 75 stopped by a signal
with a complete checkpoint, resumable (``engine.stop``); 130 interrupted before training began.

torchrun hides a worker's exit code (it exits 1 whatever failed) and restarts failed workers up
to ``--max-restarts`` times. So:

where ``TWOLEVEL_EXIT_FILE`` names a file (our launchers set it: ``launch/torchrun.sh``), the job
writes its exit code and its one line there for the launcher to exit with, and a worker that
ends with code 2 under torchrun also ends its agent (SIGTERM), so that the agent does not
restart it into the same refusal. A stop is not restarted either: when a signal reached only
the workers (SLURM signals every process of a step), torchrun restarts them, and the restarted
workers find the stop recorded and end at once (``stopped_earlier``). Under a bare torchrun
nothing of this happens.
"""

import os
import signal
from pathlib import Path

EXIT_FILE = "TWOLEVEL_EXIT_FILE"
NO_RESTART = (2,)


def report_exit(code: int, line: str) -> None:
    """Record ``code`` and ``line`` for the launcher (see the module docstring)."""
    path = os.environ.get(EXIT_FILE)
    if not path:
        return
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(f"{code}\n{line}\n")
    os.replace(tmp, path)
    if code in NO_RESTART and "TORCHELASTIC_RUN_ID" in os.environ:
        os.kill(os.getppid(), signal.SIGTERM)       # torchrun's agent: no restart


def stopped_earlier() -> str | None:
    """In a torchrun restart round after this job stopped (its exit file holds code 75): the
    stop's line, to end with at once; else None."""
    path = os.environ.get(EXIT_FILE)
    if not path or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0:
        return None
    try:
        code, line = Path(path).read_text().split("\n", 1)
    except (OSError, ValueError):
        return None
    return line.strip() if code.strip() == "75" else None
