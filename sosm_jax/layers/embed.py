"""Token embeddings (standard or factorized ALBERT-style) and the output head (tied or untied).

Standard: table `[vocab, d_model]`. Factorized (embed_dim > 0): table `[vocab, embed_dim]` then a
projection `[embed_dim, d_model]`; fewer parameters for large vocabularies. The tied head reuses
the same matrices transposed (factorized: d_model -> embed_dim -> vocab); an untied head is one
`[d_model, vocab]` matrix in both cases.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sosm_jax.layers.common import compute_dtype, constrain, fan_in_init, param_dtype

_F32 = jnp.float32


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def head_matmul(equation: str, a: jax.Array, b: jax.Array, out_dtype=_F32) -> jax.Array:
  """`einsum(equation, a, b)` accumulated in float32, written in `out_dtype`; its backward runs
  in a's (compute) dtype.

  A float32 cotangent would make both backward matmuls fp32/TF32 GEMMs (~10 ms of a 165 ms step
  on an H100 at vocabulary 32000); the cotangent is cast to the operands' dtype instead, and
  the matmuls accumulate in float32 as the forward does.
  """
  return jnp.einsum(equation, a, b, preferred_element_type=out_dtype)


def _head_matmul_fwd(equation, a, b, out_dtype):
  return head_matmul(equation, a, b, out_dtype), (a, b)


def _head_matmul_bwd(equation, out_dtype, residuals, g):
  del out_dtype
  a, b = residuals
  _, vjp = jax.vjp(lambda x, y: jnp.einsum(equation, x, y, preferred_element_type=a.dtype), a, b)
  return vjp(g.astype(a.dtype))


head_matmul.defvjp(_head_matmul_fwd, _head_matmul_bwd)


def _max_and_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(max, first index of the max) over the last axis in one pass over x."""
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)

  def pick(a, b):
    (va, ia), (vb, ib) = a, b
    take_a = (va > vb) | ((va == vb) & (ia < ib))
    return jnp.where(take_a, va, vb), jnp.where(take_a, ia, ib)

  init = (jnp.array(-jnp.inf, x.dtype), jnp.array(jnp.iinfo(jnp.int32).max, jnp.int32))
  return jax.lax.reduce((x, index), init, pick, (x.ndim - 1,))


def _sums_and_logz(logits, targets, mask):
  x = logits.astype(_F32)
  top, best = _max_and_argmax(x)
  logz = top + jnp.log(jnp.sum(jnp.exp(x - top[..., None]), axis=-1))
  picked = jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  correct = (best == targets).astype(_F32)
  return (jnp.sum((logz - picked) * mask), jnp.sum(correct * mask)), logz


@jax.custom_vjp
def masked_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """(sum of -log p(target), sum of argmax == target) over tokens where mask, in float32.

  logits `[..., V]` (any float dtype; reduced in float32), targets `[...]` int, mask `[...]`.
  Differentiable in the logits only (the mask and targets get zero cotangents). The backward
  pass is one elementwise pass, `g * mask * (softmax - onehot)` written in the logits' dtype,
  from the saved log-normaliser: autodiff of logsumexp would keep float32 probabilities
  `[..., V]` alive and read them again (at vocabulary 32,000 several GB per step).
  """
  return _sums_and_logz(logits, targets, mask)[0]


def _masked_sums_fwd(logits, targets, mask):
  sums, logz = _sums_and_logz(logits, targets, mask)
  return sums, (logits, targets, mask, logz)


def _masked_sums_bwd(residuals, cotangents):
  logits, targets, mask, logz = residuals
  g_loss = cotangents[0]    # the correct-count is a step function: no gradient
  probs = jnp.exp(logits.astype(_F32) - logz[..., None])
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
  grad = (g_loss * mask.astype(_F32))[..., None] * (probs - onehot.astype(_F32))
  zero_targets = np.zeros(targets.shape, jax.dtypes.float0)
  return grad.astype(logits.dtype), zero_targets, jnp.zeros_like(mask)


masked_sums.defvjp(_masked_sums_fwd, _masked_sums_bwd)


def mean_loss_metrics(loss_sum, correct_sum, tokens):
  """(mean loss, {'loss', 'accuracy', 'tokens'}) from masked sums over `tokens` tokens."""
  denom = jnp.maximum(tokens, 1.0)
  loss = loss_sum / denom
  return loss, {"loss": loss, "accuracy": correct_sum / denom, "tokens": tokens}


