"""One query token against a heads-first KV cache, as a Pallas (Triton) kernel: decode attention.

`cached_attention` reads the cache with two batched products. When the serving engine reads only
the filled part of a long cache (`read_len` < max_len), XLA:GPU first copies that part out (a
slice of every slot's K and V: the GEMM needs its operand contiguous), which at 64 slots with
131,072-position caches cost a quarter of the decode step (benchmarks/RESULTS.md, "Serving").
This kernel reads the keys in place, block by block, and only the blocks that hold keys the query
may see (positions <= the query's, and within the sliding window), whatever read_len is; a read length
that is not whole blocks ends with a block that overlaps the one before it, masked.

Grid (batch, kv head, split): a program takes one kv head's query group (its `H / K` query heads,
padded to 16 rows for the tensor cores) over one contiguous span of the cache with an online
softmax, and writes its unnormalised output, running max and sum; the splits are merged in
XLA (flash decoding). Splits give a batch of one enough programs to fill the GPU.

int8 caches (`quantize_kv`) are read as int8: a key's scale multiplies its scores and a value's
scale its probabilities, as in `cached_attention`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sosm_jax.ops.common.pallas import compiler_params, dot

_F32 = jnp.float32
# Keys per loaded block (a [block, head_dim] tile).
BLOCK = 128
# Query rows per program: the group's heads padded to the smallest tensor-core tile.
_ROWS = 16
# Programs to aim for (~2 per SM of an H200); a split keeps at least _MIN_SPAN keys, since each
# split adds a partial output to merge.
_TARGET_PROGRAMS = 256
_MIN_SPAN = 512
# The running max before any key: finite, so that exp(m - m_new) of an empty split stays 0.
_NO_MAX = -1e30


def supports(tq: int, group: int, keys: int) -> bool:
  """Whether the kernel takes this call: one query token, a query group of at most 16 heads, and
  at least one block of keys to read."""
  return tq == 1 and group <= _ROWS and keys >= BLOCK


def num_splits(batch: int, kv_heads: int, keys: int) -> int:
  """Splits of the read length (a power of two): enough programs to fill the GPU, each at least
  _MIN_SPAN keys."""
  blocks = -(-keys // BLOCK)
  splits = 1
  while (batch * kv_heads * splits < _TARGET_PROGRAMS
         and blocks // (2 * splits) * BLOCK >= _MIN_SPAN):
    splits *= 2
  return splits


def _kernel(index_ref, q_ref, k_ref, v_ref, *rest, keys, span_blocks, window, scale, quantized):
  if quantized:
    ks_ref, vs_ref, o_ref, m_ref, l_ref = rest
  else:
    o_ref, m_ref, l_ref = rest
  query = index_ref[0] - 1                      # the query's position: the newest key
  lowest = jnp.maximum(query - window + 1, 0) if window else 0
  first_block = pl.program_id(2) * span_blocks
  first = jnp.maximum(first_block, lowest // BLOCK)
  stop = jnp.minimum(first_block + span_blocks, query // BLOCK + 1)
  q = q_ref[...]
  cdt = q.dtype

  def body(j, carry):
    m, l, acc = carry
    # A read length that is not whole blocks: its last block is loaded from keys - BLOCK (inside
    # the cache) and the positions its neighbour holds are masked.
    start = jnp.minimum(j * BLOCK, keys - BLOCK)
    pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, BLOCK), 1)
    at = pl.ds(start, BLOCK)
    s = dot(q, k_ref[at, :].astype(cdt), tb=True) * scale              # [rows, BLOCK]
    if quantized:
      s = s * ks_ref[at][None, :]
    visible = (pos >= j * BLOCK) & (pos <= query) & (pos >= lowest)
    s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.sum(p, axis=1)
    if quantized:
      p = p * vs_ref[at][None, :]
    acc = acc * alpha[:, None] + dot(p.astype(cdt), v_ref[at, :].astype(cdt))
    return m_new, l, acc

  rows, dh = q.shape
  init = (jnp.full((rows,), _NO_MAX, _F32), jnp.zeros((rows,), _F32),
          jnp.zeros((rows, dh), _F32))
  m, l, acc = jax.lax.fori_loop(first, jnp.maximum(stop, first), body, init)
  o_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def decode_attention(q, cache, *, window=0, scale=None, read_len=0, interpret=False):
  """`cached_attention` for one query token, read in place by a Pallas kernel.

  Args:
    q: `[batch, 1, heads, head_dim]`.
    cache: as `ops.attention.init_kv_cache` (float or int8), already holding this step's keys;
      its 'index' is the number of filled positions (the query sits at index - 1).
    read_len: static; > 0 bounds the positions read to [0, read_len) (the caller guarantees the
      query is inside); 0 = the whole cache. Either way only blocks with visible keys are read.
    interpret: run the kernel in Pallas interpret mode (any platform; tests).
  Returns:
    `[batch, 1, heads, head_dim]` in q's dtype.
  """
  b, tq, h, dh = q.shape
  kv_heads, max_len = cache["k"].shape[1:3]
  keys = read_len or max_len
  group = h // kv_heads
  if not supports(tq, group, keys):
    raise ValueError(f"decode_attention: takes one query token (got {tq}), at most {_ROWS} "
                     f"query heads per kv head (got {group}) and a read length of at least "
                     f"{BLOCK} (got {keys}); use ops.attention.cached_attention's XLA form.")
  quantized = "k_scale" in cache
  splits = num_splits(b, kv_heads, keys)
  span_blocks = -(-(-(-keys // BLOCK)) // splits)      # ceil(ceil(keys / BLOCK) / splits)
  qg = q.reshape(b, kv_heads, group, dh)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, _ROWS - group), (0, 0)))
  index = jnp.broadcast_to(cache["index"].astype(jnp.int32), (1,))
  whole = pl.BlockSpec((None, None, max_len, dh), lambda i, j, s: (i, j, 0, 0))
  in_specs = [pl.BlockSpec((1,), lambda i, j, s: (0,)),
              pl.BlockSpec((None, None, _ROWS, dh), lambda i, j, s: (i, j, 0, 0)), whole, whole]
  args = [index, qg, cache["k"], cache["v"]]
  if quantized:
    scales = pl.BlockSpec((None, None, max_len), lambda i, j, s: (i, j, 0))
    in_specs += [scales, scales]
    args += [cache["k_scale"][..., 0], cache["v_scale"][..., 0]]
  part = lambda *tail: pl.BlockSpec((None, None, None, _ROWS, *tail),
                                    lambda i, j, s: (i, j, s, 0, *[0] * len(tail)))
  kernel = functools.partial(_kernel, keys=keys, span_blocks=span_blocks, window=window,
                             quantized=quantized,
                             scale=dh ** -0.5 if scale is None else scale)
  o, m, l = pl.pallas_call(
      kernel, grid=(b, kv_heads, splits), in_specs=in_specs,
      out_specs=[part(dh), part(), part()],
      out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, _ROWS, dh), _F32),
                 jax.ShapeDtypeStruct((b, kv_heads, splits, _ROWS), _F32),
                 jax.ShapeDtypeStruct((b, kv_heads, splits, _ROWS), _F32)],
      interpret=interpret, compiler_params=compiler_params(interpret, num_warps=4, num_stages=2),
      name="decode_attention")(*args)
  # Merge the splits: each partial output and sum rescaled to the overall max.
  top = jnp.max(m, axis=2, keepdims=True)
  weight = jnp.exp(m - top)
  out = jnp.sum(o * weight[..., None], axis=2) / jnp.sum(l * weight, axis=2)[..., None]
  return out[:, :, :group].reshape(b, 1, h, dh).astype(q.dtype)
