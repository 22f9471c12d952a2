"""Multi-host start-up (jax.distributed) and the part of the batch each process reads."""
from __future__ import annotations

import os

import jax
from absl import logging
from jax.sharding import Mesh, NamedSharding

# Variables that Cloud TPU (GKE / xpk, multi-slice) or a user sets when a job spans several hosts.
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _env_says_multihost(environ) -> bool:
  """True when the environment describes a job of several processes that JAX can discover."""
  if any(environ.get(k) for k in _MULTIHOST_ENV):
    return True
  if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  try:
    return int(environ.get("MEGASCALE_NUM_SLICES", "1")) > 1
  except ValueError:
    return False


def distributed_init_args(dist_cfg, environ=None) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for a single-process job.

  `dist_cfg` has `coordinator_address` (str, '' = none), `num_processes` (0 = single process unless
  the environment says otherwise, -1 = let JAX discover the cluster: Cloud TPU VM, GKE/xpk, SLURM)
  and `process_id` (-1 = discovered). Raises ValueError for an incomplete combination.
  """
  environ = os.environ if environ is None else environ
  address, count, pid = dist_cfg.coordinator_address, int(dist_cfg.num_processes), int(
      dist_cfg.process_id)
  if address:
    if count < 1 or not 0 <= pid < count:
      raise ValueError(
          f"distributed.coordinator_address={address!r} needs distributed.num_processes (>= 1, "
          f"got {count}) and distributed.process_id in [0, num_processes) (got {pid}) for this "
          f"process; or leave coordinator_address empty and set num_processes=-1 to let JAX "
          f"discover the cluster")
    return {"coordinator_address": address, "num_processes": count, "process_id": pid}
  if count < -1:
    raise ValueError(f"distributed.num_processes={count}: use -1 (discover), 0 or 1 (single "
                     f"process) or N > 1 with a coordinator_address")
  if count > 1:
    # A count without an address: JAX finds the coordinator itself (TPU metadata, SLURM, ...).
    return {"num_processes": count, **({"process_id": pid} if pid >= 0 else {})}
  if count == -1 or (count == 0 and _env_says_multihost(environ)):
    return {}
  return None


def maybe_initialize_distributed(dist_cfg) -> bool:
  """Starts the JAX distributed runtime when the config or environment asks for several processes.

  Must run before anything touches the devices. Returns True when it initialized. On a Cloud TPU
  slice every host runs the same command (with `--config.distributed.num_processes=-1`) and JAX
  finds its peers through the TPU metadata.
  """
  args = distributed_init_args(dist_cfg)
  if args is None:
    return False
  if args.get("coordinator_address"):
    # Cross-process collectives for CPU devices (tests, CPU clusters); no effect on GPU/TPU.
    # Asking for the backend here would start it before the distributed runtime: set it blindly.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**args)
  logging.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def process_batch_shard(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """(shard index, shard count) of the rows of a `[global_batch, ...]` batch this process feeds.

  The batch is split over ('data', 'fsdp'); processes whose devices hold the same rows (a 'tensor'
  axis spanning hosts) must read the same data, so they get the same index. With one process per
  row block (the usual layout) this is (jax.process_index(), jax.process_count()). The pipeline is
  then built with `process_index=index, process_count=count, batch_size=global_batch // count`.
  """
  sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  blocks: dict[int, set[tuple[int, int]]] = {}
  for device, index in sharding.devices_indices_map((global_batch,)).items():
    rows = index[0]
    blocks.setdefault(device.process_index, set()).add(
        (rows.start or 0, global_batch if rows.stop is None else rows.stop))
  spans = {}
  for process, rows in blocks.items():
    lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
    if sum(b - a for a, b in rows) != hi - lo:
      raise ValueError(
          f"process {process} holds rows {sorted(rows)} of the batch, which are not one contiguous "
          f"block; order the mesh so each host's devices are adjacent along ('data', 'fsdp')")
    spans[process] = (lo, hi)
  distinct = sorted(set(spans.values()))
  tiles = all(a[1] == b[0] for a, b in zip(distinct, distinct[1:]))
  if (not tiles or len({b - a for a, b in distinct}) != 1 or distinct[0][0] != 0
      or distinct[-1][1] != global_batch):
    raise ValueError(f"the processes hold unequal or overlapping parts of the batch (process: "
                     f"rows): {spans}")
  return distinct.index(spans[jax.process_index()]), len(distinct)
