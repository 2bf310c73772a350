"""The README's main job says what it gives: its quoted lines are those of the committed log of
that very command (``benchmarks/results/main_job/``), and the slow test runs the command again
and gets the same epochs to the last digit (training here is deterministic: fixed seeds, gloo,
one thread per rank)."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
COMMITTED = REPO / "benchmarks" / "results" / "main_job"


def _main_command() -> list[str]:
    """The training command of the README's first code block (after the setup's ``&&``)."""
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    line = next(line for line in first_block.splitlines() if "twolevel_dist.train" in line)
    return shlex.split(line.split("&&", 1)[1].split("#", 1)[0])


def _epoch_lines(log: str) -> list[str]:
    """The epoch lines and the final line, without the time stamps, speeds and the run's own
    directory (which vary)."""
    lines = [line.split(" ", 1)[1] for line in log.splitlines()
             if re.search(r" epoch \d+/\d+ step \d+:| final test accuracy ", line)]
    return [re.sub(r" \| [\d,]+ img/s, .*$| \(consolidated .*\)$", "", line) for line in lines]


def test_the_readme_quotes_the_committed_log_of_its_main_command():
    assert (COMMITTED / "command.txt").read_text().split() == _main_command()
    log = (COMMITTED / "train.log").read_text()
    last_epoch, final = _epoch_lines(log)[-2:]
    quoted = re.search(r"its last epoch line reads `([^`]+)`", " ".join(README.split()))
    assert quoted and " ".join(quoted.group(1).split()) in last_epoch, last_epoch
    assert re.search(r"the log ends `(final test accuracy [\d.]+%)`", README).group(1) in final


@pytest.mark.slow          # the main job itself: about 2 minutes on 2 cores (README, "Tests")
def test_the_main_command_gives_the_committed_epochs(tmp_path):
    command = _main_command()
    assert command[0] == ".venv/bin/torchrun"
    out = subprocess.run([str(REPO / command[0]), *command[1:], f"run_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    fresh = _epoch_lines((tmp_path / "run" / "train.log").read_text())
    assert fresh == _epoch_lines((COMMITTED / "train.log").read_text())
