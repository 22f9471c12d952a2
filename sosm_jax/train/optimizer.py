"""AdamW with warmup then cosine or WSD decay, global-norm clipping and a weight-decay mask."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

# Parameters whose path contains one of these names get no weight decay: norm scales, biases, and
# (by default) embeddings, which weight decay shrinks towards zero for rare tokens.
_NO_DECAY_NAMES = ("norm", "bias", "scale", "A_log", "dt_bias", "lower_bound")
_EMBEDDING_NAMES = ("embed", "embedding")


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup, then 'cosine' decay to min_lr_ratio·lr or 'wsd' (warmup-stable-decay).

  The schedule is a function of the global step, so it runs on unbroken across curriculum stages.
  """
  warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
  peak, floor = opt_cfg.learning_rate, opt_cfg.learning_rate * opt_cfg.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  warm = optax.linear_schedule(0.0 if warmup else peak, peak, max(warmup, 1))
  if opt_cfg.schedule == "cosine":
    rest = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_cfg.min_lr_ratio)
  elif opt_cfg.schedule == "wsd":
    cool = max(int(round(decay_steps * opt_cfg.decay_fraction)), 1)
    rest = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, cool)],
        [decay_steps - cool])
  elif opt_cfg.schedule == "constant":
    rest = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optimizer.schedule={opt_cfg.schedule!r}: use 'cosine', 'wsd' or 'constant'")
  return optax.join_schedules([warm, rest], [warmup])


def weight_decay_mask(params, decay_embeddings: bool):
  """True for the parameters that get weight decay (matrices), False for norms, biases, ..."""
  flat = traverse_util.flatten_dict(params)

  def decays(path) -> bool:
    names = "/".join(str(p) for p in path)
    if any(n in names for n in _NO_DECAY_NAMES):
      return False
    if not decay_embeddings and any(n in names for n in _EMBEDDING_NAMES):
      return False
    return True

  return traverse_util.unflatten_dict({path: decays(path) for path in flat})


def make_optimizer(opt_cfg, total_steps: int
                   ) -> tuple[optax.GradientTransformation | FusedAdamW, optax.Schedule]:
  """Returns (optimizer, schedule). The optimizer clips by global norm, then applies AdamW.

  With `opt_cfg.fused` the optimizer is a `FusedAdamW` (the same update on flat buffers).
  """
  schedule = learning_rate_schedule(opt_cfg, total_steps)
  if opt_cfg.get("fused", False):
    return fused_adamw(opt_cfg, schedule), schedule
  optimizer = optax.chain(
      optax.clip_by_global_norm(opt_cfg.clip_norm) if opt_cfg.clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay,
                  mask=lambda p: weight_decay_mask(p, opt_cfg.decay_embeddings)),
  )
  return optimizer, schedule


# ---------------------------------------------------------------------------------------------
# optimizer.fused: the same AdamW on a few flat buffers instead of a set of kernels per leaf.


class FusedAdamWState(NamedTuple):
  """The fused optimizer's state: one update count and, per group of parameters (name ->
  buffer), the first and second moments in the group's dtype and layout (`_Group`)."""
  count: jax.Array          # int32: updates applied (rejected steps excluded), as optax's counts
  mu: dict[str, jax.Array]
  nu: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """Where one parameter sits in its group's buffer, and how it gets there."""
  index: int                # into jax.tree.leaves(params)
  shape: tuple[int, ...]    # global
  # the dimensions of `shape` split into (shards of each mesh axis, in the spec's order, major
  # first; the rest): a reshape that keeps each device's block whole
  split_shape: tuple[int, ...]
  perm: tuple[int, ...]     # of split_shape: the group's mesh axes (its order) first
  size: int                 # elements per device


