"""What a self-grouped model costs: parameters and multiply-accumulates, dense vs kept.

Spatial sizes come from one forward pass of a zero input of batch 1 with forward hooks (no
gradient, eval mode, the model's mode restored afterwards). MACs are those of one sample and
count convolutions and linear layers only (batch norm, activations and pooling are left out, as
usual). A module called more than once per forward is counted once, at its last output size.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from twolevel_dist.layers.two_level import TwoLevelGroupConv2d
from twolevel_dist.models import count_parameters
from twolevel_dist.selfgroup.layers import (
    SELF_GROUPED_TYPES,
    SelfGroupedConv2d,
    self_grouped_layers,
)


@dataclass
class LayerRow:
    name: str
    kind: str                    # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: int                  # 1 for a linear layer
    groups: int                  # non-empty filter groups
    group_sizes: tuple[int, ...]  # filters per group
    dense_params: int
    kept_params: int
    dense_macs: int
    kept_macs: int


@dataclass
class ModelTotals:
    dense_params: int            # every parameter, the self-grouped layers' dense weights included
    kept_params: int             # count_parameters: self-grouped layers count only kept weights
    param_compression: float     # dense / kept
    dense_macs: int
    kept_macs: int
    mac_compression: float


def _output_shapes(model: nn.Module, input_size: tuple[int, ...]) -> dict[nn.Module, torch.Size]:
    """Output shape of every convolution and linear layer for one zero sample."""
    shapes: dict[nn.Module, torch.Size] = {}

    def record(module, inputs, output):
        shapes[module] = output.shape

    counted = (nn.Conv2d, nn.Linear, TwoLevelGroupConv2d) + SELF_GROUPED_TYPES
    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, counted)]
    reference = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=reference.device, dtype=reference.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return shapes


def _spatial(shape: torch.Size, conv: bool) -> tuple[int, ...]:
    """Output positions of one sample: (H', W') for a convolution, the dimensions between batch
    and features for a linear layer (none for a classifier head)."""
    return tuple(shape[-2:]) if conv else tuple(shape[1:-1]) or (1,)


def _row(name: str, layer: nn.Module, shape: torch.Size | None) -> LayerRow:
    conv = isinstance(layer, SelfGroupedConv2d)
    positions = (1, 1) if shape is None else _spatial(shape, conv)
    dense_params = sum(p.numel() for p in layer.parameters(recurse=False))
    return LayerRow(
        name=name, kind="conv" if conv else "linear",
        in_channels=layer.mask.shape[1], out_channels=layer.mask.shape[0],
        kernel=layer.kernel_size if conv else 1,
        groups=layer.num_groups, group_sizes=tuple(layer.group_sizes()),
        dense_params=dense_params, kept_params=layer.num_effective_parameters(),
        dense_macs=layer.multiply_accumulates(positions, dense=True),
        kept_macs=layer.multiply_accumulates(positions))


def layer_report(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> list[LayerRow]:
    """One row per self-grouped layer, in ``named_modules`` order. A layer the forward pass does
    not reach is costed at one output position."""
    shapes = _output_shapes(model, input_size)
    return [_row(name, layer, shapes.get(layer)) for name, layer in self_grouped_layers(model)]


def _dense_macs(module: nn.Module, shape: torch.Size) -> int:
    if isinstance(module, TwoLevelGroupConv2d):
        # GC (C_out filters) and R0 (one filter per group) over C_in/N channels, then A0
        # (N -> C_out).
        positions = shape[-2] * shape[-1]
        per_filter = module.in_channels // module.groups * module.kernel_size ** 2
        return ((module.out_channels + module.groups) * per_filter
                + module.out_channels * module.groups) * positions
    if isinstance(module, nn.Conv2d):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        positions = shape[-2] * shape[-1]
        return module.out_channels * module.in_channels // module.groups * kernel * positions
    positions = shape.numel() // shape[-1]        # batch is 1
    return module.in_features * module.out_features * positions


def totals(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> ModelTotals:
    """Whole-model parameters and MACs, dense vs kept, with the compression ratios dense / kept.
    Convolutions and linear layers that are not self-grouped (the stem, depthwise convolutions,
    the GC and GC-2L layers of a converted network) count as they are on both sides."""
    shapes = _output_shapes(model, input_size)
    dense_macs = kept_macs = 0
    for module, shape in shapes.items():
        if isinstance(module, SELF_GROUPED_TYPES):
            positions = _spatial(shape, isinstance(module, SelfGroupedConv2d))
            dense_macs += module.multiply_accumulates(positions, dense=True)
            kept_macs += module.multiply_accumulates(positions)
        else:
            macs = _dense_macs(module, shape)
            dense_macs += macs
            kept_macs += macs
    dense_params = sum(p.numel() for p in model.parameters())
    kept_params = count_parameters(model)
    return ModelTotals(dense_params, kept_params, dense_params / max(kept_params, 1),
                       dense_macs, kept_macs, dense_macs / max(kept_macs, 1))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (tuple, list)):
        return "/".join(str(v) for v in value)
    return str(value)


def markdown_table(rows) -> str:
    """A Markdown table of dataclass rows (``LayerRow``s, or ``[totals(...)]``), one column per
    field; group sizes are written 8/8/12/4."""
    rows = list(rows)
    if not rows:
        return ""
    names = [f.name for f in fields(rows[0])]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(getattr(row, n)) for n in names) + " |")
    return "\n".join(lines)
