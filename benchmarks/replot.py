"""Redraw the plots of results from their csv files, timing and training nothing again: how a
plot's look changes without re-running a benchmark (timings need a quiet machine).

  python benchmarks/replot.py --update benchmarks/results/*.csv \
      benchmarks/results/gpu_check/*/gpu_step_time.csv

Each csv's plot is drawn by the script that wrote it (scaling_*: scaling.py, which also reads the
command and commit from the md beside the csv; accuracy_*: accuracy.py; gpu_step_time:
gpu_table.py; dp_vs_gp_*: dp_vs_gp.py); csv files of results without a plot are skipped.
--update writes each png beside its csv; by default they go to a fresh folder,
benchmarks/results/new/<UTC time>/.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import dp_vs_gp  # noqa: E402
import gpu_table  # noqa: E402
import scaling  # noqa: E402
from common import add_output_options, existing_file, output_stem, run_cli, shown  # noqa: E402

PLOTTERS = {"scaling_": scaling.replot, "accuracy_": accuracy.replot,
            "gpu_step_time": gpu_table.replot, "dp_vs_gp_": dp_vs_gp.replot}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=existing_file, nargs="+", help="results csv files")
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.out is not None and len(args.csv) > 1:
        parser.error("--out names one plot's stem: give one csv")
    for path in args.csv:
        replot = next((plotter for prefix, plotter in PLOTTERS.items()
                       if path.name.startswith(prefix)), None)
        if replot is None:
            print(f"{shown(path)}: no plot for this result, skipped")
            continue
        # --update: the committed plot is the one beside its csv, wherever that is.
        replot(path, output_stem(args, path.stem, committed=path.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
