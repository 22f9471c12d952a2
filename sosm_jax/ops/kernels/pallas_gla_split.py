"""GLA (HGRN-2) Pallas path 'split': the work of a chunk split over small kernels by what it needs.

Same math as `pallas_gla.py` (per chunk: o = scale ((q e^gam) h + A v), A the causal intra-chunk
scores with per-key-channel decay, gam the within-chunk cumulative log-decay, h the state entering
the chunk). Each kernel reads and writes the caller's `[B, T, H, D]` layout, so no transposes run
in XLA. The custom VJP takes log_f itself (the cumulative sums are done in the kernels):

forward   prep: gam, kd = k e^(gam_C - gam), a = e^gam_C, one program per chunk
          recurrence (state per chunk, `pallas_gla.rec_forward`)
          scores A `[B*H, T, C]`, 16-row programs (`pallas_gla_scores`), kept for the backward
          output o = scale ((q e^gam) h + A v), one program per chunk (two matmuls)
backward  reverse recurrence (dh per chunk, `pallas_gla.rec_backward`)
          per chunk: dA = scale do v^T (causal), dv = scale A^T do + kd dh, and the state's
          shares of dq and dk (do h^T e^gam, v dh^T e^(gam_C - gam)) as 64-row matmuls
          per 16-row sub-block: dq, dk (intra-chunk part from dA, plus the shares) and the
          block's reverse cumulative sum of d gam; XLA adds what later blocks contribute

Diagonal 16 x 16 blocks never overflow however strong the decay: see DIAG.
`interpret=True` runs on CPU (tests). Measurements: NOTES.md beside this file.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sosm_jax.ops.kernels import pallas_gla, pallas_gla_scores
from sosm_jax.ops.kernels.pallas_recurrence import _compiler_params, _dot

_F32 = jnp.float32
TUNING = {"scores_warps": 2, "out_warps": 4, "dav_warps": 4, "dqk_warps": 4}
# Diagonal 16 x 16 blocks, of the scores (forward) and of their gradient: 'exact' walks all 16
# keys one at a time; 'split' takes the lower-left 8 x 8 quadrant as a matmul through the block's
# middle token (both factors exp of non-positive numbers) and walks only the two 8 x 8 diagonal
# quadrants, both at once (8 steps, not 16).
DIAG = {"scores": "split", "grads": "split"}


def _params(interpret, name):
  return None if interpret else _compiler_params(TUNING[name], 1)


def _chunk_rows(heads, c, width):
  """A chunk's rows of a `[B, T, H, width]` array; grid (batch*head, chunk, ...)."""
  return pl.BlockSpec((None, c, None, width), lambda i, n, *_: (i // heads, n, i % heads, 0))


def _sub_rows(heads, c, sub, width):
  """A 16-row sub-block of a `[B, T, H, width]` array; grid (batch*head, chunk, sub-block)."""
  nb = c // sub
  return pl.BlockSpec((None, sub, None, width),
                      lambda i, n, p: (i // heads, n * nb + p, i % heads, 0))


def _score_chunk(c):
  """A chunk's `[C, C]` block of `[B*H, T, C]` scores."""
  return pl.BlockSpec((None, c, c), lambda i, n, *_: (i, n, 0))


def _state(kdim, vdim):
  """The `[K, V]` state of a chunk in `[B*H, N*K, V]`."""
  return pl.BlockSpec((None, kdim, vdim), lambda i, n, *_: (i, n, 0))


# --------------------------------------------------------------------------- diagonal blocks


def _diag_scores(q_ref, k_ref, g_ref, row0, q, g, *, sub, fast):
  """DIAG 'split' scores of the diagonal block at rows row0.. -> `[sub, sub]` f32."""
  del q_ref
  k = k_ref[pl.ds(row0, sub), :].astype(_F32)
  return pallas_gla._diag_scores_split(k_ref, g_ref, row0, q, k, g, sub, fast, k_ref.dtype)  # pylint: disable=protected-access


def _diag_grads(q_ref, k_ref, g_ref, da_ref, row0, q, g, dq, dk, *, sub, fast):
  """DIAG 'split' share of the diagonal block in (dq, dk) `[sub, K]`, from dA `[C, C]`."""
  dt = k_ref.dtype
  hf = sub // 2
  k = k_ref[pl.ds(row0, sub), :].astype(_F32)
  lo, qfac, kfac, qf, kf = pallas_gla._halves(g_ref, row0, q, k, g, sub, dt)  # pylint: disable=protected-access
  trow = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)
  tcol = lax.broadcasted_iota(jnp.int32, (1, sub), 1)
  within = jnp.where(lo, trow, trow - hf)
  da = da_ref[pl.ds(row0, sub), pl.ds(row0, sub)]
  da_q = jnp.where(jnp.logical_not(lo) & (tcol < hf), da, 0.0).astype(dt)   # lower-left quadrant
  dq = dq + _dot(da_q, kf) * qfac
  dk = dk + _dot(da_q, qf, ta=True) * kfac
  paired = functools.partial(pallas_gla._paired_row, r0=row0, hf=hf, lo=lo)  # pylint: disable=protected-access
  lo1 = lax.broadcasted_iota(jnp.int32, (sub,), 0) < hf   # lo as a vector (no value slicing
  # in the Triton lowering)

  def step(j, carry):
    dq, dk = carry
    # dq[t] += dA[t, j'] k_j' e^(G_t - G_j'), j' = j (upper half) or hf + j (lower), j' <= t
    e = pallas_gla_scores._exp(jnp.where(within >= j, g - paired(g_ref, j=j), -jnp.inf), fast)  # pylint: disable=protected-access
    dcol = jnp.where(lo1, da_ref[pl.ds(row0, sub), row0 + j],
                     da_ref[pl.ds(row0, sub), row0 + hf + j]).astype(_F32)
    dq = dq + dcol[:, None] * paired(k_ref, j=j) * e
    # dk[i] += dA[t', i] q_t' e^(G_t' - G_i), t' = j or hf + j, i <= t'
    e = pallas_gla_scores._exp(jnp.where(within <= j, paired(g_ref, j=j) - g, -jnp.inf), fast)  # pylint: disable=protected-access
    drow = jnp.where(lo1, da_ref[row0 + j, pl.ds(row0, sub)],
                     da_ref[row0 + hf + j, pl.ds(row0, sub)]).astype(_F32)
    dk = dk + drow[:, None] * paired(q_ref, j=j) * e
    return dq, dk

  return pallas_gla_scores._loop(hf, step, (dq, dk), fast and pallas_gla_scores.UNROLL)  # pylint: disable=protected-access


def _diag_options(sub, interpret):
  """The `diag` arguments of the score kernels for DIAG (None: their exact loops)."""
  fast = not interpret
  split = lambda part: DIAG[part] == "split" and sub % 2 == 0
  return (functools.partial(_diag_scores, sub=sub, fast=fast) if split("scores") else None,
          functools.partial(_diag_grads, sub=sub, fast=fast) if split("grads") else None)


# --------------------------------------------------------------------------- forward


def _per_chunk(kdim):
  """One `[K]` row per chunk of a `[B*H, N, K]` array."""
  return pl.BlockSpec((None, None, kdim), lambda i, n: (i, n, 0))


def _prep_kernel(lf_ref, k_ref, g_ref, kd_ref, a_ref):
  lf = lf_ref[...]
  g = jnp.cumsum(lf, axis=0)                 # gam: within-chunk cumulative log-decay
  g_ref[...] = g
  g_end = jnp.sum(lf, axis=0)                # gam_C (a value slice does not lower to Triton)
  kd_ref[...] = (k_ref[...].astype(_F32) * jnp.exp(g_end[None, :] - g)).astype(kd_ref.dtype)
  a_ref[...] = jnp.exp(g_end)


def prepare(log_f, k, *, chunk, interpret=False):
  """log_f, k `[B,T,H,K]` -> gam `[B,T,H,K]` f32, kd = k e^(gam_C - gam) in k's dtype,
  a = e^gam_C `[B*H, N, K]` f32 (the recurrence's inputs)."""
  b, t, heads, kdim = k.shape
  krows = _chunk_rows(heads, chunk, kdim)
  return pl.pallas_call(
      _prep_kernel, grid=(b * heads, t // chunk), in_specs=[krows, krows],
      out_specs=[krows, krows, _per_chunk(kdim)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, _F32), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct((b * heads, t // chunk, kdim), _F32)],
      interpret=interpret, compiler_params=_params(interpret, "out_warps"),
      name="gla_split_prep")(log_f.astype(_F32), k)


def scores(q, k, gam, *, chunk, interpret=False):
  """q, k `[B,T,H,K]`, gam `[B,T,H,K]` f32 -> A `[B*H, T, C]` in q's dtype (zero above the
  diagonal)."""
  b, t, heads, kdim = q.shape
  sub = pallas_gla._sub(chunk)  # pylint: disable=protected-access
  nb = chunk // sub
  spec = _chunk_rows(heads, chunk, kdim)
  kernel = functools.partial(pallas_gla_scores._fwd_kernel, chunk=chunk, sub=sub,  # pylint: disable=protected-access
                             unroll=not interpret, diag=_diag_options(sub, interpret)[0])
  return pl.pallas_call(
      kernel, grid=(b * heads, t // chunk, nb), in_specs=[spec, spec, spec],
      out_specs=pl.BlockSpec((None, sub, chunk), lambda i, n, p: (i, n * nb + p, 0)),
      out_shape=jax.ShapeDtypeStruct((b * heads, t, chunk), q.dtype), interpret=interpret,
      compiler_params=_params(interpret, "scores_warps"), name="gla_split_scores")(q, k, gam)


def _out_kernel(q_ref, g_ref, v_ref, h_ref, a_ref, o_ref, *, scale):
  dt = q_ref.dtype
  qe = (q_ref[...].astype(_F32) * jnp.exp(g_ref[...])).astype(dt)
  o = _dot(qe, h_ref[...]) + _dot(a_ref[...].astype(dt), v_ref[...])
  o_ref[...] = (o * scale).astype(o_ref.dtype)


def output(q, gam, v, h_in, a, *, chunk, scale, interpret=False):
  """o = scale ((q e^gam) h + A v): q, gam `[B,T,H,K]`, v `[B,T,H,V]`, h_in `[B*H, N*K, V]`,
  A `[B*H, T, C]` -> o `[B,T,H,V]` in v's dtype."""
  b, t, heads, kdim = q.shape
  vdim = v.shape[-1]
  return pl.pallas_call(
      functools.partial(_out_kernel, scale=scale), grid=(b * heads, t // chunk),
      in_specs=[_chunk_rows(heads, chunk, kdim), _chunk_rows(heads, chunk, kdim),
                _chunk_rows(heads, chunk, vdim), _state(kdim, vdim), _score_chunk(chunk)],
      out_specs=_chunk_rows(heads, chunk, vdim),
      out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype), interpret=interpret,
      compiler_params=_params(interpret, "out_warps"), name="gla_split_out")(q, gam, v, h_in, a)


# --------------------------------------------------------------------------- backward


def _dav_kernel(k_ref, g_ref, v_ref, do_ref, a_ref, h_ref, lam_ref, da_ref, dv_ref, dqs_ref,
                dkd_ref, tail_ref, *, scale):
  dt = v_ref.dtype
  c = v_ref.shape[0]
  causal = lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)
  do = do_ref[...]
  da_ref[...] = jnp.where(causal, scale * _dot(do, v_ref[...], tb=True), 0.0)
  g = g_ref[...]
  to_end = jnp.exp(g_ref[c - 1, :][None, :] - g)
  kd = (k_ref[...].astype(_F32) * to_end).astype(dt)
  dv = scale * _dot(a_ref[...].astype(dt), do, ta=True) + _dot(kd, lam_ref[...])
  dv_ref[...] = dv.astype(dv_ref.dtype)
  # the state's share of dq, dk: o gets scale (q e^gam) h, the next state (k e^(gam_C - gam))^T v
  dqs_ref[...] = scale * _dot(do, h_ref[...], tb=True) * jnp.exp(g)
  dkd = _dot(v_ref[...], lam_ref[...], tb=True) * to_end
  dkd_ref[...] = dkd
  tail_ref[...] = jnp.sum(k_ref[...].astype(_F32) * dkd, axis=0)


def scores_and_values_backward(k, gam, v, do, a, h_in, lam_next, *, chunk, scale,
                               interpret=False):
  """Per chunk (64-row matmuls) -> dA `[B*H, T, C]` f32 (scale do v^T on and below the
  diagonal), dv `[B,T,H,V]`, the state's shares dq_s = scale (do h^T) e^gam and
  dkd = (v dh^T) e^(gam_C - gam) `[B,T,H,K]` f32, tails `[B*H, N, K]` = sum(k dkd) per chunk."""
  b, t, heads, kdim = k.shape
  vdim = v.shape[-1]
  krows, vrows = _chunk_rows(heads, chunk, kdim), _chunk_rows(heads, chunk, vdim)
  f32_rows = jax.ShapeDtypeStruct(k.shape, _F32)
  return pl.pallas_call(
      functools.partial(_dav_kernel, scale=scale), grid=(b * heads, t // chunk),
      in_specs=[krows, krows, vrows, vrows, _score_chunk(chunk), _state(kdim, vdim),
                _state(kdim, vdim)],
      out_specs=[_score_chunk(chunk), vrows, krows, krows, _per_chunk(kdim)],
      out_shape=[jax.ShapeDtypeStruct((b * heads, t, chunk), _F32),
                 jax.ShapeDtypeStruct(v.shape, v.dtype), f32_rows, f32_rows,
                 jax.ShapeDtypeStruct((b * heads, t // chunk, kdim), _F32)],
      interpret=interpret, compiler_params=_params(interpret, "dav_warps"),
      name="gla_split_dav")(k, gam, v, do, a, h_in, lam_next)


def _dqk_kernel(q_ref, k_ref, g_ref, da_ref, dqs_ref, dkd_ref, dq_ref, dk_ref, dlf_ref, tot_ref,
                *, chunk, sub, unroll, diag):
  """One 16-row sub-block: dq, dk, and d log_f up to what later rows of the chunk add (the
  within-sub-block reverse cumulative sum of d gam, and its total)."""
  dq, dk = pallas_gla_scores.intra_grads(q_ref, k_ref, g_ref, da_ref, chunk=chunk, sub=sub,
                                         unroll=unroll, diag=diag)
  dq, dk = dq + dqs_ref[...], dk + dkd_ref[...]
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  rows = pl.ds(pl.program_id(2) * sub, sub)
  # A and the state terms depend on gam as q e^gam and k e^-gam
  dg = q_ref[rows, :].astype(_F32) * dq - k_ref[rows, :].astype(_F32) * dk
  total = jnp.sum(dg, axis=0)
  dlf_ref[...] = total[None, :] - jnp.cumsum(dg, axis=0) + dg      # sum over t >= s in the block
  tot_ref[...] = total


def query_key_backward(q, k, gam, da, dq_s, dkd, tail, *, chunk, interpret=False):
  """-> dq, dk `[B,T,H,K]` (q's dtype) and d log_f `[B,T,H,K]` f32, from dA `[B*H, T, C]`, the
  state's shares dq_s, dkd `[B,T,H,K]` f32 and the chunk-end terms tail `[B*H, N, K]` f32."""
  b, t, heads, kdim = q.shape
  sub = pallas_gla._sub(chunk)  # pylint: disable=protected-access
  nb = chunk // sub
  krows, rows = _chunk_rows(heads, chunk, kdim), _sub_rows(heads, chunk, sub, kdim)
  kernel = functools.partial(_dqk_kernel, chunk=chunk, sub=sub, unroll=not interpret,
                             diag=_diag_options(sub, interpret)[1])
  dq, dk, dlf, totals = pl.pallas_call(
      kernel, grid=(b * heads, t // chunk, nb),
      in_specs=[krows, krows, krows, _score_chunk(chunk), rows, rows],
      out_specs=[rows, rows, rows,
                 pl.BlockSpec((None, None, kdim), lambda i, n, p: (i, n * nb + p, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(gam.shape, _F32),
                 jax.ShapeDtypeStruct((b * heads, t // sub, kdim), _F32)],
      interpret=interpret, compiler_params=_params(interpret, "dqk_warps"),
      name="gla_split_dqk")(q, k, gam, da, dq_s, dkd)
  # what the later sub-blocks of the chunk and its end add to every row of a sub-block; this
  # broadcast add fuses into the caller's elementwise backward of log_f
  n = t // chunk
  totals = totals.reshape(b * heads, n, nb, kdim)
  later = jnp.flip(jnp.cumsum(jnp.flip(totals, 2), axis=2), 2) - totals + tail[:, :, None]
  later = jnp.moveaxis(later.reshape(b, heads, n, nb, kdim), 1, 3)      # [B, N, nb, H, K]
  dlf = dlf.reshape(b, n, nb, sub, heads, kdim) + later[:, :, :, None]
  return dq, dk, dlf.reshape(gam.shape)


# --------------------------------------------------------------------------- custom VJP


def _forward(q, k, v, log_f, h0, scale, chunk, interpret, block_v):
  gam, kd, a = prepare(log_f, k, chunk=chunk, interpret=interpret)
  h_in, h_last = pallas_gla.rec_forward(kd, v, a, h0, chunk=chunk, interpret=interpret,
                                        block_v=block_v)
  scores_a = scores(q, k, gam, chunk=chunk, interpret=interpret)
  o = output(q, gam, v, h_in, scores_a, chunk=chunk, scale=scale, interpret=interpret)
  return (o, h_last), (q, k, v, gam, a, h_in, scores_a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def gla_split(q, k, v, log_f, h0, scale, chunk, interpret=False, block_v=None):
  """q, k, log_f `[B,T,H,K]` (log_f f32 <= 0), v `[B,T,H,V]` (T a multiple of chunk; q, k, v of
  one dtype), h0 `[B*H,K,V]` f32 -> (o `[B,T,H,V]` in v's dtype, h_last `[B*H,K,V]` f32)."""
  return _forward(q, k, v, log_f, h0, scale, chunk, interpret, block_v)[0]


def _split_fwd(q, k, v, log_f, h0, scale, chunk, interpret, block_v):
  return _forward(q, k, v, log_f, h0, scale, chunk, interpret, block_v)


def _split_bwd(scale, chunk, interpret, block_v, res, cts):
  q, k, v, gam, a, h_in, scores_a = res
  do, dh_last = cts
  do = do.astype(v.dtype)
  qe = (q.astype(_F32) * jnp.exp(gam)).astype(q.dtype)
  lam_next, lam0, hl = pallas_gla.rec_backward(qe, do, a, dh_last, h_in, chunk=chunk,
                                               scale=scale, interpret=interpret, block_v=block_v)
  da, dv, dq_s, dkd, tails = scores_and_values_backward(k, gam, v, do, scores_a, h_in, lam_next,
                                                        chunk=chunk, scale=scale,
                                                        interpret=interpret)
  # gam_C scales the carried state (a = e^gam_C) and every kd row
  dq, dk, dlog_f = query_key_backward(q, k, gam, da, dq_s, dkd, tails + a * hl, chunk=chunk,
                                      interpret=interpret)
  return dq, dk, dv, dlog_f, lam0


gla_split.defvjp(_split_fwd, _split_bwd)
