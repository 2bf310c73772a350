"""What every benchmark plot shares: one colour per convolution kind, log axes labelled plainly,
and where a figure goes. Every script that draws takes its colours from ``style`` (checked by
tests/test_benchmarks.py), so that a kind has the same colour in every figure."""

import sys
from pathlib import Path

from common import shown

# A reader compares figures by colour: one per kind, everywhere (matplotlib's tab10 colours).
KIND_COLOURS = {
    "sc": "#1f77b4",            # blue: standard convolution, the whole network on one device
    "gc": "#ff7f0e",            # orange
    "gc2l": "#2ca02c",          # green
    "shuffle": "#d62728",       # red
    "flgc": "#9467bd",          # purple
    "sc_split": "#8c564b",      # brown: SC across ranks, each layer split by output channels
    "sc_dp": "#e377c2",         # pink: data parallel, SC replicated (DDP)
    "mix": "#17becf",           # cyan: dp x gp, data-parallel replicas of a GC-2L model
}
ALIASES = {"sc split": "sc_split", "dp": "sc_dp", "ddp": "sc_dp"}
# A variant of a kind (GC-2L's paths) keeps the kind's colour: the line and marker tell it apart.
VARIANTS = {"": ("-", "o"), "fused": ("-", "o"), "shard": ("-", "o"), "overlap": ("--", "s"),
            "pad8": ("-.", "^"), "taps": (":", "v")}
OTHER_VARIANT = ("--", "D")
IDEAL = dict(color="black", linestyle=":", linewidth=1)      # an ideal line is no kind's


def kind_and_variant(label: str) -> tuple[str, str]:
    """``gc2l+overlap`` -> (gc2l, overlap), ``gc2l_pad8`` -> (gc2l, pad8), ``sc split`` ->
    (sc_split, ""). An unknown kind is an error: give it a colour in KIND_COLOURS."""
    label = ALIASES.get(label, label)
    for kind in sorted(KIND_COLOURS, key=len, reverse=True):     # sc_split before sc
        if label == kind or (label.startswith(kind) and label[len(kind)] in "+_"):
            return kind, label[len(kind) + 1:]
    raise ValueError(f"no colour for {label!r}: add its kind to KIND_COLOURS in "
                     f"benchmarks/plotting.py")


def style(label: str) -> dict:
    """``Axes.plot`` keywords for a scheme's line: its kind's colour, its variant's line."""
    kind, variant = kind_and_variant(label)
    linestyle, marker = VARIANTS.get(variant, OTHER_VARIANT)
    return dict(color=KIND_COLOURS[kind], linestyle=linestyle, marker=marker)


def log_axis(ax, which: str, base: int = 2, suffix: str = "", ticks=None) -> None:
    """A log axis labelled "1, 2, 4" (with ``suffix`` "x": "1x, 2x, 4x"), not 2^0, 2^1: at the
    powers of ``base`` in view, or at exactly ``ticks`` (a run's N)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter
    getattr(ax, f"set_{which}scale")("log", base=base)
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(FixedLocator(ticks) if ticks is not None else LogLocator(base))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}{suffix}"))
    axis.set_minor_formatter(NullFormatter())


def pyplot():
    """matplotlib.pyplot drawing to files; None where matplotlib is not installed (the tables
    do not need it)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[bench]')",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {shown(path)}", flush=True)
