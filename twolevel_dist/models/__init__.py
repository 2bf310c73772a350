"""The paper's networks, written for one device, behind one ``build_model``."""

import inspect
from typing import Callable

import torch.nn as nn

from twolevel_dist.errors import ConfigError
from twolevel_dist.models.mobilenet_v2 import MobileNetV2
from twolevel_dist.models.wrn import WideResNet, wrn_cifar, wrn_imagenet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "wrn": wrn_cifar,
    "wrn_imagenet": wrn_imagenet,
    "mobilenet_v2": MobileNetV2,
}


def build_model(name: str, *, conv: str = "sc", groups: int = 1, num_classes: int | None = None,
                **kwargs) -> nn.Module:
    """Build network ``name`` with every replaceable convolution of kind ``conv`` in ``groups``
    groups. ``num_classes`` defaults to the network's data set (10 for ``wrn``, 1000 otherwise)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    factory = MODELS[name]
    accepted = set(inspect.signature(factory).parameters) - {"conv", "groups", "num_classes"}
    unknown = set(kwargs) - accepted
    if unknown:
        raise ConfigError(f"model {name!r} got unknown argument(s) {sorted(unknown)}; "
                          f"it accepts {sorted(accepted)}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return factory(conv=conv, groups=groups, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters. A layer that stores more than it uses (FLGC's masked dense weight)
    reports its deployed size through ``num_effective_parameters()``."""
    total = 0
    for module in model.modules():
        if hasattr(module, "num_effective_parameters"):
            total += module.num_effective_parameters()
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


__all__ = ["MODELS", "build_model", "count_parameters", "WideResNet", "MobileNetV2"]
