"""Convert a trained SC wide ResNet into GC or GC-2L, keeping the most important connections.

A GC layer keeps only the diagonal blocks of the SC weight. Which channels share a block is free:
permuting a channel space consistently (the rows of the convolutions writing it, the columns of
those reading it, its BatchNorms, the stem's rows, the head's columns) leaves the SC network's
function unchanged. So the conversion (1) describes the WRN's channel spaces as a ``ChannelGraph``,
(2) partitions every space into balanced groups (``balanced_partition``, or the naive contiguous
split), (3) permutes the SC network group by group and (4) copies the permuted diagonal blocks into
a freshly built GC / GC-2L network. GC-2L's coarse operator A0 starts at zero, so at conversion
time GC-2L computes exactly what GC does; A0 learns during fine-tuning.

Channel spaces of a pre-activation WRN: the stem's output; each stage's residual stream (written
by the stage's first-block shortcut and every block's conv2, read by every bn1/conv1/shortcut, by
the next stage's first block and, for the last stage, by final_norm and fc); each block's inner
space (conv1's output, bn2, conv2's input). A block without a shortcut adds its input to its
output, so its output stream IS its input space (with widen=1 the stem output and the first
stream are one space).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers import GroupConv2d, StandardConv2d, StemConv2d, TwoLevelGroupConv2d
from twolevel_dist.models import build_model
from twolevel_dist.models.wrn import WideResNet
from twolevel_dist.selfgroup.importance import importance_vectors
from twolevel_dist.selfgroup.partition import (
    ChannelGraph,
    ChannelSpace,
    GroupedLayer,
    Partitions,
    balanced_partition,
    check_groups,
    check_partitions,
    contiguous_partitions,
    diagonal_mass,
    group_order,
    kept_fraction_by_layer,
    total_mass,
)

METHODS = ("selfgroup", "contiguous")
TARGET_KINDS = ("gc", "gc2l")

# How a tensor of a module is indexed by a channel space.
CONV_OUT, CONV_IN, NORM, LINEAR_IN = "conv_out", "conv_in", "norm", "linear_in"


@dataclass(frozen=True)
class ChannelUse:
    """Module ``module`` (a dotted name in the model) touches ``space`` as ``role``: a conv's
    output rows or input columns, a BatchNorm's per-channel tensors, a linear layer's columns."""

    space: str
    module: str
    role: str


@dataclass(frozen=True)
class WrnChannelGraph(ChannelGraph):
    """The channel graph of an SC WRN plus every place a permutation must be applied."""

    uses: tuple[ChannelUse, ...] = ()


@dataclass(frozen=True)
class ConversionReport:
    """Importance mass kept in the diagonal blocks, as a fraction of the SC network's, for the
    chosen partition and for the contiguous split (total and per grouped layer)."""

    method: str
    conv: str
    groups: int
    kept_fraction: float
    contiguous_fraction: float
    kept_by_layer: dict[str, float]
    contiguous_by_layer: dict[str, float]
    partitions: Partitions = field(repr=False)

    def summary(self) -> str:
        return (f"{self.method} partition into {self.groups} groups keeps "
                f"{100 * self.kept_fraction:.2f}% of the importance mass "
                f"(contiguous split: {100 * self.contiguous_fraction:.2f}%)")


# ----------------------------------------------------------------------------- the graph

def _kind(module: nn.Module) -> str:
    return getattr(module, "kind", type(module).__name__)


def _check_sc_wrn(model: nn.Module) -> None:
    if not isinstance(model, WideResNet):
        raise ConfigError(
            f"conversion supports WRN built with conv=sc ('wrn' or 'wrn_imagenet'), got a "
            f"{type(model).__name__}; build the network to convert with "
            f"build_model('wrn' | 'wrn_imagenet', conv='sc')")
    if not isinstance(model.stem[0], StemConv2d):
        raise ConfigError("conversion supports WRN built with conv=sc: the model's stem does "
                          "not start with a StemConv2d")
    for stage_index, stage in enumerate(model.stages):
        for block_index, block in enumerate(stage):
            for part in ("conv1", "conv2", "shortcut"):
                conv = getattr(block, part)
                if conv is not None and type(conv) is not StandardConv2d:
                    raise ConfigError(
                        f"conversion supports WRN built with conv=sc, but "
                        f"stages.{stage_index}.{block_index}.{part} is {_kind(conv)!r}; convert "
                        f"the trained SC network (build_model(..., conv='sc'))")


def wrn_channel_graph(model: nn.Module) -> WrnChannelGraph:
    """The channel spaces and grouped layers of an SC WRN (``wrn`` or ``wrn_imagenet``), with the
    importance of every connection and every tensor a permutation must reorder."""
    _check_sc_wrn(model)
    spaces: list[ChannelSpace] = []
    layers: list[GroupedLayer] = []
    uses: list[ChannelUse] = []

    def grouped(name: str, conv: nn.Module, in_space: str, out_space: str) -> None:
        layers.append(GroupedLayer(name, in_space, out_space, importance_vectors(conv.weight)))
        uses.extend([ChannelUse(in_space, name, CONV_IN), ChannelUse(out_space, name, CONV_OUT)])

    stream = "stem"
    spaces.append(ChannelSpace(stream, model.stem[0].out_channels))
    uses.append(ChannelUse(stream, "stem.0", CONV_OUT))
    for index, module in enumerate(model.stem):
        if isinstance(module, nn.BatchNorm2d):       # the ImageNet stem's own BN
            uses.append(ChannelUse(stream, f"stem.{index}", NORM))
    for stage_index, stage in enumerate(model.stages):
        for block_index, block in enumerate(stage):
            prefix = f"stages.{stage_index}.{block_index}"
            inner = f"{prefix}.inner"
            spaces.append(ChannelSpace(inner, block.conv1.out_channels))
            uses.append(ChannelUse(stream, f"{prefix}.bn1", NORM))
            grouped(f"{prefix}.conv1", block.conv1, stream, inner)
            uses.append(ChannelUse(inner, f"{prefix}.bn2", NORM))
            if block.shortcut is not None:
                out = f"stages.{stage_index}.stream" if block_index == 0 else f"{prefix}.stream"
                spaces.append(ChannelSpace(out, block.shortcut.out_channels))
                grouped(f"{prefix}.shortcut", block.shortcut, stream, out)
            else:
                out = stream                          # identity residual: the same space
            grouped(f"{prefix}.conv2", block.conv2, inner, out)
            stream = out
    uses.extend([ChannelUse(stream, "final_norm", NORM), ChannelUse(stream, "fc", LINEAR_IN)])
    return WrnChannelGraph(tuple(spaces), tuple(layers), tuple(uses))


# ------------------------------------------------------------------------ the permutation

@torch.no_grad()
def _reorder(module: nn.Module, role: str, order: torch.Tensor) -> None:
    def permute(tensor: torch.Tensor, dim: int) -> None:
        tensor.copy_(tensor.index_select(dim, order.to(tensor.device)))

    if role == NORM:
        for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
            if tensor is not None:
                permute(tensor, 0)
    else:
        permute(module.weight, 0 if role == CONV_OUT else 1)


def permute_channels(model: nn.Module, partitions: Partitions) -> nn.Module:
    """A deep copy of the SC WRN ``model`` whose every channel space is reordered group by group
    (``group_order`` of its labels). It computes exactly the same function."""
    graph = wrn_channel_graph(model)
    check_partitions(graph, partitions)
    orders = {space: group_order(labels) for space, labels in partitions.items()}
    permuted = copy.deepcopy(model)
    modules = dict(permuted.named_modules())
    for use in graph.uses:
        _reorder(modules[use.module], use.role, orders[use.space])
    return permuted


# --------------------------------------------------------------------------- the conversion

def _conv_geometry(conv: nn.Module) -> tuple[int, int, int, int]:
    def first(value):
        return value[0] if isinstance(value, tuple) else value
    return conv.in_channels, conv.out_channels, first(conv.kernel_size), first(conv.stride)


def _describe(module: nn.Module) -> str:
    if isinstance(module, (nn.Conv2d, TwoLevelGroupConv2d)):
        return f"a convolution with (in, out, kernel, stride) = {_conv_geometry(module)}"
    shapes = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    return f"a {type(module).__name__} with {shapes}"


def _compatible(sc: nn.Module, target: nn.Module) -> bool:
    if isinstance(target, (nn.Conv2d, TwoLevelGroupConv2d)):
        return isinstance(sc, nn.Conv2d) and _conv_geometry(sc) == _conv_geometry(target)
    sc_state, target_state = sc.state_dict(), target.state_dict()
    return type(sc) is type(target) and sc_state.keys() == target_state.keys() and all(
        sc_state[key].shape == target_state[key].shape for key in sc_state)


def _check_same_architecture(sc_model: nn.Module, target: nn.Module, built_with: str) -> None:
    """Every module of the target must have its counterpart, of the same shape, in the SC model
    (an SC convolution of the same geometry for a grouped one)."""
    def owners(model: nn.Module) -> dict[str, nn.Module]:
        return {name: module for name, module in model.named_modules()
                if list(module.parameters(recurse=False)) or list(module.buffers(recurse=False))}

    sc_modules, target_modules = owners(sc_model), owners(target)
    if sc_modules.keys() != target_modules.keys():
        raise ConfigError(
            f"the SC model does not have the layers of {built_with} (SC only: "
            f"{sorted(sc_modules.keys() - target_modules.keys())[:3]}, missing: "
            f"{sorted(target_modules.keys() - sc_modules.keys())[:3]}); pass the model_name "
            f"and model_kwargs the SC network was built with")
    for name, module in target_modules.items():
        if not _compatible(sc_modules[name], module):
            raise ConfigError(f"{name}: the SC model has {_describe(sc_modules[name])} where "
                              f"{built_with} has {_describe(module)}; pass the model_name and "
                              f"model_kwargs the SC network was built with")


def diagonal_blocks(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[O, I, ...] -> [N, O/N, I/N, ...]: block j maps input group j to output group j."""
    out_channels, in_channels = weight.shape[:2]
    blocks = weight.reshape(groups, out_channels // groups, groups, in_channels // groups,
                            *weight.shape[2:])
    diagonal = torch.arange(groups, device=weight.device)
    return blocks[diagonal, :, diagonal]


