"""The one table mapping the model's logical axis names to mesh axes, and shardings built from it.

Layers only name logical axes ('embed', 'heads', 'activation_batch', ...); which mesh axis each one
is split over is decided here, so changing the parallelism never touches a layer.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Parameters are split over 'fsdp' along their model dimension and over 'tensor' along heads / MLP
# width / vocabulary; activations are split over ('data', 'fsdp') along the batch and over 'context'
# along time (a size-1 'context' axis, the default, splits nothing).
LOGICAL_AXIS_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("conv", None),
    ("layers", None),
    ("norm", None),
)


def _fit_spec_to_shape(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Replicates any dimension whose size the mesh axes do not divide (tiny or odd-sized params)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = math.prod(mesh.shape[n] for n in names)
    fitted.append(axes if ways > 1 and dim % ways == 0 else None)
  return P(*fitted)


def unbox_values(tree):
  """Strips `nn.LogicallyPartitioned` boxes without sharding constraints.

  `nn.unbox` constrains each value to its sharding when a mesh is set, which fails on the
  ShapeDtypeStructs of `jax.eval_shape` (and is only wanted inside a jitted function).
  """
  return nn.meta.map_axis_meta(lambda box: unbox_values(box.unbox(apply_constraint=False))
                               if isinstance(box, nn.Partitioned) else
                               unbox_values(box.unbox()), tree)


def logical_shardings(abstract_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a tree whose leaves may be boxed with logical axis names.

  `abstract_tree` is typically `jax.eval_shape(model.init, ...)` (leaves `nn.LogicallyPartitioned`
  around ShapeDtypeStructs). Unboxed leaves are replicated. Returns an unboxed tree of shardings.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = unbox_values(abstract_tree)
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, _fit_spec_to_shape(spec, leaf.shape, mesh)),
      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a `[batch, time]` batch: batch split over ('data', 'fsdp'), time over 'context'
  (when the mesh has that axis)."""
  time = "context" if "context" in mesh.axis_names else None
  return NamedSharding(mesh, P(("data", "fsdp"), time))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
