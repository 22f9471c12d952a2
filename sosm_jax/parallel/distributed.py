"""Multi-host start-up: `jax.distributed.initialize()` when the job spans several processes."""
from __future__ import annotations

import os

import jax
from absl import logging

_TPU_ENV_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID")


def maybe_initialize_distributed(dist_cfg) -> None:
  """Starts the JAX distributed runtime when asked to, or when on a multi-host Cloud TPU slice.

  `dist_cfg` has `coordinator_address` (str, '' = none), `num_processes` and `process_id` (-1 =
  auto-detect). On a Cloud TPU VM every host runs the same command and JAX finds its peers itself.
  """
  if dist_cfg.coordinator_address:
    if dist_cfg.num_processes < 1 or dist_cfg.process_id < 0:
      raise ValueError(
          "distributed.coordinator_address is set: also set distributed.num_processes (>=1) and "
          "distributed.process_id (0-based) for this process")
    # Cross-process collectives for CPU devices (tests, CPU clusters); no effect on GPU/TPU. Asking
    # for the backend here would start it before the distributed runtime, so the flag is set blindly.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(dist_cfg.coordinator_address, num_processes=dist_cfg.num_processes,
                               process_id=dist_cfg.process_id)
  elif any(os.environ.get(k) for k in _TPU_ENV_HINTS) and "," in os.environ.get(
      "TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()
  else:
    return
  logging.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
