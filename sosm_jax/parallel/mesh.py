"""Build the device mesh ('data', 'fsdp', 'context', 'tensor') from a config's `mesh` section."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

# 'context' splits the time axis of activations (one long sequence over several devices,
# sosm_jax/parallel/context.py); it sits next to 'tensor' so both use the fastest links.
MESH_AXES = ("data", "fsdp", "context", "tensor")
# Every axis is 'Auto': the compiler propagates shardings from the ones we give (parameters, batch,
# logical constraints). jax.make_mesh would default to 'Explicit' axes, where every reshape of a
# sharded dimension needs an explicit out_sharding.
_AXIS_TYPES = (AxisType.Auto,) * len(MESH_AXES)


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
          f"divide the {num_devices} devices; set --config.mesh.* so that the product is "
          f"{num_devices}")
    sizes[unknown[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} has {known} devices but {num_devices} are present; "
        f"set one axis to -1 or make the product {num_devices}")
  return tuple(sizes)


def split_over_slices(shape: Sequence[int], num_slices: int) -> tuple[tuple[int, ...],
                                                                      tuple[int, ...]]:
  """Splits a mesh shape into (within-slice, across-slices) shapes for a multi-slice TPU job.

  Only the 'data' axis (the first) crosses slices (its gradient all-reduce is the one collective
  per step that tolerates the slow data-centre network); the others stay on the fast chip
  interconnect.
  """
  data, rest = shape[0], tuple(shape[1:])
  if data % num_slices:
    raise ValueError(
        f"the job spans {num_slices} TPU slices but mesh.data={data} is not a multiple of it: "
        f"only the 'data' axis may cross slices; set --config.mesh.data to a multiple of "
        f"{num_slices} (e.g. -1 with fsdp*tensor no larger than one slice)")
  return (data // num_slices,) + rest, (num_slices,) + (1,) * len(rest)


def _num_slices(devices: Sequence[jax.Device]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def mesh_sizes(mesh_cfg) -> tuple[int, ...]:
  """The configured size of each of MESH_AXES (`context` may be absent: 1).

  Raises ValueError naming `mesh.context` when it is not a positive integer (it splits a sequence,
  so -1 is not accepted for it).
  """
  context = mesh_cfg.get("context", 1) if hasattr(mesh_cfg, "get") else getattr(
      mesh_cfg, "context", 1)
  if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 1:
    raise ValueError(f"mesh.context={context!r}: the number of devices one sequence is split over "
                     f"must be an integer >= 1 (1 = off); set --config.mesh.context=N")
  return (mesh_cfg.data, mesh_cfg.fsdp, int(context), mesh_cfg.tensor)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a Mesh with axes ('data', 'fsdp', 'context', 'tensor') over `devices` (default: all).

  `mesh_cfg` has integer fields `data`, `fsdp`, `tensor` (-1 = the remaining devices) and
  optionally `context` (default 1; the devices one sequence's time axis is split over). With all
  devices the placement follows the hardware topology (ICI rings on TPU, NVLink islands on GPU,
  the data axis across slices on a multi-slice TPU job); a given device list is used in its order.
  """
  all_devices = list(jax.devices())
  devices = list(all_devices if devices is None else devices)
  shape = resolve_mesh_shape(mesh_sizes(mesh_cfg), len(devices))
  if devices != all_devices:
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=_AXIS_TYPES)
  slices = _num_slices(devices)
  if slices > 1:
    within, across = split_over_slices(shape, slices)
    grid = mesh_utils.create_hybrid_device_mesh(within, across, devices)
    return Mesh(grid, MESH_AXES, axis_types=_AXIS_TYPES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=_AXIS_TYPES, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """Number of ways the batch is split: the product of the 'data' and 'fsdp' axes."""
  return mesh.shape["data"] * mesh.shape["fsdp"]
