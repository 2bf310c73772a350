"""The results table of benchmarks/selfgroup_cifar.sh, from the runs' report.json files.

    python benchmarks/selfgroup_table.py <runs prefix> <out.md> <command>
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def main(prefix: str, out: str, command: str) -> None:
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
    for job in ("sg", "convert"):
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
    Path(out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:4])
