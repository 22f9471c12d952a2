"""AdamW with warmup then cosine or WSD decay, global-norm clipping and a weight-decay mask."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

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
  buffer), the first and second moments as 1-D buffers in the group's dtype."""
  count: jax.Array          # int32: updates applied (rejected steps excluded), as optax's counts
  mu: dict[str, jax.Array]
  nu: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class _Group:
  name: str                 # '<dtype>_decay' | '<dtype>_no_decay' (its key in mu / nu)
  dtype: Any
  decay: bool
  leaves: tuple[int, ...]   # indices into jax.tree.leaves(params), in that order
  sizes: tuple[int, ...]


def _layout(params, decay_embeddings: bool) -> tuple[list[_Group], Any]:
  """The groups of a parameter tree (from its shapes and dtypes only) and its treedef."""
  leaves, treedef = jax.tree.flatten(params)
  mask = treedef.flatten_up_to(weight_decay_mask(params, decay_embeddings))
  members: dict[tuple[str, bool], list[int]] = {}
  for i, (leaf, decay) in enumerate(zip(leaves, mask)):
    members.setdefault((jnp.dtype(leaf.dtype).name, bool(decay)), []).append(i)
  groups = [_Group(f"{dtype}_{'decay' if decay else 'no_decay'}", jnp.dtype(dtype), decay,
                   tuple(idx), tuple(math.prod(leaves[i].shape) for i in idx))
            for (dtype, decay), idx in sorted(members.items())]
  return groups, treedef


def _concat(leaves, group: _Group) -> jax.Array:
  parts = [leaves[i].reshape(-1).astype(group.dtype) for i in group.leaves]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _split(flat: dict[str, jax.Array], groups: list[_Group], treedef, like):
  """The parameter tree from its groups' flat buffers (leaves shaped as `like`'s)."""
  like_leaves = treedef.flatten_up_to(like)
  out = [None] * len(like_leaves)
  for g in groups:
    offset = 0
    for i, size in zip(g.leaves, g.sizes):
      out[i] = jax.lax.slice(flat[g.name], (offset,), (offset + size,)).reshape(
          like_leaves[i].shape)
      offset += size
  return treedef.unflatten(out)


def _sq_norm(buffers) -> jax.Array:
  return sum(jnp.sum(jnp.square(b.astype(jnp.float32))) for b in buffers)


class FusedAdamW(NamedTuple):
  """AdamW + global-norm clipping + masked weight decay on flat buffers (`optimizer.fused`).

  The same arithmetic as `make_optimizer`'s optax chain (clip_by_global_norm, adamw with the
  schedule and the weight-decay mask), but with the parameters grouped by (dtype, decays) and
  each group's gradients, parameters and moments handled as one 1-D buffer: the norms, the
  clipping, the moment updates, the decay (a per-group constant: no mask array) and the finite
  guard's selects are a few kernels per group instead of several per parameter leaf, which on a
  GPU are hundreds of launches of tiny kernels (launch-bound; issue 20). The concatenation of
  the gradients and the split of the new parameters back into the tree are one memory pass each.

  Decisions:
  - The moments live as flat buffers (`FusedAdamWState`), so the checkpoint's optimizer state
    has another layout than the per-leaf one; `resume.decide` refuses a resume across a changed
    `optimizer.fused` naming the key (the arrays are the same numbers, in another order).
  - Only for replicated parameters (one device, or a mesh with fsdp = tensor = 1: pure data
    parallelism). A flat buffer of leaves sharded in different ways would need gathers or a
    layout of its own per sharding; `check_fused_shardings` refuses other meshes with a clear
    error before anything compiles.
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


def fused_adamw(opt_cfg, schedule: optax.Schedule) -> FusedAdamW:
  """The `FusedAdamW` of `opt_cfg` (see its docstring); `schedule(count)` is the learning rate."""
  b1, b2, eps = float(opt_cfg.b1), float(opt_cfg.b2), float(opt_cfg.eps)
  clip, wd = float(opt_cfg.clip_norm), float(opt_cfg.weight_decay)
  decay_embeddings = bool(opt_cfg.decay_embeddings)

  def init(params):
    groups, _ = _layout(params, decay_embeddings)
    zeros = {g.name: jnp.zeros((sum(g.sizes),), g.dtype) for g in groups}
    return FusedAdamWState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=dict(zeros))

  def flat_update(grads, state: FusedAdamWState, params):
    """(flat updates, flat params, new state, grad_norm): optax's chain on the groups."""
    groups, treedef = _layout(params, decay_embeddings)
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

  return FusedAdamW(init, update, guarded_update)


def check_fused_shardings(param_shardings) -> None:
  """Raises ValueError unless every parameter is replicated (what `FusedAdamW` supports)."""
  flat = traverse_util.flatten_dict(param_shardings) if isinstance(param_shardings, dict) else {
      (str(i),): s for i, s in enumerate(jax.tree.leaves(param_shardings))}
  split = [("/".join(map(str, k)), s) for k, s in flat.items() if not s.is_fully_replicated]
  if split:
    name, sharding = split[0]
    raise ValueError(
        f"config.optimizer.fused=True keeps the optimizer state as flat buffers of replicated "
        f"parameters, but this mesh splits {len(split)} parameters (e.g. {name}: "
        f"{getattr(sharding, 'spec', sharding)}); use a mesh with fsdp=1 and tensor=1 (data "
        f"parallelism only) or --config.optimizer.fused=false")
