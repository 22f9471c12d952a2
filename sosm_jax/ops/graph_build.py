"""Causal top-K similarity graph between tokens: features, streaming/blockwise top-K, filters, shortcuts.

Everything here is a pure jnp function with static shapes and no parameters. A token at position p
may link only to earlier tokens j <= p - exclude (the local window of the attention covers the
`exclude` most recent tokens, self included), and only within its own segment. The graph is
shared by all attention heads. Selection is discrete: callers wrap the inputs in
`jax.lax.stop_gradient` (no gradient flows through which edges are chosen).

Layout: features `[batch, time, feat]`, edge lists `[batch, time, slots]` (int32 indices of earlier
tokens, bool masks). Similarities are float32. Empty top-K slots hold index 0 and similarity -inf;
in a finished graph (`build_graph`) empty slots hold the query's own index (masked off).
"""
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf
SIMILARITIES = ("full", "blockwise", "projection")


# ----------------------------------------------------------------------------- features

def l2_normalize(x, axis=-1, eps=1e-6):
  """Unit vectors along `axis`; zero vectors stay (near) zero instead of NaN."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def random_orthonormal(d_in: int, d_out: int, seed: int = 0) -> np.ndarray:
  """A fixed (not learned) `[d_in, d_out]` matrix with orthonormal columns, reproducible from `seed`."""
  if d_out > d_in:
    raise ValueError(f"proj_dim={d_out} must be <= semantic_dim={d_in}; lower graph.proj_dim.")
  g = np.random.default_rng(seed).standard_normal((d_in, d_out))
  q, r = np.linalg.qr(g)
  return (q * np.sign(np.diag(r))[None, :]).astype(np.float32)


def similarity_features(sem, *, similarity="full", block_size=4, block_weights=None,
                        proj_dim=16, proj_seed=0):
  """Query/key features whose dot product is the similarity between two tokens.

  sem `[batch, time, sem_dim]` -> (fq, fk), each `[batch, time, feat]` float32, with
  sim(t, j) = <fq_t, fk_j>:
  - 'full': cosine of the whole semantic state.
  - 'blockwise': sum_b w_b cos(sem_t[b], sem_j[b]) over blocks of `block_size` dims with w_b != 0
    (`block_weights`, one per block). Symmetric in t and j.
  - 'projection': cosine after a fixed random orthonormal projection to `proj_dim` dims.
  """
  if similarity == "full":
    f = l2_normalize(sem)
    return f, f
  if similarity == "blockwise":
    s = sem.shape[-1]
    w = np.asarray(block_weights, np.float32)
    if s % block_size or w.shape != (s // block_size,):
      raise ValueError(f"block_weights needs one weight per block ({s // block_size} blocks of "
                       f"{block_size}); got {w.shape[0] if w.ndim else 'a scalar'}.")
    sel = np.nonzero(w)[0]
    if sel.size == 0:
      raise ValueError("block_weights are all zero: give at least one block a weight.")
    blocks = sem.reshape(sem.shape[:-1] + (s // block_size, block_size))[..., sel, :]
    n = l2_normalize(blocks)
    fk = n.reshape(sem.shape[:-1] + (sel.size * block_size,))
    fq = (n * jnp.asarray(w[sel])[:, None]).reshape(fk.shape)
    return fq, fk
  if similarity == "projection":
    p = jnp.asarray(random_orthonormal(sem.shape[-1], proj_dim, proj_seed))
    f = l2_normalize(jnp.einsum("...s,sp->...p", sem.astype(jnp.float32), p))
    return f, f
  raise ValueError(f"graph.similarity={similarity!r}; choose one of {SIMILARITIES}.")


# ----------------------------------------------------------------------------- segments

def segment_starts(segment_ids, batch: int, length: int):
  """`[batch, time]` int32: index of the first token of each token's segment (0 without segments)."""
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.int32)
  t = jnp.arange(length, dtype=jnp.int32)
  new = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  return jax.lax.cummax(jnp.where(new, t[None], 0), axis=1)


