"""Kernel bodies of GLA's intra-chunk scores and their gradient (for the kernels of `pallas.py`).

    A[t, i] = sum_d q[t, d] k[i, d] exp(G[t, d] - G[i, d])   for i <= t within a chunk, else 0

(G is the within-chunk cumulative log-decay, per key channel). A program owns one 16-row
sub-block of a chunk. Below the diagonal sub-block the scores are matmuls through a reference
point (the token before the sub-block), so both factors are exp of non-positive numbers. The
16 x 16 diagonal block is split at its middle token m: its lower-left 8 x 8 quadrant is one matmul
through m (again both factors <= 1), and only the two 8 x 8 diagonal quadrants are walked key by
key, both at once (8 steps). Nothing overflows however strong the decay. A depends on G only
through G[t] - G[i], so dG = q dq - k dk.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sosm_jax.ops.common.pallas import dot as _dot, fast_exp

_F32 = jnp.float32
SUB = 16  # rows of a sub-block


def _iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


def _rows(ref, row0, s):
  return ref[pl.ds(row0, s), :]


def _sub_block(q_ref, g_ref, sub):
  """This program's sub-block (program 2): (p, row0, q f32 `[sub, K]`, gam `[sub, K]`, gam of the
  token before it `[K]`, the reference point that keeps every exponent <= 0)."""
  p = pl.program_id(2)
  row0 = p * sub
  q = _rows(q_ref, row0, sub).astype(_F32)
  return p, row0, q, _rows(g_ref, row0, sub), g_ref[jnp.maximum(row0 - 1, 0), :]


def _earlier_keys(k_ref, g_ref, r, sub, gref, dt):
  """Keys of sub-block r decayed to the reference point: k e^(gref - gam), `[sub, K]` in dt."""
  return (_rows(k_ref, r * sub, sub).astype(_F32)
          * jnp.exp(gref[None, :] - _rows(g_ref, r * sub, sub))).astype(dt)


# --------------------------------------------------------------------------- diagonal blocks


def _halves(g_ref, r0, q, k, g, sub, dt):
  """Quadrant factors through the middle token m: rows >= sub/2 get e^(gam - gam_m) (queries),
  rows < sub/2 get e^(gam_m - gam) (keys); both exponents are <= 0."""
  hf = sub // 2
  lo = _iota((sub, 1), 0) < hf
  gm = g_ref[r0 + hf - 1, :][None, :]
  qfac = jnp.exp(jnp.where(lo, -jnp.inf, g - gm))
  kfac = jnp.exp(jnp.where(lo, gm - g, -jnp.inf))
  return lo, qfac, kfac, (q * qfac).astype(dt), (k * kfac).astype(dt)


def _paired_row(ref, r0, j, hf, lo):
  """Row j of the block for the upper half, row hf + j for the lower half: `[sub, D]` f32."""
  return jnp.where(lo, ref[r0 + j, :][None, :], ref[r0 + hf + j, :][None, :]).astype(_F32)


def _diag_scores(k_ref, g_ref, r0, q, g, sub, fast):
  """Scores of the diagonal block at rows r0.. (q, g its rows, f32) -> `[sub, sub]` f32."""
  dt = k_ref.dtype
  hf = sub // 2
  k = _rows(k_ref, r0, sub).astype(_F32)
  lo, _, _, qf, kf = _halves(g_ref, r0, q, k, g, sub, dt)
  trow, tcol = _iota((sub, 1), 0), _iota((1, sub), 1)
  within = jnp.where(lo, trow, trow - hf)

  def body(j, acc):
    kj, gj = _paired_row(k_ref, r0, j, hf, lo), _paired_row(g_ref, r0, j, hf, lo)
    e = fast_exp(jnp.where(within >= j, g - gj, -jnp.inf), fast)
    col = jnp.sum(q * kj * e, axis=1)
    return acc + jnp.where(tcol == jnp.where(lo, j, j + hf), col[:, None], 0.0)

  return lax.fori_loop(0, hf, body, _dot(qf, kf, tb=True))


def _diag_grads(q_ref, k_ref, g_ref, da_ref, row0, q, g, dq, dk, sub, fast):
  """The diagonal block's share in (dq, dk) `[sub, K]`, from dA `[C, C]` (da_ref)."""
  dt = k_ref.dtype
  hf = sub // 2
  k = _rows(k_ref, row0, sub).astype(_F32)
  lo, qfac, kfac, qf, kf = _halves(g_ref, row0, q, k, g, sub, dt)
  trow, tcol = _iota((sub, 1), 0), _iota((1, sub), 1)
  within = jnp.where(lo, trow, trow - hf)
  da = da_ref[pl.ds(row0, sub), pl.ds(row0, sub)]
  da_q = jnp.where(jnp.logical_not(lo) & (tcol < hf), da, 0.0).astype(dt)   # lower-left quadrant
  dq = dq + _dot(da_q, kf) * qfac
  dk = dk + _dot(da_q, qf, ta=True) * kfac
  paired = functools.partial(_paired_row, r0=row0, hf=hf, lo=lo)
  lo1 = _iota((sub,), 0) < hf   # lo as a vector (no value slicing in the Triton lowering)

  def step(j, carry):
    dq, dk = carry
    # dq[t] += dA[t, j'] k_j' e^(G_t - G_j'), j' = j (upper half) or hf + j (lower), j' <= t
    e = fast_exp(jnp.where(within >= j, g - paired(g_ref, j=j), -jnp.inf), fast)
    dcol = jnp.where(lo1, da_ref[pl.ds(row0, sub), row0 + j],
                     da_ref[pl.ds(row0, sub), row0 + hf + j]).astype(_F32)
    dq = dq + dcol[:, None] * paired(k_ref, j=j) * e
    # dk[i] += dA[t', i] q_t' e^(G_t' - G_i), t' = j or hf + j, i <= t'
    e = fast_exp(jnp.where(within <= j, paired(g_ref, j=j) - g, -jnp.inf), fast)
    drow = jnp.where(lo1, da_ref[row0 + j, pl.ds(row0, sub)],
                     da_ref[row0 + hf + j, pl.ds(row0, sub)]).astype(_F32)
    dk = dk + drow[:, None] * paired(q_ref, j=j) * e
    return dq, dk

  return lax.fori_loop(0, hf, step, (dq, dk))


