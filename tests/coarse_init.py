"""GC-2L's coarse operator A0 ships at zero (the layer starts as its GC). At zero, every
comparison of the coarse path at initialisation (sharded against single-device, taps against
fused, bf16 against fp32, gradients through the all-gather) would hold trivially, 0 = 0. So tests
build GC-2L layers with a random A0, as a trained layer has: ``conftest.py`` for this process,
``distributed.py`` for spawned ranks. Tests of the shipped initialisation carry the
``shipped_init`` marker. (Training runs started as subprocesses use the shipped init.)"""

from twolevel_dist.layers.init import he_normal_
from twolevel_dist.layers.two_level import TwoLevelGroupConv2d

SHIPPED_RESET = TwoLevelGroupConv2d.reset_parameters


def reset_with_random_coarse_operator(layer: TwoLevelGroupConv2d) -> None:
    SHIPPED_RESET(layer)
    he_normal_(layer.coarse_weight, fan_in=layer.groups, gain=1.0)


def use_random_coarse_operator() -> None:
    TwoLevelGroupConv2d.reset_parameters = reset_with_random_coarse_operator