def segment_cumsum(x, starts):
  """Inclusive running sum along time that restarts at each segment start.

  x `[batch, time, ...]`, starts `[batch, time]` (from `segment_starts`). The row's prefix sum
  minus the prefix before the segment start: cheap to compile and run; in float32 its absolute
  error grows with the row's total (|row sum| · 1e-7), small next to the thresholds it feeds.
  """
  x = x.astype(jnp.float32)
  cs = jnp.cumsum(x, axis=1)
  before = jnp.concatenate([jnp.zeros_like(cs[:, :1]), cs[:, :-1]], 1)  # exclusive prefix
  idx = starts.reshape(starts.shape + (1,) * (x.ndim - 2))
  return cs - jnp.take_along_axis(before, idx, axis=1)


# ----------------------------------------------------------------------------- top-K

def _candidate_ok(j, q_pos, q_seg, k_seg, exclude, length):
  """Bool mask: key position(s) j are candidates for queries at q_pos (causal, same segment)."""
  ok = (j <= q_pos[..., None] - exclude) & (j < length) & (j >= 0)
  if k_seg is not None:
    ok &= k_seg == q_seg[..., None]
  return ok


def _finish_topk(sims, idx):
  valid = sims > NEG_INF
  return sims, jnp.where(valid, idx, 0).astype(jnp.int32), valid


def topk_dense_reference(fq, fk, *, k, exclude, segment_ids=None):
  """Plain reference: the full `[T, T]` similarity matrix, masked, then top-k. Tests only.

  fq, fk `[batch, time, feat]` -> (sims `[batch, time, k]` descending, idx int32, valid bool).
  """
  b, t, _ = fq.shape
  s = jnp.einsum("bqf,bkf->bqk", fq, fk, precision="highest")
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  ok = _candidate_ok(jnp.arange(t)[None, None], pos, None, None, exclude, t)
  if segment_ids is not None:
    ok = ok & (segment_ids[:, None, :] == segment_ids[:, :, None])
  vals, idx = jax.lax.top_k(jnp.where(ok, s, NEG_INF), k)
  return _finish_topk(vals, idx)


def _pad_time(x, multiple, value=0):
  pad = (-x.shape[1]) % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def topk_streaming(fq, fk, *, k, exclude, q_pos=None, q_seg=None, k_seg=None, key_chunk=256):
  """Exact top-k earlier tokens by similarity, streaming over key chunks (memory O(Tq·(k+chunk))).

  fq `[batch, tq, feat]` queries at positions q_pos `[batch, tq]` (default 0..tq-1);
  fk `[batch, L, feat]` keys at positions 0..L-1; q_seg `[batch, tq]`, k_seg `[batch, L]` optional
  segment ids. A key j is a candidate iff j <= q_pos - exclude and in the query's segment.
  Returns (sims `[batch, tq, k]` descending, idx int32, valid bool). Ties go to the earlier key.
  """
  b, tq, f = fq.shape
  length = fk.shape[1]
  if q_pos is None:
    q_pos = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq))
  chunk = min(key_chunk, length)
  fk_p = _pad_time(fk, chunk)
  n = fk_p.shape[1] // chunk
  fk_c = jnp.moveaxis(fk_p.reshape(b, n, chunk, f), 1, 0)
  seg_c = None if k_seg is None else jnp.moveaxis(_pad_time(k_seg, chunk, -1).reshape(b, n, chunk), 1, 0)

  def body(carry, xs):
    best, best_i = carry
    c, fkc = xs[0], xs[1]
    j = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    s = jnp.einsum("bqf,bkf->bqk", fq, fkc, preferred_element_type=jnp.float32)
    segc = None if seg_c is None else xs[2][:, None, :]
    s = jnp.where(_candidate_ok(j[None, None], q_pos, q_seg, segc, exclude, length), s, NEG_INF)
    vals = jnp.concatenate([best, s], -1)
    ids = jnp.concatenate([best_i, jnp.broadcast_to(j, s.shape)], -1)
    top, pos = jax.lax.top_k(vals, k)
    return (top, jnp.take_along_axis(ids, pos, -1)), None

  init = (jnp.full((b, tq, k), NEG_INF, jnp.float32), jnp.zeros((b, tq, k), jnp.int32))
  xs = (jnp.arange(n, dtype=jnp.int32), fk_c) + (() if seg_c is None else (seg_c,))
  (sims, idx), _ = jax.lax.scan(body, init, xs)
  return _finish_topk(sims, idx)


