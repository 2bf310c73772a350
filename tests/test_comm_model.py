"""The engine's counted communication equals the closed form, for every scheme; the per-rank
simulation builds the same shard as a real rank."""

import pytest
import torch
import torch.nn.functional as F

from twolevel_dist.models import build_model
from twolevel_dist.parallel import count_collectives, parallelize
from twolevel_dist.parallel.comm_model import LINKS, LinkModel, collective_seconds, expected_comm
from twolevel_dist.parallel.simulated import simulated_mesh


@pytest.mark.parametrize("conv", ["gc2l", "gc", "sc", "shuffle"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_counted_communication_equals_the_closed_form(conv, ranks):
    kwargs = dict(depth=10, widen=2, num_classes=10)
    groups = 1 if conv == "sc" else ranks
    calls, nbytes = expected_comm(build_model("wrn", conv=conv, groups=groups, **kwargs), ranks,
                                  batch=4, image_size=32, num_classes=10)
    shard = parallelize(build_model("wrn", conv=conv, groups=groups, **kwargs),
                        simulated_mesh(ranks, rank=ranks - 1))
    with count_collectives() as stats:
        F.cross_entropy(shard(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
    assert dict(stats.calls) == calls
    assert dict(stats.bytes) == nbytes
    if conv == "gc2l":   # 9 layers x 4 x N x H x W floats each way, plus the [4, 10] logits
        assert calls == {"all_gather": 9, "reduce_scatter": 9, "all_reduce": 1}


def test_simulated_shard_holds_a_real_ranks_parameters():
    shard = parallelize(build_model("wrn", conv="gc2l", groups=4, depth=10, widen=2),
                        simulated_mesh(4))
    assert sum(p.numel() for p in shard.parameters()) == 20942   # as a real rank (test_parallel)


def test_ring_link_model():
    link = LinkModel("test", bandwidth_gbs=1.0, latency_us=10.0)
    # all-gather of 4 GB over 4 ranks: 3 steps of latency, each rank sends 3/4 of it.
    assert collective_seconds("all_gather", 4e9, 4, link) == pytest.approx(3e-5 + 3.0)
    assert collective_seconds("all_reduce", 4e9, 4, link) == pytest.approx(6e-5 + 6.0)
    assert collective_seconds("all_gather", 4e9, 1, link) == 0.0
    assert set(LINKS) == {"nvlink", "infiniband", "ethernet100"}
