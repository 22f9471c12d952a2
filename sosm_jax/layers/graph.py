"""Graph-routing mixer (SOSM): attention over a learned causal top-K token graph plus a local window.

Per token the layer projects a semantic state (`semantic_dim`, blocks of `semantic_block_size`)
and a temporal state (`temporal_dim`) from the hidden state; `ops.graph_build` links each token
to at most k_max earlier tokens (+ shortcut edges between hubs) and `ops.graph_attention`
attends over those edges and the local window in one softmax, optionally with memory edges.

Gradients. Which edges exist (top-K, adaptive K, mutual k-NN, temporal gate, hubs) is discrete
and gets no gradient. q/k/v/o projections are trained by the attention. The semantic projection
(`sem_proj`) learns through the edge bias w_sim[h]·sim(t, j), the temporal projections
(`temp_proj`, `gate_proj`) through w_gate[h]·log σ(gate logit(t, j)); both biases are on every
edge's logit (`edge_bias=True`; with it off those projections get no gradient at all).
`memory_gate` [heads] is the learned per-head gate of the memory edges: a bias on their logits in
the joint softmax with the local and graph edges (0 at init; an empty memory changes nothing).

Config: `cfg.graph` (see `default_graph_config`); heads/head dims fall back to the model's
attn_num_heads / attn_num_kv_heads / attn_head_dim when 0.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sosm_jax.layers.common import (BATCH_LENGTH_HEADS, BATCH_LENGTH_KV_HEADS, Dense, compute_dtype,
                                    constrain, param_dtype)
from sosm_jax.ops import attention as attn_ops
from sosm_jax.ops import graph_attention as ga
from sosm_jax.ops import graph_build as gb

_ROADMAP_WEIGHTS = (0.5, 0.0, 0.0, 0.3, 0.0, 0.2) + (0.0,) * 10  # blocks I, R2, K of 16


GRAPH_DEFAULTS = dict(
    num_heads=0, num_kv_heads=0, head_dim=0,   # 0: model's attn_num_heads/kv_heads/head_dim
    rope=True,                                 # RoPE on q/k (positions within the document)
    semantic_dim=64, semantic_block_size=4, temporal_dim=32,
    similarity="blockwise",                    # 'full' | 'blockwise' | 'projection'
    block_weights=_ROADMAP_WEIGHTS,            # one per semantic block ('blockwise')
    proj_dim=16, proj_seed=0,                  # fixed random orthonormal ('projection')
    mode="block",                              # 'block' (fast, NSA/MoBA-like) | 'token' (exact)
    window=64,                                 # local window; graph edges start beyond it
    k_max=12, k_min=3, k_base=5.0, k_alpha=1.5, adaptive_k=True,
    mutual_knn=False,
    temporal_gate=True, tau_mu=0.15, tau_temp=0.3, tau_high=0.6,
    num_shortcuts=2, hub_threshold=0.5,
    select_block_size=64, select_num_blocks=8,   # block mode
    query_chunk=4096, key_chunk=256,             # memory bounds of the builders
    edge_bias=True,
)


def default_graph_config():
  """The graph mixer's keys (merged into `config.model.graph`); values in `GRAPH_DEFAULTS`."""
  import ml_collections  # pylint: disable=import-outside-toplevel  (the layer itself runs without it)
  return ml_collections.ConfigDict(dict(GRAPH_DEFAULTS))


def graph_opts(g) -> dict:
  """Graph-build options (dict for `ops.graph_build`) from a graph config; validates it."""
  validate_graph_config(g)
  return {k: _get(g, k) for k in gb.default_opts()}


def _get(g, key):
  return g[key] if hasattr(g, "__getitem__") else getattr(g, key)