def topk_block_select(fq, fk, *, k, exclude, block_size=64, num_blocks=8, q_pos=None, q_seg=None,
                      k_seg=None, query_chunk=4096):
  """Two-stage top-k: pick blocks by pooled keys, then the top-k tokens inside them (NSA/MoBA style).

  Keys are split into blocks of `block_size`. A query at p with c = (p - exclude) // block_size
  scores every complete earlier block m < c by <fq_p, mean of fk over block m>, keeps the best
  `num_blocks`, and always adds block c itself (partly available: only tokens j <= p - exclude).
  With segments, a block belongs to its last token's segment, pools only that segment's tokens
  and is eligible only for queries of that segment.
  Candidates are the tokens of those blocks; the result is their exact top-k (causal, same
  segment). With num_blocks >= the number of blocks this equals `topk_streaming`.
  Shapes as in `topk_streaming`; memory O(query_chunk · (num_blocks+1) · block_size · feat).
  """
  b, tq, f = fq.shape
  length = fk.shape[1]
  if q_pos is None:
    q_pos = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq))
  bs = block_size
  fk_p = _pad_time(fk, bs)
  nb_total = fk_p.shape[1] // bs
  fk_blocks = fk_p.reshape(b, nb_total, bs, f)
  if k_seg is None:  # one segment; same arithmetic as with segments (decode passes them)
    k_seg = jnp.zeros((b, length), jnp.int32)
    q_seg = jnp.zeros((b, tq), jnp.int32)
  seg_blocks = _pad_time(k_seg, bs, -1).reshape(b, nb_total, bs)
  # A block belongs to the segment of its last token and pools only that segment's tokens, so
  # a block's score never depends on another document.
  blk_seg = seg_blocks[..., -1]
  member = (seg_blocks == blk_seg[..., None]).astype(fk_blocks.dtype)
  pooled = jnp.einsum("bmkf,bmk->bmf", fk_blocks, member) / jnp.maximum(
      member.sum(-1), 1.0)[..., None]  # [b, nb_total, f]
  nsel = min(num_blocks, nb_total)

  def one_chunk(args):
    fqc, pc, segc = args  # [b, c, f], [b, c], [b, c] or None
    cur = jnp.floor_divide(pc - exclude, bs)  # block holding the last candidate (may be < 0)
    sc = jnp.einsum("bqf,bmf->bqm", fqc, pooled, preferred_element_type=jnp.float32)
    m = jnp.arange(nb_total, dtype=jnp.int32)
    eligible = (m[None, None] < cur[..., None]) & (blk_seg[:, None, :] == segc[..., None])
    sc = jnp.where(eligible, sc, NEG_INF)
    bval, bidx = jax.lax.top_k(sc, nsel)
    blk = jnp.concatenate([bidx, jnp.maximum(cur, 0)[..., None]], -1)  # [b, c, nsel+1]
    blk_ok = jnp.concatenate([bval > NEG_INF, (cur >= 0)[..., None]], -1)
    gather = jax.vmap(lambda arr, ii: arr[ii])
    cand_f = gather(fk_blocks, blk)  # [b, c, nsel+1, bs, f]
    s = jnp.einsum("bqf,bqnkf->bqnk", fqc, cand_f, preferred_element_type=jnp.float32)
    j = blk[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)  # [b, c, nsel+1, bs]
    ok = blk_ok[..., None] & _candidate_ok(j, pc[..., None], None, None, exclude, length)
    ok &= gather(seg_blocks, blk) == segc[..., None, None]
    s = jnp.where(ok, s, NEG_INF).reshape(s.shape[:2] + (-1,))
    top, pos = jax.lax.top_k(s, k)
    return top, jnp.take_along_axis(j.reshape(s.shape), pos, -1)

  chunk = min(query_chunk, tq)
  if chunk == tq:
    sims, idx = one_chunk((fq, q_pos, q_seg))
  else:  # queries in chunks, one after another, to bound the candidate buffers
    fq_p, pos_p = _pad_time(fq, chunk), _pad_time(q_pos, chunk)
    seg_p = None if q_seg is None else _pad_time(q_seg, chunk, -1)
    nq = fq_p.shape[1] // chunk
    split = lambda x: None if x is None else jnp.moveaxis(x.reshape((b, nq, chunk) + x.shape[2:]), 1, 0)
    sims, idx = jax.lax.map(one_chunk, (split(fq_p), split(pos_p), split(seg_p)))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, nq * chunk) + x.shape[3:])[:, :tq]
    sims, idx = merge(sims), merge(idx)
  return _finish_topk(sims, idx)


