"""Derive independent, reproducible seeds from tuples like (seed, epoch, dp_rank).

Python's hash() is salted per process, and seed + epoch arithmetic collides
((seed=1, epoch=0) == (seed=0, epoch=1)), so we hash a canonical string instead. The result
is identical on every rank, process and machine, which the sharded loaders depend on.
"""

from __future__ import annotations

import hashlib

import torch

# torch.Generator.manual_seed accepts up to 2**64 - 1; numpy accepts any non-negative int.
# 63 bits keeps the value a valid non-negative int64 as well.
_SEED_BITS = 63


def derive_seed(*parts: object) -> int:
    """A 63-bit seed determined only by the values (and order) of ``parts``."""
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - _SEED_BITS)


def make_generator(*parts: object) -> torch.Generator:
    """A CPU torch.Generator seeded by ``derive_seed(*parts)``; never touches the global RNG."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(*parts))
    return generator
