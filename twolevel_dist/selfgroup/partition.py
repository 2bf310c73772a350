"""Balanced, importance-aware partitions of a network's channel spaces into N groups.

Converting a trained SC network into GC keeps, in every grouped layer, only the connections whose
output channel and input channel fall in the same group (the diagonal blocks). Which channels
form a group is free: any permutation of a channel space, applied to everything that touches it,
leaves the SC network's function unchanged. This module chooses, for every channel space, a
balanced partition (N groups of exactly C/N channels) that keeps as much importance mass as it can
inside the diagonal blocks. It is model-agnostic: a network is described by a ``ChannelGraph``
(its channel spaces and the grouped layers between them, each with its importance matrix);
``convert.py`` builds one for a WRN.

Objective. For partitions x (one label per channel of every space) the kept mass is

    sum over layers L (in_space a, out_space b) of  sum_{o, i} M_L[o, i] [x_b(o) == x_a(i)].

Holding every other space fixed, the kept mass is linear in the labels of one space s:
channel c contributes affinity[c, x_s(c)], where affinity[c, j] is c's importance mass with group
j of every neighbouring space (rows of the layers that write s, columns of the layers that read
it). Maximising it under the balance constraint is a transportation problem that
``balanced_assignment`` solves exactly. ``balanced_partition`` uses that as the step of a
coordinate ascent over the spaces; see its docstring for the whole algorithm.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from twolevel_dist.errors import ConfigError
from twolevel_dist.selfgroup.kmeans import kmeans

# A partition of every channel space: space name -> long tensor [channels] of group labels.
Partitions = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ChannelSpace:
    """A set of channels that must be permuted as one (e.g. a residual stream)."""

    name: str
    channels: int


@dataclass(frozen=True)
class GroupedLayer:
    """A layer that becomes grouped: it maps ``in_space`` to ``out_space`` and will keep only its
    diagonal blocks. ``importance`` [out channels, in channels] says what each connection is worth
    (``importance_vectors`` of its weight); it is held detached, on the CPU, in float64 so that
    masses sum without rounding trouble."""

    name: str
    in_space: str
    out_space: str
    importance: torch.Tensor

    def __post_init__(self) -> None:
        if self.importance.dim() != 2:
            raise ConfigError(f"layer {self.name!r}: importance must be [out, in], got shape "
                              f"{tuple(self.importance.shape)}")
        object.__setattr__(self, "importance", self.importance.detach().cpu().double())


@dataclass(frozen=True)
class ChannelGraph:
    """Channel spaces (in the order the partitioner visits them: input to output is best) and
    the grouped layers between them."""

    spaces: tuple[ChannelSpace, ...]
    layers: tuple[GroupedLayer, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "spaces", tuple(self.spaces))
        object.__setattr__(self, "layers", tuple(self.layers))
        names = [space.name for space in self.spaces]
        if len(set(names)) != len(names):
            raise ConfigError(f"channel graph: space names must be unique, got {names}")
        for space in self.spaces:
            if isinstance(space.channels, bool) or not isinstance(space.channels, int) \
                    or space.channels < 1:
                raise ConfigError(f"channel space {space.name!r}: channels must be a positive "
                                  f"integer, got {space.channels!r}")
        channels = dict(zip(names, (space.channels for space in self.spaces)))
        layer_names = [layer.name for layer in self.layers]
        if len(set(layer_names)) != len(layer_names):
            raise ConfigError(f"channel graph: layer names must be unique, got {layer_names}")
        for layer in self.layers:
            for role, space in (("in_space", layer.in_space), ("out_space", layer.out_space)):
                if space not in channels:
                    raise ConfigError(f"layer {layer.name!r}: {role} {space!r} is not one of the "
                                      f"graph's spaces {names}")
            expected = (channels[layer.out_space], channels[layer.in_space])
            if tuple(layer.importance.shape) != expected:
                raise ConfigError(
                    f"layer {layer.name!r}: importance has shape "
                    f"{tuple(layer.importance.shape)} but its spaces {layer.out_space!r} x "
                    f"{layer.in_space!r} have {expected[0]} x {expected[1]} channels")

    def channels(self, space: str) -> int:
        for candidate in self.spaces:
            if candidate.name == space:
                return candidate.channels
        raise ConfigError(f"no channel space {space!r}; the graph has "
                          f"{[s.name for s in self.spaces]}")

    def touching(self, space: str) -> list[GroupedLayer]:
        """The layers that read or write ``space``."""
        return [layer for layer in self.layers if space in (layer.in_space, layer.out_space)]


# --------------------------------------------------------------------------- validation, masses

def check_groups(graph: ChannelGraph, groups: int) -> None:
    """Every space must split into ``groups`` equal groups."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"groups must be a positive integer, got {groups!r}")
    for space in graph.spaces:
        if space.channels % groups:
            raise ConfigError(
                f"groups={groups} does not divide channel space {space.name!r} "
                f"({space.channels} channels); pick a number of groups that divides every "
                f"width (e.g. a power of two no larger than the narrowest space)")