# ----------------------------------------------------------------------------- filters

def block_entropy_deficit(sem, block_size):
  """log(num_blocks) − entropy(softmax of block norms), `[batch, time]` float32 (0 = flat)."""
  nb = sem.shape[-1] // block_size
  norms = jnp.sqrt(jnp.sum(jnp.square(sem.astype(jnp.float32).reshape(
      sem.shape[:-1] + (nb, block_size))), -1) + 1e-12)
  logp = jax.nn.log_softmax(norms, -1)
  return np.log(nb).astype(np.float32) + jnp.sum(jnp.exp(logp) * logp, -1)


def adaptive_k(deficit, count, sum1, sum2, *, k_min, k_max, k_base, alpha, eps=1e-4):
  """Per-token K from its block-norm entropy, standardised by the running (causal) mean/std.

  deficit `[...]` this token's entropy deficit; count/sum1/sum2 `[...]` running count, sum and sum
  of squares of the deficit over its segment up to and including itself. z = standardised
  entropy (= −standardised deficit); K = clip(floor(k_base + alpha·z), k_min, k_max), int32.
  """
  mean = sum1 / count
  var = jnp.maximum(sum2 / count - mean * mean, 0.0)
  z = -(deficit - mean) / (jnp.sqrt(var) + eps)
  return jnp.clip(jnp.floor(k_base + alpha * z), k_min, k_max).astype(jnp.int32)


def kth_similarity(sims, valid, k_t):
  """Similarity of each token's k_t-th best candidate (−inf if it has fewer): `[batch, time]`."""
  kth = jnp.take_along_axis(sims, (k_t - 1)[..., None], -1)[..., 0]
  ok = jnp.take_along_axis(valid, (k_t - 1)[..., None], -1)[..., 0]
  return jnp.where(ok, kth, NEG_INF)


def mutual_knn_keep(sims, target_kth):
  """Causal mutual k-NN: keep edge t→j iff sim(t, j) >= the K_j-th best similarity of j's own list.

  Definition: j is among t's top-K earlier tokens (the list itself), and t would have entered j's
  kept top-K list had it been one of j's candidates, i.e. sim(t, j) is at least the similarity of
  j's K_j-th nearest earlier token (K_j its adaptive K; −inf when j has fewer than K_j candidates,
  so such j always accept). Everything it reads is at positions <= t, so it is causal, and it
  costs one gather per edge. sims `[batch, time, k]`, target_kth `[batch, time, k]` (kth of idx).
  """
  return sims >= target_kth


def temporal_gate(gq, gk):
  """Temporal gate sigmoid(<g_t, g_j> / sqrt(d)) of edge t→j: gq `[..., d]`, gk `[..., k, d]` -> `[..., k]`."""
  logit = jnp.einsum("...d,...kd->...k", gq.astype(jnp.float32), gk.astype(jnp.float32))
  return jax.nn.sigmoid(logit / np.sqrt(gq.shape[-1]).astype(np.float32))


