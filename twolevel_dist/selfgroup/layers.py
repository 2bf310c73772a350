"""Self-grouped layers: a dense weight whose connections are pruned group by group (SG-CNN).

Every filter belongs to one group (``filter_group``, [O] long) and reads only the input channels
its row of ``mask`` ([O, I] bool) keeps. After SG-CNN's pruning all filters of a group keep the
same channels, so the layer is a group convolution whose groups have unequal sizes and may share
input channels. Two ways to compute it, giving the same outputs and gradients:

* ``masked``: the dense convolution of ``weight * mask``, as the authors of SG-CNN run it; it is
  simple and exact but saves nothing.
* ``compact``: each group gathers the input channels its filters use (one ``index_select``), runs
  one dense convolution of its own size, and the group outputs are concatenated and put back in
  filter order (one ``torch.cat``, one ``index_select``). This is the real saving: a group costs
  filters x kept channels x k^2 multiply-accumulates per output position.

In both modes a pruned weight gets a zero gradient and its value never reaches the output, so the
dense ``weight`` may hold anything there (an optimizer's momentum or weight decay may move it).
``mask`` and ``filter_group`` are buffers, so a pruned model's state dict carries its grouping.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers.group import StandardConv2d

MODES = ("masked", "compact")


@dataclass(frozen=True)
class _GroupPlan:
    """The index tensors of the compact path for one grouping (one entry per non-empty group)."""

    filters: list[torch.Tensor]          # [F_g] long: the group's filters, ascending
    channels: list[torch.Tensor | None]  # [C_g] long: the group's input channels; None = all
    masks: list[torch.Tensor | None]     # [F_g, C_g] bool: None when every entry is kept
    restore: torch.Tensor | None         # [O] long: filter o's column in the concatenation;
    #                                      None when the groups are already in filter order


def _build_plan(mask: torch.Tensor, filter_group: torch.Tensor) -> _GroupPlan:
    """Group the filters by ``filter_group`` and find each group's input channels (the union of
    its filters' masks). One pass over the groups; nothing loops over channels."""
    if filter_group.numel() and int(filter_group.min()) < 0:
        raise ConfigError("filter_group entries must be non-negative group ids")
    order = torch.argsort(filter_group, stable=True)          # filters sorted by group
    counts = torch.bincount(filter_group)
    counts = counts[counts > 0].tolist()
    filters, channels, masks = [], [], []
    in_channels = mask.shape[1]
    for group_filters in torch.split(order, counts):
        rows = mask.index_select(0, group_filters)
        used = rows.any(0).nonzero().flatten()
        full = used.numel() == in_channels
        sub_mask = rows if full else rows.index_select(1, used)
        filters.append(group_filters)
        channels.append(None if full else used)
        masks.append(None if bool(sub_mask.all()) else sub_mask)
    in_order = torch.equal(order, torch.arange(order.numel(), device=order.device))
    return _GroupPlan(filters, channels, masks, None if in_order else torch.argsort(order))