class Embedder(nn.Module):
  """`encode(tokens [B,T]) -> [B,T,D]` and `logits(h [B,T,D]) -> [B,T,V]` float32."""
  cfg: Any

  def setup(self):
    cfg = self.cfg
    pd = param_dtype(cfg)
    width = cfg.embed_dim if cfg.embed_dim > 0 else cfg.d_model
    # std 1/sqrt(width): unit-scale logits at init with a tied head after the final RMSNorm
    table_axes = ("vocab", "embed") if cfg.embed_dim <= 0 else ("vocab", None)
    self.table = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(width ** -0.5), table_axes),
        (cfg.vocab_size, width), pd)
    if cfg.embed_dim > 0:
      self.project = self.param("embed_proj",
                                nn.with_logical_partitioning(fan_in_init(1), (None, "embed")),
                                (cfg.embed_dim, cfg.d_model), pd)
    if not cfg.tie_embeddings:
      self.head = self.param("head", nn.with_logical_partitioning(fan_in_init(1), ("embed", "vocab")),
                             (cfg.d_model, cfg.vocab_size), pd)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """tokens `[batch, time]` int -> `[batch, time, d_model]` in the compute dtype."""
    dt = compute_dtype(self.cfg)
    x = jnp.take(jnp.asarray(self.table), tokens, axis=0).astype(dt)
    if self.cfg.embed_dim > 0:
      x = jnp.einsum("bte,ed->btd", x, jnp.asarray(self.project, dt))
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  def logits(self, h: jax.Array) -> jax.Array:
    """h `[batch, time, d_model]` -> logits `[batch, time, vocab]` in `cfg.logits_dtype`.

    Matmuls in the compute dtype with float32 accumulation, forward and backward (`head_matmul`).
    """
    dt = compute_dtype(self.cfg)
    h = h.astype(dt)
    out_dtype = jnp.dtype(self.cfg.logits_dtype)
    mm = lambda eq, a, b: head_matmul(eq, a, jnp.asarray(b, dt), out_dtype)
    if not self.cfg.tie_embeddings:
      out = mm("btd,dv->btv", h, self.head)
    elif self.cfg.embed_dim > 0:
      e = head_matmul("btd,ed->bte", h, jnp.asarray(self.project, dt)).astype(dt)
      out = mm("bte,ve->btv", e, self.table)
    else:
      out = mm("btd,vd->btv", h, self.table)
    return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

  def cross_entropy(self, h: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                    chunk_size: int) -> tuple[jax.Array, dict]:
    """Masked mean cross-entropy of `logits(h)` without holding `[B, T, V]` logits.

    h `[B, T, D]`, targets `[B, T]` int, loss_mask `[B, T]`. The time axis is cut into chunks of
    `chunk_size` (the batch axis stays whole, so its sharding is kept); each chunk's logits live
    only inside a rematerialised scan step, so the backward pass recomputes them instead of
    storing B x T x V floats. Same (loss, metrics) as `models.lm.cross_entropy(logits(h), ...)`.
    """
    b, t, _ = h.shape
    pad = (-t) % chunk_size
    mask = loss_mask.astype(_F32)
    if pad:
      h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
      targets = jnp.pad(targets, ((0, 0), (0, pad)))
      mask = jnp.pad(mask, ((0, 0), (0, pad)))
    n = (t + pad) // chunk_size
    chunks = lambda x: jnp.swapaxes(x.reshape(b, n, chunk_size, *x.shape[2:]), 0, 1)
    logits_of = self.logits   # bound method: reads the params once, outside the scan

    @jax.checkpoint
    def chunk_sums(hc, tc, mc):
      return masked_sums(logits_of(hc), tc, mc)

    def step(carry, xs):
      loss, correct = chunk_sums(*xs)
      return (carry[0] + loss, carry[1] + correct), None

    zero = jnp.zeros((), _F32)
    (loss_sum, correct_sum), _ = jax.lax.scan(step, (zero, zero),
                                              (chunks(h), chunks(targets), chunks(mask)))
    return mean_loss_metrics(loss_sum, correct_sum, jnp.sum(mask))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.encode(tokens)

  @staticmethod
  def param_count(cfg) -> int:
    v, d, e = cfg.vocab_size, cfg.d_model, cfg.embed_dim
    n = v * e + e * d if e > 0 else v * d
    return n + (0 if cfg.tie_embeddings else d * v)

  @staticmethod
  def head_flops_per_token(cfg) -> float:
    """Forward FLOPs of the output head (the embedding lookup is free)."""
    v, d, e = cfg.vocab_size, cfg.d_model, cfg.embed_dim
    if cfg.tie_embeddings and e > 0:
      return 2.0 * (d * e + e * v)
    return 2.0 * d * v

  @staticmethod
  def input_flops_per_token(cfg) -> float:
    return 2.0 * cfg.embed_dim * cfg.d_model if cfg.embed_dim > 0 else 0.0