def temporal_gate_keep(sims, gate, *, tau_mu, tau_temp, tau_high):
  """Keep an edge iff (sim > tau_mu and gate > tau_temp) or sim > tau_high (all `[..., k]`)."""
  return ((sims > tau_mu) & (gate > tau_temp)) | (sims > tau_high)


def hub_flags(sem, sem_running_sum, threshold):
  """A token is a hub iff cos(its semantic state, running sum of its segment's states) >= threshold.

  Points near the data mean are the hubs of k-NN graphs; the running sum up to and including t
  makes this causal (the first token of a segment is always a hub). `[batch, time]` bool.
  """
  return jnp.sum(l2_normalize(sem) * l2_normalize(sem_running_sum), -1) >= threshold


def shortcut_edges(is_hub, q_pos, seg_start, last_hub_at, *, window, num_shortcuts, sem_idx, sem_mask):
  """Deterministic hub-to-hub shortcuts: hub t links to the latest hub at or before t − window·2^r.

  is_hub, q_pos, seg_start `[batch, tq]`; last_hub_at(p) maps positions `[batch, tq]` (>= 0) to the
  latest hub index <= p (−1 if none); sem_idx/sem_mask `[batch, tq, k]` the semantic edges, used
  to drop duplicates. r = 0..num_shortcuts−1 gives log-spaced long-range links (skip-list like).
  Returns (idx `[batch, tq, num_shortcuts]` int32, mask bool).
  """
  idxs, masks = [], []
  for r in range(num_shortcuts):
    p = q_pos - window * (2 ** r)
    tgt = last_hub_at(jnp.maximum(p, 0))
    ok = is_hub & (p >= 0) & (tgt >= seg_start) & (tgt >= 0)
    ok &= ~jnp.any(sem_mask & (sem_idx == tgt[..., None]), -1)
    for prev_t, prev_ok in zip(idxs, masks):
      ok &= ~(prev_ok & (prev_t == tgt))
    idxs.append(jnp.where(ok, tgt, 0))
    masks.append(ok)
  if not idxs:
    shape = q_pos.shape + (0,)
    return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, bool)
  return jnp.stack(idxs, -1).astype(jnp.int32), jnp.stack(masks, -1)


def gather_rows(x, idx):
  """x `[batch, L, ...]`, idx `[batch, ...]` int -> x[b, idx[b, ...]] with shape `[batch, *idx, ...]`."""
  return jax.vmap(lambda a, i: a[i])(x, idx)


# ----------------------------------------------------------------------------- the whole graph

class Graph(NamedTuple):
  """A built graph. idx/mask `[batch, time, k_max + num_shortcuts]` (semantic slots first)."""
  idx: jax.Array
  mask: jax.Array
  sims: jax.Array          # [b, t, k_max] similarity of each semantic slot (−inf if empty)
  k_t: jax.Array           # [b, t] adaptive K
  kth: jax.Array           # [b, t] this token's mutual-kNN threshold for later tokens
  is_hub: jax.Array        # [b, t]
  last_hub: jax.Array      # [b, t] latest hub index <= t (global, −1 if none)
  stages: dict             # bool masks [b, t, k_max] after each filter (provenance only)
  stats: jax.Array         # [b, t, 3] running (count, sum, sum sq) of the entropy deficit
  sem_sum: jax.Array       # [b, t, sem_dim] running sum of semantic states (segment-wise)
  seg_start: jax.Array     # [b, t] first index of each token's segment


