"""Softmax attention mixer: q/k/v/o projections, grouped KV heads, RoPE, KV cache.

The math (masks, RoPE, backends) is in `sosm_jax/ops/attention.py`; this module holds parameters
and the cache. Config keys: attn_num_heads, attn_num_kv_heads, attn_head_dim, rope_base,
attn_window (0 = full causal), attn_impl ('' auto), attn_block_size (blockwise and splash block),
attn_decode_read_len (decode reads only that many cache positions; 0 = all).
A Pallas kernel (splash attention) is opaque to XLA's partitioner, so it runs inside `jax.shard_map`
over the mesh axes that the batch and heads are split over (`sosm_jax.parallel.per_shard`).
With the time axis split over devices (mesh axis 'context') an all-to-all gives each device the
whole sequence of its share of heads (`sosm_jax.parallel.context.attention_across_context`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sosm_jax.layers.common import (BATCH_LENGTH_HEADS, BATCH_LENGTH_KV_HEADS, Dense, compute_dtype,
                                    param_dtype, constrain)
from sosm_jax.ops import attention as attn_ops
from sosm_jax.parallel.context import attention_across_context
from sosm_jax.parallel.per_shard import per_shard

_KERNEL_IMPLS = ("splash", "splash_interpret")
# k and v name their heads 'activation_heads' too: query and key/value heads are split together
# (only when the mesh divides both), which keeps each query head with its key/value head.
_QKV = ("activation_batch", None, "activation_heads", None)


class Attention(nn.Module):
  """Causal GQA attention. x `[B, T, D]` -> (y `[B, T, D]`, cache).

  Modes: cache=None (training); cache given, decode=False (prefill: the chunk starts the
  stream, cache empty); cache given, decode=True (the chunk, usually one token, continues
  the cached stream). Cache: {'k','v': `[B, kv_heads, max_len, head_dim]`, 'index': int32}.
  """
  cfg: Any
  layer_index: Any = 0

  @nn.compact
  def __call__(self, x, *, positions, segment_ids=None, cache=None, decode=False):
    cfg = self.cfg
    kw = dict(dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg))
    h, kv, dh = cfg.attn_num_heads, cfg.attn_num_kv_heads, cfg.attn_head_dim
    q = Dense((h, dh), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x)
    k = Dense((kv, dh), ("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x)
    v = Dense((kv, dh), ("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x)
    q = constrain(attn_ops.apply_rope(q, positions, cfg.rope_base), BATCH_LENGTH_HEADS)
    k = constrain(attn_ops.apply_rope(k, positions, cfg.rope_base), BATCH_LENGTH_KV_HEADS)
    v = constrain(v, BATCH_LENGTH_KV_HEADS)
    if cache is not None and decode:
      cache = attn_ops.update_kv_cache(cache, k, v)
      o = attn_ops.cached_attention(q, cache, window=cfg.attn_window,
                                    read_len=cfg.get("attn_decode_read_len", 0),
                                    implementation=cfg.get("attn_decode_impl", ""))
    else:
      attend = lambda q, k, v, s: attn_ops.causal_attention(
          q, k, v, segment_ids=s, window=cfg.attn_window, implementation=cfg.attn_impl or None,
          block_size=cfg.attn_block_size)
      impl = attn_ops.select_implementation(cfg.attn_impl or None, q.dtype,
                                            segment_ids is not None, q.shape[1], cfg.attn_window)
      o = attention_across_context(attend, q, k, v, segment_ids)
      if o is None:   # the time axis is whole on every device
        o = (per_shard(attend, (q, k, v, segment_ids), (_QKV, _QKV, _QKV, _QKV[:2]), _QKV)
             if impl in _KERNEL_IMPLS else attend(q, k, v, segment_ids))
      if cache is not None:
        cache = attn_ops.update_kv_cache(cache, k, v)
    o = constrain(o, BATCH_LENGTH_HEADS)
    y = Dense((cfg.d_model,), ("heads", "head_dim", "embed"), in_dims=2, name="o_proj", **kw)(o)
    return y, cache

  def init_cache(self, batch_size: int, max_len: int):
    cfg = self.cfg
    return attn_ops.init_kv_cache(batch_size, max_len, cfg.attn_num_kv_heads, cfg.attn_head_dim,
                                  compute_dtype(cfg),
                                  quantized=cfg.get("attn_kv_cache_dtype", "") == "int8")

  @staticmethod
  def param_count(cfg) -> int:
    d, h, kv, dh = cfg.d_model, cfg.attn_num_heads, cfg.attn_num_kv_heads, cfg.attn_head_dim
    return 2 * d * h * dh + 2 * d * kv * dh

  @staticmethod
  def forward_flops_per_token(cfg, seq_len: int) -> float:
    """Projections plus causal QK^T and AV, averaged over positions (window-limited)."""
    h, dh = cfg.attn_num_heads, cfg.attn_head_dim
    w = cfg.attn_window if cfg.attn_window > 0 else seq_len
    w = min(w, seq_len)
    # mean number of visible keys: positions t=1..T see min(t, w) keys
    mean_keys = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
    return 2.0 * Attention.param_count(cfg) + 4.0 * h * dh * mean_keys
