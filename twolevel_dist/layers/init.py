"""He (Kaiming) normal initialisation with an explicit fan-in.

torch's ``kaiming_normal_`` infers the fan-in from the tensor's shape, which is wrong for the fused
GC-2L layout ``[N, C_out/N + 1, C_in/N, k, k]``; every convolution here therefore states its true
per-output fan-in (the number of inputs one output value sums over).
"""

import math

import torch


@torch.no_grad()
def he_normal_(tensor: torch.Tensor, fan_in: int, gain: float = math.sqrt(2.0)) -> torch.Tensor:
    """Fill ``tensor`` from N(0, (gain / sqrt(fan_in))^2); gain sqrt(2) suits a following ReLU."""
    return tensor.normal_(0.0, gain / math.sqrt(fan_in))