def select_edges(sims, idx, valid, k_t, *, target_kth, gq, gk, is_hub, q_pos, seg_start, last_hub_at,
                 opts):
  """Filters and shortcut edges on top of a top-K list; shared by the full build and decode.

  sims/idx/valid `[b, tq, k_max]` from top-K; k_t `[b, tq]`; target_kth `[b, tq, k_max]` the
  mutual thresholds of the targets; gq `[b, tq, d]` and gk `[b, tq, k_max, d]` temporal gate
  features of query and targets; is_hub, q_pos, seg_start `[b, tq]`; last_hub_at as in
  `shortcut_edges`. Returns (idx, mask) `[b, tq, k_max + num_shortcuts]`, kept sims, stages.
  """
  stages = {"topk": valid}
  if opts["adaptive_k"]:
    valid = valid & (jnp.arange(opts["k_max"]) < k_t[..., None])
  stages["adaptive_k"] = valid
  if opts["mutual_knn"]:
    valid = valid & mutual_knn_keep(sims, target_kth)
  stages["mutual_knn"] = valid
  if opts["temporal_gate"]:
    valid = valid & temporal_gate_keep(sims, temporal_gate(gq, gk), tau_mu=opts["tau_mu"],
                                       tau_temp=opts["tau_temp"], tau_high=opts["tau_high"])
  stages["temporal_gate"] = valid
  sc_idx, sc_mask = shortcut_edges(is_hub, q_pos, seg_start, last_hub_at, window=opts["window"],
                                   num_shortcuts=opts["num_shortcuts"], sem_idx=idx, sem_mask=valid)
  stages["shortcut"] = sc_mask
  # Empty slots point at the query itself: gathers stay spread out (no hot row in backward).
  idx = jnp.where(valid, idx, q_pos[..., None])
  sc_idx = jnp.where(sc_mask, sc_idx, q_pos[..., None])
  return (jnp.concatenate([idx, sc_idx], -1), jnp.concatenate([valid, sc_mask], -1),
          jnp.where(valid, sims, NEG_INF), stages)


def make_topk_fn(opts, *, q_pos, q_seg, k_seg):
  """The configured top-K builder ('token' = exact streaming, 'block' = block selection)."""
  common = dict(k=opts["k_max"], exclude=opts["window"], q_pos=q_pos, q_seg=q_seg, k_seg=k_seg)
  if opts["mode"] == "token":
    return lambda fq, fk: topk_streaming(fq, fk, key_chunk=opts["key_chunk"], **common)
  if opts["mode"] == "block":
    return lambda fq, fk: topk_block_select(fq, fk, block_size=opts["select_block_size"],
                                            num_blocks=opts["select_num_blocks"],
                                            query_chunk=opts["query_chunk"], **common)
  raise ValueError(f"graph.mode={opts['mode']!r}; choose 'token' or 'block'.")


def token_k(deficit, count, sum1, sum2, opts):
  """Adaptive K (or k_max everywhere when graph.adaptive_k is off): `[b, t]` int32."""
  if not opts["adaptive_k"]:
    return jnp.full(deficit.shape, opts["k_max"], jnp.int32)
  return adaptive_k(deficit, count, sum1, sum2, k_min=opts["k_min"], k_max=opts["k_max"],
                    k_base=opts["k_base"], alpha=opts["k_alpha"])


def build_graph(fq, fk, gfeat, sem, *, segment_ids=None, opts):
  """The causal graph of a whole sequence.

  fq, fk `[batch, time, feat]` similarity features; gfeat `[batch, time, d_gate]` temporal gate
  features; sem `[batch, time, sem_dim]` semantic states; segment_ids `[batch, time]` or None.
  opts: see `default_opts`. Returns a `Graph` (slots: k_max semantic, then num_shortcuts).
  """
  b, t, _ = fq.shape
  q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  starts = segment_starts(segment_ids, b, t)
  d = block_entropy_deficit(sem, opts["semantic_block_size"])
  stats = segment_cumsum(jnp.stack([jnp.ones_like(d), d, d * d], -1), starts)
  sem_sum = segment_cumsum(sem.astype(jnp.float32), starts)
  sims, idx, valid = make_topk_fn(opts, q_pos=q_pos, q_seg=segment_ids, k_seg=segment_ids)(fq, fk)
  k_t = token_k(d, stats[..., 0], stats[..., 1], stats[..., 2], opts)
  kth = kth_similarity(sims, valid, k_t)
  hub = hub_flags(sem, sem_sum, opts["hub_threshold"])
  last_hub = jax.lax.cummax(jnp.where(hub, q_pos, -1), axis=1)
  all_idx, mask, kept, stages = select_edges(
      sims, idx, valid, k_t, target_kth=gather_rows(kth, idx), gq=gfeat, gk=gather_rows(gfeat, idx),
      is_hub=hub, q_pos=q_pos, seg_start=starts,
      last_hub_at=lambda p: jnp.take_along_axis(last_hub, p, 1), opts=opts)
  return Graph(all_idx, mask, kept, k_t, kth, hub, last_hub, stages, stats, sem_sum, starts)


