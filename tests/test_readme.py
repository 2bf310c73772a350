"""The README's main job says what it gives: its quoted lines are those of the committed log of
that very command (``benchmarks/results/main_job/``), and the slow test runs the command again
and gets the same epochs to the last digit (training here is deterministic: fixed seeds, gloo,
one thread per rank). Its accuracy tables quote the committed sweep results, means, spreads and
slopes alike."""

import csv
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
COMMITTED = REPO / "benchmarks" / "results" / "main_job"
RESULTS = REPO / "benchmarks" / "results"


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


def _readme_table(header: str) -> dict[str, list[str]]:
    """The README table whose header line starts with ``header``: its cells by row, keyed by
    the row's kind as the sweep names it (``GC-2L`` and ``gc2l (N = 1)`` alike: gc2l)."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            return table
        name, *cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        table[name.split(" (")[0].lower().replace("-", "")] = cells
    return table


def _sweep_errors(results: str) -> dict[tuple[str, int], list[float]]:
    """{(conv, N): the final test error of each finished seed} of a committed sweep's csv."""
    errors = {}
    with open(RESULTS / f"{results}.csv") as f:
        for row in csv.DictReader(f):
            if row["finished"] == "True":
                errors.setdefault((row["conv"], int(row["N"])), []).append(
                    float(row["final_test_error"]))
    return errors


def _assert_quotes(cell: str, errors: list[float]):
    """A table cell such as ``**26.71 ± 0.67, 2 seeds (4.12)**``: the mean over the seeds, half
    their range and their number, as the sweep's csv has them."""
    found = re.match(r"\**(\d+\.\d+)(?: ± (\d+\.\d+),? \(?(\d+) seeds)?", cell)
    assert found, cell
    mean, half, seeds = found.groups()
    assert abs(float(mean) - sum(errors) / len(errors)) < 0.0051, (cell, errors)
    assert int(seeds or 1) == len(errors), (cell, errors)
    if half:
        assert abs(float(half) - (max(errors) - min(errors)) / 2) < 0.0051, (cell, errors)


@pytest.mark.parametrize("results, header, groups, slope_digits", [
    ("accuracy_cifar10_wrn10_2_cpu", "| conv | N = 2 |", (2, 4, 8, 16), 1),
    ("accuracy_cifar10_mobilenet_v2_cpu", "| conv | here, N = 2 |", (2, 4, 8), 2),
])
def test_the_readme_accuracy_tables_quote_the_committed_sweeps(results, header, groups,
                                                                slope_digits):
    table, errors = _readme_table(header), _sweep_errors(results)
    assert set(table) == {"sc", "gc", "gc2l", "shuffle", "flgc"}, table
    _assert_quotes(table["sc"][0], errors[("sc", 1)])
    for kind in ("gc", "gc2l", "shuffle", "flgc"):
        for n, cell in zip(groups, table[kind]):
            _assert_quotes(cell, errors[(kind, n)])
        # The growth from the smallest N to the largest, of the means.
        mean = {n: sum(errors[(kind, n)]) / len(errors[(kind, n)]) for n in groups}
        slope = re.match(r"\**([+-]\d+\.\d+)", table[kind][len(groups)]).group(1)
        assert abs(float(slope) - (mean[groups[-1]] - mean[groups[0]])) < \
            0.51 * 10 ** -slope_digits, (kind, slope, mean)