def validate_graph_config(g) -> None:
  """Raises ValueError naming the bad key of a graph config."""
  def fail(key, msg):
    raise ValueError(f"model.graph.{key}: {msg}")
  if _get(g, "semantic_dim") % _get(g, "semantic_block_size"):
    fail("semantic_dim", "must be a multiple of semantic_block_size")
  if _get(g, "similarity") not in gb.SIMILARITIES:
    fail("similarity", f"choose one of {gb.SIMILARITIES}")
  if _get(g, "similarity") == "blockwise":
    nb = _get(g, "semantic_dim") // _get(g, "semantic_block_size")
    w = tuple(_get(g, "block_weights"))
    if len(w) != nb or not any(w):
      fail("block_weights", f"needs {nb} weights (one per block), not all zero; got {len(w)}")
  if _get(g, "similarity") == "projection" and not 0 < _get(g, "proj_dim") <= _get(g, "semantic_dim"):
    fail("proj_dim", "must be in 1..semantic_dim")
  if _get(g, "mode") not in ("token", "block"):
    fail("mode", "choose 'token' or 'block'")
  if _get(g, "window") < 2:
    fail("window", "must be >= 2 (self and the previous token are covered by the window)")
  if not 1 <= _get(g, "k_min") <= _get(g, "k_max"):
    fail("k_min", "need 1 <= k_min <= k_max")
  for key in ("select_block_size", "select_num_blocks", "query_chunk", "key_chunk"):
    if _get(g, key) < 1:
      fail(key, "must be >= 1")
  if _get(g, "num_shortcuts") < 0:
    fail("num_shortcuts", "must be >= 0")


def graph_dims(cfg) -> dict:
  """Resolved sizes: heads, kv_heads, head_dim, sem, temp, feat (similarity feature dim)."""
  g = cfg.graph
  h = _get(g, "num_heads") or cfg.attn_num_heads
  kv = _get(g, "num_kv_heads") or cfg.attn_num_kv_heads
  dh = _get(g, "head_dim") or cfg.attn_head_dim
  if h % kv:
    raise ValueError(f"model.graph.num_heads={h} must be a multiple of num_kv_heads={kv}.")
  sim = _get(g, "similarity")
  s, bs = _get(g, "semantic_dim"), _get(g, "semantic_block_size")
  if sim == "full":
    feat = s
  elif sim == "blockwise":
    feat = bs * int(np.count_nonzero(np.asarray(_get(g, "block_weights"))))
  else:
    feat = _get(g, "proj_dim")
  return dict(heads=h, kv_heads=kv, head_dim=dh, sem=s, temp=_get(g, "temporal_dim"), feat=feat)


