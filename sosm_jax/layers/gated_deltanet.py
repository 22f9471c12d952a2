"""Gated DeltaNet mixer (Yang et al., ICLR 2025): projections, short convs, gates, gated norm, cache.

Per head (key dim K = value dim V = gdn_head_dim):
  q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v)); q, k L2-normalised
  g = -exp(A_log) * softplus(x W_a + dt_bias)   (log-decay, <= 0)
  beta = sigmoid(x W_b)
  o = gated_delta_rule(q, k, v, g, beta)        (sosm_jax/ops/gated_delta/)
  y = W_o (rmsnorm(o) * gate(x W_gate))         gate by cfg.gdn_output_gate (OUTPUT_GATES)
At packed-document starts the decay is set to ~0 so the state restarts. The short convs are not
reset there: up to conv_width-1 tokens of the previous document reach the first tokens of the next.
Cache: {'state': `[B, H, K, V]` float32, 'conv_q', 'conv_k', 'conv_v': `[B, conv_width-1, H*dim]`}.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sosm_jax.layers.common import (BATCH_LENGTH_HEADS, Dense, RMSNorm, compute_dtype, constrain,
                                    param_dtype, reset_log_decay)
from sosm_jax.ops import conv as conv_ops
from sosm_jax.ops import gated_delta as gd_ops
from sosm_jax.parallel.context import conv_across_context, delta_rule_across_context

_F32 = jnp.float32


def _a_log_init(key, shape, dtype=_F32):
  """A ~ U(1, 16) per head, stored as log A."""
  return jnp.log(jax.random.uniform(key, shape, _F32, 1.0, 16.0)).astype(dtype)


def _dt_bias_init(key, shape, dtype=_F32):
  """Inverse softplus of dt ~ logU(1e-3, 1e-1), so softplus(dt_bias) starts at dt."""
  dt = jnp.exp(jax.random.uniform(key, shape, _F32, math.log(1e-3), math.log(1e-1)))
  dt = jnp.maximum(dt, 1e-4)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _conv_init(key, shape, dtype=_F32):
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


# The output gate (key model.gdn_output_gate; benchmarks/RESULTS.md, "Gated DeltaNet output gate"):
#   'sigmoid2'  2 * sigmoid(x W_gate), W_gate zero-initialised: the gate starts as the identity and
#               learns to scale channels in (0, 2). The default: small models learn MQAR with it.
#   'silu'      silu(x W_gate), W_gate fan-in initialised: the paper's and fla's gate (needed to
#               export to fla). At init it multiplies each channel by a random, token-dependent
#               factor that a bias-free gate cannot quickly make constant; small models stall.
#   'none'      no gate (and no gate_proj parameters).
OUTPUT_GATES = ("sigmoid2", "silu", "none")


def output_gate(kind: str, z: jax.Array) -> jax.Array:
  """The gate's multiplier from its pre-activation z `[B, T, H, dim]` (kind 'sigmoid2' | 'silu')."""
  if kind == "sigmoid2":
    return 2.0 * jax.nn.sigmoid(z)
  if kind == "silu":
    return nn.silu(z)
  raise ValueError(f"gdn_output_gate {kind!r} unknown; use one of {OUTPUT_GATES}.")


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Unit vectors along the last axis (float32 inside), x's dtype out."""
  xf = x.astype(_F32)
  return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype)


