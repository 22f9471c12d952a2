"""Runs a per-device function (a custom kernel) on each device's shard, by logical axis names.

Custom kernels (Pallas calls) are opaque to XLA's partitioner: called on sharded arrays they are
replicated, and XLA all-gathers their inputs. `per_shard` wraps such a call in `jax.shard_map`
over the mesh axes that the logical axis names of its arguments map to under the active rules
(`nn.logical_axis_rules`, this package's `LOGICAL_AXIS_RULES`), so each device computes only its
share and the outputs keep the inputs' sharding. Callers (layers) name logical axes only; which
mesh axes those are is decided by the rules table, as for every other array of the model.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

Names = Sequence[str | None]


def _mesh_axes(name: str, mesh) -> tuple[str, ...]:
  """Mesh axes (of size > 1) that the logical axis `name` maps to under the active rules."""
  axes = nn.logical_to_mesh_axes((name,))[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def shard_axes(args: Sequence[Any], in_axes: Sequence[Names | None], mesh) -> dict[str, tuple]:
  """Logical name -> mesh axes it is split over here: the rules' axes when they divide the size
  of every dimension carrying that name, else () (that dimension stays whole on each device)."""
  split: dict[str, tuple] = {}
  for x, names in zip(args, in_axes):
    if x is None:
      continue
    if len(names) != x.ndim:
      raise ValueError(f"per_shard: logical axes {tuple(names)} do not match an argument of shape "
                       f"{x.shape}; give one name (or None) per dimension.")
    for size, name in zip(x.shape, names):
      if name is None:
        continue
      axes = split[name] if name in split else _mesh_axes(name, mesh)
      split[name] = axes if size % math.prod(mesh.shape[a] for a in axes) == 0 else ()
  return split


def _is_names(t) -> bool:
  """A tuple of logical names (a leaf of out_axes), not a tuple of such tuples."""
  return isinstance(t, tuple) and all(n is None or isinstance(n, str) for n in t)


def per_shard(fn: Callable, args: Sequence[Any], in_axes: Sequence[Names | None], out_axes):
  """fn(*args), computed by every device on its own shard of the arguments.

  Args:
    fn: a function of arrays that treats the named dimensions independently (a batch row or a
      head never needs another one), e.g. a linear-attention kernel over (batch, heads).
    args: arrays, or None for absent optional arguments (passed to fn as None).
    in_axes: per argument, one logical axis name (or None: whole on every device) per dimension;
      ignored for None arguments.
    out_axes: fn's output structure with a tuple of logical names per output array.
  Returns:
    fn's outputs, split as out_axes name. Outside a mesh of several devices, or when no named
    dimension is split under the rules, this is just fn(*args).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  split = shard_axes(args, in_axes, mesh)
  if not any(split.values()):
    return fn(*args)
  return shard_call(fn, mesh, split, args, in_axes, out_axes)


def shard_call(fn: Callable, mesh, split: dict[str, tuple], args: Sequence[Any],
               in_axes: Sequence[Names | None], out_axes):
  """fn(*args) inside `jax.shard_map` on `mesh`, each logical name split over `split[name]`
  (as `shard_axes` gives; a name absent or mapped to () stays whole). None arguments are passed
  to fn as None; out_axes as in `per_shard`."""
  spec = lambda names: P(*[split.get(n) or None if n is not None else None for n in names])
  present = [i for i, x in enumerate(args) if x is not None]

  def local(*arrays):
    full = list(args)
    for i, a in zip(present, arrays):
      full[i] = a
    return fn(*full)

  in_specs = tuple(spec(in_axes[i]) for i in present)
  out_specs = jax.tree.map(spec, out_axes, is_leaf=_is_names)
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*(args[i] for i in present))
