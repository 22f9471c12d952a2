"""Analytic parameter counts and FLOPs per token, per layer type (used for MFU and checked in tests).

Each mixer class provides static `param_count(cfg)` and `forward_flops_per_token(cfg, seq_len)`;
a mixer without them (an optional one still in progress) is counted from its initialised shapes
and 2 FLOPs per parameter.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sosm_jax.layers.common import MLP
from sosm_jax.layers.embed import Embedder
from sosm_jax.models.config import layer_mixers, resolved_pattern
from sosm_jax.models.hybrid import mixer_class


def _measured_mixer_params(cfg, name: str) -> int:
  """Parameters of one mixer from its abstract init (fallback for mixers without a formula)."""
  cls = mixer_class(name)
  x = jnp.zeros((1, 8, cfg.d_model), jnp.dtype(cfg.dtype))
  pos = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: cls(cfg=cfg, layer_index=0).init(
      jax.random.PRNGKey(0), x, positions=pos, segment_ids=None))
  return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))


def mixer_params(cfg, name: str) -> int:
  cls = mixer_class(name)
  if hasattr(cls, "param_count"):
    return int(cls.param_count(cfg))
  return _measured_mixer_params(cfg, name)


def mixer_forward_flops(cfg, name: str, seq_len: int) -> float:
  cls = mixer_class(name)
  if hasattr(cls, "forward_flops_per_token"):
    return float(cls.forward_flops_per_token(cfg, seq_len))
  return 2.0 * mixer_params(cfg, name)


def num_params(cfg) -> int:
  """Total parameter count of `HybridLM(cfg)`."""
  d = cfg.d_model
  block_extra = 2 * d + MLP.param_count(cfg)            # two RMSNorm scales, SwiGLU
  total = Embedder.param_count(cfg) + d                 # + final norm
  for name in layer_mixers(cfg):
    total += block_extra + mixer_params(cfg, name)
  if "hgrn2" in resolved_pattern(cfg):
    total += cfg.num_layers * (d // cfg.hgrn2_head_dim) * cfg.hgrn2_head_dim   # lower bounds
  return total


def forward_flops_per_token(cfg, seq_len: int) -> float:
  """Forward FLOPs per token: matmuls (2 per multiply-add), attention/recurrences by algorithm."""
  total = Embedder.input_flops_per_token(cfg) + Embedder.head_flops_per_token(cfg)
  for name in layer_mixers(cfg):
    total += MLP.forward_flops_per_token(cfg) + mixer_forward_flops(cfg, name, seq_len)
  return total
