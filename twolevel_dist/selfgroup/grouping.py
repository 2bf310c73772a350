"""SG-CNN's self-grouping and centroid-based pruning (Guo et al. 2020, arXiv 2009.13803).

One step of the progressive schedule (``prune_step``), for every self-grouped layer taking part:

1. Importance vectors under the current mask: row o, entry j is the L1 norm of filter o's kernel
   slice on input channel j (|W[o, j]| for a linear layer), 0 where the connection is pruned.
2. k-means of the filters' importance vectors into ``groups`` clusters, seeded from ``seed`` and
   the layer's index so the result is deterministic. A cluster's centroid is the mean of its
   filters' (masked) importance vectors: what the group as a whole takes from each channel.
3. A threshold: the ``sparsity``-percentile of the "centroid entries", one entry per connection:
   entry (o, j) = centroid[group(o), j] * mask[o, j].
4. Each group keeps the input channels where its centroid exceeds the threshold (strictly); the
   new mask of a filter is its group's kept channels AND its old mask, so masks only shrink.
   Pruned weights are zeroed.

What was taken from the authors' code (QingbeiGuo/SG-CNN, Classification/ResNet50/ImageNet/{G,LG}/
group.py, ``cluster_Euclidean_distance`` and ``set_conv_mask``):

* Importance is computed on ``weight * mask``, and k-means (theirs: scikit-learn, random init,
  10 restarts) runs on those masked vectors at every step; the groups are re-formed each step.
* Already pruned connections stay in the percentile as zeros: their list holds, for every filter,
  its cluster's centroid multiplied by that filter's own mask, and ``np.percentile`` (linear
  interpolation) is taken over all of it. Because a connection is kept exactly when its entry
  exceeds the threshold (a pruned one has entry 0 and the threshold is >= 0), the connections
  pruned after the step are exactly the entries <= threshold: the cumulative pruned fraction
  reaches the step's ``sparsity`` (up to ties: the entries of one group and channel are equal, so
  the granularity is a group's size). Here ``percentile`` reproduces that interpolation.
* ``> threshold`` keeps a channel; the new mask is the group's binary centroid times the old mask.
* The schedule 10%, 20%, ..., with fine-tuning between steps (``np.arange(10, 100, 10)``).
* Which layers: their ResNet masks every convolution inside the residual blocks (3x3 and the 1x1
  convolutions of bottlenecks) and the fc head, but neither the stem nor the 1x1 projection
  shortcuts (``downsample`` is a plain ``nn.Conv2d``). The head is pruned only while the step's
  percentage is <= 60 (``if cp <= 60``). Defaults here follow that: ``include_shortcuts=False``
  and ``linear_until=0.6``; the stem is never self-grouped.

Where this differs from their code:

* Threshold scope. Their percentile is taken per layer. The default here, ``scope="global"``, is
  one percentile over the entries of all layers taking part (the overall pruned fraction of their
  connections reaches ``sparsity``, each layer's does not); ``scope="layer"`` is theirs. A 3x3
  connection's importance sums 9 weights, a 1x1 or linear one's a
  single weight, so the entries are divided by the k x k weights of a connection first (a
  per-weight magnitude, as in global magnitude pruning); otherwise one global threshold would
  prune 1x1 and linear layers far harder than 3x3 ones.
* Their binary centroid is masked with the first member's mask (a quirk); here the centroid is
  already the mean of masked vectors, and each filter is ANDed with its own mask.
* Guard: a group whose centroid has no entry above the threshold keeps its single most important
  channel (their code would leave the whole group, and so its output channels, cut off).
* k-means here is the project's seeded k-means++ (``twolevel_dist.selfgroup.kmeans``).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from twolevel_dist.errors import ConfigError
from twolevel_dist.selfgroup.importance import importance_vectors
from twolevel_dist.selfgroup.kmeans import KMeansResult, kmeans
from twolevel_dist.selfgroup.layers import SelfGroupedLinear, self_grouped_layers

SCOPES = ("global", "layer")


@dataclass
class LayerPruneSummary:
    name: str
    groups: int             # non-empty filter groups after the step
    kept_fraction: float    # kept connections / all (filter, input channel) pairs of the layer
    threshold: float | None  # the threshold applied; None when the layer did not take part
    took_part: bool


@dataclass
class PruneStepSummary:
    sparsity: float
    threshold: float | None          # the global threshold (None with scope="layer")
    pruned_fraction: float           # pruned connections / connections, over the layers taking part
    layers: list[LayerPruneSummary]


def layer_seed(seed: int, layer_index: int) -> int:
    """The k-means seed of layer ``layer_index`` (its position among all self-grouped layers)."""
    return (seed * 1_000_003 + layer_index) % 2 ** 63


def percentile(values: torch.Tensor, fraction: float) -> float:
    """The ``fraction``-quantile of ``values`` with linear interpolation between the two closest
    ranks (``np.percentile``'s default): sorted[pos] interpolated at pos = fraction * (n - 1).
    Written with a sort rather than ``torch.quantile``, which refuses inputs above 2^24 entries."""
    flat = values.detach().flatten().double()
    if flat.numel() == 0:
        raise ConfigError("percentile of an empty set of values")
    ordered = flat.sort().values
    position = fraction * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    weight = position - low
    return float(ordered[low] + weight * (ordered[high] - ordered[low]))


def cluster_filters(layer: nn.Module, groups: int, *, seed: int, iterations: int = 100,
                    restarts: int = 3) -> KMeansResult:
    """k-means of ``layer``'s filters by their importance vectors under the current mask."""
    vectors = importance_vectors(layer.weight, layer.mask)
    return kmeans(vectors, groups, seed=seed, iterations=iterations, restarts=restarts)


def kept_channels(centroids: torch.Tensor, threshold: float) -> torch.Tensor:
    """[groups, I] bool: the channels where each centroid exceeds ``threshold``; a group left with
    none keeps its single most important channel, so that no group is cut off."""
    keep = centroids > threshold
    dead = (~keep.any(1)).nonzero().flatten()
    keep[dead, centroids[dead].argmax(1)] = True
    return keep


def _weights_per_connection(layer: nn.Module) -> int:
    """k x k for a convolution, 1 for a linear layer."""
    return layer.weight[0, 0].numel()


def _check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{name} must be a fraction strictly between 0 and 1 (e.g. 0.5 prunes "
                          f"half of the connections), got {value!r}")


def _is_projection_shortcut(name: str) -> bool:
    # The networks here name the 1x1 projection of a residual block ``shortcut`` (wrn.py).
    return name.rpartition(".")[2] == "shortcut"


def participating_layers(model: nn.Module, sparsity: float, *, include_shortcuts: bool = False,
                         linear_until: float = 0.6) -> list[tuple[int, str, nn.Module]]:
    """(index among all self-grouped layers, name, layer) of the layers a step at ``sparsity``
    prunes: every self-grouped conv except projection shortcuts (unless ``include_shortcuts``),
    and the self-grouped linear head while ``sparsity <= linear_until``."""
    chosen = []
    for index, (name, layer) in enumerate(self_grouped_layers(model)):
        if isinstance(layer, SelfGroupedLinear):
            if sparsity > linear_until + 1e-9:
                continue
        elif _is_projection_shortcut(name) and not include_shortcuts:
            continue
        chosen.append((index, name, layer))
    return chosen


@torch.no_grad()
def prune_step(model: nn.Module, *, sparsity: float, groups: int, seed: int = 0,
               scope: str = "global", include_shortcuts: bool = False,
               linear_until: float = 0.6, kmeans_iterations: int = 100,
               kmeans_restarts: int = 3) -> PruneStepSummary:
    """One step of SG-CNN's progressive pruning: re-group every participating layer's filters
    into ``groups`` clusters and prune connections until ``sparsity`` of them (cumulative,
    counting those pruned by earlier steps) are gone. See the module docstring."""
    _check_fraction("sparsity", sparsity)
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES} ('global': one threshold over all "
                          f"layers; 'layer': one per layer, as the authors' code), got {scope!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"groups must be a positive integer, got {groups!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if not self_grouped_layers(model):
        raise ConfigError("the model has no self-grouped layers; call self_group_model(model) "
                          "on an SC network first")
    layers = participating_layers(model, sparsity, include_shortcuts=include_shortcuts,
                                  linear_until=linear_until)
    if not layers:
        raise ConfigError(f"no self-grouped layer takes part in a step at sparsity {sparsity} "
                          f"(shortcuts left out: {not include_shortcuts}, head only up to "
                          f"{linear_until}); pass include_shortcuts=True or a higher linear_until")
    for _, name, layer in layers:
        if groups > layer.mask.shape[0]:
            raise ConfigError(
                f"groups={groups} exceeds the {layer.mask.shape[0]} filters of layer {name!r}; "
                f"use at most {min(m.mask.shape[0] for _, _, m in layers)} groups (or leave the "
                f"head out with self_group_model(..., include_linear=False))")

    clusters = [cluster_filters(layer, groups, seed=layer_seed(seed, index),
                                iterations=kmeans_iterations, restarts=kmeans_restarts)
                for index, _, layer in layers]
    # One entry per connection: the filter's centroid, zero where the connection is pruned,
    # per weight (divided by the k x k weights a connection holds), so that 1x1, 3x3 and linear
    # connections meet one global threshold on the same footing (global magnitude pruning).
    entries = [result.centroids.to(layer.mask.device)[result.labels.to(layer.mask.device)]
               * layer.mask / _weights_per_connection(layer)
               for (_, _, layer), result in zip(layers, clusters)]
    global_threshold = (percentile(torch.cat([e.flatten() for e in entries]), sparsity)
                        if scope == "global" else None)

    summaries: dict[str, LayerPruneSummary] = {}
    for (_, name, layer), result, layer_entries in zip(layers, clusters, entries):
        threshold = (global_threshold if global_threshold is not None
                     else percentile(layer_entries, sparsity))
        labels = result.labels.to(layer.mask.device)
        keep = kept_channels(result.centroids.to(layer.mask.device)
                             / _weights_per_connection(layer), threshold)
        layer.apply_grouping(labels, keep[labels] & layer.mask)
        summaries[name] = LayerPruneSummary(
            name, layer.num_groups, layer.kept_connections() / layer.mask.numel(), threshold, True)

    report = []
    for name, layer in self_grouped_layers(model):
        report.append(summaries.get(name) or LayerPruneSummary(
            name, layer.num_groups, layer.kept_connections() / layer.mask.numel(), None, False))
    total = sum(layer.mask.numel() for _, _, layer in layers)
    kept = sum(layer.kept_connections() for _, _, layer in layers)
    return PruneStepSummary(sparsity, global_threshold, 1 - kept / max(total, 1), report)


def progressive_schedule(target: float, step: float = 0.1) -> list[float]:
    """The sparsities of the progressive schedule: step, 2 step, ... below ``target``, then
    ``target`` (e.g. 0.5 -> [0.1, 0.2, 0.3, 0.4, 0.5]; 0.55 -> [..., 0.5, 0.55])."""
    _check_fraction("target sparsity", target)
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
        raise ConfigError(f"step must be a positive fraction (e.g. 0.1), got {step!r}")
    schedule = []
    count = 1
    while count * step < target - 1e-9:
        schedule.append(round(count * step, 10))
        count += 1
    return schedule + [target]
