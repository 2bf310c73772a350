"""How a run's end reaches its launcher.

Exit codes: 0 done; 2 refused or failed for a reason a restart cannot fix (a config error,
missing data, a divergence, a full disk); 3 another rank died or hung; 75 stopped by a signal
with a complete checkpoint, resumable (``engine.stop``); 130 interrupted before training began.

torchrun hides a worker's exit code (it exits 1 whatever failed) and restarts failed workers up
to ``--max-restarts`` times. So:

where ``TWOLEVEL_EXIT_FILE`` names a file (our launchers set it: ``launch/torchrun.sh``), the job
writes its exit code and its one line there for the launcher to exit with, and a worker that
ends with code 2 under torchrun also ends its agent (SIGTERM), so that the agent does not
restart it into the same refusal. Under a bare torchrun nothing of this happens.
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