class GraphMixer(nn.Module):
  """Graph-routing mixer. x `[B, T, D]` -> (y `[B, T, D]`, cache).

  Modes as for attention: cache=None (training); cache given, decode=False (prefill from an
  empty cache); decode=True (one token `[B, 1, D]` continues the cached stream: its neighbours
  are searched among cached states, the past graph is never rebuilt). Optional memory edges:
  memory_keys/values `[B, T, M, heads or kv_heads, head_dim]`, memory_mask `[B, T, M]` bool;
  keys as stored (before RoPE: the layer rotates them to each query's position). With
  `mutable=['memory_probe']` it sows 'qkv' = (q, k, v) before RoPE (what the memory searches
  with and stores). With `mutable=['intermediates']` it sows 'graph_stats' (edge provenance, see
  `graph_provenance`); otherwise none of that is computed.
  """
  cfg: Any
  layer_index: Any = 0

  @nn.compact
  def __call__(self, x, *, positions=None, segment_ids=None, cache=None, decode=False,
               memory_keys=None, memory_values=None, memory_mask=None):
    cfg, g = self.cfg, self.cfg.graph
    opts = graph_opts(g)
    dims = graph_dims(cfg)
    h, kv, dh = dims["heads"], dims["kv_heads"], dims["head_dim"]
    b, t, _ = x.shape
    kw = dict(dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg))
    f32 = dict(dtype=jnp.float32, param_dtype=param_dtype(cfg))
    q = Dense((h, dh), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x)
    k = Dense((kv, dh), ("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x)
    v = Dense((kv, dh), ("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x)
    if self.is_mutable_collection("memory_probe") and not self.is_initializing():
      # what the host memory searches with and stores (only when asked for: init makes every
      # collection mutable)
      self.sow("memory_probe", "qkv", (q, k, v))
    if memory_keys is not None:
      memory_keys, memory_values = memory_keys.astype(q.dtype), memory_values.astype(v.dtype)
    if _get(g, "rope"):
      if positions is None:  # default: index in the row (continuing the cache when decoding)
        start = cache["index"] if decode else 0
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
      q = attn_ops.apply_rope(q, positions, cfg.rope_base)
      k = attn_ops.apply_rope(k, positions, cfg.rope_base)
      if memory_keys is not None:   # stored unrotated: a memory logit depends on content only
        memory_keys = rotate_to_queries(memory_keys, positions, cfg.rope_base)
    q, k = constrain(q, BATCH_LENGTH_HEADS), constrain(k, BATCH_LENGTH_KV_HEADS)
    v = constrain(v, BATCH_LENGTH_KV_HEADS)
    # Graph states in float32: they are small and decide discrete selections.
    sem = Dense((dims["sem"],), ("embed", None), name="sem_proj", **f32)(x)
    temp = Dense((dims["temp"],), ("embed", None), name="temp_proj", **f32)(x)
    gfeat = Dense((dims["temp"],), (None, None), name="gate_proj", **f32)(temp)
    fq, fk = gb.similarity_features(sem, similarity=_get(g, "similarity"),
                                    block_size=_get(g, "semantic_block_size"),
                                    block_weights=_get(g, "block_weights"),
                                    proj_dim=_get(g, "proj_dim"), proj_seed=_get(g, "proj_seed"))
    w_sim = self.param("edge_sim_weight", nn.with_logical_partitioning(nn.initializers.ones, ("heads",)),
                       (h,), param_dtype(cfg))
    w_gate = self.param("edge_gate_weight", nn.with_logical_partitioning(nn.initializers.ones, ("heads",)),
                        (h,), param_dtype(cfg))
    mem_gate = self.param("memory_gate", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)),
                          (h,), param_dtype(cfg))
    out = lambda o: Dense((cfg.d_model,), ("heads", "head_dim", "embed"), in_dims=2, name="o_proj",
                          **kw)(constrain(o, BATCH_LENGTH_HEADS))
    sg = jax.lax.stop_gradient
    mem = dict(memory_bias=mem_gate.astype(jnp.float32))
    if decode:
      if cache is None or t != 1:
        raise ValueError(f"decode=True needs a cache and one token per step (got T={t}).")
      if memory_keys is not None:
        mem.update(memory_keys=memory_keys[:, 0], memory_values=memory_values[:, 0],
                   memory_mask=memory_mask[:, 0])
      o, cache = self._decode_step(q, k, v, sem, fq, fk, gfeat, cache, opts, w_sim, w_gate, mem)
      return out(o), cache

    graph = gb.build_graph(sg(fq), sg(fk), sg(gfeat), sg(sem), segment_ids=segment_ids, opts=opts)
    bias = None
    if _get(g, "edge_bias"):
      bias = _edge_bias(gb.edge_scores(fq, fk, graph.idx), gb.edge_scores(gfeat, gfeat, graph.idx),
                        w_sim, w_gate, dims["temp"])
    mem.update(memory_keys=memory_keys, memory_values=memory_values, memory_mask=memory_mask)
    o = ga.graph_attention(q, k, v, graph.idx, graph.mask, window=opts["window"], edge_bias=bias,
                           segment_ids=segment_ids, **mem)
    y = out(o)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "graph_stats",
               graph_provenance(graph, sem, g, segment_ids=segment_ids, memory_mask=memory_mask))
    if cache is not None:
      cache = _prefill_cache(cache, k, v, fk, gfeat, graph)
    return y, cache

  def _decode_step(self, q, k, v, sem, fq, fk, gfeat, cache, opts, w_sim, w_gate, mem):
    cfg = self.cfg
    sg = jax.lax.stop_gradient
    pos = cache["index"]
    put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), pos, 1)
    kc, vc = put(cache["k"], k), put(cache["v"], v)
    fkc, gkc = put(cache["fk"], fk), put(cache["gk"], gfeat)
    d = gb.block_entropy_deficit(sem, opts["semantic_block_size"])[:, 0]
    stats = cache["stats"] + jnp.stack([jnp.ones_like(d), d, d * d], -1)
    sem_sum = cache["sem_sum"] + sem[:, 0]
    idx, mask, _, _, kth, hub, _ = gb.build_graph_step(
        sg(fq), sg(gfeat), sg(sem), fk_cache=sg(fkc), gk_cache=sg(gkc), kth_cache=cache["kth"],
        last_hub_cache=cache["last_hub"], stats=stats, sem_sum=sem_sum, seg_start=cache["seg_start"],
        pos=pos, opts=opts)
    bias = None
    if _get(cfg.graph, "edge_bias"):
      bias = _edge_bias(gb.edge_scores(fq, fkc, idx), gb.edge_scores(gfeat, gkc, idx), w_sim, w_gate,
                        gfeat.shape[-1])[:, 0]
    o = ga.graph_attention_step(q[:, 0], kc, vc, pos, idx[:, 0], mask[:, 0], window=opts["window"],
                                edge_bias=bias, seg_start=cache["seg_start"], **mem)
    prev_hub = jnp.where(pos > 0, jax.lax.dynamic_index_in_dim(cache["last_hub"], jnp.maximum(pos - 1, 0), 1,
                                                                keepdims=False), -1)
    last = jnp.where(hub[:, 0], pos, prev_hub).astype(jnp.int32)
    new = dict(cache, k=kc, v=vc, fk=fkc, gk=gkc, stats=stats, sem_sum=sem_sum, index=pos + 1,
               kth=put(cache["kth"], kth), last_hub=put(cache["last_hub"], last[:, None]))
    return o[:, None], new

  def init_cache(self, batch_size: int, max_len: int):
    """Empty decode cache (all `[batch, max_len, ...]` per token, plus running statistics)."""
    cfg = self.cfg
    d = graph_dims(cfg)
    b, n = batch_size, max_len
    return {
        "k": jnp.zeros((b, n, d["kv_heads"], d["head_dim"]), compute_dtype(cfg)),
        "v": jnp.zeros((b, n, d["kv_heads"], d["head_dim"]), compute_dtype(cfg)),
        "fk": jnp.zeros((b, n, d["feat"]), jnp.float32),      # similarity key features
        "gk": jnp.zeros((b, n, d["temp"]), jnp.float32),      # temporal gate features
        "kth": jnp.full((b, n), -jnp.inf, jnp.float32),       # mutual-kNN thresholds
        "last_hub": jnp.full((b, n), -1, jnp.int32),          # latest hub index <= position
        "stats": jnp.zeros((b, 3), jnp.float32),              # entropy-deficit count/sum/sumsq
        "sem_sum": jnp.zeros((b, d["sem"]), jnp.float32),     # running semantic sum (hubs)
        "seg_start": jnp.zeros((b,), jnp.int32),              # current document's first index
        "index": jnp.zeros((), jnp.int32),
    }

  @staticmethod
  def param_count(cfg) -> int:
    d = graph_dims(cfg)
    dm, h, kv, dh = cfg.d_model, d["heads"], d["kv_heads"], d["head_dim"]
    return (2 * dm * h * dh + 2 * dm * kv * dh + dm * d["sem"] + dm * d["temp"] + d["temp"] ** 2
            + 3 * h)

  @staticmethod
  def forward_flops_per_token(cfg, seq_len: int) -> float:
    """Projections, graph build (similarity scoring) and attention over window + edges."""
    g, d = cfg.graph, graph_dims(cfg)
    dm, h, dh, f = cfg.d_model, d["heads"], d["head_dim"], d["feat"]
    w = min(_get(g, "window"), seq_len)
    edges = _get(g, "k_max") + _get(g, "num_shortcuts")
    proj = 2.0 * (GraphMixer.param_count(cfg) - 3 * h)
    if _get(g, "mode") == "token":
      build = 2.0 * f * seq_len  # every earlier key scored (streaming)
    else:
      nblk = -(-seq_len // _get(g, "select_block_size"))
      build = 2.0 * f * (nblk + (_get(g, "select_num_blocks") + 1) * _get(g, "select_block_size"))
    # useful attention work: w window keys + the edges (the blockwise window computes 2w)
    return proj + build + 4.0 * h * dh * (w + edges)


MIXER = GraphMixer


def rotate_to_queries(memory_keys, positions, base):
  """RoPE on memory keys `[B, T, M, H, D]` at their querying token's position `[B, T]`.

  Memory keys are stored before RoPE; rotating each to its query's position makes the query-key
  product that of the unrotated vectors (a retrieved entry acts as if at distance 0).
  """
  b, t, m, h, d = memory_keys.shape
  r = attn_ops.apply_rope(memory_keys.reshape(b, t, m * h, d), positions, base)
  return r.reshape(b, t, m, h, d)


def _edge_bias(sim, gate_dot, w_sim, w_gate, d_gate):
  """Per-head edge logit bias w_sim[h]·sim + w_gate[h]·log σ(gate_dot/√d): `[b, t, k]` -> `[b, t, h, k]`."""
  gate_logit = gate_dot / np.sqrt(d_gate).astype(np.float32)
  return (w_sim.astype(jnp.float32)[:, None] * sim[:, :, None]
          + w_gate.astype(jnp.float32)[:, None] * jax.nn.log_sigmoid(gate_logit)[:, :, None])


def _prefill_cache(cache, k, v, fk, gfeat, graph):
  """Writes a whole prompt (positions 0..T-1) into an empty cache."""
  t = k.shape[1]
  put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), 0, 1)
  return dict(cache, k=put(cache["k"], k), v=put(cache["v"], v), fk=put(cache["fk"], fk),
              gk=put(cache["gk"], gfeat), kth=put(cache["kth"], graph.kth),
              last_hub=put(cache["last_hub"], graph.last_hub),
              stats=graph.stats[:, -1], sem_sum=graph.sem_sum[:, -1],
              seg_start=graph.seg_start[:, -1], index=jnp.asarray(t, jnp.int32))


