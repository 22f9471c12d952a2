"""HGRN-2 mixer (Qin et al. 2024): forget gate with a depth-rising lower bound, state expansion.

Heads H = d_model // hgrn2_head_dim; per head key (state-expansion) dim Kd = hgrn2_head_dim and
value dim d_model // H = Kd. With lb the layer's lower bound in [0, 1):
  f = lb + (1 - lb) * sigmoid(x W_f)        (forget gate per key channel)
  k = 1 - f,  q = silu(x W_q) (output gate), i = x W_i (input)
  h_t = diag(f_t) h_{t-1} + k_t i_t^T,  o_t = h_t^T q_t       (sosm_jax/ops/gla/, gla)
  y = W_o rmsnorm_per_head(o)
Lower bound: the model owns one learned table `hgrn2_lower_bounds` [num_layers, d_model] and
passes row l as `lower_bound` (HGRN-2's cumulative softmax over depth: lb_l = sum_{j<=l}
softmax_j - softmax_0, so lb_0 = 0 and lb rises with depth). Called without it (a layer used on
its own), lb = layer_index / num_layers, the same schedule the table starts from.
At packed-document starts the decay is set to ~0 so the state restarts.
Cache: {'state': `[B, H, Kd, Kd]` float32}.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sosm_jax.layers.common import (BATCH_LENGTH_HEADS, Dense, RMSNorm, compute_dtype, constrain,
                                    param_dtype, reset_log_decay)
from sosm_jax.ops import gla, gla_step
from sosm_jax.parallel.context import gla_across_context

_F32 = jnp.float32
# floor on the lower bound: keeps log(lb) finite (no NaN gradient at lb = 0) and bounds the decay
# at exp(-20.7) per token, far below anything that matters
_MIN_LOWER_BOUND = 1e-9


def hgrn2_num_heads(cfg) -> int:
  return cfg.d_model // cfg.hgrn2_head_dim


def cumulative_lower_bounds(table: jax.Array) -> jax.Array:
  """HGRN-2 lower bounds from a learned table `[num_layers, width]` -> `[num_layers, width]`.

  Softmax over depth, cumulative sum, minus the first row: 0 at layer 0, rising, < 1.
  """
  p = jax.nn.softmax(table.astype(_F32), axis=0)
  return jnp.cumsum(p, axis=0) - p[:1]


def forget_gate(f_logits: jax.Array, lower_bound) -> tuple[jax.Array, jax.Array]:
  """(log f, k = 1 - f) for f = lb + (1 - lb) sigmoid(f_logits), stable in float32.

  log f = logaddexp(log lb, log(1 - lb) + log_sigmoid(z)); 1 - f = (1 - lb) sigmoid(-z).
  """
  z = f_logits.astype(_F32)
  lb = jnp.maximum(jnp.asarray(lower_bound, _F32), _MIN_LOWER_BOUND)
  log_f = jnp.logaddexp(jnp.log(lb), jnp.log1p(-lb) + jax.nn.log_sigmoid(z))
  k = (1.0 - lb) * jax.nn.sigmoid(-z)
  return log_f, k


class HGRN2(nn.Module):
  """HGRN-2 mixer. x `[B, T, D]` -> (y `[B, T, D]`, cache); modes as `Attention`.

  `lower_bound`: `[d_model]` (= [H * Kd]) or scalar, or None for the depth schedule.
  """
  cfg: Any
  layer_index: Any = 0

  @nn.compact
  def __call__(self, x, *, positions=None, segment_ids=None, cache=None, decode=False,
               lower_bound=None):
    del positions
    cfg = self.cfg
    dt = compute_dtype(cfg)
    kw = dict(dtype=dt, param_dtype=param_dtype(cfg))
    h, dk = hgrn2_num_heads(cfg), cfg.hgrn2_head_dim
    b, t, _ = x.shape
    q = nn.silu(Dense((h, dk), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x))
    f = Dense((h, dk), ("embed", "heads", "head_dim"), name="f_proj", **kw)(x)
    i = Dense((h, dk), ("embed", "heads", "head_dim"), name="i_proj", **kw)(x)
    if lower_bound is None:
      lower_bound = jnp.asarray(self.layer_index, _F32) / cfg.num_layers
    else:
      lower_bound = jnp.asarray(lower_bound, _F32).reshape((h, dk) if jnp.ndim(lower_bound) else ())
    log_f, k = forget_gate(f, lower_bound)
    log_f = reset_log_decay(log_f, segment_ids)
    q = constrain(q, BATCH_LENGTH_HEADS)
    k = constrain(k.astype(dt), BATCH_LENGTH_HEADS)
    i = constrain(i, BATCH_LENGTH_HEADS)

    state = None if cache is None else cache["state"]
    if decode and cache is not None and t == 1:
      o, state = gla_step(q[:, 0], k[:, 0], i[:, 0], log_f[:, 0], state)
      o = o[:, None]
    else:
      # each device runs the op (a Pallas kernel on GPU) on its own batch rows, heads and (mesh
      # axis 'context') time segment; segments are joined by their carried states
      run = lambda q, k, i, log_f, s: gla(q, k, i, log_f, initial_state=s,
                                          chunk_size=cfg.chunk_size,
                                          implementation=cfg.linear_impl)
      o, state = gla_across_context(run, q, k, i, log_f, state)
    o = RMSNorm(cfg.norm_eps, ("heads", "head_dim"), dt, param_dtype(cfg), name="o_norm")(o)
    o = constrain(o, BATCH_LENGTH_HEADS)
    y = Dense((cfg.d_model,), ("heads", "head_dim", "embed"), in_dims=2, name="o_proj", **kw)(o)
    return y, (None if cache is None else {"state": state})

  def init_cache(self, batch_size: int, max_len: int):
    del max_len
    cfg = self.cfg
    h, dk = hgrn2_num_heads(cfg), cfg.hgrn2_head_dim
    return {"state": jnp.zeros((batch_size, h, dk, dk), _F32)}

  @staticmethod
  def param_count(cfg) -> int:
    d, w = cfg.d_model, hgrn2_num_heads(cfg) * cfg.hgrn2_head_dim
    return 3 * d * w + w * d + w

  @staticmethod
  def forward_flops_per_token(cfg, seq_len: int) -> float:
    """Projections and chunked GLA per token: per chunk and head Q K^T and A V (2 C^2 K each),
    Q S and the state update (2 C K V each)."""
    h, dk = hgrn2_num_heads(cfg), cfg.hgrn2_head_dim
    c = min(cfg.chunk_size, seq_len)
    per_chunk = 4 * c * c * dk + 4 * c * dk * dk
    return 2.0 * HGRN2.param_count(cfg) + h * per_chunk / c
