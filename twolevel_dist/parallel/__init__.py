"""Group parallelism: one rank per group, one all-gather per GC-2L layer."""

from twolevel_dist.parallel.collectives import (
                                                exchange_chunks,
                                                gather_channels,
                                                start_gather_channels,
                                                sum_over_ranks,
)
from twolevel_dist.parallel.counters import CommStats, count_collectives
from twolevel_dist.parallel.mesh import (
                                                apply_slurm_env,
                                                backend_for,
                                                check_device,
                                                env_rank,
                                                env_world_size,
                                                init_distributed,
                                                init_mesh,
                                                local_device,
)
from twolevel_dist.parallel.parallelize import parallelize, unwrap
from twolevel_dist.parallel.scalars import all_reduce_values
from twolevel_dist.parallel.state import consolidate_state_dict, join_shards, shard_state_dict
from twolevel_dist.parallel.transport import TRANSPORTS, get_transport, set_transport

__all__ = [
    "CommStats", "count_collectives", "apply_slurm_env", "backend_for", "check_device", "env_rank",
    "env_world_size", "gather_channels", "start_gather_channels", "sum_over_ranks",
    "exchange_chunks", "init_distributed", "init_mesh", "local_device", "parallelize", "unwrap",
    "consolidate_state_dict", "join_shards", "shard_state_dict", "all_reduce_values", "TRANSPORTS",
    "get_transport", "set_transport",
]