class GatedDeltaNet(nn.Module):
  """Gated DeltaNet mixer. x `[B, T, D]` -> (y `[B, T, D]`, cache); modes as `Attention`."""
  cfg: Any
  layer_index: Any = 0

  @nn.compact
  def __call__(self, x, *, positions=None, segment_ids=None, cache=None, decode=False):
    # Packed documents: the short convs must not reach across a boundary (positions restart).
    conv_positions = positions if segment_ids is not None else None
    cfg = self.cfg
    dt = compute_dtype(cfg)
    kw = dict(dtype=dt, param_dtype=param_dtype(cfg))
    h, dk = cfg.gdn_num_heads, cfg.gdn_head_dim
    b, t, _ = x.shape
    step = decode and cache is not None and t == 1

    def short_conv(name, y):
      """y `[B,T,H,dim]` -> silu(causal depthwise conv(y)), new conv cache."""
      w = self.param(f"{name}_weight", nn.with_logical_partitioning(_conv_init, ("conv", "heads")),
                     (cfg.conv_width, h * dk), param_dtype(cfg))
      flat = y.reshape(b, t, h * dk)
      c = None if cache is None else cache[name]
      if step:
        out, c = conv_ops.causal_conv1d_step(flat[:, 0], jnp.asarray(w), None, c)
        out = out[:, None]
      else:
        conv = lambda x, p, c: conv_ops.causal_conv1d(x, jnp.asarray(w), None, cache=c,
                                                      positions=p)
        out, c = conv_across_context(conv, flat, conv_positions, c, cfg.conv_width)
      return nn.silu(out).reshape(b, t, h, dk), c

    q = Dense((h, dk), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x)
    k = Dense((h, dk), ("embed", "heads", "head_dim"), name="k_proj", **kw)(x)
    v = Dense((h, dk), ("embed", "heads", "head_dim"), name="v_proj", **kw)(x)
    q, conv_q = short_conv("conv_q", q)
    k, conv_k = short_conv("conv_k", k)
    v, conv_v = short_conv("conv_v", v)
    q = constrain(l2_normalize(q), BATCH_LENGTH_HEADS)
    k = constrain(l2_normalize(k), BATCH_LENGTH_HEADS)
    v = constrain(v, BATCH_LENGTH_HEADS)

    a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init, ("heads",)), (h,),
                       param_dtype(cfg))
    dt_bias = self.param("dt_bias", nn.with_logical_partitioning(_dt_bias_init, ("heads",)), (h,),
                         param_dtype(cfg))
    a = Dense((h,), ("embed", "heads"), name="a_proj", **kw)(x).astype(_F32)
    g = -jnp.exp(jnp.asarray(a_log, _F32)) * jax.nn.softplus(a + jnp.asarray(dt_bias, _F32))
    g = reset_log_decay(g, segment_ids)
    beta = jax.nn.sigmoid(Dense((h,), ("embed", "heads"), name="b_proj", **kw)(x).astype(_F32))

    state = None if cache is None else cache["state"]
    if step:
      o, state = gd_ops.gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
      o = o[:, None]
    else:
      # each device runs the op (a Pallas kernel on GPU) on its own batch rows, heads and (mesh
      # axis 'context') time segment; segments are joined by their carried states
      run = lambda q, k, v, g, beta, s: gd_ops.gated_delta_rule(
          q, k, v, g, beta, scale=dk ** -0.5, initial_state=s, chunk_size=cfg.chunk_size,
          implementation=cfg.linear_impl)
      o, state = delta_rule_across_context(run, q, k, v, g, beta, state)
    o = RMSNorm(cfg.norm_eps, ("head_dim",), dt, param_dtype(cfg), name="o_norm")(o)
    if cfg.gdn_output_gate != "none":
      init = nn.initializers.zeros if cfg.gdn_output_gate == "sigmoid2" else None
      gate = Dense((h, dk), ("embed", "heads", "head_dim"), name="gate_proj", kernel_init=init,
                   **kw)(x)
      o = o * output_gate(cfg.gdn_output_gate, gate)
    o = constrain(o, BATCH_LENGTH_HEADS)
    y = Dense((cfg.d_model,), ("heads", "head_dim", "embed"), in_dims=2, name="o_proj", **kw)(o)
    if cache is not None:
      cache = {"state": state, "conv_q": conv_q, "conv_k": conv_k, "conv_v": conv_v}
    return y, cache

  def init_cache(self, batch_size: int, max_len: int):
    del max_len  # constant-size state
    cfg = self.cfg
    h, dk = cfg.gdn_num_heads, cfg.gdn_head_dim
    tail = jnp.zeros((batch_size, cfg.conv_width - 1, h * dk), compute_dtype(cfg))
    return {"state": jnp.zeros((batch_size, h, dk, dk), _F32),
            "conv_q": tail, "conv_k": tail, "conv_v": tail}

  @staticmethod
  def param_count(cfg) -> int:
    d, h, dk = cfg.d_model, cfg.gdn_num_heads, cfg.gdn_head_dim
    gate = 0 if cfg.gdn_output_gate == "none" else d * h * dk
    proj = 4 * d * h * dk + gate + 2 * d * h    # q, k, v, o, gate; a, b
    return proj + 2 * h + 3 * cfg.conv_width * h * dk + dk

  @staticmethod
  def forward_flops_per_token(cfg, seq_len: int) -> float:
    """Projections, convs, and the chunked (WY) delta rule per token (chunk C, dims K=V=dk).

    Per chunk and head: K K^T, Q K^T (2 C^2 K each), triangular solve for [U|W] (C^2 (V+K)),
    W S and the state update (2 C K V each), intra-chunk output (2 C^2 V) and Q S (2 C K V).
    """
    d, h, dk = cfg.d_model, cfg.gdn_num_heads, cfg.gdn_head_dim
    c = min(cfg.chunk_size, seq_len)
    per_chunk = 4 * c * c * dk + c * c * 2 * dk + 6 * c * dk * dk + 2 * c * c * dk
    gates = 4 if cfg.gdn_output_gate == "none" else 5
    proj = 2.0 * (gates * d * h * dk + 2 * d * h) + 2.0 * 3 * cfg.conv_width * h * dk
    return proj + h * per_chunk / c
