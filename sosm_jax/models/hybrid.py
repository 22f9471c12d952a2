"""HybridLM: embeddings, pre-norm blocks with the mixer pattern over depth, final norm, head.

Block: x + mixer(norm(x)), then x + mlp(norm(x)). The pattern (e.g. hgrn2,hgrn2,hgrn2,attn) is one
"group"; num_layers // len(pattern) groups. With scan_layers the groups run under `nn.scan`
(params stacked on a leading 'layers' axis, compile time flat in depth, caches stacked the same
way); without it each layer is its own module. Remat wraps each block.

Memory beyond the window (sosm_jax/memory): `memory` = {layer index: (keys, values, mask)} for
'graph' layers, keys/values `[B, T, M, kv_heads, head_dim]` (before RoPE), mask `[B, T, M]`
bool; each graph layer attends to its entries jointly with its local and graph edges. Under the
layer scan the entries are stacked along the scanned axis (graph layers without an entry get an
all-masked one, which changes nothing). The parameter tree is the same with or without memory.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sosm_jax.layers import MIXERS
from sosm_jax.layers.common import BATCH_LENGTH_EMBED, MLP, RMSNorm, compute_dtype, constrain, param_dtype
from sosm_jax.layers.embed import Embedder
from sosm_jax.layers.hgrn2 import cumulative_lower_bounds
from sosm_jax.models.config import layer_mixers, resolved_pattern


def mixer_class(name: str):
  if name not in MIXERS:
    raise ValueError(f"model.pattern: mixer {name!r} is not available (registered: "
                     f"{sorted(MIXERS)}); for 'graph', sosm_jax/layers/graph.py must exist.")
  return MIXERS[name]


def _remat(cls, policy: str, static_layer_index: bool = False):
  """`cls` wrapped in nn.remat by policy; a Python-int layer index stays static (no scan)."""
  if policy == "none":
    return cls
  # Block.__call__(self, x, positions, segment_ids, cache, lower_bound, layer_index): self is 0
  static = (6,) if static_layer_index else ()
  # Inside nn.scan the loop already keeps XLA from merging the recomputation with the forward
  # pass; unrolled (static layer index) it needs prevent_cse, or remat saves nothing.
  prevent_cse = static_layer_index
  if policy == "full":
    return nn.remat(cls, prevent_cse=prevent_cse, static_argnums=static)
  # 'dots': keep projection matmul outputs (no batch dims), recompute the rest
  return nn.remat(cls, prevent_cse=prevent_cse, static_argnums=static,
                  policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


class Block(nn.Module):
  """One pre-norm residual block around mixer `mixer_name`. x `[B, T, D]` -> (x, cache).

  memory: None or (keys, values, mask) for a 'graph' mixer (see the module doc).
  """
  cfg: Any
  mixer_name: str
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache, lower_bound, layer_index, memory=None):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, ("norm",), compute_dtype(cfg), param_dtype(cfg),
                                name=name)
    extra = {"lower_bound": lower_bound} if self.mixer_name == "hgrn2" else {}
    if memory is not None:
      extra.update(memory_keys=memory[0], memory_values=memory[1], memory_mask=memory[2])
    mixer = mixer_class(self.mixer_name)(cfg=cfg, layer_index=layer_index, name="mixer")
    y, cache = mixer(norm("mixer_norm")(x), positions=positions, segment_ids=segment_ids,
                     cache=cache, decode=self.decode, **extra)
    x = constrain(x + y.astype(x.dtype), BATCH_LENGTH_EMBED)
    x = x + MLP(cfg, name="mlp")(norm("mlp_norm")(x)).astype(x.dtype)
    return constrain(x, BATCH_LENGTH_EMBED), cache


class BlockGroup(nn.Module):
  """One repetition of the pattern; the body of the layer scan.

  (x, (caches, lower_bounds, group_index, memories)) -> (x, caches); caches, lower_bounds and
  memories are per pattern position (tuples, entries may be None).
  """
  cfg: Any
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, caches, lower_bounds, group_index, memories=None):
    pattern = resolved_pattern(self.cfg)
    block_cls = _remat(Block, self.cfg.remat)
    new_caches = []
    for p, name in enumerate(pattern):
      x, c = block_cls(self.cfg, name, self.decode, name=f"block_{p}")(
          x, positions, segment_ids, None if caches is None else caches[p],
          None if lower_bounds is None else lower_bounds[p], group_index * len(pattern) + p,
          None if memories is None else memories[p])
      new_caches.append(c)
    return x, (None if caches is None else tuple(new_caches))


def _uses_lower_bounds(cfg) -> bool:
  return "hgrn2" in resolved_pattern(cfg)


class HybridLM(nn.Module):
  """The language model. tokens `[B, T]` -> logits `[B, T, V]` (cfg.logits_dtype) (and cache if given).

  positions `[B, T]` default 0..T-1; segment_ids `[B, T]` or None; cache from `init_cache`;
  memory {layer: (keys, values, mask)} for graph layers (module doc) or None. With
  loss_targets=(targets, loss_mask) `[B, T]` it returns (loss, metrics) instead of logits, the
  head's logits computed in chunks of cfg.loss_chunk_size tokens (`Embedder.cross_entropy`).
  With last_logits_only the logits are those of the last position only, `[B, 1, V]`: what a
  prefill continues from, without the head's product over every prompt position (at 64K tokens
  and a 32K vocabulary, 3.2 TFLOP and a 4 GB array that XLA does not slice away by itself).
  """
  cfg: Any

  @nn.compact
  def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None, decode=False,
               memory=None, loss_targets=None, last_logits_only=False):
    cfg = self.cfg
    check_memory_layers(cfg, memory)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if not cfg.document_masking:
      segment_ids = None
    embedder = Embedder(cfg, name="embed")
    x = embedder.encode(tokens)

    lower_bounds = None
    if _uses_lower_bounds(cfg):
      width = cfg.d_model // cfg.hgrn2_head_dim * cfg.hgrn2_head_dim
      table = self.param("hgrn2_lower_bounds",
                         nn.with_logical_partitioning(nn.initializers.zeros, ("layers", "heads")),
                         (cfg.num_layers, width), param_dtype(cfg))
      lower_bounds = cumulative_lower_bounds(jnp.asarray(table))   # [L, width]

    layer_caches = None if cache is None else cache["layers"]
    if cfg.scan_layers:
      x, layer_caches = self._scan(x, positions, segment_ids, layer_caches, lower_bounds, decode,
                                   stack_memory(cfg, memory))
    else:
      x, layer_caches = self._loop(x, positions, segment_ids, layer_caches, lower_bounds, decode,
                                   memory)

    if last_logits_only:
      x = x[:, -1:]
    x = RMSNorm(cfg.norm_eps, ("norm",), compute_dtype(cfg), param_dtype(cfg), name="final_norm")(x)
    if loss_targets is not None:
      return embedder.cross_entropy(x, *loss_targets, max(1, cfg.loss_chunk_size))
    logits = embedder.logits(x)
    if cache is None:
      return logits
    return logits, {"index": cache["index"] + t, "layers": layer_caches}

  def _scan(self, x, positions, segment_ids, caches, lower_bounds, decode, memories):
    cfg = self.cfg
    p = len(resolved_pattern(cfg))
    groups = cfg.num_layers // p
    lb = None
    if lower_bounds is not None:
      lb = tuple(lower_bounds.reshape(groups, p, -1)[:, i] for i in range(p))
    scanned = nn.scan(
        BlockGroup,
        variable_axes={"params": 0, "memory_probe": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, 0, 0, 0),
        length=groups,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, decode, name="layers")(
        x, positions, segment_ids, caches, lb, jnp.arange(groups, dtype=jnp.int32), memories)

  def _loop(self, x, positions, segment_ids, caches, lower_bounds, decode, memory):
    cfg = self.cfg
    new = []
    block_cls = _remat(Block, cfg.remat, static_layer_index=True)
    for i, name in enumerate(layer_mixers(cfg)):
      x, c = block_cls(cfg, name, decode, name=f"layer_{i}")(
          x, positions, segment_ids, None if caches is None else caches[i],
          None if lower_bounds is None else lower_bounds[i], i,
          None if memory is None else memory.get(i))
      new.append(c)
    return x, (None if caches is None else tuple(new))


def init_cache(cfg, batch_size: int, max_len: int) -> dict:
  """Zero cache for `HybridLM`: {'index': int32 scalar, 'layers': per-layer caches}.

  scan_layers: a tuple over pattern positions of caches stacked `[groups, ...]`; otherwise a
  tuple over layers.
  """
  def one(name, i):
    return mixer_class(name)(cfg=cfg, layer_index=i).init_cache(batch_size, max_len)

  if cfg.scan_layers:
    pattern = resolved_pattern(cfg)
    groups = cfg.num_layers // len(pattern)
    layers = tuple(jax.tree.map(lambda a: jnp.broadcast_to(a, (groups,) + a.shape), one(name, p))
                   for p, name in enumerate(pattern))
  else:
    layers = tuple(one(name, i) for i, name in enumerate(layer_mixers(cfg)))
  return {"index": jnp.zeros((), jnp.int32), "layers": layers}


def check_memory_layers(cfg, memory) -> None:
  """ValueError unless every layer given memory is a 'graph' layer."""
  if not memory:
    return
  names = layer_mixers(cfg)
  for i in memory:
    if not 0 <= i < len(names) or names[i] != "graph":
      raise ValueError(f"memory given for layer {i}, which is "
                       f"{names[i] if 0 <= i < len(names) else 'not a layer'!r}; only 'graph' "
                       f"layers (model.pattern) read memory: pass memory for those only.")


def stack_memory(cfg, memory):
  """{layer: (k, v, mask)} -> per pattern position (k, v, mask) stacked `[groups, ...]` or None.

  For the layer scan. Graph layers without an entry get an all-masked one (changes nothing).
  """
  if not memory:
    return None
  pattern = resolved_pattern(cfg)
  p, groups = len(pattern), cfg.num_layers // len(pattern)
  template = next(iter(memory.values()))
  blank = tuple(jnp.zeros_like(a) for a in template)
  out = []
  for pos in range(p):
    layers = [g * p + pos for g in range(groups)]
    if not any(i in memory for i in layers):
      out.append(None)
      continue
    items = [memory.get(i, blank) for i in layers]
    out.append(tuple(jnp.stack([jnp.asarray(it[j]) for it in items]) for j in range(3)))
  return tuple(out)