def build_graph_step(fq, gq, sem, *, fk_cache, gk_cache, kth_cache, last_hub_cache, stats, sem_sum,
                     seg_start, pos, opts):
  """The new token's edges during decoding, found among cached states (the past graph is kept).

  fq `[b, 1, feat]`, gq `[b, 1, d_gate]`, sem `[b, 1, sem_dim]` of the token at position `pos`
  (int32 scalar); caches `[b, L, .]` hold earlier tokens' fk, gate features, mutual thresholds
  and latest-hub indices (the new token's fk may already be written: it is never a candidate);
  stats `[b, 3]` running (count, sum, sum of squares) of the entropy deficit and sem_sum
  `[b, sem_dim]`, both including this token; seg_start `[b]`. Returns (idx, mask, sims, k_t, kth,
  is_hub, stages) with a time axis of 1, as in `build_graph`.
  """
  b = fq.shape[0]
  q_pos = jnp.full((b, 1), pos, jnp.int32)
  d = block_entropy_deficit(sem, opts["semantic_block_size"])
  # Only the current segment's tokens are candidates (a packed prompt may hold earlier documents).
  k_seg = (jnp.arange(fk_cache.shape[1])[None] >= seg_start[:, None]).astype(jnp.int32)
  q_seg = jnp.ones((b, 1), jnp.int32)
  sims, idx, valid = make_topk_fn(opts, q_pos=q_pos, q_seg=q_seg, k_seg=k_seg)(fq, fk_cache)
  k_t = token_k(d, stats[:, None, 0], stats[:, None, 1], stats[:, None, 2], opts)
  kth = kth_similarity(sims, valid, k_t)
  hub = hub_flags(sem, sem_sum[:, None], opts["hub_threshold"])
  all_idx, mask, kept, stages = select_edges(
      sims, idx, valid, k_t, target_kth=gather_rows(kth_cache, idx), gq=gq,
      gk=gather_rows(gk_cache, idx), is_hub=hub, q_pos=q_pos, seg_start=seg_start[:, None],
      last_hub_at=lambda p: jnp.take_along_axis(last_hub_cache, p, 1), opts=opts)
  return all_idx, mask, kept, k_t, kth, hub, stages


def edge_scores(fq, fk, idx):
  """Differentiable <fq_t, fk_idx> for every slot: fq `[b, t, f]`, fk `[b, L, f]`, idx `[b, t, k]` -> `[b, t, k]`."""
  return jnp.einsum("btf,btkf->btk", fq.astype(jnp.float32), gather_rows(fk, idx).astype(jnp.float32))


def default_opts(**overrides):
  """Graph-build options with the defaults of `layers.graph.default_graph_config()`."""
  opts = dict(k_max=12, k_min=3, k_base=5.0, k_alpha=1.5, adaptive_k=True, mutual_knn=False,
              temporal_gate=True, tau_mu=0.15, tau_temp=0.3, tau_high=0.6, hub_threshold=0.5,
              num_shortcuts=2, window=64, mode="block", key_chunk=256, select_block_size=64,
              select_num_blocks=8, query_chunk=4096, semantic_block_size=4)
  unknown = set(overrides) - set(opts)
  if unknown:
    raise ValueError(f"unknown graph option(s) {sorted(unknown)}; known: {sorted(opts)}.")
  opts.update(overrides)
  return opts