@dataclasses.dataclass(frozen=True)
class _Group:
  name: str                 # '<dtype>_<decay|no_decay>[_by_<axis>_<axis>...]' (its key in mu / nu)
  dtype: Any
  decay: bool
  axes: tuple[str, ...]     # mesh axes that split the group, in the mesh's order (() replicated)
  ways: tuple[int, ...]     # their sizes: the buffer is [*ways, sum of the leaves' sizes]
  leaves: tuple[_Leaf, ...]
  sharding: Any             # the buffer's NamedSharding (None: the optimizer has no mesh)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.ways + (sum(leaf.size for leaf in self.leaves),)


def _leaf_axes(shape, sharding) -> tuple[tuple[tuple[str, ...], ...], dict[str, int]]:
  """Per dimension of `shape`, the mesh axes (of size > 1) that split it; and the mesh's sizes."""
  if sharding is None:
    return ((),) * len(shape), {}
  if not isinstance(sharding, NamedSharding):
    if sharding.is_fully_replicated:
      return ((),) * len(shape), {}
    raise ValueError(f"the fused AdamW lays its buffers out after NamedShardings; a parameter "
                     f"of shape {tuple(shape)} has {sharding}")
  sizes = dict(sharding.mesh.shape)
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  dims = []
  for entry in spec[:len(shape)]:
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    dims.append(tuple(n for n in names if sizes[n] > 1))
  return tuple(dims), sizes


