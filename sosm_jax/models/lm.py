"""LanguageModel: the one interface over architectures (init, loss, prefill, decode, generate, counts).

`build_model(cfg)` validates and freezes the `config.model` ConfigDict and returns a
`LanguageModel`. All methods are pure functions of (params, inputs) and can be jitted by the
caller; `generate` jits its own prefill and decode loop.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sosm_jax.layers.embed import masked_sums, mean_loss_metrics
from sosm_jax.models import counting
from sosm_jax.models.config import freeze, layer_mixers, resolved_pattern
from sosm_jax.models.hybrid import HybridLM, init_cache, mixer_class
from sosm_jax.models.sampling import sample_token

_F32 = jnp.float32


def cross_entropy(logits, targets, loss_mask):
  """Masked mean cross-entropy and accuracy in float32.

  logits `[B, T, V]`, targets `[B, T]` int, loss_mask `[B, T]` -> (loss, metrics).
  """
  mask = loss_mask.astype(_F32)
  return mean_loss_metrics(*masked_sums(logits, targets, mask), jnp.sum(mask))


class LanguageModel:
  """Wraps `HybridLM` with the training / inference / accounting interface of the contract."""

  def __init__(self, cfg):
    self.cfg = freeze(cfg)
    for name in set(resolved_pattern(self.cfg)):
      mixer_class(name)   # unavailable mixers fail here, not deep inside tracing
    self.module = HybridLM(self.cfg)
    self._jit_prefill = jax.jit(self.prefill, static_argnums=(2,))
    self._jit_decode = jax.jit(self.decode_step)

  # ------------------------------------------------------------------ training

  def init(self, rng, batch_size: int, seq_len: int):
    """Params ('params' collection, leaves boxed `nn.LogicallyPartitioned`)."""
    tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
    return self.module.init(rng, tokens)["params"]

  def apply(self, params, tokens, *, positions=None, segment_ids=None, memory=None):
    """logits `[B, T, V]` (in `cfg.logits_dtype`) for tokens `[B, T]`.

    memory: None or {graph layer index: (keys, values, mask)}, keys/values
    `[B, T, M, kv_heads, head_dim]` (as stored: before RoPE), mask `[B, T, M]` bool: entries
    retrieved from the host memory (sosm_jax/memory) that each token also attends to.
    """
    return self.module.apply({"params": params}, tokens, positions=positions,
                             segment_ids=segment_ids, memory=memory)

  def loss(self, params, batch):
    """(mean cross-entropy over batch['loss_mask'], {'loss','accuracy','tokens'}).

    batch: `[B, T]` arrays 'inputs', 'targets', 'loss_mask', optional 'positions', 'segment_ids',
    and optional 'memory' (as in `apply`).
    """
    kwargs = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                  memory=batch.get("memory"))
    if self.cfg.loss_chunk_size > 0:   # never materialise [B, T, V] logits
      return self.module.apply({"params": params}, batch["inputs"], **kwargs,
                               loss_targets=(batch["targets"], batch["loss_mask"]))
    logits = self.apply(params, batch["inputs"], **kwargs)
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])

  # ------------------------------------------------------------------ inference

  def init_cache(self, batch_size: int, max_len: int):
    return init_cache(self.cfg, batch_size, max_len)

  def prefill(self, params, tokens, max_len: int, memory=None, *, last_only: bool = False):
    """Runs the prompt tokens `[B, T]` (positions 0..T-1) -> (logits `[B, T, V]`, cache).

    The cache holds up to `max_len` tokens (prompt plus everything decoded later). memory as in
    `apply`. last_only: logits of the last position only, `[B, 1, V]` (all that generation
    continues from; the head is then not applied to the other T - 1 positions).
    """
    b, t = tokens.shape
    if t > max_len:
      raise ValueError(f"prefill: prompt length {t} exceeds max_len {max_len}; raise max_len.")
    cache = self.init_cache(b, max_len)
    return self.module.apply({"params": params}, tokens, cache=cache, decode=False, memory=memory,
                             last_logits_only=last_only)

  def decode_step(self, params, token, cache, memory=None):
    """One token `[B]` at position cache['index'] -> (logits `[B, V]`, cache). Jit-able.

    memory as in `apply` with T = 1.
    """
    b = token.shape[0]
    positions = jnp.broadcast_to(cache["index"], (b, 1)).astype(jnp.int32)
    logits, cache = self.module.apply({"params": params}, token[:, None], positions=positions,
                                      cache=cache, decode=True, memory=memory)
    return logits[:, 0], cache

  def memory_probe(self, params, tokens, *, positions=None, segment_ids=None, cache=None):
    """{graph layer: (q `[B, T, heads, d]`, k, v `[B, T, kv_heads, d]`)} before RoPE.

    What the host memory searches with (q) and stores (k, v) for tokens `[B, T]`, from a forward
    pass without memory (a layer's q/k/v do not depend on memory given to it; with several
    memory layers the deeper ones' are those of the memory-free network). With a cache, the
    tokens continue it as one decode step (T = 1) and the cache is not advanced.
    """
    kw = {} if cache is None else dict(cache=cache, decode=True)
    if cache is not None and positions is None:
      positions = jnp.broadcast_to(cache["index"], tokens.shape).astype(jnp.int32)
    _, state = self.module.apply({"params": params}, tokens, positions=positions,
                                 segment_ids=segment_ids, mutable=["memory_probe"], **kw)
    return probed_layers(self.cfg, state["memory_probe"])

  def generate(self, params, prompt, rng, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0):
    """Continues prompt `[B, T]` by max_new_tokens -> tokens `[B, T + max_new_tokens]`.

    temperature 0 is greedy (argmax); otherwise sampling at that temperature from the
    smallest set of tokens whose probability reaches top_p.
    """
    if max_new_tokens <= 0:
      return prompt
    return _generate(self, params, prompt, rng, int(max_new_tokens), float(temperature),
                     float(top_p))

  # ------------------------------------------------------------------ accounting

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) at this sequence length."""
    return 3.0 * counting.forward_flops_per_token(self.cfg, seq_len)

  def num_params_formula(self) -> int:
    return counting.num_params(self.cfg)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(model, params, prompt, rng, max_new_tokens, temperature, top_p):
  b, t = prompt.shape
  logits, cache = model.prefill(params, prompt, t + max_new_tokens, last_only=True)
  rng, sub = jax.random.split(rng)
  first = sample_token(logits[:, -1], sub, temperature, top_p)

  def body(carry, _):
    token, cache, rng = carry
    rng, sub = jax.random.split(rng)
    logits, cache = model.decode_step(params, token, cache)
    nxt = sample_token(logits, sub, temperature, top_p)
    return (nxt, cache, rng), nxt

  _, rest = jax.lax.scan(body, (first, cache, rng), None, length=max_new_tokens - 1)
  new = jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)
  return jnp.concatenate([prompt, new.astype(prompt.dtype)], axis=1)


def probed_layers(cfg, tree) -> dict:
  """The sown 'memory_probe' collection -> {layer index: (q, k, v)} (unstacks the layer scan)."""
  names = layer_mixers(cfg)
  if not cfg.scan_layers:
    return {i: tree[f"layer_{i}"]["mixer"]["qkv"][0] for i, n in enumerate(names) if n == "graph"}
  pattern = resolved_pattern(cfg)
  out = {}
  for p, name in enumerate(pattern):
    if name != "graph":
      continue
    stacked = tree["layers"][f"block_{p}"]["mixer"]["qkv"][0]   # each [groups, ...]
    for g in range(cfg.num_layers // len(pattern)):
      out[g * len(pattern) + p] = tuple(a[g] for a in stacked)
  return dict(sorted(out.items()))


def build_model(cfg) -> LanguageModel:
  """`LanguageModel` for a `config.model` ConfigDict (validated; ValueError names a bad key)."""
  return LanguageModel(cfg)
