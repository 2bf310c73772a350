"""Seeded, deterministic k-means (k-means++ seeding, Lloyd iterations) on the rows of a matrix."""

from dataclasses import dataclass

import torch

from twolevel_dist.errors import ConfigError


@dataclass
class KMeansResult:
    labels: torch.Tensor      # [n] long, cluster of each point
    centroids: torch.Tensor   # [k, d], mean of each cluster's points
    inertia: float            # sum of squared distances to the assigned centroids


def _plus_plus_init(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++: each next centre drawn with probability proportional to the squared distance
    to the nearest centre already chosen (uniform when all points coincide)."""
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = torch.cdist(points, points[chosen]).squeeze(1).square()
    for _ in range(1, k):
        weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, (points - points[index]).square().sum(1))
    return points[chosen].clone()


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100,
           restarts: int = 3) -> KMeansResult:
    """Cluster the rows of ``points`` [n, d] into ``k`` clusters; the best of ``restarts`` seeded
    runs (lowest inertia). The same inputs and seed always give the same labels. A cluster left
    empty by an iteration takes the point farthest from its centre, so every cluster is used."""
    if points.dim() != 2:
        raise ConfigError(f"kmeans: points must be [n, d], got shape {tuple(points.shape)}")
    n = points.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"kmeans: k must be an integer in [1, {n}] (the number of points), "
                          f"got {k!r}")
    points = points.detach().double().cpu()
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(max(restarts, 1)):
        centroids = _plus_plus_init(points, k, generator)
        labels = None
        for _ in range(iterations):
            distances = torch.cdist(points, centroids).square()
            new_labels = distances.argmin(1)
            counts = torch.bincount(new_labels, minlength=k)
            served = distances.gather(1, new_labels[:, None]).squeeze(1)
            for empty in torch.nonzero(counts == 0).flatten().tolist():
                # The worst-served point of a cluster that can spare one moves to the empty one.
                spare = counts[new_labels] > 1
                far = int(torch.where(spare, served, -1.0).argmax())
                counts[new_labels[far]] -= 1
                counts[empty] += 1
                new_labels[far] = empty
                served[far] = -1.0
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            centroids = torch.zeros_like(centroids).index_add_(0, labels, points)
            centroids /= torch.bincount(labels, minlength=k).clamp_min(1)[:, None].double()
        inertia = float((points - centroids[labels]).square().sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(labels, centroids, inertia)
    return KMeansResult(best.labels, best.centroids.float(), best.inertia)