def _layout(params, decay_embeddings: bool, param_shardings=None
            ) -> tuple[list[_Group], Any]:
  """The groups of a parameter tree (from its shapes, dtypes and shardings only) and its treedef.

  A leaf split over mesh axes a1..ak (by its NamedSharding in `param_shardings`; None: all
  replicated) joins the group of (dtype, decay, a1..ak); its buffer is [size(a1), ..., size(ak),
  n] sharded as P(a1, ..., ak, None), so that every device holds exactly its own blocks of the
  group's leaves: gathering the leaves into the buffer and splitting it again are local.
  """
  leaves, treedef = jax.tree.flatten(params)
  mask = treedef.flatten_up_to(weight_decay_mask(params, decay_embeddings))
  shardings = ([None] * len(leaves) if param_shardings is None
               else treedef.flatten_up_to(param_shardings))
  mesh_order, mesh = (), None
  members: dict[tuple, list[_Leaf]] = {}
  for i, (leaf, decay, sharding) in enumerate(zip(leaves, mask, shardings)):
    shape = tuple(leaf.shape)
    dims, sizes = _leaf_axes(shape, sharding)
    if isinstance(sharding, NamedSharding):
      mesh, mesh_order = sharding.mesh, tuple(sharding.mesh.axis_names)
    split_shape, where = [], {}
    for dim, axes in zip(shape, dims):
      ways = math.prod(sizes[a] for a in axes)
      if dim % ways:
        raise ValueError(f"parameter {i} of shape {shape}: its sharding {sharding.spec} splits "
                         f"a dimension of {dim} {ways} ways, which does not divide it")
      for a in axes:
        where[a] = len(split_shape)
        split_shape.append(sizes[a])
      split_shape.append(dim // ways)
    axes = tuple(a for a in mesh_order if a in where)
    front = tuple(where[a] for a in axes)
    perm = front + tuple(d for d in range(len(split_shape)) if d not in front)
    ways = tuple(sizes[a] for a in axes)
    key = (jnp.dtype(leaf.dtype).name, bool(decay), axes)
    members.setdefault(key, []).append(
        _Leaf(i, shape, tuple(split_shape), perm, math.prod(shape) // math.prod(ways)))
  groups = []
  for (dtype, decay, axes), group_leaves in sorted(members.items()):
    name = f"{dtype}_{'decay' if decay else 'no_decay'}" + ("_by_" + "_".join(axes) if axes
                                                            else "")
    ways = tuple(group_leaves[0].split_shape[d] for d in group_leaves[0].perm[:len(axes)])
    sharding = None if mesh is None else NamedSharding(mesh, P(*axes, None))
    groups.append(_Group(name, jnp.dtype(dtype), decay, axes, ways, tuple(group_leaves),
                         sharding))
  return groups, treedef


def _concat(leaves, group: _Group) -> jax.Array:
  """The group's buffer of `leaves` (a flat list of arrays shaped as the parameters)."""
  rank = len(group.ways)
  parts = [_transpose(leaves[leaf.index].reshape(leaf.split_shape), leaf.perm)
           .reshape(group.ways + (leaf.size,)).astype(group.dtype) for leaf in group.leaves]
  flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=rank)
  return flat if group.sharding is None else jax.lax.with_sharding_constraint(flat, group.sharding)


def _split(flat: dict[str, jax.Array], groups: list[_Group], treedef, like):
  """The parameter tree (`like`'s structure) from its groups' buffers."""
  like_leaves = treedef.flatten_up_to(like)
  out = [None] * len(like_leaves)
  for g in groups:
    offset, rank = 0, len(g.ways)
    for leaf in g.leaves:
      part = jax.lax.slice_in_dim(flat[g.name], offset, offset + leaf.size, axis=rank)
      moved = tuple(leaf.split_shape[d] for d in leaf.perm)
      out[leaf.index] = _transpose(part.reshape(moved), _inverse(leaf.perm)).reshape(
          leaf.shape)
      offset += leaf.size
  return treedef.unflatten(out)


def _transpose(x, perm):
  # replicated leaves (identity): the plain reshapes of the 1-D layout, no transpose op at all
  return x if perm == tuple(range(len(perm))) else jnp.transpose(x, perm)


def _inverse(perm):
  inverse = [0] * len(perm)
  for position, d in enumerate(perm):
    inverse[d] = position
  return tuple(inverse)


def _sq_norm(buffers) -> jax.Array:
  return sum(jnp.sum(jnp.square(b.astype(jnp.float32))) for b in buffers)


class FusedAdamW(NamedTuple):
  """AdamW + global-norm clipping + masked weight decay on flat buffers (`optimizer.fused`).

  The same arithmetic as `make_optimizer`'s optax chain (clip_by_global_norm, adamw with the
  schedule and the weight-decay mask), but with the parameters grouped by (dtype, decays, the
  mesh axes that split them) and each group's gradients, parameters and moments handled as one
  buffer: the norms, the clipping, the moment updates, the decay (a per-group constant: no mask
  array) and the finite guard's selects are a few kernels per group instead of several per
  parameter leaf, which on a GPU are hundreds of launches of tiny kernels (launch-bound; issue
  20). The concatenation of the gradients and the split of the new parameters back into the tree
  are one memory pass each.

  Decisions:
  - The moments live as group buffers (`FusedAdamWState`) in memory; checkpoints store them as
    trees like the parameters (`fused_state_to_tree`, `state.FusedCheckpointForm`: one array
    per parameter in the parameter's sharding), so orbax reshards them on restore as it does
    the parameters and `fused_state_from_tree` packs them into the layout of the mesh that
    resumes: a fused checkpoint resumes on any mesh (fsdp / tensor sizes may change). The per-leaf
    chain holds the same moments (trees like the parameters) and counts equal to the fused
    count, so a resume across a changed `optimizer.fused` converts the checkpoint's state at
    the restore boundary (`chain_state_to_fused_tree` / `fused_tree_to_chain_state`, used by
    both checkpoint forms in `state`), exactly, either way and on any mesh.
  - Sharded parameters (fsdp, tensor): `on_shardings(param_shardings)` lays the buffers out
    after the parameters' NamedShardings (`state.place_optimizer` does it for a mesh). A leaf
    whose dimensions are split over mesh axes a1..ak (in the mesh's order) has each split
    dimension reshaped to (shards, rest), the shard dimensions moved to the front and the rest
    flattened: [size(a1), ..., size(ak), n], so each device's block of the leaf stays whole and
    in place; the leaves of a group are concatenated along the last axis into a buffer sharded
    P(a1, ..., ak, None). Concatenation, split, moments and selects are then local to each
    device: the update moves no data between devices (the norms are global sums: one small
    all-reduce each, as in the per-leaf path). Replicated leaves keep the 1-D buffers named
    '<dtype>_<decay|no_decay>'. The buffers' shapes depend on the sizes of the splitting mesh
    axes, hence the checkpoints' tree form above. Without `on_shardings` every parameter
    counts as replicated, and `state.state_shardings` refuses a mesh that splits them.
  - The global gradient norm (clipping, metrics) is summed in float32 whatever the dtype (optax
    sums bfloat16 leaves in bfloat16); every elementwise step runs in the group's dtype, as
    optax's does per leaf, so float32 parameters get the per-leaf results to rounding.
  - The train step calls `guarded_update`, which applies the update to the flat parameters and
    selects between old and new (parameters, moments, count) on the flat buffers with the
    step's accept(grad_norm, update_norm, param_norm) decision; `init`/`update` keep the optax
    GradientTransformation interface for everything else.
  """
  init: Callable
  update: Callable
  guarded_update: Callable
  # (param_shardings) -> the same optimizer with its buffers laid out after these shardings
  on_shardings: Callable
  # (abstract params) -> the FusedAdamWState of NamedShardings (its buffers' layout)
  state_shardings: Callable
  param_shardings: Any = None   # what the layout follows (None: every parameter replicated)
  # (params) -> (its groups, its treedef): the buffers' layout (`_layout` for these shardings)
  layout: Callable | None = None


def fused_adamw(opt_cfg, schedule: optax.Schedule, param_shardings=None) -> FusedAdamW:
  """The `FusedAdamW` of `opt_cfg` (see its docstring); `schedule(count)` is the learning rate.

  param_shardings: the parameters' NamedShardings (a tree like the parameters); None: all
  replicated (one device or data parallelism).
  """
  b1, b2, eps = float(opt_cfg.b1), float(opt_cfg.b2), float(opt_cfg.eps)
  clip, wd = float(opt_cfg.clip_norm), float(opt_cfg.weight_decay)
  decay_embeddings = bool(opt_cfg.decay_embeddings)
  layout = lambda params: _layout(params, decay_embeddings, param_shardings)

  def init(params):
    groups, _ = layout(params)
    zeros = {g.name: jnp.zeros(g.shape, g.dtype) for g in groups}
    return FusedAdamWState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=dict(zeros))

  def state_shardings(params):
    groups, _ = layout(params)
    if param_shardings is None:
      raise ValueError("FusedAdamW.state_shardings needs an optimizer laid out for shardings "
                       "(on_shardings)")
    replicated = NamedSharding(groups[0].sharding.mesh, P()) if groups else None
    by_name = {g.name: g.sharding for g in groups}
    return FusedAdamWState(count=replicated, mu=by_name, nu=dict(by_name))

  def flat_update(grads, state: FusedAdamWState, params):
    """(flat updates, flat params, new state, grad_norm): optax's chain on the groups."""
    groups, treedef = layout(params)
    g_leaves, p_leaves = treedef.flatten_up_to(grads), treedef.flatten_up_to(params)
    flat_g = {g.name: _concat(g_leaves, g) for g in groups}
    flat_p = {g.name: _concat(p_leaves, g) for g in groups}
    grad_norm = jnp.sqrt(_sq_norm(flat_g.values()))
    count_inc = optax.safe_increment(state.count)
    # the corrections in float32 before the cast, as optax.tree.bias_correction (b**count in
    # bfloat16 rounds to 1)
    correction1, correction2 = 1 - b1 ** count_inc, 1 - b2 ** count_inc
    step_size = -schedule(state.count)
    updates, mu, nu = {}, {}, {}
    for g in groups:
      grad, p = flat_g[g.name], flat_p[g.name]
      if clip > 0:
        grad = jax.lax.select(grad_norm < clip, grad,
                              (grad / grad_norm.astype(g.dtype)) * clip)
      m = (1 - b1) * grad + b1 * state.mu[g.name]
      v = (1 - b2) * (grad ** 2) + b2 * state.nu[g.name]
      u = (m / correction1.astype(g.dtype)) / (jnp.sqrt(v / correction2.astype(g.dtype)) + eps)
      if g.decay and wd:
        u = u + wd * p
      updates[g.name] = jnp.array(step_size, dtype=g.dtype) * u
      mu[g.name], nu[g.name] = m.astype(g.dtype), v.astype(g.dtype)
    return updates, flat_p, FusedAdamWState(count_inc, mu, nu), grad_norm, (groups, treedef)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("the fused AdamW needs the parameters (weight decay, the flat layout)")
    updates, _, new_state, _, (groups, treedef) = flat_update(grads, state, params)
    return _split(updates, groups, treedef, params), new_state

  def guarded_update(grads, state, params, accept):
    """(new params, new state, grad_norm, update_norm, param_norm, accepted).

    accept(grad_norm, update_norm, param_norm) -> bool scalar: whether the update is applied;
    if not, parameters and state come back unchanged.
    """
    updates, flat_p, new_state, grad_norm, (groups, treedef) = flat_update(grads, state, params)
    update_norm = jnp.sqrt(_sq_norm(updates.values()))
    param_norm = jnp.sqrt(_sq_norm(flat_p.values()))
    ok = accept(grad_norm, update_norm, param_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_flat = {k: jnp.where(ok, (flat_p[k] + updates[k]).astype(flat_p[k].dtype), flat_p[k])
                for k in flat_p}
    return (_split(new_flat, groups, treedef, params), keep(new_state, state), grad_norm,
            update_norm, param_norm, ok)

  return FusedAdamW(init, update, guarded_update,
                    lambda shardings: fused_adamw(opt_cfg, schedule, shardings),
                    state_shardings, param_shardings, layout)


def fused_state_to_tree(optimizer: FusedAdamW, state: FusedAdamWState, params_like
                        ) -> FusedAdamWState:
  """The checkpoint form of a fused state: mu and nu as trees like `params_like` (one array per
  parameter, of its shape and dtype), the count as it is. Pure data movement (slices, reshapes,
  transposes; within each device's blocks for split groups): `fused_state_from_tree` gives the
  buffers back bit for bit. params_like: the parameters or their ShapeDtypeStructs."""
  groups, treedef = optimizer.layout(params_like)
  return FusedAdamWState(state.count, _split(state.mu, groups, treedef, params_like),
                         _split(state.nu, groups, treedef, params_like))


def fused_state_from_tree(optimizer: FusedAdamW, tree_state: FusedAdamWState, params_like
                          ) -> FusedAdamWState:
  """The inverse of `fused_state_to_tree`: the per-parameter moments packed into `optimizer`'s
  buffers (its layout, for the mesh it was placed on, whatever mesh wrote them)."""
  groups, treedef = optimizer.layout(params_like)

  def pack(tree):
    leaves = treedef.flatten_up_to(tree)
    return {g.name: _concat(leaves, g) for g in groups}

  return FusedAdamWState(tree_state.count, pack(tree_state.mu), pack(tree_state.nu))


def chain_state_to_fused_tree(chain_state) -> FusedAdamWState:
  """The fused optimizer's checkpoint form (`fused_state_to_tree`'s) of a state of
  `make_optimizer`'s per-leaf chain: its adam moments as they are (trees like the parameters, of
  their dtypes) and its count. Pure restructuring (no arithmetic), so it also maps abstract
  states (ShapeDtypeStructs with shardings).

  The chain's state is (clip_by_global_norm or identity: EmptyState, adamw: (ScaleByAdamState(
  count, mu, nu), MaskedState(EmptyState) of the masked decay, ScaleByScheduleState(count))). Its
  two counts advance together (a rejected step keeps the whole state), as the fused count does
  for both the bias correction and the schedule; `chain_counts` reads them for a check.
  """
  return FusedAdamWState(*_adam_state(chain_state))


def fused_tree_to_chain_state(tree_state: FusedAdamWState):
  """The per-leaf chain's state (see `chain_state_to_fused_tree`) of a fused checkpoint form:
  the moments as they are, its count as both the adam and the schedule count. Pure
  restructuring; the two counts are one value, so run it under jit (the checkpoint forms do) to
  get the separate buffers a donating train step needs."""
  count = tree_state.count
  return (optax.EmptyState(),
          (optax.ScaleByAdamState(count, tree_state.mu, tree_state.nu),
           optax.MaskedState(inner_state=optax.EmptyState()), optax.ScaleByScheduleState(count)))


def is_chain_state(state) -> bool:
  """Whether `state` has the structure of `make_optimizer`'s per-leaf chain state."""
  try:
    _adam_state(state)
  except ValueError:
    return False
  return True


def chain_counts(chain_state) -> tuple[Any, Any]:
  """(adam's count, the schedule's count) of a per-leaf chain state."""
  _adam_state(chain_state)
  return chain_state[1][0].count, chain_state[1][2].count


def _adam_state(chain_state) -> optax.ScaleByAdamState:
  pair = isinstance(chain_state, tuple) and len(chain_state) == 2
  parts = chain_state[1] if pair else None
  if not (pair and isinstance(chain_state[0], optax.EmptyState)
          and isinstance(parts, tuple) and len(parts) == 3
          and isinstance(parts[0], optax.ScaleByAdamState)
          and isinstance(parts[1], optax.MaskedState)
          and isinstance(parts[1].inner_state, optax.EmptyState)
          and isinstance(parts[2], optax.ScaleByScheduleState)):
    raise ValueError(f"not a state of make_optimizer's per-leaf chain (clip, adamw with a "
                     f"masked decay and a schedule): {jax.tree.structure(chain_state)}")
  return parts[0]


def check_fused_shardings(optimizer: FusedAdamW, param_shardings) -> None:
  """Raises ValueError unless `optimizer`'s buffers are laid out for `param_shardings`: the
  shardings it was given by `on_shardings` (or, without them, replicated parameters)."""
  flat = lambda tree: (traverse_util.flatten_dict(tree) if isinstance(tree, dict) else
                       {(str(i),): s for i, s in enumerate(jax.tree.leaves(tree))})
  wanted = flat(param_shardings)
  laid_out = ({} if optimizer.param_shardings is None else flat(optimizer.param_shardings))
  differ = [k for k in sorted(set(wanted) | set(laid_out), key=str)
            if _split_axes(wanted.get(k)) != _split_axes(laid_out.get(k))]
  if differ:
    name, sharding = "/".join(map(str, differ[0])), wanted.get(differ[0])
    raise ValueError(
        f"config.optimizer.fused=True lays its buffers out after the parameters' shardings, but "
        f"{len(differ)} parameters are sharded otherwise than it was laid out for (e.g. {name}: "
        f"{getattr(sharding, 'spec', sharding)}); build it for these shardings with "
        f"state.place_optimizer(init_params, optimizer, mesh) or "
        f"optimizer.on_shardings(param_shardings)")


def _split_axes(sharding):
  """(mesh, (dimension, mesh axis, its size) for every split): what a leaf's layout follows."""
  if sharding is None:
    return None
  dims, sizes = _leaf_axes((0,) * len(sharding.spec), sharding)
  splits = tuple((d, a, sizes[a]) for d, axes in enumerate(dims) for a in axes)
  return (sharding.mesh, splits) if splits else None
