"""Importance vectors: how much each filter relies on each of its input channels."""

import torch

from twolevel_dist.errors import ConfigError


def importance_vectors(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[O, I]: entry (i, j) is the L1 norm of filter i's kernel slice on input channel j, or
    |W[i, j]| for a linear layer's [O, I] weight. ``mask`` ([O, I], bool or 0/1) zeroes pruned
    connections, so the vectors describe the layer as it currently computes."""
    if weight.dim() not in (2, 4):
        raise ConfigError(f"importance vectors need a linear [O, I] or convolution [O, I, k, k] "
                          f"weight, got shape {tuple(weight.shape)}")
    scores = weight.detach().abs()
    if weight.dim() == 4:
        scores = scores.sum((2, 3))
    if mask is not None:
        if mask.shape != scores.shape:
            raise ConfigError(f"mask shape {tuple(mask.shape)} does not match the weight's "
                              f"[out, in] = {tuple(scores.shape)}")
        scores = scores * mask.to(scores.dtype)
    return scores