def convert_to_grouped(sc_model: nn.Module, *, conv: str, groups: int, model_name: str,
                       model_kwargs: dict | None = None, method: str = "selfgroup",
                       seed: int = 0, num_classes: int | None = None,
                       ) -> tuple[nn.Module, ConversionReport]:
    """Build ``build_model(model_name, conv=conv, groups=groups, num_classes=..., **model_kwargs)``
    and fill it from the SC WRN ``sc_model``: stem, BatchNorms and head from the permuted SC
    network, every GC weight from the permuted SC weight's diagonal blocks. For ``gc2l`` those
    blocks are the local filters, the representative filters keep their fresh initialisation and
    A0 is zero, so the result computes exactly what the GC conversion does.

    ``method``: "selfgroup" (``balanced_partition`` with ``seed``) or "contiguous" (the naive
    split). ``num_classes`` defaults to the SC model's head."""
    if conv not in TARGET_KINDS:
        raise ConfigError(f"convert_to_grouped: conv must be one of {TARGET_KINDS}, got {conv!r}")
    if method not in METHODS:
        raise ConfigError(f"convert_to_grouped: method must be one of {METHODS}, got {method!r}")
    graph = wrn_channel_graph(sc_model)
    check_groups(graph, groups)
    model_kwargs = dict(model_kwargs or {})
    num_classes = sc_model.fc.out_features if num_classes is None else num_classes
    built_with = f"build_model({model_name!r}, conv={conv!r}, groups={groups}, " \
                 f"num_classes={num_classes}, **{model_kwargs})"
    target = build_model(model_name, conv=conv, groups=groups, num_classes=num_classes,
                         **model_kwargs)
    if not isinstance(target, WideResNet):
        raise ConfigError(f"conversion supports WRN built with conv=sc ('wrn' or "
                          f"'wrn_imagenet'), got model_name={model_name!r}")
    _check_same_architecture(sc_model, target, built_with)

    contiguous = contiguous_partitions(graph, groups)
    partitions = balanced_partition(graph, groups, seed) if method == "selfgroup" else contiguous
    check_partitions(graph, partitions, groups)
    permuted = permute_channels(sc_model, partitions).state_dict()

    state = target.state_dict()
    modules = dict(target.named_modules())
    for key in state:
        owner, _, tensor_name = key.rpartition(".")
        module = modules[owner]
        if isinstance(module, (GroupConv2d, TwoLevelGroupConv2d)) and tensor_name == "weight":
            blocks = diagonal_blocks(permuted[key], groups).to(state[key].dtype)
            if isinstance(module, TwoLevelGroupConv2d):
                local = module.local_out_channels
                state[key] = state[key].clone()
                state[key][:, :local] = blocks.to(state[key].device)
            else:
                state[key] = blocks.reshape(state[key].shape)
        elif isinstance(module, TwoLevelGroupConv2d) and tensor_name == "coarse_weight":
            state[key] = torch.zeros_like(state[key])
        else:
            state[key] = permuted[key]
    target.load_state_dict(state, strict=True)
    device = next(sc_model.parameters()).device
    target.to(device).train(sc_model.training)

    whole = total_mass(graph) or 1.0
    report = ConversionReport(
        method=method, conv=conv, groups=groups,
        kept_fraction=diagonal_mass(graph, partitions) / whole,
        contiguous_fraction=diagonal_mass(graph, contiguous) / whole,
        kept_by_layer=kept_fraction_by_layer(graph, partitions),
        contiguous_by_layer=kept_fraction_by_layer(graph, contiguous),
        partitions=partitions)
    return target, report