def graph_provenance(graph, sem, g, *, segment_ids=None, memory_mask=None) -> dict:
  """Edge provenance and graph statistics (auxiliary; for logging).

  graph: a `gb.Graph` of `[b, t, k_max + num_shortcuts]` slots; sem `[b, t, sem_dim]`.
  Returns 'edge_index' / 'edge_mask' `[b, t, slots]` and float32 arrays: 'block_contrib'
  `[b, t, slots, num_blocks]` (each block's share of an
  edge's similarity: w_b·cos_b for 'blockwise', <s_t,b, s_j,b>/(|s_t||s_j|) otherwise, which sums
  to the cosine), 'dominant_block_counts' `[num_blocks]`, and scalars 'edges/semantic',
  'edges/shortcut', 'edges/local', 'edges/memory', 'degree/out_mean|out_min|out_max|in_max',
  'adaptive_k/mean', 'hub_fraction', 'kept_fraction/<stage>' (of top-K slots found).
  """
  f32 = jnp.float32
  bs, kmax = _get(g, "semantic_block_size"), _get(g, "k_max")
  b, t, s = sem.shape
  nb = s // bs
  blocks = sem.astype(f32).reshape(b, t, nb, bs)
  tgt = gb.gather_rows(blocks, graph.idx)  # [b, t, k, nb, bs]
  if _get(g, "similarity") == "blockwise":
    w = jnp.asarray(np.asarray(_get(g, "block_weights"), np.float32))
    contrib = w * jnp.sum(gb.l2_normalize(blocks)[:, :, None] * gb.l2_normalize(tgt), -1)
  else:
    norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a), (-1, -2)) + 1e-6)
    contrib = jnp.sum(blocks[:, :, None] * tgt, -1) / (norm(blocks)[:, :, None, None] * norm(tgt)[..., None])
  contrib = contrib * graph.mask[..., None]
  dominant = jax.nn.one_hot(jnp.argmax(contrib, -1), nb) * graph.mask[..., None]
  deg = graph.mask.sum(-1).astype(f32)
  indeg = jax.vmap(lambda i, m: jnp.zeros((t,), f32).at[i.reshape(-1)].add(m.reshape(-1)))(
      graph.idx, graph.mask.astype(f32))
  pos = jnp.arange(t)
  local = jnp.minimum(pos[None] - graph.seg_start + 1, _get(g, "window")).astype(f32)
  found = jnp.maximum(graph.stages["topk"].sum(), 1).astype(f32)
  out = {
      "edge_index": graph.idx, "edge_mask": graph.mask,
      "block_contrib": contrib,
      "dominant_block_counts": dominant.sum((0, 1, 2)),
      "edges/semantic": graph.mask[..., :kmax].sum().astype(f32),
      "edges/shortcut": graph.mask[..., kmax:].sum().astype(f32),
      "edges/local": local.sum(),
      "edges/memory": (jnp.zeros((), f32) if memory_mask is None else memory_mask.sum().astype(f32)),
      "degree/out_mean": deg.mean(), "degree/out_min": deg.min(), "degree/out_max": deg.max(),
      "degree/in_max": indeg.max(),
      "adaptive_k/mean": graph.k_t.astype(f32).mean(),
      "hub_fraction": graph.is_hub.astype(f32).mean(),
  }
  for name in ("adaptive_k", "mutual_knn", "temporal_gate"):
    out[f"kept_fraction/{name}"] = graph.stages[name].sum().astype(f32) / found
  if segment_ids is not None:
    out["edges/local"] = jnp.sum(local * (segment_ids > 0))
  return out
