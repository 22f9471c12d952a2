"""Memory beyond the window: run an LM segment by segment with a host memory per stream.

The model's `HybridLM` does not (yet) pass memory tensors to its mixers, so `MemoryLM` here is the
same network (parameter names of `HybridLM` with `scan_layers=False`, so the same params load)
that hands `memory_keys/values/mask` to its graph layers. Per segment s of a long document:

1. `probe` (a forward pass, jitted) returns each memory layer's q/k/v projections (before RoPE)
   for segment s. A memory layer's q does not depend on memory given to it or to later layers,
   so with one memory layer (or memory layers queried in depth order) this is exact.
2. The host searches every stream's memory (segments < s) with the normalised queries
   (`search_vectors`) and gathers the top-k stored keys/values `[B, T, k, kv_heads, head_dim]`.
3. The model runs on segment s with those memory edges (training step or scoring). The stored
   keys are rotated by RoPE to the querying token's position, so a memory logit depends on
   content only (a retrieved entry acts as if at distance 0).
4. Segment s's normalised keys and keys/values are added to the memory. They are numpy arrays:
   no gradient ever flows into stored entries.

Overlap: step 3 is dispatched asynchronously; step 4 (host FAISS add) runs while it computes.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sosm_jax.layers import MIXERS
from sosm_jax.layers.common import MLP, RMSNorm, compute_dtype, param_dtype
from sosm_jax.layers.embed import Embedder
from sosm_jax.layers.hgrn2 import cumulative_lower_bounds
from sosm_jax.models.config import freeze, layer_mixers
from sosm_jax.ops import attention as attn_ops
from sosm_jax.memory.store import MemoryBank, l2_normalize


def memory_layer_indices(cfg, layers=None) -> tuple[int, ...]:
  """Layers that read memory: the given ones, or every 'graph' layer; ValueError if not graph."""
  names = layer_mixers(cfg)
  idx = tuple(i for i, n in enumerate(names) if n == "graph") if layers is None else tuple(layers)
  for i in idx:
    if names[i] != "graph":
      raise ValueError(f"memory layer {i} is {names[i]!r}; only 'graph' layers take memory edges.")
  if not idx:
    raise ValueError("the model has no 'graph' layer to read memory; add 'graph' to model.pattern.")
  return idx


class _Block(nn.Module):
  """`hybrid.Block` with memory kwargs for graph mixers (same parameter names)."""
  cfg: Any
  mixer_name: str

  @nn.compact
  def __call__(self, x, positions, segment_ids, lower_bound, layer_index, memory):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, ("norm",), compute_dtype(cfg), param_dtype(cfg), name=name)
    extra = {"lower_bound": lower_bound} if self.mixer_name == "hgrn2" else {}
    if memory is not None:
      extra.update(memory_keys=memory[0], memory_values=memory[1], memory_mask=memory[2])
    y, _ = MIXERS[self.mixer_name](cfg=cfg, layer_index=layer_index, name="mixer")(
        norm("mixer_norm")(x), positions=positions, segment_ids=segment_ids, **extra)
    x = x + y.astype(x.dtype)
    return x + MLP(cfg, name="mlp")(norm("mlp_norm")(x)).astype(x.dtype)


class MemoryLM(nn.Module):
  """tokens `[B, T]` -> logits `[B, T, V]`; memory {layer: (keys, values, mask)} per graph layer.

  keys/values `[B, T, M, kv_heads, head_dim]` (unrotated, as stored), mask `[B, T, M]` bool.
  """
  cfg: Any

  @nn.compact
  def __call__(self, tokens, *, positions=None, segment_ids=None, memory=None):
    cfg = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if not cfg.document_masking:
      segment_ids = None
    embedder = Embedder(cfg, name="embed")
    x = embedder.encode(tokens)
    names = layer_mixers(cfg)
    lbs = None
    if "hgrn2" in names:
      width = cfg.d_model // cfg.hgrn2_head_dim * cfg.hgrn2_head_dim
      table = self.param("hgrn2_lower_bounds",
                         nn.with_logical_partitioning(nn.initializers.zeros, ("layers", "heads")),
                         (cfg.num_layers, width), param_dtype(cfg))
      lbs = cumulative_lower_bounds(jnp.asarray(table))
    for i, name in enumerate(names):
      mem = None if memory is None else memory.get(i)
      if mem is not None and _get(cfg.graph, "rope"):
        mem = (rotate_to_queries(mem[0], positions, cfg.rope_base),) + tuple(mem[1:])
      x = _Block(cfg, name, name=f"layer_{i}")(x, positions, segment_ids,
                                               None if lbs is None else lbs[i], i, mem)
    x = RMSNorm(cfg.norm_eps, ("norm",), compute_dtype(cfg), param_dtype(cfg), name="final_norm")(x)
    return embedder.logits(x)


def _get(g, key):
  return g[key] if hasattr(g, "__getitem__") else getattr(g, key)


def rotate_to_queries(mem_keys, positions, base):
  """RoPE on memory keys `[B, T, M, H, D]` at their querying token's position `[B, T]`."""
  b, t, m, h, d = mem_keys.shape
  r = attn_ops.apply_rope(mem_keys.reshape(b, t, m * h, d), positions, base)
  return r.reshape(b, t, m, h, d)


