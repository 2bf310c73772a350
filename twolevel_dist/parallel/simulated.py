"""One rank of an N-rank job in a single process: the per-rank simulation.

``simulated_mesh(groups)`` stands in for ``init_mesh``: ``parallelize`` then builds exactly the
shard rank ``rank`` would hold, and the collectives, seeing a ``SimulatedGroup``, return tensors of
the right shape without communicating (and are still counted, bytes included). So one device
measures one rank's compute at any N, and the communication can be modelled from the bytes.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class SimulatedGroup:
    """A process group of ``size`` ranks of which this process plays ``rank``."""

    size: int
    rank: int = 0


class _SimulatedMeshDim:
    def __init__(self, group: SimulatedGroup):
        self._group = group

    def size(self) -> int:
        return self._group.size

    def get_local_rank(self) -> int:
        return self._group.rank

    def get_group(self) -> SimulatedGroup:
        return self._group


class SimulatedMesh:
    """The ("dp", "gp") mesh of one rank, with dp = 1."""

    mesh_dim_names = ("dp", "gp")

    def __init__(self, groups: int, rank: int = 0):
        if not 0 <= rank < groups:
            raise ValueError(f"rank {rank} is not in a group of {groups} ranks")
        self._dims = {"dp": _SimulatedMeshDim(SimulatedGroup(1)),
                      "gp": _SimulatedMeshDim(SimulatedGroup(groups, rank))}

    def __getitem__(self, name: str) -> _SimulatedMeshDim:
        return self._dims[name]


def simulated_mesh(groups: int, rank: int = 0) -> SimulatedMesh:
    return SimulatedMesh(groups, rank)
