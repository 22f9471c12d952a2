"""A matrix product of a few rows with a weight, shaped for reading the weight (a Pallas kernel).

Batch-1 decode multiplies 1-8 rows by each weight: the product does ~2 flops per weight byte, so
its time is the time to read the weight. XLA:GPU's Triton GEMM fusions took 3.6-4.7 us for the
recipe model's 1.2-6.3 MB per-layer weights on an H200 (~1 TB/s of its ~4.8; RESULTS.md, "Decode
speed"). Here the weight is spread over many programs: the grid runs over blocks of `block_n`
output columns (and, with `split_k` > 1, over `split_k` slices of the contraction, whose float32
partial sums XLA adds after the kernel), and each program streams its `[K / split_k, block_n]`
stripe of the weight in `[block_k, block_n]` tiles through a loop that Triton pipelines
(`num_stages`).

The rows are few, so the kernel does not use Triton's `dot` (it needs >= 16 rows; padding 1-2
rows to 16 would multiply 8-16x the useful work on tensor cores that are not the limit): each
tile is a broadcast multiply-add into a float32 accumulator of the tile's shape per row, summed
over the contraction axis once after the loop, on CUDA cores, which keep up with the weight's
bytes at these row counts (1-8 float32 FMAs per weight element: ~0.2 us of an H200's CUDA cores
for a 6 MB weight at 2 rows, against ~1.3 us to read it at 4.8 TB/s).

`gemv(x, w)`: x `[M, K]` @ w `[K, N]` (or w `[N, K]` with `transpose_w`, the tied head's
embedding table) -> `[M, N]`. `interpret=True` runs the same kernel in Pallas interpret mode on
any platform (the CPU tests); False compiles it with Triton (GPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sosm_jax.ops.common.pallas import compiler_params, is_tile_size

_F32 = jnp.float32
MAX_ROWS = 8   # more rows are a real matrix product: use XLA's dot
# Programs to aim for when picking blocks: ~2 per SM of an H200 (132 SMs), so that every SM
# streams part of every weight.
TARGET_PROGRAMS = 264


def _kernel(x_ref, w_ref, o_ref, *, block_k, steps, transpose_w):
  """One program: rows `[Mp, Ks]` x its weight stripe (`[Ks, bn]`, or `[bn, Ks]` transposed)
  -> `[Mp, bn]`, Ks = steps * block_k, accumulated in float32.

  The loop only multiplies and adds elementwise into a `[Mp, bk, bn]` accumulator; the sum over
  the tile's bk axis (a reduction across threads) is done once after it, not once per tile."""
  def body(i, acc):
    ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
    x = x_ref[:, ks].astype(_F32)                                      # [Mp, bk]
    if transpose_w:
      return acc + x[:, None, :] * w_ref[:, ks].astype(_F32)[None]     # [Mp, bn, bk]
    return acc + x[:, :, None] * w_ref[ks, :].astype(_F32)[None]       # [Mp, bk, bn]

  mp, bn = o_ref.shape
  shape = (mp, bn, block_k) if transpose_w else (mp, block_k, bn)
  acc = lax.fori_loop(0, steps, body, jnp.zeros(shape, _F32))
  o_ref[...] = jnp.sum(acc, axis=2 if transpose_w else 1).astype(o_ref.dtype)


