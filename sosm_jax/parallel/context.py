"""Context parallelism: one sequence's time axis split over devices (recurrent and attention ops).

Layers name logical axes only; the mesh axes that 'activation_length' maps to under the active
rules (`rules.py`: the 'context' axis) are resolved here, as `per_shard` resolves batch and heads.
When the time axis is not split (no mesh, context = 1, or a length the axis does not divide) every
function here is the plain per-device call (`per_shard`).

Linear recurrences (`gla_across_context`, `delta_rule_across_context`). Device i of C holds tokens
[i T/C, (i+1) T/C). Over its segment the recurrence is an affine map of the state entering it,
S_out = A_i S_in + B_i, with B_i the final state from a zero start and A_i the segment's transition:
  GLA:        A_i = diag(prod_t f_t)            (the cumulative decay, per key channel)
  delta rule: A_i = prod_t alpha_t (I - beta_t k_t k_t^T)     (`[key_dim, key_dim]` per head)
Each device runs the op on its segment (the Pallas kernel on GPU), all-gathers the (A, B) pairs
over the context axes, composes the prefix in float32 (S_in of device i = the map of devices
0..i-1 applied to the initial state; C is small, so a sequential loop over C), and adds the
contribution of its incoming state to its outputs:
  GLA:        o_t += scale (q_t * exp(cumsum log f)_t) S_in
  delta rule: o_t += S_in^T q~_t,  q~_t = scale (A_{1..t})^T q_t
For the delta rule one op call gives o from zero, B, A and q~ together: the value columns are
extended by key_dim zero columns and the initial state by the identity (S0 = [0 | I]), so the
extra columns of the final state are A and those of the output q~. Cost: the op runs with
value_dim + key_dim columns (the WY solve is shared; about 1.5x the op at key = value dim),
instead of a second pass with the incoming state (2x). Gradients are JAX autodiff through the
shard_map and the collectives (all_gather transposes to a reduce-scatter).

Short convolutions (`conv_across_context`): each device receives the last width-1 inputs of the
previous device (ppermute) as its conv cache.

Attention (`attention_across_context`): an all-to-all turns the time split into a head split
(sequence -> head parallelism, as DeepSpeed-Ulysses / Megatron's all-to-all for GDN): device j of
N receives every device's tokens of its heads [j H/N, (j+1) H/N), runs the backend's own causal
attention over the whole sequence (cuDNN, splash, XLA or blockwise, packed documents through the
all-gathered segment ids, sliding window as configured), and a second all-to-all returns the
outputs to the time split. Each device does exactly 1/N of the causal work (T^2/2 x H/N): the load
is balanced by construction, with no query offset or mask arithmetic of our own. Gradients are
autodiff through the collectives (an all-to-all transposes to the reverse all-to-all).
Key/value heads travel with their query heads when N divides the KV heads (grouped-query
attention kept); otherwise each query head gets its key/value head repeated (k, v become
`[B, t, H, D]`) and the heads are zero-padded to a multiple of N (12 heads on 8 devices: 16, so
a quarter of the attention work is padding; N above the heads per tensor shard pads more).
Why not zig-zag query chunks against all-gathered KV (the alternative considered): on GPU the
fast kernel is cuDNN, whose JAX API has neither a query offset (bottom-right causal mask) nor a
differentiable log-sum-exp, so a device's two query chunks would either be computed as zero-filled
rows of the whole sequence (T^2/2 per device, what this replaced: no balance gained) or merged
from per-block calls with a backward written against cuDNN's private primitives; the plain-JAX
offset loop that takes an offset runs ~10x below cuDNN. The head split costs 4 all-to-alls of a
device's q, k, v, o forward (and 4 backward) instead of an all-gather of K and V, and needs
nothing from the kernels.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from sosm_jax.parallel.per_shard import per_shard, shard_axes, shard_call

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST
LENGTH = "activation_length"

Names = Sequence[str | None]


def _mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def context_split(args: Sequence, in_axes: Sequence[Names | None]):
  """(mesh, split) when the 'activation_length' dimension of `args` is split over devices under
  the active rules, else (None, None). split: logical name -> mesh axes (as `shard_axes`)."""
  mesh = _mesh()
  if mesh is None:
    return None, None
  split = shard_axes(args, in_axes, mesh)
  if not split.get(LENGTH):
    return None, None
  return mesh, split


def combine_segments(transition: jax.Array, local_final: jax.Array, initial_state, axis,
                     diagonal: bool) -> tuple[jax.Array, jax.Array]:
  """(state entering this device's segment, state after the last segment), both float32.

  Args:
    transition: this device's A: `[B, H, K]` (diagonal) or `[B, H, K, K]`.
    local_final: this device's B `[B, H, K, V]` (final state from a zero start).
    initial_state: `[B, H, K, V]` or None (zeros): the state entering device 0.
    axis: the mesh axes of the time split (inside shard_map).
    diagonal: A is a diagonal (GLA) rather than a full matrix (delta rule).
  """
  a_all = lax.all_gather(transition.astype(_F32), axis, axis=0, tiled=False)   # [C, ...]
  b_all = lax.all_gather(local_final.astype(_F32), axis, axis=0, tiled=False)
  s = jnp.zeros_like(b_all[0]) if initial_state is None else initial_state.astype(_F32)
  incoming = []
  for j in range(a_all.shape[0]):
    incoming.append(s)
    if diagonal:
      s = a_all[j][..., None] * s + b_all[j]
    else:
      s = jnp.einsum("bhkj,bhjv->bhkv", a_all[j], s, precision=_HIGHEST) + b_all[j]
  s_in = jnp.stack(incoming)[lax.axis_index(axis)]
  return s_in, s


def cumsum_time(x: jax.Array, chunk: int = 64) -> jax.Array:
  """Cumulative sum over axis 1 `[B, T, ...]` as sums within chunks plus a scan of chunk totals:
  two short scans (fp32 rounding grows with the chunk and T/chunk, not with T)."""
  b, t = x.shape[:2]
  if t <= chunk or t % chunk:
    return jnp.cumsum(x, axis=1)
  inner = jnp.cumsum(x.reshape((b, t // chunk, chunk) + x.shape[2:]), axis=2)
  totals = inner[:, :, -1]
  before = jnp.cumsum(totals, axis=1) - totals                     # exclusive prefix of chunks
  return (inner + before[:, :, None]).reshape(x.shape)


_STATE = ("activation_batch", "activation_heads", None, None)
_BTH = ("activation_batch", LENGTH, "activation_heads")
_BTHD = _BTH + (None,)


def gla_across_context(run: Callable, q, k, v, log_f, initial_state, *, scale: float = 1.0):
  """Gated linear attention with the time axis split over the context axes.

  Args:
    run: (q, k, v, log_f, initial_state) -> (o, final_state), the op on one device's arrays
      (e.g. `sosm_jax.ops.gla` with its implementation and chunk size bound) at this `scale`.
    q, k, log_f: `[B, T, H, K]`; v: `[B, T, H, V]`; initial_state `[B, H, K, V]` or None.
  Returns:
    (o `[B, T, H, V]` in v's dtype, final_state `[B, H, K, V]` float32), equal to run(...) on
    the whole sequence.
  """
  args = (q, k, v, log_f, initial_state)
  in_axes = (_BTHD,) * 4 + (_STATE,)
  mesh, split = context_split(args, in_axes)
  if mesh is None:
    return per_shard(run, args, in_axes, (_BTHD, _STATE))
  axis = split[LENGTH]

  def local(q, k, v, log_f, s0):
    o, b_local = run(q, k, v, log_f, None)
    cum = cumsum_time(log_f.astype(_F32))                          # [B, t, H, K], <= 0
    s_in, final = combine_segments(jnp.exp(cum[:, -1]), b_local, s0, axis, diagonal=True)
    q_in = q.astype(_F32) * jnp.exp(cum)
    extra = scale * jnp.einsum("bthk,bhkv->bthv", q_in, s_in, precision=_HIGHEST)
    return (o.astype(_F32) + extra).astype(v.dtype), final

  return shard_call(local, mesh, split, args, in_axes, (_BTHD, _STATE))


def delta_rule_across_context(run: Callable, q, k, v, g, beta, initial_state):
  """Gated delta rule with the time axis split over the context axes.

  Args:
    run: (q, k, v, g, beta, initial_state) -> (o, final_state), the op on one device's arrays
      (e.g. `sosm_jax.ops.gated_delta_rule` with its implementation and scale bound); it must
      accept a value dim of V + K (the transition rides along as extra value columns).
    q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; g, beta: `[B, T, H]`; initial_state `[B, H, K, V]`
      or None.
  Returns:
    (o `[B, T, H, V]` in v's dtype, final_state `[B, H, K, V]` float32), equal to run(...) on
    the whole sequence.
  """
  args = (q, k, v, g, beta, initial_state)
  in_axes = (_BTHD,) * 3 + (_BTH,) * 2 + (_STATE,)
  mesh, split = context_split(args, in_axes)
  if mesh is None:
    return per_shard(run, args, in_axes, (_BTHD, _STATE))
  axis = split[LENGTH]

  def local(q, k, v, g, beta, s0):
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    v_ext = jnp.concatenate([v, jnp.zeros((b, t, h, dk), v.dtype)], axis=-1)
    eye = jnp.broadcast_to(jnp.eye(dk, dtype=_F32), (b, h, dk, dk))
    s_ext = jnp.concatenate([jnp.zeros((b, h, dk, dv), _F32), eye], axis=-1)
    o_ext, f_ext = run(q, k, v_ext, g, beta, s_ext)
    o, q_tilde = o_ext[..., :dv], o_ext[..., dv:]                  # q~_t = scale A_{1..t}^T q_t
    b_local, a = f_ext[..., :dv], f_ext[..., dv:]                  # [B,H,K,V], [B,H,K,K]
    s_in, final = combine_segments(a, b_local, s0, axis, diagonal=False)
    extra = jnp.einsum("bthk,bhkv->bthv", q_tilde.astype(_F32), s_in, precision=_HIGHEST)
    return (o.astype(_F32) + extra).astype(v.dtype), final

  return shard_call(local, mesh, split, args, in_axes, (_BTHD, _STATE))


def conv_across_context(conv: Callable, x, positions, cache, width: int):
  """A causal short convolution with the time axis split over the context axes.

  Args:
    conv: (x, positions, cache) -> (y, new_cache) on one device's arrays, e.g.
      `sosm_jax.ops.conv.causal_conv1d` with its weight bound; cache `[B, width-1, C]` or None.
    x: `[B, T, C]`; positions: `[B, T]` (document positions; packed documents) or None.
    width: the conv width; every device's segment must hold at least width-1 tokens.
  Returns:
    (y `[B, T, C]`, new_cache `[B, width-1, C]`: the last width-1 inputs of the sequence, or None
    when cache is None).
  """
  names = ("activation_batch", LENGTH, None)
  args = (x, positions, cache)
  in_axes = (names, names[:2], ("activation_batch", None, None))
  mesh, split = context_split(args, in_axes)
  if mesh is None:
    return conv(x, positions, cache)
  axis = split[LENGTH]
  n = math.prod(mesh.shape[a] for a in axis)
  if x.shape[1] // n < width - 1:
    raise ValueError(f"conv_across_context: {x.shape[1] // n} tokens per device is fewer than the "
                     f"conv width - 1 = {width - 1}; use a smaller mesh.context or longer "
                     f"sequences")

  def local(x, pos, c):
    tail = x[:, x.shape[1] - (width - 1):]
    received = lax.ppermute(tail, axis, [(i, i + 1) for i in range(n - 1)])
    first = lax.axis_index(axis) == 0
    if c is not None:
      received = jnp.where(first, c.astype(x.dtype), received)
    y, _ = conv(x, pos, received)
    if c is None:
      return y, jnp.zeros((x.shape[0], width - 1, x.shape[2]), x.dtype)
    last = lax.axis_index(axis) == n - 1
    new_cache = lax.psum(jnp.where(last, tail, jnp.zeros_like(tail)).astype(_F32), axis)
    return y, new_cache.astype(c.dtype)

  y, new_cache = shard_call(local, mesh, split, args, in_axes,
                          (names, ("activation_batch", None, None)))
  return y, (None if cache is None else new_cache)


def _pad_heads(x: jax.Array, extra: int) -> jax.Array:
  """`[B, T, H, D]` -> `[B, T, H + extra, D]` with zero heads at the end."""
  return jnp.pad(x, [(0, 0), (0, 0), (0, extra), (0, 0)]) if extra else x


def attention_across_context(attend: Callable, q, k, v, segment_ids):
  """Causal attention with the time axis split over the context axes (all-to-all to heads).

  Args:
    attend: (q, k, v, segment_ids) -> o, the causal attention of a whole sequence on one device's
      heads (`sosm_jax.ops.attention.causal_attention` with its implementation, window and block
      bound): q `[B, T, h, D]`, k, v `[B, T, kv, D]` (h a multiple of kv), segment ids `[B, T]`
      or None.
    q: `[B, T, H, D]`; k, v: `[B, T, KV, D]`; segment_ids `[B, T]` (packed documents) or None.
  Returns:
    o `[B, T, H, D]`, or None when the time axis is not split here (the caller runs its own
    single-device path).
  """
  qkv = ("activation_batch", LENGTH, "activation_heads", None)
  args = (q, k, v, segment_ids)
  in_axes = (qkv, qkv, qkv, qkv[:2])
  mesh, split = context_split(args, in_axes)
  if mesh is None:
    return None
  axis = split[LENGTH]
  n = math.prod(mesh.shape[a] for a in axis)

  def local(q, k, v, seg):
    h, kv = q.shape[2], k.shape[2]
    if kv % n:                        # KV heads do not split: one key/value head per query head
      k, v = (jnp.repeat(x, h // kv, axis=2) for x in (k, v))
      q, k, v = (_pad_heads(x, -h % n) for x in (q, k, v))
    to_heads = lambda x: lax.all_to_all(x, axis, 2, 1, tiled=True)    # [B,t,H,D] -> [B,T,H/n,D]
    whole = None if seg is None else lax.all_gather(seg, axis, axis=1, tiled=True)
    o = attend(to_heads(q), to_heads(k), to_heads(v), whole)
    return (lax.all_to_all(o, axis, 1, 2, tiled=True)[:, :, :h],)     # back to [B,t,H,D]

  return shard_call(local, mesh, split, args, in_axes, (qkv,))[0]


def check_context_config(context: int, pattern: Sequence[str], seq_lens: Sequence[int],
                         memory_enabled: bool, conv_width: int = 4) -> None:
  """Raises ValueError naming the key when `mesh.context` > 1 cannot split this training run.

  Refused: 'graph' layers (their top-K edge search spans the whole sequence: not split yet) and
  host memory (its retrieval runs per window on the host); a stage length that the context size
  does not divide, or that leaves a device fewer tokens than a short conv's tail.
  """
  if context <= 1:
    return
  if "graph" in tuple(pattern):
    raise ValueError(f"mesh.context={context}: the 'graph' mixer in model.pattern "
                     f"{tuple(pattern)} does not run with its time axis split over devices; "
                     f"use --config.mesh.context=1 or a pattern without 'graph'")
  if memory_enabled:
    raise ValueError(f"mesh.context={context}: memory.enabled (host memory) does not run with "
                     f"the time axis split over devices; use --config.mesh.context=1 or "
                     f"--config.memory.enabled=False")
  for seq_len in seq_lens:
    if seq_len % context or seq_len // context < max(conv_width - 1, 1):
      raise ValueError(f"mesh.context={context}: curriculum.seq_lens entry {seq_len} does not "
                       f"split into {context} equal segments of at least {max(conv_width - 1, 1)} "
                       f"tokens; use lengths that are multiples of mesh.context")
