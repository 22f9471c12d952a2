"""Memory beyond the window: run a `LanguageModel` segment by segment with a host memory per stream.

The model itself (`HybridLM`, any `scan_layers`) takes `memory={layer: (keys, values, mask)}`
for its 'graph' layers; this driver fills those inputs from FAISS memories on the host. Per
segment s of a long document:

1. `probe` (a forward pass, jitted) returns each memory layer's q/k/v projections (before RoPE)
   for segment s (`LanguageModel.memory_probe`). A memory layer's q does not depend on memory
   given to it, so with one memory layer this is exact; deeper memory layers use the q/k/v of
   the memory-free network.
2. The host searches every stream's memory (segments < s) with the normalised queries
   (`search_vectors`) and gathers the top-k stored keys/values `[B, T, k, kv_heads, head_dim]`.
3. The model runs on segment s with those memory edges (training step, scoring or decoding).
   The graph layer rotates the stored keys by RoPE to each query's position, so a memory logit
   depends on content only, and mixes them with its local and graph edges by a learned
   per-head gate.
4. Segment s's normalised keys and keys/values are added to the memory. They are numpy arrays:
   no gradient ever flows into stored entries.

Overlap: step 3 is dispatched asynchronously; step 4 (host FAISS add) runs while it computes.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sosm_jax.memory.store import MemoryBank, l2_normalize
from sosm_jax.models.config import layer_mixers
from sosm_jax.models.sampling import sample_token


def memory_layer_indices(cfg, layers=None) -> tuple[int, ...]:
  """Layers that read memory: the given ones, or every 'graph' layer; ValueError if not graph."""
  names = layer_mixers(cfg)
  idx = tuple(i for i, n in enumerate(names) if n == "graph") if not layers else tuple(layers)
  for i in idx:
    if not 0 <= i < len(names) or names[i] != "graph":
      raise ValueError(f"memory.layers: layer {i} is "
                       f"{names[i] if 0 <= i < len(names) else 'out of range'!r}; only 'graph' "
                       f"layers take memory edges (leave memory.layers empty for all of them).")
  if not idx:
    raise ValueError("the model has no 'graph' layer to read memory; add 'graph' to model.pattern.")
  return idx


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


def _concat_probes(parts):
  """[{layer: (q, k, v) `[B, t_i, ...]`}] -> one probe along time."""
  return {i: tuple(np.concatenate([np.asarray(p[i][j]) for p in parts], 1) for j in range(3))
          for i in parts[0]}


class SegmentRunner:
  """A `LanguageModel` plus per-layer memory banks; the pieces of the per-segment loop.

  model: a `LanguageModel` or a `config.model` ConfigDict (built with `build_model`).
  memory_cfg: memory keys (store.MEMORY_DEFAULTS). num_streams: batch rows (one document each).
  layers: memory layers (default: every 'graph' layer). The params are the model's own.
  """

  def __init__(self, model, memory_cfg=None, *, num_streams: int, layers=None, **over):
    from sosm_jax.layers.graph import graph_dims  # pylint: disable=import-outside-toplevel
    from sosm_jax.models import build_model  # pylint: disable=import-outside-toplevel
    self.model = model if hasattr(model, "memory_probe") else build_model(model)
    self.cfg = self.model.cfg
    self.layers = memory_layer_indices(self.cfg, layers)
    dims = graph_dims(self.cfg)
    self.kv, self.head_dim = dims["kv_heads"], dims["head_dim"]
    self.num_streams = int(num_streams)
    self.banks = {i: MemoryBank(num_streams, self.kv * self.head_dim, memory_cfg, **over)
                  for i in self.layers}
    self.top_k = self.banks[self.layers[0]].memories[0].cfg["top_k"]
    self.probe = jax.jit(self._probe)
    self._jit = {}

  # ------------------------------------------------------------------ model pieces

  def init(self, rng, batch_size: int, seq_len: int):
    """Params (unboxed) of the model (the same tree as without memory)."""
    return nn.unbox(jax.jit(self.model.init, static_argnums=(1, 2))(rng, batch_size, seq_len))

  def _probe(self, params, tokens, positions=None, segment_ids=None, cache=None):
    """{memory layer: (q, k, v)} before RoPE for tokens `[B, T]` (see LanguageModel.memory_probe)."""
    probed = self.model.memory_probe(params, tokens, positions=positions, segment_ids=segment_ids,
                                     cache=cache)
    return {i: probed[i] for i in self.layers}

  def apply(self, params, tokens, memory=None, positions=None, segment_ids=None):
    """logits `[B, T, V]` of the model with memory inputs {layer: (keys, values, mask)}."""
    return self.model.apply(params, tokens, positions=positions, segment_ids=segment_ids,
                            memory=memory)

  def _jitted(self, name):
    if name not in self._jit:
      fns = {"apply": self.apply,
             "prefill": functools.partial(self.model.prefill, last_only=True),
             "decode": self.model.decode_step}
      self._jit[name] = jax.jit(fns[name], static_argnums=(2,) if name == "prefill" else ())
    return self._jit[name]

  # ------------------------------------------------------------------ host memory

  def empty_memory(self, batch: int, length: int):
    """All-masked memory inputs (a model with these equals the model without memory)."""
    z = np.zeros((batch, length, self.top_k, self.kv, self.head_dim), np.float32)
    m = np.zeros((batch, length, self.top_k), bool)
    return {i: (z, z, m) for i in self.layers}

  def retrieve(self, probed, match=None):
    """Memory inputs {layer: (keys, values, mask)} for a probed segment (host FAISS search).

    match: optional {metadata name: `[B, T]`}: entries count only where their metadata equals
    the querying token's (e.g. {'doc': ...}: never across documents).
    """
    out = {}
    for i in self.layers:
      # each stream's search vectors on the bank's threads (the same numbers as the whole batch's)
      keys, values, valid, _ = self.banks[i].retrieve(
          np.asarray(probed[i][0], np.float32), self.top_k, key_shape=(self.kv, self.head_dim),
          match=match, to_search=self._stream_search_vectors)
      out[i] = (np.asarray(keys, np.float32), np.asarray(values, np.float32), valid)
    return out

  def _stream_search_vectors(self, q):
    """search_vectors of one stream's queries `[T, heads, D]` -> `[T, kv_heads * D]`."""
    return search_vectors(q[None], self.kv)[0]

  def add(self, probed, positions=None, segment=0, metadata=None, where=None):
    """Stores a probed segment's keys/values (numpy: no gradient) with metadata.

    Metadata per entry: 'position' (given `[B, T]` or 0..T-1), 'segment' (the int given) and
    any `metadata` {name: `[B, T]`}; where `[B, T]` bool selects the tokens stored.
    """
    for i in self.layers:
      k, v = (np.asarray(a, np.float32) for a in probed[i][1:])   # q is not stored
      b, t = k.shape[:2]
      pos = np.broadcast_to(np.arange(t) if positions is None else np.asarray(positions), (b, t))
      meta = {"position": pos, "segment": np.full((b, t), segment, np.int32), **(metadata or {})}
      self.banks[i].add(search_vectors(k, self.kv), k, v, meta, where=where)

  def reset(self, streams=None):
    """Resets the memories of the given streams (all when None) at a document boundary."""
    for bank in self.banks.values():
      bank.reset(streams)

  def entries(self) -> list[int]:
    """Entries per stream in the first memory layer."""
    return [len(m) for m in self.banks[self.layers[0]].memories]

  def save(self, directory: str):
    """Memory of every layer under `directory/layer_<i>` (next to a model checkpoint)."""
    for i, bank in self.banks.items():
      bank.save(f"{directory}/layer_{i}")

  def load(self, directory: str):
    """Replaces every layer's memory by the one saved in `directory` (see `save`)."""
    for i in self.layers:
      self.banks[i] = MemoryBank.load(f"{directory}/layer_{i}", self.num_streams)

  # ------------------------------------------------------------------ long documents

  def run_document(self, params, tokens, segment_len: int, *, apply_fn=None, positions=None):
    """Scores a long document `[B, N]` segment by segment with memory -> logits `[B, N, V]`.

    Memory is reset first; each segment sees its own tokens (window) plus the top-k memory
    entries of all earlier segments. positions `[B, N]`: default restart at 0 in every segment
    (the window; RoPE makes only differences matter); the memory carries what lies beyond it.
    """
    tokens = np.asarray(tokens)
    b, n = tokens.shape
    if n % segment_len:
      raise ValueError(f"document length {n} is not a multiple of segment_len {segment_len}.")
    apply_fn = apply_fn or self._jitted("apply")
    self.reset()
    outs = []
    for s in range(n // segment_len):
      window = slice(s * segment_len, (s + 1) * segment_len)
      seg = jnp.asarray(tokens[:, window])
      pos = None if positions is None else jnp.asarray(np.asarray(positions)[:, window])
      probed = self.probe(params, seg, pos)
      memory = self.retrieve(probed)
      outs.append(apply_fn(params, seg, memory) if pos is None
                  else apply_fn(params, seg, memory, pos))      # dispatched asynchronously
      self.add(probed, segment=s)                                   # host work overlaps it
    return jnp.concatenate(outs, axis=1)

  def generate(self, params, prompt, segment_len: int, max_new_tokens: int, *, rng=None,
               temperature: float = 0.0, top_p: float = 1.0):
    """Continues prompts `[B, N]` (N may exceed the window) -> `[B, N + max_new_tokens]`.

    The tokens of `stream` (see there) after the prompt.
    """
    prompt = np.asarray(prompt)
    new = [t[:, None] for t in self.stream(params, prompt, segment_len, max_new_tokens, rng=rng,
                                           temperature=temperature, top_p=top_p)]
    return np.concatenate([prompt] + new, 1)

  def stream(self, params, prompt, segment_len: int, max_new_tokens: int, *, rng=None,
             temperature: float = 0.0, top_p: float = 1.0):
    """Yields the next token of every prompt `[B, N]` (N may exceed the window), `[B]` each.

    The window is `segment_len` tokens. Whole segments before the last (partial or full) one
    only fill the memory; the current segment is prefilled (with memory retrieved for its
    queries) and then decoded token by token with the model's cache, each new token's memory
    retrieved for its own query. When the segment is full its keys/values go to the memory and
    a new segment (fresh cache, positions from 0) starts with the next token. Memory is reset
    first. temperature 0 = greedy; else sampling (rng required) with nucleus top_p. A token is
    computed only when asked for (a caller that stops early, e.g. at EOS, decodes no further).
    """
    prompt = np.asarray(prompt)
    b, n = prompt.shape
    if n < 1:
      raise ValueError("generate needs a prompt of at least one token.")
    if temperature > 0 and rng is None:
      raise ValueError("generate: sampling (temperature > 0) needs rng=jax.random.key(...).")
    rng = jax.random.key(0) if rng is None else rng
    prefill, decode = self._jitted("prefill"), self._jitted("decode")
    self.reset()
    done = (n - 1) // segment_len
    for s in range(done):
      seg = jnp.asarray(prompt[:, s * segment_len:(s + 1) * segment_len])
      self.add(self.probe(params, seg), segment=s)
    seg_index = done

    def start(tokens):   # a new window: probe, retrieve, prefill
      probed = self.probe(params, jnp.asarray(tokens))
      logits, cache = prefill(params, jnp.asarray(tokens), segment_len, self.retrieve(probed))
      return logits[:, -1], cache, [probed]

    last, cache, parts = start(prompt[:, done * segment_len:])
    length = n - done * segment_len
    for i in range(max_new_tokens):
      rng, sub = jax.random.split(rng)
      nxt = np.asarray(sample_token(last, sub, temperature, top_p)).astype(prompt.dtype)
      yield nxt
      if i == max_new_tokens - 1:
        break
      if length == segment_len:               # window full: it becomes memory
        self.add(_concat_probes(parts), segment=seg_index)
        seg_index += 1
        last, cache, parts = start(nxt[:, None])
        length = 1
      else:
        token = jnp.asarray(nxt)
        probed = self.probe(params, token[:, None], cache=cache)
        last, cache = decode(params, token, cache, self.retrieve(probed))
        parts.append(probed)
        length += 1
