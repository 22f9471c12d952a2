"""Device meshes, logical-axis sharding rules, per-shard kernel calls and multi-host start-up."""
from sosm_jax.parallel.distributed import (distributed_init_args, maybe_initialize_distributed,
                                           process_batch_shard)
from sosm_jax.parallel.mesh import MESH_AXES, make_mesh, data_parallel_size
from sosm_jax.parallel.per_shard import per_shard
from sosm_jax.parallel.rules import (LOGICAL_AXIS_RULES, batch_sharding, logical_shardings,
                                     replicated_sharding, unbox_values)

__all__ = [
    "MESH_AXES", "make_mesh", "data_parallel_size", "LOGICAL_AXIS_RULES", "batch_sharding",
    "logical_shardings", "replicated_sharding", "maybe_initialize_distributed",
    "distributed_init_args", "process_batch_shard", "unbox_values", "per_shard",
]
