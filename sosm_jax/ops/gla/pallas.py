"""Gated linear attention on Pallas (Triton) kernels: the work of a chunk split by what it needs.

Per chunk: o = scale ((q e^gam) h + A v), A the causal intra-chunk scores with per-key-channel
decay (`pallas_scores.py`), gam the within-chunk cumulative log-decay, h the state entering the
chunk. Each kernel reads and writes the caller's `[B, T, H, D]` layout, so no transposes run in
XLA. The custom VJP takes log_f itself (the cumulative sums are done in the kernels):

forward   prep: gam, kd = k e^(gam_C - gam), a = e^gam_C, one program per chunk
          recurrence (state per chunk; one program per (batch*head, V block), state on chip)
          scores A `[B*H, T, C]`, 16-row programs, kept for the backward
          output o = scale ((q e^gam) h + A v), one program per chunk (two matmuls)
backward  reverse recurrence (dh per chunk; it forms scale (q e^gam)^T do itself)
          per chunk: dA = scale do v^T (causal), dv = scale A^T do + kd dh, and the state's
          shares of dq and dk (do h^T e^gam, v dh^T e^(gam_C - gam)) as 64-row matmuls
          per 16-row sub-block: dq, dk (intra-chunk part from dA, plus the shares) and the
          block's reverse cumulative sum of d gam; XLA adds what later blocks contribute

Diagonal 16 x 16 blocks never overflow however strong the decay (`pallas_scores.py`).
`interpret=True` runs on any platform (tests). Measurements: `sosm_jax/ops/NOTES.md`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sosm_jax.ops.common.chunks import matmul_dtype, pad_last, pad_time, padded_state
from sosm_jax.ops.common.pallas import (check_tile_chunk_size, compiler_params, dot as _dot,
                                        padded_tile_size, pick_block_v)
from sosm_jax.ops.gla import pallas_scores
from sosm_jax.ops.gla.reference import check_inputs

_F32 = jnp.float32
# Warps per kernel (measured at 4096 x 16 on an H100: NOTES.md).
WARPS = {"scores": 2, "out": 4, "dav": 4, "dqk": 4, "rec": 4}
REC_STAGES = 2


def _params(interpret, name, stages=1):
  return compiler_params(interpret, WARPS[name], stages)


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


# --------------------------------------------------------------------------- recurrence


def _rec_fwd_kernel(kd_ref, v_ref, a_ref, h0_ref, hin_ref, hl_ref, *, n_chunks, chunk, key_dim):
  dt = v_ref.dtype

  def body(n, h):
    rows = pl.ds(n * chunk, chunk)
    hin_ref[pl.ds(n * key_dim, key_dim), :] = h.astype(dt)
    return a_ref[n, :][:, None] * h + _dot(kd_ref[rows, :], v_ref[rows, :], ta=True)

  hl_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))


def _rec_bwd_kernel(qe_ref, do_ref, a_ref, dhl_ref, hin_ref, lam_ref, lam0_ref, hl_ref, *,
                    n_chunks, chunk, key_dim, scale):
  dt = qe_ref.dtype

  def body(i, lam):
    n = n_chunks - 1 - i
    rows = pl.ds(n * chunk, chunk)
    states = pl.ds(n * key_dim, key_dim)
    lam_ref[states, :] = lam.astype(dt)
    hl_ref[n, :] = jnp.sum(hin_ref[states, :].astype(_F32) * lam, axis=1)   # d e^gam_C (per key)
    return a_ref[n, :][:, None] * lam + scale * _dot(qe_ref[rows, :], do_ref[rows, :], ta=True)

  lam0_ref[...] = lax.fori_loop(0, n_chunks, body, dhl_ref[...].astype(_F32))


def _rec_specs(heads, t, kdim, bv, n):
  seq = lambda w, j: pl.BlockSpec((None, t, None, w),
                                  lambda i, jj: (i // heads, 0, i % heads, jj if j else 0))
  return dict(k=seq(kdim, False), v=seq(bv, True),
              a=pl.BlockSpec((None, n, kdim), lambda i, j: (i, 0, 0)),
              state=pl.BlockSpec((None, kdim, bv), lambda i, j: (i, 0, j)),
              states=pl.BlockSpec((None, n * kdim, bv), lambda i, j: (i, 0, j)))


def recurrence_forward(kd, v, a, h0, *, chunk, interpret=False, block_v=None):
  """kd `[B,T,H,K]`, v `[B,T,H,V]`, a `[B*H,N,K]` f32, h0 `[B*H,K,V]` f32 ->
  (h_in `[B*H,N*K,V]` in v's dtype, h_last `[B*H,K,V]` f32)."""
  b, t, heads, kdim = kd.shape
  vdim = v.shape[-1]
  n = t // chunk
  bv = pick_block_v(b * heads, vdim, block_v)
  sp = _rec_specs(heads, t, kdim, bv, n)
  kernel = functools.partial(_rec_fwd_kernel, n_chunks=n, chunk=chunk, key_dim=kdim)
  return pl.pallas_call(
      kernel, grid=(b * heads, vdim // bv), in_specs=[sp["k"], sp["v"], sp["a"], sp["state"]],
      out_specs=[sp["states"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct((b * heads, n * kdim, vdim), v.dtype),
                 jax.ShapeDtypeStruct((b * heads, kdim, vdim), _F32)],
      interpret=interpret, compiler_params=_params(interpret, "rec", REC_STAGES),
      name="gla_recurrence_fwd")(
          kd, v, a, h0)


def recurrence_backward(qe, do, a, dh_last, h_in, *, chunk, scale, interpret=False, block_v=None):
  """qe = q e^gam `[B,T,H,K]`, do `[B,T,H,V]`, a, dh_last as `recurrence_forward`,
  h_in `[B*H,N*K,V]` ->
  (lam_next `[B*H,N*K,V]` = dL/dh_{n+1} for every chunk n, dL/dh_0 f32,
  hl `[B*H,N,K]` = rowsum(h_n * lam_{n+1}))."""
  b, t, heads, kdim = qe.shape
  vdim = do.shape[-1]
  n = t // chunk
  bv = pick_block_v(b * heads, vdim, block_v)
  sp = _rec_specs(heads, t, kdim, bv, n)
  kernel = functools.partial(_rec_bwd_kernel, n_chunks=n, chunk=chunk, key_dim=kdim, scale=scale)
  nvb = vdim // bv
  lam, lam0, hl = pl.pallas_call(
      kernel, grid=(b * heads, nvb),
      in_specs=[sp["k"], sp["v"], sp["a"], sp["state"], sp["states"]],
      out_specs=[sp["states"], sp["state"], pl.BlockSpec((None, n, kdim), lambda i, j: (i, 0, j))],
      out_shape=[jax.ShapeDtypeStruct((b * heads, n * kdim, vdim), qe.dtype),
                 jax.ShapeDtypeStruct((b * heads, kdim, vdim), _F32),
                 jax.ShapeDtypeStruct((b * heads, n, nvb * kdim), _F32)],
      interpret=interpret, compiler_params=_params(interpret, "rec", REC_STAGES),
      name="gla_recurrence_bwd")(
          qe, do.astype(qe.dtype), a, dh_last.astype(_F32), h_in)
  return lam, lam0, hl.reshape(b * heads, n, nvb, kdim).sum(2)


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
      interpret=interpret, compiler_params=_params(interpret, "out"),
      name="gla_split_prep")(log_f.astype(_F32), k)


def scores(q, k, gam, *, chunk, interpret=False):
  """q, k `[B,T,H,K]`, gam `[B,T,H,K]` f32 -> A `[B*H, T, C]` in q's dtype (zero above the
  diagonal)."""
  b, t, heads, kdim = q.shape
  sub = pallas_scores.SUB
  nb = chunk // sub
  spec = _chunk_rows(heads, chunk, kdim)
  kernel = functools.partial(pallas_scores.score_rows, chunk=chunk, sub=sub, fast=not interpret)
  return pl.pallas_call(
      kernel, grid=(b * heads, t // chunk, nb), in_specs=[spec, spec, spec],
      out_specs=pl.BlockSpec((None, sub, chunk), lambda i, n, p: (i, n * nb + p, 0)),
      out_shape=jax.ShapeDtypeStruct((b * heads, t, chunk), q.dtype), interpret=interpret,
      compiler_params=_params(interpret, "scores"), name="gla_split_scores")(q, k, gam)


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
      compiler_params=_params(interpret, "out"), name="gla_split_out")(q, gam, v, h_in, a)


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
      interpret=interpret, compiler_params=_params(interpret, "dav"),
      name="gla_split_dav")(k, gam, v, do, a, h_in, lam_next)


def _dqk_kernel(q_ref, k_ref, g_ref, da_ref, dqs_ref, dkd_ref, dq_ref, dk_ref, dlf_ref, tot_ref,
                *, chunk, sub, fast):
  """One 16-row sub-block: dq, dk, and d log_f up to what later rows of the chunk add (the
  within-sub-block reverse cumulative sum of d gam, and its total)."""
  dq, dk = pallas_scores.intra_grads(q_ref, k_ref, g_ref, da_ref, chunk=chunk, sub=sub,
                                     fast=fast)
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
  sub = pallas_scores.SUB
  nb = chunk // sub
  krows, rows = _chunk_rows(heads, chunk, kdim), _sub_rows(heads, chunk, sub, kdim)
  kernel = functools.partial(_dqk_kernel, chunk=chunk, sub=sub, fast=not interpret)
  dq, dk, dlf, totals = pl.pallas_call(
      kernel, grid=(b * heads, t // chunk, nb),
      in_specs=[krows, krows, krows, _score_chunk(chunk), rows, rows],
      out_specs=[rows, rows, rows,
                 pl.BlockSpec((None, None, kdim), lambda i, n, p: (i, n * nb + p, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(gam.shape, _F32),
                 jax.ShapeDtypeStruct((b * heads, t // sub, kdim), _F32)],
      interpret=interpret, compiler_params=_params(interpret, "dqk"),
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
  h_in, h_last = recurrence_forward(kd, v, a, h0, chunk=chunk, interpret=interpret,
                                    block_v=block_v)
  scores_a = scores(q, k, gam, chunk=chunk, interpret=interpret)
  o = output(q, gam, v, h_in, scores_a, chunk=chunk, scale=scale, interpret=interpret)
  return (o, h_last), (q, k, v, gam, a, h_in, scores_a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def gla_core(q, k, v, log_f, h0, scale, chunk, interpret=False, block_v=None):
  """q, k, log_f `[B,T,H,K]` (log_f f32 <= 0), v `[B,T,H,V]` (T a multiple of chunk; q, k, v of
  one dtype), h0 `[B*H,K,V]` f32 -> (o `[B,T,H,V]` in v's dtype, h_last `[B*H,K,V]` f32)."""
  return _forward(q, k, v, log_f, h0, scale, chunk, interpret, block_v)[0]


def _core_fwd(q, k, v, log_f, h0, scale, chunk, interpret, block_v):
  return _forward(q, k, v, log_f, h0, scale, chunk, interpret, block_v)


def _core_bwd(scale, chunk, interpret, block_v, res, cts):
  q, k, v, gam, a, h_in, scores_a = res
  do, dh_last = cts
  do = do.astype(v.dtype)
  qe = (q.astype(_F32) * jnp.exp(gam)).astype(q.dtype)
  lam_next, lam0, hl = recurrence_backward(qe, do, a, dh_last, h_in, chunk=chunk, scale=scale,
                                           interpret=interpret, block_v=block_v)
  da, dv, dq_s, dkd, tails = scores_and_values_backward(k, gam, v, do, scores_a, h_in, lam_next,
                                                        chunk=chunk, scale=scale,
                                                        interpret=interpret)
  # gam_C scales the carried state (a = e^gam_C) and every kd row
  dq, dk, dlog_f = query_key_backward(q, k, gam, da, dq_s, dkd, tails + a * hl, chunk=chunk,
                                      interpret=interpret)
  return dq, dk, dv, dlog_f, lam0


gla_core.defvjp(_core_fwd, _core_bwd)


def gla_pallas(q, k, v, log_f, *, scale=1.0, initial_state=None, chunk_size=64, interpret=False,
               block_v=None):
  """Chunked gated linear attention on the Pallas kernels (contract of `gla_chunked`).

  Args:
    q, k, log_f: `[batch, time, heads, key_dim]` (log_f <= 0), v `[batch, time, heads, value_dim]`.
    scale: output scale. initial_state: `[batch, heads, key_dim, value_dim]` or None.
    chunk_size: a power of two >= 16 (static). interpret: Pallas interpret mode (any platform).
    block_v: V block of the recurrence programs (None: chosen from the shapes).
  Returns:
    (o `[batch, time, heads, value_dim]` in v's dtype, final_state f32).
  Time is zero-padded to a multiple of chunk_size (identity steps); key and value dims that are
  not powers of two >= 16 are zero-padded to one (zero key channels with log_f = 0 and zero value
  columns change nothing) and the results trimmed.
  """
  check_inputs(q, k, v, log_f, initial_state)
  check_tile_chunk_size("gla (pallas)", chunk_size)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  kp, vp = padded_tile_size(dk), padded_tile_size(dv)
  pad = (-t) % chunk_size
  dt = matmul_dtype(q, k, v)
  prep = lambda x, size, d: pad_last(pad_time(x, pad, d), size)
  h0 = padded_state(initial_state, b, h, kp, vp)
  o, h_last = gla_core(prep(q, kp, dt), prep(k, kp, dt), prep(v, vp, dt), prep(log_f, kp, _F32),
                       h0, float(1.0 if scale is None else scale), chunk_size, interpret, block_v)
  h_last = h_last.reshape(b, h, kp, vp)[:, :, :dk, :dv]
  return o[:, :t, :, :dv].astype(v.dtype), h_last
