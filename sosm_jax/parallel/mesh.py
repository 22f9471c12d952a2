"""Build the device mesh ('data', 'fsdp', 'tensor') from the `mesh` section of a config."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills at most one -1 in `sizes` so that their product is `num_devices`.

  Raises ValueError naming the numbers when that is impossible.
  """
  sizes = [int(s) for s in sizes]
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, which does not "
          f"divide the {num_devices} devices; set --config.mesh.* so that the product is {num_devices}")
    sizes[unknown[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} has {known} devices but {num_devices} are present; "
        f"set one axis to -1 or make the product {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a Mesh with axes ('data', 'fsdp', 'tensor') over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape((mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor), len(devices))
  if devices == list(jax.devices()):
    # Topology-aware placement (ICI rings on TPU, NVLink islands on GPU).
    return jax.make_mesh(shape, MESH_AXES, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  """Number of ways the batch is split: the product of the 'data' and 'fsdp' axes."""
  return mesh.shape["data"] * mesh.shape["fsdp"]