class _SelfGrouped(nn.Module):
    """What the self-grouped conv and linear share: the grouping buffers, the mode and the
    compact path's cached index tensors."""

    weight: nn.Parameter

    def __init__(self, out_features: int, in_features: int, device=None):
        super().__init__()
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool,
                                                device=device))
        self.register_buffer("filter_group", torch.zeros(out_features, dtype=torch.long,
                                                         device=device))
        self._mode = "masked"
        self._plan_key: tuple | None = None
        self._plan: _GroupPlan | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"self-grouped layer mode must be one of {MODES}, got {mode!r}")
        self._mode = mode

    def plan(self) -> _GroupPlan:
        """The compact path's index tensors, rebuilt only when ``mask`` or ``filter_group``
        changed: an in-place write (pruning, ``load_state_dict``) bumps the tensor's version, and
        ``.to()`` or reassignment gives a new tensor. The key holds the tensors themselves, so a
        freed tensor's id cannot be mistaken for the current one."""
        key = (self.mask, self.mask._version, self.filter_group, self.filter_group._version)
        cached = self._plan_key
        if (cached is None or cached[0] is not key[0] or cached[2] is not key[2]
                or cached[1] != key[1] or cached[3] != key[3]):
            self._plan = _build_plan(self.mask, self.filter_group)
            self._plan_key = key
        return self._plan

    @torch.no_grad()
    def apply_grouping(self, filter_group: torch.Tensor, mask: torch.Tensor) -> None:
        """Set the grouping and zero the pruned weights (their values are ignored anyway; zeros
        keep the dense weight honest for anyone who reads it directly)."""
        if filter_group.shape != self.filter_group.shape or mask.shape != self.mask.shape:
            raise ConfigError(
                f"grouping shapes filter_group {tuple(filter_group.shape)}, mask "
                f"{tuple(mask.shape)} do not match the layer's {tuple(self.filter_group.shape)}, "
                f"{tuple(self.mask.shape)}")
        self.filter_group.copy_(filter_group)
        self.mask.copy_(mask)
        self.weight.mul_(self._broadcast_mask().to(self.weight.dtype))

    def _broadcast_mask(self) -> torch.Tensor:
        return self.mask

    @property
    def num_groups(self) -> int:
        """Groups that hold at least one filter."""
        return int((torch.bincount(self.filter_group) > 0).sum())

    def group_sizes(self) -> list[int]:
        """Filters per non-empty group, in group-id order."""
        counts = torch.bincount(self.filter_group)
        return counts[counts > 0].tolist()

    def kept_connections(self) -> int:
        """Kept (filter, input channel) pairs."""
        return int(self.mask.sum())

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self._broadcast_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "masked":
            return self._masked_forward(x)
        return self._compact_forward(x, self.plan())

    def _gathered_weight(self, filters: torch.Tensor, channels: torch.Tensor | None,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """The group's [F_g, C_g, ...] block of the weight, pruned entries multiplied by 0 (so
        they get zero gradient when filters of a group keep different channels)."""
        weight = self.weight.index_select(0, filters)
        if channels is not None:
            weight = weight.index_select(1, channels)
        if mask is not None:
            weight = weight * mask.view(*mask.shape, *([1] * (weight.dim() - 2)))
        return weight

    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _compact_forward(self, x: torch.Tensor, plan: _GroupPlan) -> torch.Tensor:
        raise NotImplementedError


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class SelfGroupedConv2d(_SelfGrouped):
    """A bias-free square-kernel convolution with SG-CNN's filter groups and connection mask."""

    kind = "sg"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride=1,
                 padding=None, dilation=1, *, device=None, dtype=None):
        super().__init__(out_channels, in_channels, device=device)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = _pair(kernel_size // 2 if padding is None else padding)
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, kernel_size,
                                               kernel_size, device=device, dtype=dtype))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "SelfGroupedConv2d":
        """The same convolution (weights copied exactly), all connections kept, one group."""
        if not isinstance(conv, nn.Conv2d):
            raise ConfigError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        problems = []
        if conv.groups != 1:
            problems.append(f"groups={conv.groups} (self-grouping starts from a standard conv)")
        if conv.bias is not None:
            problems.append("a bias")
        if conv.kernel_size[0] != conv.kernel_size[1]:
            problems.append(f"a non-square kernel {conv.kernel_size}")
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            problems.append(f"padding {conv.padding!r}/{conv.padding_mode!r}")
        if problems:
            raise ConfigError(f"cannot self-group a convolution with {', '.join(problems)}; "
                              f"only bias-free, square, zero-padded convolutions with groups=1 "
                              f"(StandardConv2d) are supported")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride,
                    conv.padding, conv.dilation, device=conv.weight.device,
                    dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
        layer.train(conv.training)
        return layer

    def _broadcast_mask(self) -> torch.Tensor:
        return self.mask[:, :, None, None]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the output for an input of ``height`` x ``width``."""
        k = self.kernel_size
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, s in zip(
            (height, width), self.padding, self.dilation, self.stride))

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)

    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.effective_weight())

    def _compact_forward(self, x: torch.Tensor, plan: _GroupPlan) -> torch.Tensor:
        parts = []
        for filters, channels, mask in zip(plan.filters, plan.channels, plan.masks):
            if channels is not None and channels.numel() == 0:
                # A group with no kept input: its filters output zeros (and take no gradient).
                height, width = self.output_size(*x.shape[-2:])
                parts.append(x.new_zeros(x.shape[0], filters.numel(), height, width))
                continue
            group_input = x if channels is None else x.index_select(1, channels)
            parts.append(self._conv(group_input, self._gathered_weight(filters, channels, mask)))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return out if plan.restore is None else out.index_select(1, plan.restore)

    def num_effective_parameters(self) -> int:
        """Kept weights: kept connections x k^2."""
        return self.kept_connections() * self.kernel_size ** 2

    def multiply_accumulates(self, output_size: tuple[int, int] = (1, 1), *,
                             dense: bool = False) -> int:
        """Multiply-accumulates of one sample for an output of ``output_size`` (H', W'): kept (or,
        with ``dense``, all) connections x k^2 x H' x W'. After SG pruning this is also what the
        compact path computes (each group: filters x its channels x k^2 per position)."""
        connections = self.mask.numel() if dense else self.kept_connections()
        return connections * self.kernel_size ** 2 * output_size[0] * output_size[1]

    def extra_repr(self) -> str:
        kept = self.kept_connections() / max(self.mask.numel(), 1)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.num_groups}, kept={kept:.3f}, "
                f"mode={self.mode}")


class SelfGroupedLinear(_SelfGrouped):
    """A linear layer (the classifier head) with SG-CNN's filter groups and connection mask; the
    bias stays dense."""

    kind = "sg_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype=None):
        super().__init__(out_features, in_features, device=device)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device,
                                               dtype=dtype))
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SelfGroupedLinear":
        """The same linear layer (weights copied exactly), all connections kept, one group."""
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.train(linear.training)
        return layer

    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def _compact_forward(self, x: torch.Tensor, plan: _GroupPlan) -> torch.Tensor:
        parts = []
        for filters, channels, mask in zip(plan.filters, plan.channels, plan.masks):
            if channels is not None and channels.numel() == 0:
                parts.append(x.new_zeros(*x.shape[:-1], filters.numel()))
                continue
            group_input = x if channels is None else x.index_select(-1, channels)
            parts.append(F.linear(group_input, self._gathered_weight(filters, channels, mask)))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        if plan.restore is not None:
            out = out.index_select(-1, plan.restore)
        return out if self.bias is None else out + self.bias

    def num_effective_parameters(self) -> int:
        """Kept weights plus the (dense) bias."""
        return self.kept_connections() + (0 if self.bias is None else self.bias.numel())

    def multiply_accumulates(self, output_size: tuple[int, ...] = (1, 1), *,
                             dense: bool = False) -> int:
        """Multiply-accumulates of one sample: kept (or all) connections x the number of positions
        the layer is applied to (the product of ``output_size``; 1 for a classifier head)."""
        connections = self.mask.numel() if dense else self.kept_connections()
        positions = 1
        for size in output_size:
            positions *= size
        return connections * positions

    def extra_repr(self) -> str:
        kept = self.kept_connections() / max(self.mask.numel(), 1)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, groups={self.num_groups}, kept={kept:.3f}, "
                f"mode={self.mode}")


SELF_GROUPED_TYPES = (SelfGroupedConv2d, SelfGroupedLinear)


def self_grouped_layers(model: nn.Module) -> list[tuple[str, _SelfGrouped]]:
    """(qualified name, layer) of every self-grouped layer, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SELF_GROUPED_TYPES)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def self_group_model(model: nn.Module, *, include_linear: bool = True) -> nn.Module:
    """Replace, in place, every ``StandardConv2d`` (kind "sc") by a ``SelfGroupedConv2d`` and, with
    ``include_linear``, the last ``nn.Linear`` (the classifier head) by a ``SelfGroupedLinear``.
    Weights are copied exactly and every connection is kept, so the outputs do not change. The
    stem, depthwise and group convolutions are left alone. Returns ``model``."""
    convs = [(name, m) for name, m in model.named_modules()
             if isinstance(m, StandardConv2d) and m.kind == "sc"]
    if not convs:
        already = " (it is already self-grouped)" if self_grouped_layers(model) else ""
        raise ConfigError(
            f"the model has no standard convolution (kind 'sc') to self-group{already}; "
            f"self-grouping starts from a trained SC network: build it with conv='sc'")
    for name, conv in convs:
        _replace(model, name, SelfGroupedConv2d.from_conv(conv))
    if include_linear:
        linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
        if linears:
            name, linear = linears[-1]
            _replace(model, name, SelfGroupedLinear.from_linear(linear))
    return model


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Put every self-grouped layer of ``model`` in ``mode`` ("masked" or "compact")."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    layers = self_grouped_layers(model)
    if not layers:
        raise ConfigError("the model has no self-grouped layers; call self_group_model first")
    for _, layer in layers:
        layer.mode = mode
    return model