def search_vectors(x, num_kv):
  """Normalised search vectors `[B, T, kv_heads * head_dim]` from q or k `[B, T, heads, D]`.

  Each head is L2-normalised; query heads of one kv group are averaged (grouped queries), so a
  query's inner product with a key is the mean cosine over kv heads (up to one global scale,
  which the index's own normalisation removes).
  """
  x = np.asarray(x, np.float32)
  b, t, h, d = x.shape
  x = l2_normalize(x).reshape(b, t, num_kv, h // num_kv, d).mean(3)
  return l2_normalize(x).reshape(b, t, num_kv * d)


class SegmentRunner:
  """Model + per-layer memory banks; the pieces of the per-segment loop (see module doc).

  model_cfg: `config.model` (scan_layers is ignored: MemoryLM runs layers in a loop).
  memory_cfg: memory keys (store.MEMORY_DEFAULTS). num_streams: batch rows (one document each).
  """

  def __init__(self, model_cfg, memory_cfg=None, *, num_streams: int, layers=None, **over):
    self.cfg = freeze(model_cfg)
    self.module = MemoryLM(self.cfg)
    self.layers = memory_layer_indices(self.cfg, layers)
    g = self.cfg.graph
    self.kv = _get(g, "num_kv_heads") or self.cfg.attn_num_kv_heads
    self.head_dim = _get(g, "head_dim") or self.cfg.attn_head_dim
    self.banks = {i: MemoryBank(num_streams, self.kv * self.head_dim, memory_cfg, **over)
                  for i in self.layers}
    self.top_k = self.banks[self.layers[0]].memories[0].cfg["top_k"]
    self.probe = jax.jit(self._probe)

  def init(self, rng, batch_size: int, seq_len: int):
    """Params (unboxed) of MemoryLM (= HybridLM with scan_layers=False)."""
    tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
    return nn.unbox(jax.jit(self.module.init)(rng, tokens)["params"])

  def _probe(self, params, tokens, positions=None):
    """{layer: (q, k, v)} projections (before RoPE) of the memory layers for tokens `[B, T]`."""
    wanted = {f"layer_{i}" for i in self.layers}
    def keep(mdl, method):
      path = mdl.path
      return (method == "__call__" and len(path) >= 3 and path[0] in wanted and path[1] == "mixer"
              and path[2] in ("q_proj", "k_proj", "v_proj") and len(path) == 3)
    _, state = self.module.apply({"params": params}, tokens, positions=positions,
                                 capture_intermediates=keep, mutable=["intermediates"])
    inter = state["intermediates"]
    return {i: tuple(inter[f"layer_{i}"]["mixer"][p]["__call__"][0] for p in ("q_proj", "k_proj", "v_proj"))
            for i in self.layers}

  def empty_memory(self, batch: int, length: int):
    """All-masked memory inputs (a model with these equals the model without memory)."""
    z = np.zeros((batch, length, self.top_k, self.kv, self.head_dim), np.float32)
    m = np.zeros((batch, length, self.top_k), bool)
    return {i: (z, z, m) for i in self.layers}

  def retrieve(self, probed):
    """Memory inputs {layer: (keys, values, mask)} for a probed segment (host FAISS search)."""
    out = {}
    for i in self.layers:
      q = probed[i][0]
      b, t = q.shape[:2]
      keys, values, valid, _ = self.banks[i].retrieve(search_vectors(q, self.kv), self.top_k,
                                                      key_shape=(self.kv, self.head_dim))
      out[i] = (keys.astype(np.float32), values.astype(np.float32), valid)
    return out

  def add(self, probed, positions=None, segment=0):
    """Stores a probed segment's keys/values (numpy: no gradient) with position/segment metadata."""
    for i in self.layers:
      _, k, v = (np.asarray(a, np.float32) for a in probed[i])
      b, t = k.shape[:2]
      pos = np.broadcast_to(np.arange(t) if positions is None else np.asarray(positions), (b, t))
      meta = {"position": pos, "segment": np.full((b, t), segment, np.int32)}
      self.banks[i].add(search_vectors(k, self.kv), k, v, meta)

  def reset(self, streams=None):
    """Resets the memories of the given streams (all when None) at a document boundary."""
    for bank in self.banks.values():
      bank.reset(streams)

  def save(self, directory: str):
    """Memory of every layer under `directory/layer_<i>` (next to a model checkpoint)."""
    for i, bank in self.banks.items():
      bank.save(f"{directory}/layer_{i}")

  def load(self, directory: str):
    for i in self.layers:
      self.banks[i] = MemoryBank.load(f"{directory}/layer_{i}", len(self.banks[i]))

  def apply(self, params, tokens, memory=None, positions=None):
    return self.module.apply({"params": params}, tokens, positions=positions, memory=memory)

  def run_document(self, params, tokens, segment_len: int, *, apply_fn=None):
    """Scores a long document `[B, N]` segment by segment with memory -> logits `[B, N, V]`.

    Memory is reset first; each segment sees its own tokens (window) plus the top-k memory
    entries of all earlier segments. Positions restart at 0 in every segment (the window);
    the memory carries what lies beyond it.
    """
    tokens = np.asarray(tokens)
    b, n = tokens.shape
    if n % segment_len:
      raise ValueError(f"document length {n} is not a multiple of segment_len {segment_len}.")
    apply_fn = apply_fn or jax.jit(self.apply)
    self.reset()
    outs = []
    for s in range(n // segment_len):
      seg = jnp.asarray(tokens[:, s * segment_len:(s + 1) * segment_len])
      probed = self.probe(params, seg)
      mem = self.retrieve(probed) if s else self.empty_memory(b, segment_len)
      outs.append(apply_fn(params, seg, mem))   # dispatched asynchronously
      self.add(probed, segment=s)               # host work overlaps the device call
    return jnp.concatenate(outs, axis=1)

  def generate(self, params, prompt, segment_len: int, max_new_tokens: int, *, apply_fn=None):
    """Greedy continuation of prompts `[B, N]` (N may exceed the window) -> `[B, N + new]`.

    Whole segments before the last (partial or full) one only fill the memory; the current
    segment is run padded to segment_len (causal, so padding never changes earlier positions;
    one compiled shape) with memory retrieved for its queries. When it is full, it is added to
    the memory and a new segment starts with the next token. Memory is reset first.
    """
    prompt = np.asarray(prompt)
    b, n = prompt.shape
    if n < 1:
      raise ValueError("generate needs a prompt of at least one token.")
    apply_fn = apply_fn or jax.jit(self.apply)
    self.reset()
    done = (n - 1) // segment_len
    for s in range(done):
      self.add(self.probe(params, jnp.asarray(prompt[:, s * segment_len:(s + 1) * segment_len])),
               segment=s)
    cur = [prompt[:, done * segment_len:]]
    out = [prompt]
    seg_index = done
    for _ in range(max_new_tokens):
      toks = np.concatenate(cur, 1)
      length = toks.shape[1]
      padded = np.zeros((b, segment_len), prompt.dtype)
      padded[:, :length] = toks
      probed = self.probe(params, jnp.asarray(padded))
      mem = self.retrieve(probed) if seg_index else self.empty_memory(b, segment_len)
      logits = apply_fn(params, jnp.asarray(padded), mem)
      nxt = np.asarray(jnp.argmax(logits[:, length - 1], -1)).astype(prompt.dtype)[:, None]
      out.append(nxt)
      if length == segment_len:              # segment complete: it becomes memory
        self.add(probed, segment=seg_index)
        seg_index += 1
        cur = [nxt]
      else:
        cur.append(nxt)
    return np.concatenate(out, 1)
