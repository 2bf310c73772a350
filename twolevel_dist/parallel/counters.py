"""Counting collectives: ``with count_collectives() as stats:`` records every collective the
transport issues inside the block (kind, calls, bytes, shapes), so that the training loop can log
them per step and the tests can count them."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class CommStats:
    """Collectives issued, by kind: number of calls and bytes of the full (gathered, reduced or
    exchanged) tensor, which is what the link carries per rank up to a factor (N-1)/N."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=lambda: defaultdict(list))

    def record(self, kind: str, tensor: torch.Tensor) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += tensor.numel() * tensor.element_size()
        self.shapes[kind].append(tuple(tensor.shape))

    def total_calls(self) -> int:
        return sum(self.calls.values())

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def as_dict(self) -> dict[str, int]:
        out = {f"{kind}_calls": n for kind, n in sorted(self.calls.items())}
        out.update({f"{kind}_bytes": n for kind, n in sorted(self.bytes.items())})
        return out


_active_counters: list[CommStats] = []


@contextlib.contextmanager
def count_collectives():
    """``with count_collectives() as stats:`` records every collective issued inside the block."""
    stats = CommStats()
    _active_counters.append(stats)
    try:
        yield stats
    finally:
        _active_counters.remove(stats)


def record(kind: str, tensor: torch.Tensor) -> None:
    """Count one collective on ``tensor`` in every active counter."""
    for stats in _active_counters:
        stats.record(kind, tensor)