# --------------------------------------------------------------------------- kernel bodies


def score_rows(q_ref, k_ref, g_ref, a_ref, *, chunk, sub, fast):
  """Row block p (= program 2) of the chunk's scores into a_ref `[sub, chunk]`."""
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
  a_ref[:, pl.ds(row0, sub)] = _diag_scores(k_ref, g_ref, row0, q, g, sub, fast).astype(a_ref.dtype)


def intra_grads(q_ref, k_ref, g_ref, da_ref, *, chunk, sub, fast):
  """(dq, dk) `[sub, K]` f32 of sub-block p (= program 2) from the chunk's score cotangent
  da_ref `[chunk, chunk]`; q_ref, k_ref, g_ref hold the chunk's rows `[chunk, K]`."""
  dt = q_ref.dtype
  nb = chunk // sub
  p, row0, q, g, gref = _sub_block(q_ref, g_ref, sub)
  kdim = q.shape[-1]

  def past(r, acc):                       # dq from keys of earlier sub-blocks
    kg = _earlier_keys(k_ref, g_ref, r, sub, gref, dt)
    return acc + _dot(da_ref[pl.ds(row0, sub), pl.ds(r * sub, sub)].astype(dt), kg)

  dq = lax.fori_loop(0, p, past, jnp.zeros((sub, kdim), _F32)) * jnp.exp(g - gref[None, :])

  def later(r, acc):                      # dk from queries of later sub-blocks
    gr = g_ref[r * sub - 1, :]
    qg = (_rows(q_ref, r * sub, sub).astype(_F32)
          * jnp.exp(_rows(g_ref, r * sub, sub) - gr[None, :])).astype(dt)
    part = _dot(da_ref[pl.ds(r * sub, sub), pl.ds(row0, sub)].astype(dt), qg, ta=True)
    return acc + part * jnp.exp(gr[None, :] - g)

  dk = lax.fori_loop(p + 1, nb, later, jnp.zeros((sub, kdim), _F32))
  return _diag_grads(q_ref, k_ref, g_ref, da_ref, row0, q, g, dq, dk, sub, fast)
