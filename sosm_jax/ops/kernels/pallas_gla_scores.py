"""GLA intra-chunk score kernels (the previous GLA Pallas path, PATH = "legacy" in pallas_gla.py).

    A[t, i] = sum_d q[t, d] k[i, d] exp(G[t, d] - G[i, d])   for i <= t within a chunk, else 0

(G is the within-chunk cumulative log-decay). One program per (batch*head, chunk) writes the
`[C, C]` block sub-block by sub-block (16 tokens): below the diagonal through a matmul with a
reference point (the token before the query sub-chunk), so that both factors are exp of
non-positive numbers; on the diagonal exactly, one key column at a time, so nothing overflows
however strong the decay. The backward kernel returns dq, dk; dG = q*dq - k*dk (A depends on G
only through G[t] - G[i]). `interpret=True` runs on CPU (tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sosm_jax.ops.kernels.pallas_recurrence import _compiler_params, _dot

_F32 = jnp.float32


def _sub(c):
  s = min(16, c)
  if c % s or s & (s - 1):
    raise ValueError(f"pallas gla: chunk_size {c} must be a power of two >= 16 or < 16.")
  return s


_LOG2E = 1.4426950408889634
UNROLL = False  # unroll the 16-step diagonal loops on the GPU (benchmarks/kernels.py sweeps it)


def _exp(x, fast):
  """exp; on the GPU one ex2.approx instruction (libdevice expf is several): exp(-inf) = 0."""
  if not fast:
    return jnp.exp(x)
  from jax.experimental.pallas import triton as plt  # pylint: disable=import-outside-toplevel
  [y] = plt.elementwise_inline_asm(
      "ex2.approx.ftz.f32 $0, $1;", args=[x * _LOG2E], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, _F32)])
  return y


def _loop(n, body, init, unroll):
  """fori_loop(0, n, body, init); unrolled in Python (static index) when compiling for the GPU,
  where the Pallas Triton lowering has no unroll option and straight-line code hides load latency."""
  if not unroll:
    return lax.fori_loop(0, n, body, init)
  for j in range(n):
    init = body(j, init)
  return init


def _load_rows(ref, row0, s):
  return ref[pl.ds(row0, s), :]


def _sub_block(q_ref, g_ref, sub):
  """This program's sub-block (program 2): (p, row0, q f32 `[sub, K]`, gam `[sub, K]`, gam of the
  token before it `[K]`, the reference point that keeps every exponent <= 0)."""
  p = pl.program_id(2)
  row0 = p * sub
  q = _load_rows(q_ref, row0, sub).astype(_F32)
  return p, row0, q, _load_rows(g_ref, row0, sub), g_ref[jnp.maximum(row0 - 1, 0), :]


def _earlier_keys(k_ref, g_ref, r, sub, gref, dt):
  """Keys of sub-block r decayed to the reference point: k e^(gref - gam), `[sub, K]` in dt."""
  return (_load_rows(k_ref, r * sub, sub).astype(_F32)
          * jnp.exp(gref[None, :] - _load_rows(g_ref, r * sub, sub))).astype(dt)


def _fwd_kernel(q_ref, k_ref, g_ref, a_ref, *, chunk, sub, unroll, diag=None):
  """Row block p (= program 2) of the chunk's scores: [sub, chunk]. `diag(q_ref, k_ref, g_ref,
  row0, q, g) -> [sub, sub]` replaces the exact column-by-column diagonal block when given."""
  dt = q_ref.dtype
  nb = chunk // sub
  p, row0, q, g, gref = _sub_block(q_ref, g_ref, sub)
  qg = (q * jnp.exp(g - gref[None, :])).astype(dt)

  def past(r, carry):
    kg = _earlier_keys(k_ref, g_ref, r, sub, gref, dt)
    a_ref[:, pl.ds(r * sub, sub)] = _dot(qg, kg, tb=True).astype(a_ref.dtype)
    return carry

  lax.fori_loop(0, p, past, 0)

  def future(r, carry):
    a_ref[:, pl.ds(r * sub, sub)] = jnp.zeros((sub, sub), a_ref.dtype)
    return carry

  lax.fori_loop(p + 1, nb, future, 0)

  if diag is not None:
    a_ref[:, pl.ds(row0, sub)] = diag(q_ref, k_ref, g_ref, row0, q, g).astype(a_ref.dtype)
    return
  trow = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)

  def diag_column(j, carry):              # column j of the diagonal block, stored directly
    kj = k_ref[row0 + j, :].astype(_F32)
    gj = g_ref[row0 + j, :]
    e = _exp(jnp.where(trow >= j, g - gj[None, :], -jnp.inf), unroll)
    a_ref[:, row0 + j] = jnp.sum(q * kj[None, :] * e, axis=1).astype(a_ref.dtype)
    return carry

  _loop(sub, diag_column, 0, unroll and UNROLL)


def intra_grads(q_ref, k_ref, g_ref, da_ref, *, chunk, sub, unroll, diag=None):
  """(dq, dk) `[sub, K]` f32 of sub-chunk p (= program 2) from the chunk's score
  cotangent da_ref `[chunk, chunk]`; q_ref, k_ref, g_ref hold the chunk's rows `[chunk, K]`.
  `diag(q_ref, k_ref, g_ref, da_ref, row0, q, g, dq, dk) -> (dq, dk)` adds the diagonal block's
  share instead of the exact loops when given."""
  dt = q_ref.dtype
  nb = chunk // sub
  p, row0, q, g, gref = _sub_block(q_ref, g_ref, sub)
  kdim = q.shape[-1]

  def past(r, acc):                       # dq from keys of earlier sub-chunks
    kg = _earlier_keys(k_ref, g_ref, r, sub, gref, dt)
    return acc + _dot(da_ref[pl.ds(row0, sub), pl.ds(r * sub, sub)].astype(dt), kg)

  dq = lax.fori_loop(0, p, past, jnp.zeros((sub, kdim), _F32)) * jnp.exp(g - gref[None, :])

  def later(r, acc):                      # dk from queries of later sub-chunks
    gr = g_ref[r * sub - 1, :]
    qg = (_load_rows(q_ref, r * sub, sub).astype(_F32)
          * jnp.exp(_load_rows(g_ref, r * sub, sub) - gr[None, :])).astype(dt)
    part = _dot(da_ref[pl.ds(r * sub, sub), pl.ds(row0, sub)].astype(dt), qg, ta=True)
    return acc + part * jnp.exp(gr[None, :] - g)

  dk = lax.fori_loop(p + 1, nb, later, jnp.zeros((sub, kdim), _F32))
  if diag is not None:
    return diag(q_ref, k_ref, g_ref, da_ref, row0, q, g, dq, dk)

  trow = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)

  def diag_dq(j, dq):                     # dq[t] += dA[t, j] k_j exp(G_t - G_j), t >= j
    kj = k_ref[row0 + j, :].astype(_F32)
    gj = g_ref[row0 + j, :]
    e = _exp(jnp.where(trow >= j, g - gj[None, :], -jnp.inf), unroll)
    dcol = da_ref[pl.ds(row0, sub), row0 + j].astype(_F32)
    return dq + dcol[:, None] * kj[None, :] * e

  def diag_dk(t, dk):                     # dk[i] += dA[t, i] q_t exp(G_t - G_i), i <= t
    qt = q_ref[row0 + t, :].astype(_F32)
    gt = g_ref[row0 + t, :]
    e = _exp(jnp.where(trow <= t, gt[None, :] - g, -jnp.inf), unroll)
    drow = da_ref[row0 + t, pl.ds(row0, sub)].astype(_F32)
    return dk + drow[:, None] * qt[None, :] * e

  return (_loop(sub, diag_dq, dq, unroll and UNROLL), _loop(sub, diag_dk, dk, unroll and UNROLL))


def _bwd_kernel(q_ref, k_ref, g_ref, da_ref, dq_ref, dk_ref, *, chunk, sub, unroll):
  """dq, dk of sub-chunk p (= program 2) from the chunk's score cotangent [chunk, chunk]."""
  dq_ref[...], dk_ref[...] = intra_grads(q_ref, k_ref, g_ref, da_ref, chunk=chunk, sub=sub,
                                         unroll=unroll)


def _chunk_spec(c, width):
  return pl.BlockSpec((None, c, width), lambda i, n, p: (i, n, 0))


def _row_spec(c, sub, width):
  return pl.BlockSpec((None, sub, width), lambda i, n, p: (i, n * (c // sub) + p, 0))


@functools.partial(jax.jit, static_argnames=("chunk", "interpret", "num_warps", "num_stages"))
def scores_forward(q, k, g, *, chunk, interpret=False, num_warps=4, num_stages=1):
  """q, k `[BH, T, K]` (T a multiple of chunk), g `[BH, T, K]` f32 -> A `[BH, T, chunk]` f32."""
  bh, t, kdim = q.shape
  sub = _sub(chunk)
  spec = _chunk_spec(chunk, kdim)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, chunk=chunk, sub=sub, unroll=not interpret), grid=(bh, t // chunk, chunk // sub),
      in_specs=[spec, spec, spec], out_specs=_row_spec(chunk, sub, chunk),
      out_shape=jax.ShapeDtypeStruct((bh, t, chunk), _F32), interpret=interpret,
      compiler_params=None if interpret else _compiler_params(num_warps, num_stages),
      name="gla_scores_fwd")(q, k, g.astype(_F32))


@functools.partial(jax.jit, static_argnames=("chunk", "interpret", "num_warps", "num_stages"))
def scores_backward(q, k, g, da, *, chunk, interpret=False, num_warps=4, num_stages=1):
  """Cotangent da `[BH, T, chunk]` -> (dq, dk) `[BH, T, K]` f32."""
  bh, t, kdim = q.shape
  sub = _sub(chunk)
  spec = _chunk_spec(chunk, kdim)
  out = jax.ShapeDtypeStruct((bh, t, kdim), _F32)
  rows = _row_spec(chunk, sub, kdim)
  return pl.pallas_call(
      functools.partial(_bwd_kernel, chunk=chunk, sub=sub, unroll=not interpret), grid=(bh, t // chunk, chunk // sub),
      in_specs=[spec, spec, spec, _chunk_spec(chunk, chunk)],
      out_specs=[rows, rows], out_shape=[out, out], interpret=interpret,
      compiler_params=None if interpret else _compiler_params(num_warps, num_stages),
      name="gla_scores_bwd")(q, k, g.astype(_F32), da.astype(_F32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gla_scores(q, k, g, chunk, interpret=False):
  """Causal intra-chunk scores (module docstring). q, k, g `[BH, T, K]` -> `[BH, T, chunk]` f32."""
  return scores_forward(q, k, g, chunk=chunk, interpret=interpret)


def _scores_fwd(q, k, g, chunk, interpret):
  return scores_forward(q, k, g, chunk=chunk, interpret=interpret), (q, k, g)


def _scores_bwd(chunk, interpret, res, da):
  q, k, g = res
  dq, dk = scores_backward(q, k, g, da, chunk=chunk, interpret=interpret)
  dg = q.astype(_F32) * dq - k.astype(_F32) * dk
  return dq.astype(q.dtype), dk.astype(k.dtype), dg.astype(g.dtype)


gla_scores.defvjp(_scores_fwd, _scores_bwd)