def default_blocks(k: int, n: int) -> dict:
  """Block sizes for a `[K] x [K, N]` product when none are given: block_n the larger of 32/16
  that divides N, then split_k doubled (block_k halved from 128 down to 32 where a slice would
  hold under 2 tiles) until there are `TARGET_PROGRAMS` programs. A starting point;
  `benchmarks/decode_levers.py --gemv_sweep` measures the choices.
  """
  block_n = next((b for b in (32, 16) if n % b == 0), None)
  block_k = next((b for b in (128, 64, 32, 16) if k % b == 0), None)
  if block_n is None or block_k is None:
    raise ValueError(f"gemv: no block of 16..128 divides K={k} and N={n}; pad the weight.")
  split_k = 1
  while (n // block_n) * split_k < TARGET_PROGRAMS:
    if k % (block_k * split_k * 2) == 0 and k // (split_k * 2) >= 2 * block_k:
      split_k *= 2
    elif block_k > 32:
      block_k //= 2
    else:
      break
  return dict(block_n=block_n, block_k=block_k, split_k=split_k)


def gemv(x, w, *, out_dtype=None, transpose_w: bool = False, block_n: int = 32,
         block_k: int = 128, split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
         interpret: bool = False):
  """x `[M, K]` @ w `[K, N]` -> `[M, N]` in `out_dtype` (default x's dtype), float32 accumulation.

  With `transpose_w`, w is `[N, K]` (x @ w.T: a tied head's `[vocab, d_model]` table). M is 1 to
  `MAX_ROWS` (rows are padded to a power of two for the kernel's tiles); x bfloat16 or float32
  (multiplied in float32); w any float dtype (bfloat16 in serving).

  Grid: N / block_n programs along the columns times `split_k` along the contraction (K /
  split_k each, added in float32 after the kernel); each program loops over its K range in tiles
  of `block_k` (Triton pipelines the loop over `num_stages` stages; `num_warps` per program).
  block_n and block_k are powers of two >= 16 (Triton tiles); the accumulator holds
  rows (padded) x block_k x block_n float32 values per program, so large tiles with 8 rows spill
  registers; N must be a multiple of block_n
  and K of block_k * split_k (a ValueError says which; pick blocks that divide the model's
  shapes, e.g. block_n 32 for N = 768, 2304, 4096 and 32,000).
  """
  if x.ndim != 2 or w.ndim != 2:
    raise ValueError(f"gemv: x and w must be 2-D, got {x.shape} and {w.shape}.")
  m, k = x.shape
  n, wk = (w.shape if transpose_w else w.shape[::-1])
  if wk != k:
    raise ValueError(f"gemv: contraction mismatch: x {x.shape}, w {w.shape} "
                     f"(transpose_w={transpose_w}).")
  if not 1 <= m <= MAX_ROWS:
    raise ValueError(f"gemv: x has {m} rows; the kernel takes 1..{MAX_ROWS} (more rows are a "
                     f"matrix product: use jnp.dot).")
  for name, b in (("block_n", block_n), ("block_k", block_k)):
    if not is_tile_size(b):
      raise ValueError(f"gemv: {name}={b} must be a power of two >= 16 (Triton tiles).")
  if split_k < 1:
    raise ValueError(f"gemv: split_k={split_k} must be >= 1.")
  if n % block_n:
    raise ValueError(f"gemv: N={n} is not a multiple of block_n={block_n}; pick a block_n "
                     f"that divides it.")
  if k % (block_k * split_k):
    raise ValueError(f"gemv: K={k} is not a multiple of block_k * split_k = {block_k} * "
                     f"{split_k}; pick blocks that divide it.")
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  mp = 1 << (m - 1).bit_length()   # Triton tiles are powers of two
  if mp != m:
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
  ks = k // split_k
  if transpose_w:
    w_spec = pl.BlockSpec((block_n, ks), lambda j, s: (j, s))
  else:
    w_spec = pl.BlockSpec((ks, block_n), lambda j, s: (s, j))
  kernel = functools.partial(_kernel, block_k=block_k, steps=ks // block_k,
                             transpose_w=transpose_w)
  part_dtype = out_dtype if split_k == 1 else _F32
  out = pl.pallas_call(
      kernel, grid=(n // block_n, split_k),
      in_specs=[pl.BlockSpec((mp, ks), lambda j, s: (0, s)), w_spec],
      out_specs=pl.BlockSpec((None, mp, block_n), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((split_k, mp, n), part_dtype),
      interpret=interpret, compiler_params=compiler_params(interpret, num_warps, num_stages),
      name="gemv")(x, w)
  out = out[0] if split_k == 1 else out.sum(0).astype(out_dtype)
  return out[:m]
