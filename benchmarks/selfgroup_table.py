"""The results of benchmarks/selfgroup_cifar.sh, from its runs' report files: <name>.md (the
table) and, beside it, <name>_sg_layers.md and <name>_convert_layers.md (the per-layer reports),
<name> being the runs prefix's last part (selfgroup_<model>).

    python benchmarks/selfgroup_table.py <runs prefix> <command> [--update | --out STEM]

Without --update or --out the files go to a fresh folder, benchmarks/results/new/<UTC time>/.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, machine, output_stem, shown  # noqa: E402

JOBS = ("sg", "convert")


def table(prefix: str, command: str) -> str:
    lines = ["# SG-CNN and the self-grouped conversion: CIFAR-10 (JPEG export), CPU", "",
             f"Command: `{command}`", "", f"Machine: {machine()}", ""]
    baseline = [json.loads(line) for line in open(f"{prefix}_sc/metrics.jsonl")]
    lines += [f"Baseline: SC trained {len(baseline)} epochs (cosine lr from 0.1, batch 128), "
              f"test accuracy per epoch " +
              " / ".join(f"{m['test_acc']:.2f}" for m in baseline) + " %.", ""]
    columns = [("result", "result", "{}"), ("test_acc", "test acc %", "{:.2f}"),
               ("params", "parameters", "{:,}"), ("param_compression", "x fewer", "{:.2f}"),
               ("macs", "MACs / image", "{:,}"), ("mac_compression", "x fewer", "{:.2f}"),
               ("acc_right_after_pruning", "acc before fine-tuning %", "{:.2f}"),
               ("acc_right_after_conversion", "acc before fine-tuning %", "{:.2f}"),
               ("importance_kept", "importance kept", "{:.3f}"),
               ("compact_test_acc", "compact-form acc %", "{:.2f}"),
               ("masked_ms_per_batch", "masked ms/batch", "{:.1f}"),
               ("compact_ms_per_batch", "compact ms/batch", "{:.1f}")]
    for job in JOBS:
        report = json.loads(Path(f"{prefix}_{job}/report.json").read_text())
        rows = report["results"]
        used = [(key, head, fmt) for key, head, fmt in columns
                if any(row.get(key) is not None for row in rows)]
        lines += [f"## {job}", "", f"`{report['command']}`", "",
                  "| " + " | ".join(head for _, head, _ in used) + " |",
                  "|" + "---|" * len(used)]
        for row in rows:
            lines.append("| " + " | ".join("" if row.get(k) is None else f.format(row[k])
                                           for k, _, f in used) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="the runs' common prefix, e.g. "
                                       "benchmarks/results/runs/selfgroup_wrn10_2")
    parser.add_argument("command", help="the command that made the runs, for the table")
    add_output_options(parser)
    args = parser.parse_args(argv)
    text = table(args.prefix, args.command)
    stem = output_stem(args, Path(args.prefix).name)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    print(text)
    for job in JOBS:
        shutil.copyfile(f"{args.prefix}_{job}/report.md", f"{stem}_{job}_layers.md")
    print(f"wrote {shown(stem)}.md and its {' and '.join(JOBS)} per-layer tables beside it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