def check_partitions(graph: ChannelGraph, partitions: Partitions,
                     groups: int | None = None) -> None:
    """One label tensor per space, of the space's length. With ``groups``: labels in
    [0, groups) and every group exactly C/groups channels."""
    names = {space.name for space in graph.spaces}
    if set(partitions) != names:
        raise ConfigError(f"partitions must give exactly the graph's spaces: missing "
                          f"{sorted(names - set(partitions))}, unknown "
                          f"{sorted(set(partitions) - names)}")
    for space in graph.spaces:
        labels = partitions[space.name]
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 \
                or labels.numel() != space.channels or labels.is_floating_point():
            raise ConfigError(f"partition of {space.name!r} must be an integer tensor of "
                              f"{space.channels} group labels")
        if groups is None:
            continue
        if labels.min() < 0 or labels.max() >= groups:
            raise ConfigError(f"partition of {space.name!r}: labels must lie in [0, {groups})")
        sizes = torch.bincount(labels.long().cpu(), minlength=groups)
        if not bool((sizes == space.channels // groups).all()):
            raise ConfigError(f"partition of {space.name!r} is not balanced: group sizes "
                              f"{sizes.tolist()}, each must be {space.channels // groups}")


def contiguous_partition(channels: int, groups: int) -> torch.Tensor:
    """The naive split: channels 0..C/N-1 are group 0, the next C/N group 1, and so on."""
    if channels % groups:
        raise ConfigError(f"groups={groups} does not divide {channels} channels")
    return torch.arange(channels) // (channels // groups)


def contiguous_partitions(graph: ChannelGraph, groups: int) -> Partitions:
    check_groups(graph, groups)
    return {space.name: contiguous_partition(space.channels, groups) for space in graph.spaces}


def group_order(labels: torch.Tensor) -> torch.Tensor:
    """The permutation listing a space's channels group by group (ascending channel index inside
    a group): new channel p is old channel ``order[p]``."""
    return torch.argsort(labels.cpu(), stable=True)


def layer_diagonal_mass(layer: GroupedLayer, partitions: Partitions) -> float:
    """Importance mass of ``layer`` whose output and input channels share a group."""
    out_labels = partitions[layer.out_space].cpu().long()
    in_labels = partitions[layer.in_space].cpu().long()
    groups = int(max(out_labels.max(), in_labels.max())) + 1
    # Mass of each output channel with each input group, read at the channel's own group.
    by_group = layer.importance @ _one_hot(in_labels, groups)
    return float(by_group.gather(1, out_labels[:, None]).sum())


def diagonal_mass(graph: ChannelGraph, partitions: Partitions) -> float:
    """Kept mass: the importance mass inside the diagonal blocks, summed over the layers."""
    return sum(layer_diagonal_mass(layer, partitions) for layer in graph.layers)


def total_mass(graph: ChannelGraph) -> float:
    return sum(float(layer.importance.sum()) for layer in graph.layers)


def kept_fraction_by_layer(graph: ChannelGraph, partitions: Partitions) -> dict[str, float]:
    """Per layer, the fraction of its importance mass kept (1.0 for an all-zero layer)."""
    fractions = {}
    for layer in graph.layers:
        whole = float(layer.importance.sum())
        fractions[layer.name] = layer_diagonal_mass(layer, partitions) / whole if whole else 1.0
    return fractions


# ------------------------------------------------------------------ one space: exact assignment

def _greedy_assignment(affinity: torch.Tensor, groups: int) -> torch.Tensor:
    """Take (channel, group) pairs by decreasing affinity while the group has room: a good start
    for the exact solver, which then needs few improving cycles."""
    channels = affinity.shape[0]
    room = [channels // groups] * groups
    labels = [-1] * channels
    unassigned = channels
    for index in torch.argsort(affinity.flatten(), descending=True, stable=True).tolist():
        channel, group = divmod(index, groups)
        if labels[channel] < 0 and room[group] > 0:
            labels[channel] = group
            room[group] -= 1
            unassigned -= 1
            if unassigned == 0:
                break
    return torch.tensor(labels, dtype=torch.long)


def _cycle_in(preds: list[int]) -> list[int] | None:
    """A cycle of the predecessor graph (edges preds[v] -> v), in edge order, or None."""
    done = [False] * len(preds)
    for origin in range(len(preds)):
        path, node = [], origin
        on_path: dict[int, int] = {}
        while node >= 0 and not done[node] and node not in on_path:
            on_path[node] = len(path)
            path.append(node)
            node = preds[node]
        if node >= 0 and node in on_path:
            cycle = path[on_path[node]:]
            cycle.reverse()          # the walk followed predecessors, against the edges
            return cycle
        for visited in path:
            done[visited] = True
    return None


def _positive_cycle(gain: torch.Tensor, tolerance: float) -> list[int] | None:
    """A cycle g1 -> g2 -> ... -> g1 of positive total ``gain`` in the complete graph on the
    groups (gain[g, h]: best gain of moving one channel from g to h), or None when there is none.
    Bellman-Ford for longest paths from a virtual source joined to every group: a cycle in its
    predecessor graph has positive gain, and one must appear within N rounds if any exists
    (checked every round, since it usually appears in the first few)."""
    groups = gain.shape[0]
    # Reductions run over the last, contiguous dimension: torch's max-with-indices over another
    # dimension takes a parallel path that is orders of magnitude slower on a busy machine.
    incoming = gain.T.contiguous()               # incoming[h, g] = gain[g, h]
    dist = gain.new_zeros(groups)
    pred = torch.full((groups,), -1, dtype=torch.long)
    for _ in range(groups + 1):
        candidate, source = (dist[None, :] + incoming).max(1)
        improved = candidate > dist + tolerance
        if not bool(improved.any()):
            return None
        dist = torch.where(improved, candidate, dist)
        pred = torch.where(improved, source, pred)
        cycle = _cycle_in(pred.tolist())
        if cycle is not None:
            total = sum(float(gain[g, h]) for g, h in zip(cycle, cycle[1:] + cycle[:1]))
            return cycle if total > tolerance else None
    return None


def _score(affinity: torch.Tensor, labels: torch.Tensor) -> float:
    return float(affinity.gather(1, labels[:, None]).sum())


def balanced_assignment(affinity: torch.Tensor, groups: int,
                        start: torch.Tensor | None = None) -> torch.Tensor:
    """Labels maximising sum_c affinity[c, label_c] with every group holding exactly C/groups
    channels; exact, not heuristic.

    It is a transportation problem (channels supply 1, groups take C/N), so a balanced assignment
    is optimal iff its residual graph has no improving cycle. Every such cycle moves one channel
    out of each group it visits into the next one, so it suffices to look at the N-node graph whose
    edge g -> h carries the best gain of moving one channel of g to h: cancel positive cycles
    there (each cancellation strictly increases the objective and keeps the balance) until none is
    left. Pairwise swaps are its 2-cycles. It starts from the greedy assignment, or from ``start``
    (e.g. the current labels in a coordinate ascent) unless the greedy one is strictly better, so
    an optimal ``start`` is returned unchanged. Each cycle costs O(C N + N^3), vectorised."""
    affinity = affinity.detach().cpu().double()
    channels = affinity.shape[0]
    if affinity.dim() != 2 or affinity.shape[1] != groups or channels % groups:
        raise ConfigError(f"balanced_assignment: affinity must be [C, {groups}] with {groups} "
                          f"dividing C, got shape {tuple(affinity.shape)}")
    if start is not None and (start.shape != (channels,) or start.is_floating_point() or not bool(
            (torch.bincount(start.cpu().long(), minlength=groups) == channels // groups).all())):
        raise ConfigError(f"balanced_assignment: start must give {channels} integer labels, "
                          f"{channels // groups} in each of the {groups} groups")
    labels = _greedy_assignment(affinity, groups)
    if start is not None:
        # Any balanced start reaches the optimum; the greedy one usually needs far fewer cycles,
        # but only a strictly better greedy start replaces ``start`` (an optimal start stays).
        start = start.cpu().long().clone()
        if _score(affinity, labels) <= _score(affinity, start):
            labels = start
    if groups == 1:
        return labels
    size = channels // groups
    tolerance = 1e-10 * max(float(affinity.abs().max()), 1e-300) * groups
    no_move = torch.eye(groups, dtype=torch.bool)
    for _ in range(channels * channels):  # every cycle gains > tolerance: this never binds
        order = torch.argsort(labels, stable=True).view(groups, size)
        move_gain = (affinity - affinity.gather(1, labels[:, None])).T  # [N to, C]
        best_gain, best_index = move_gain[:, order].max(2)              # [N to, N from]
        best_gain, best_index = best_gain.T, best_index.T               # [N from, N to]
        cycle = _positive_cycle(best_gain.masked_fill(no_move, float("-inf")), tolerance)
        if cycle is None:
            break
        moves = [(int(order[g, best_index[g, h]]), h) for g, h in zip(cycle, cycle[1:] + cycle[:1])]
        for channel, group in moves:
            labels[channel] = group
    return labels


# ------------------------------------------------------------------- the whole graph: ascent

def _one_hot(labels: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.cpu().long(), groups).double()


def _affinity(graph: ChannelGraph, space: str, partitions: Partitions,
              groups: int) -> torch.Tensor | None:
    """[C, N]: each channel's importance mass with each group of the already-partitioned
    neighbouring spaces, or None when no neighbour is partitioned yet. A layer reading and writing
    the same space contributes its linearisation at the current labels (its mass is quadratic in
    them); ``_ascend`` then accepts the result only if the true mass grows."""
    affinity = torch.zeros(graph.channels(space), groups, dtype=torch.float64)
    informed = False
    for layer in graph.touching(space):
        if layer.in_space == layer.out_space:
            if space in partitions:
                both = layer.importance + layer.importance.T
                affinity += both @ _one_hot(partitions[space], groups)
                informed = True
        elif layer.out_space == space and layer.in_space in partitions:
            affinity += layer.importance @ _one_hot(partitions[layer.in_space], groups)
            informed = True
        elif layer.in_space == space and layer.out_space in partitions:
            affinity += layer.importance.T @ _one_hot(partitions[layer.out_space], groups)
            informed = True
    return affinity if informed else None


def _cluster_start(graph: ChannelGraph, space: str, groups: int, seed: int) -> torch.Tensor:
    """A space with no partitioned neighbour: balanced k-means of its channels, each described by
    its importance column in every layer reading it and its row in every layer writing it,
    normalised to unit length (the pattern says which channels belong together, the scale does
    not); then the balanced assignment nearest to the centroids."""
    features = []
    for layer in graph.touching(space):
        if layer.in_space == space:
            features.append(layer.importance.T)
        if layer.out_space == space:
            features.append(layer.importance)
    channels = graph.channels(space)
    if not features:
        return contiguous_partition(channels, groups)
    points = torch.cat(features, 1)
    points = points / points.norm(dim=1, keepdim=True).clamp_min(1e-300)
    clusters = kmeans(points, groups, seed=seed)
    closeness = -torch.cdist(points, clusters.centroids.double()).square()
    return balanced_assignment(closeness, groups)


def _space_mass(graph: ChannelGraph, space: str, partitions: Partitions) -> float:
    return sum(layer_diagonal_mass(layer, partitions) for layer in graph.touching(space))


def _reads_itself(graph: ChannelGraph, space: str) -> bool:
    return any(layer.in_space == layer.out_space == space for layer in graph.layers)


def _ascend(graph: ChannelGraph, partitions: Partitions, groups: int,
            max_passes: int) -> Partitions:
    """Coordinate ascent: re-solve each space exactly with the others fixed, keep only strict
    improvements, until a pass changes nothing. The kept mass never decreases."""
    partitions = {name: labels.clone() for name, labels in partitions.items()}
    for _ in range(max_passes):
        changed = False
        for space in graph.spaces:
            affinity = _affinity(graph, space.name, partitions, groups)
            if affinity is None:
                continue
            current = partitions[space.name]
            proposal = balanced_assignment(affinity, groups, start=current)
            if torch.equal(proposal, current):
                continue
            if _reads_itself(graph, space.name):
                # The affinity was only a linearisation: judge by the true mass.
                before = _space_mass(graph, space.name, partitions)
                partitions[space.name] = proposal
                accept = _space_mass(graph, space.name, partitions) > before * (1 + 1e-12)
            else:
                # The affinity is exact: its score change is the kept mass's change.
                accept = _score(affinity, proposal) > _score(affinity, current)
            partitions[space.name] = proposal if accept else current
            changed = changed or accept
        if not changed:
            break
    return partitions


def _grow(graph: ChannelGraph, groups: int, seed: int) -> Partitions:
    """First visit, in the graph's order: each space is assigned exactly against its partitioned
    neighbours; a space with none (the first, or a disconnected part) is clustered."""
    partitions: Partitions = {}
    for space in graph.spaces:
        affinity = _affinity(graph, space.name, partitions, groups)
        if affinity is None:
            partitions[space.name] = _cluster_start(graph, space.name, groups, seed)
        else:
            partitions[space.name] = balanced_assignment(affinity, groups)
    return partitions


@contextmanager
def _single_threaded() -> Iterator[None]:
    """The search is thousands of tiny tensor ops: intra-op threads only add hand-offs, and on a
    busy machine a thread waiting for a core stalls every op (seen: 100x). Restored on exit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def balanced_partition(graph: ChannelGraph, groups: int, seed: int = 0, *,
                       max_passes: int = 20) -> Partitions:
    """The self-grouped choice: for every space, N groups of exactly C/N channels keeping as much
    importance mass inside the diagonal blocks as the search finds.

    1. Grow: visit the spaces in order. A space's channels are assigned by the exact balanced
       assignment of their affinity to the groups of the neighbouring spaces already partitioned;
       a space with no partitioned neighbour is started by balanced k-means (``seed``) of its
       channels' importance patterns.
    2. Ascend: coordinate ascent over all spaces, each re-solved exactly with the others fixed
       (``balanced_assignment``), accepting strict improvements only, until a pass changes
       nothing (at most ``max_passes`` passes).
    3. The same ascent from the contiguous split; the better of the two is returned (the grown one
       on a tie), so the result never keeps less than the contiguous split.
    Deterministic for a seed."""
    check_groups(graph, groups)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if groups == 1:
        return contiguous_partitions(graph, groups)
    with _single_threaded():
        grown = _ascend(graph, _grow(graph, groups, seed), groups, max_passes)
        from_contiguous = _ascend(graph, contiguous_partitions(graph, groups), groups, max_passes)
    if diagonal_mass(graph, from_contiguous) > diagonal_mass(graph, grown):
        return from_contiguous
    return grown
