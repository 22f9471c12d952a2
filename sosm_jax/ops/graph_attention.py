"""Sparse attention over a token graph plus a local window (and optional memory edges).

Each query at position t attends jointly, in one softmax, to:
- the local window: keys t-window+1 .. t of its own segment (computed blockwise, dense inside);
- its graph edges: `idx[t, :]` where `mask[t, :]`, gathered from k/v (earlier than the window,
  distinct — `ops.graph_build` guarantees both), each with an optional additive logit bias;
- optional memory edges `memory_keys/values[t, :]` where `memory_mask[t, :]`, whose logits get a
  learned per-head bias (the memory gate). It is merged by log-sum-exp, so the result is the joint
  softmax, and with no valid memory entry the output equals the memory-free output exactly.

Layout `[batch, time, heads, head_dim]`; k/v may have fewer heads (grouped queries). Logits and
softmax in float32; output in the dtype of v. Gradients flow to q, k, v, edge_bias, memory
inputs and memory_bias; never through idx/mask (integers/bools).
"""
import jax
import jax.numpy as jnp

NEG_BIG = -1e30


def _joint_softmax(logits, masks):
  """Softmax over the concatenation of parts. logits/masks: lists of `[..., n_i]`.

  Returns (probs list, lse `[...]`); rows with nothing valid give zero probs and lse = -inf.
  """
  logits = [jnp.where(m, l, NEG_BIG) for l, m in zip(logits, masks)]
  mx = logits[0].max(-1)
  for l in logits[1:]:
    mx = jnp.maximum(mx, l.max(-1))
  mx = jax.lax.stop_gradient(mx)
  ps = [jnp.exp(l - mx[..., None]) * m for l, m in zip(logits, masks)]
  denom = sum(p.sum(-1) for p in ps)
  ok = denom > 0
  safe = jnp.where(ok, denom, 1.0)
  lse = jnp.where(ok, mx + jnp.log(safe), -jnp.inf)
  return [p / safe[..., None] for p in ps], lse


def _merge_memory(o, lse, o_mem, lse_mem, memory_bias):
  """Joint softmax of two disjoint parts from their outputs and log-sum-exps.

  o, o_mem `[..., heads, dim]` f32; lse, lse_mem `[..., heads]`; memory_bias `[heads]` added to the
  memory logits. With lse_mem = -inf the weight is exactly 0 and o is returned unchanged.
  """
  bias = jnp.zeros(()) if memory_bias is None else memory_bias.astype(jnp.float32)
  w = jax.nn.sigmoid(lse_mem + bias - lse)
  return o + w[..., None] * (o_mem - o)


def _split_heads(q, num_kv):
  """q `[..., heads, d]` -> `[..., kv_heads, group, d]`."""
  h, d = q.shape[-2:]
  if h % num_kv:
    raise ValueError(f"query heads {h} must be a multiple of key/value heads {num_kv}.")
  return q.reshape(q.shape[:-2] + (num_kv, h // num_kv, d))


@jax.custom_vjp
def gather_rows_f32grad(x, idx):
  """x `[batch, L, c]`, idx `[batch, ...]` -> `[batch, ..., c]`; its gradient is summed in float32.

  The backward is a scatter-add; doing it in float32 avoids bf16 atomics and rounding when many
  edges share a target.
  """
  return jax.vmap(lambda a, i: a[i])(x, idx)


def _gather_fwd(x, idx):
  return gather_rows_f32grad(x, idx), (x, idx)


def _gather_bwd(res, g):
  x, idx = res
  zeros = jnp.zeros(x.shape, jnp.float32)
  dx = jax.vmap(lambda z, i, gg: z.at[i].add(gg))(zeros, idx, g.astype(jnp.float32))
  return dx.astype(x.dtype), None


gather_rows_f32grad.defvjp(_gather_fwd, _gather_bwd)


def gather_kv(x, idx):
  """x `[batch, L, kv_heads, d]`, idx `[batch, ..., k]` -> `[batch, ..., k, kv_heads, d]` (row gather)."""
  b, length, hk, d = x.shape
  g = gather_rows_f32grad(x.reshape(b, length, hk * d), idx)
  return g.reshape(idx.shape + (hk, d))


# How per-edge logits/outputs are contracted: 'multiply' (broadcast multiply + reduce: one fused
# loop, good for the tiny per-token matrices) or 'einsum' (batched dot). Benchmarks flip it.
EDGE_CONTRACTION = "multiply"


def _edge_logits(qg, kg):
  """qg `[b, t, hk, g, d]`, kg `[b, t, k, hk, d]` -> `[b, t, hk, g, k]` float32."""
  if EDGE_CONTRACTION == "einsum":
    return jnp.einsum("btxgd,btkxd->btxgk", qg, kg, preferred_element_type=jnp.float32)
  kt = jnp.swapaxes(kg, 2, 3)[:, :, :, None]  # [b, t, hk, 1, k, d]
  return jnp.sum(qg.astype(jnp.float32)[..., None, :] * kt.astype(jnp.float32), -1)


def _edge_values(p, vg):
  """p `[b, t, hk, g, k]` f32, vg `[b, t, k, hk, d]` -> `[b, t, hk, g, d]` float32."""
  if EDGE_CONTRACTION == "einsum":
    return jnp.einsum("btxgk,btkxd->btxgd", p.astype(vg.dtype), vg, preferred_element_type=jnp.float32)
  vt = jnp.swapaxes(vg, 2, 3)[:, :, :, None]  # [b, t, hk, 1, k, d]
  return jnp.sum(p.astype(vg.dtype).astype(jnp.float32)[..., None] * vt.astype(jnp.float32), -2)


def _memory_part(qg, memory_keys, memory_values, memory_mask, scale, heads_axis_kv):
  """Memory logits/probs: qg `[..., hk, g, d]`, memory `[..., m, h or hk, d]` -> (o f32, lse)."""
  hk, g, d = qg.shape[-3:]
  mh = memory_keys.shape[-2]
  if mh == hk * g:
    mk = memory_keys.reshape(memory_keys.shape[:-2] + (hk, g, d))
    mv = memory_values.reshape(memory_values.shape[:-2] + (hk, g, d))
    logit = jnp.einsum("...xgd,...mxgd->...xgm", qg, mk, preferred_element_type=jnp.float32)
    (p,), lse = _joint_softmax([logit * scale], [memory_mask[..., None, None, :]])
    o = jnp.einsum("...xgm,...mxgd->...xgd", p.astype(mv.dtype), mv, preferred_element_type=jnp.float32)
  elif mh == hk:
    logit = jnp.einsum("...xgd,...mxd->...xgm", qg, memory_keys, preferred_element_type=jnp.float32)
    (p,), lse = _joint_softmax([logit * scale], [memory_mask[..., None, None, :]])
    o = jnp.einsum("...xgm,...mxd->...xgd", p.astype(memory_values.dtype), memory_values,
                   preferred_element_type=jnp.float32)
  else:
    raise ValueError(f"memory_keys have {mh} heads; expected {hk * g} (query heads) or {hk} (kv heads).")
  return o, lse


def _check_memory(memory_keys, memory_values, memory_mask):
  given = [x is not None for x in (memory_keys, memory_values, memory_mask)]
  if any(given) and not all(given):
    raise ValueError("pass memory_keys, memory_values and memory_mask together (or none of them).")
  return all(given)


def graph_attention(q, k, v, idx, mask, *, window, edge_bias=None, segment_ids=None,
                    memory_keys=None, memory_values=None, memory_mask=None, memory_bias=None,
                    scale=None):
  """Local-window + graph-edge (+ memory) attention for a whole sequence.

  q `[batch, time, heads, d]`; k, v `[batch, time, kv_heads, d]`; idx int32 / mask bool
  `[batch, time, k]` graph edges (each j <= t - window, distinct where mask); edge_bias
  `[batch, time, heads, k]` or `[batch, time, k]` added to edge logits; segment_ids `[batch, time]`;
  memory_keys/values `[batch, time, m, heads or kv_heads, d]`, memory_mask `[batch, time, m]`,
  memory_bias `[heads]`. Returns `[batch, time, heads, d]` in v's dtype.
  """
  b, t, h, d = q.shape
  hk = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  w = window
  if w < 1:
    raise ValueError(f"window={w} must be >= 1.")
  qg = _split_heads(q, hk)  # [b, t, hk, g, d]
  g = qg.shape[3]

  # Local window, blockwise: block n of w queries sees key blocks n-1 and n.
  pad = (-t) % w
  padt = lambda x, val=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=val)
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  qb, kb, vb, sb = padt(qg), padt(k), padt(v), padt(seg, -1)
  n = (t + pad) // w
  qb = qb.reshape(b, n, w, hk, g, d)
  kb, vb, sb = kb.reshape(b, n, w, hk, d), vb.reshape(b, n, w, hk, d), sb.reshape(b, n, w)
  prev = lambda x, val=0: jnp.concatenate([jnp.full_like(x[:, :1], val), x[:, :-1]], 1)
  kl = jnp.concatenate([prev(kb), kb], 2)  # [b, n, 2w, hk, d]
  vl = jnp.concatenate([prev(vb), vb], 2)
  sl = jnp.concatenate([prev(sb, -2), sb], 2)  # block -1 never matches
  a = jnp.arange(w)[:, None]
  c = jnp.arange(2 * w)[None, :]
  band = (c > a) & (c <= a + w)  # 0 <= t - j < w
  loc_mask = band[None, None] & (sl[:, :, None, :] == sb[..., None])  # [b, n, w, 2w]
  loc_logit = jnp.einsum("bnqxgd,bnkxd->bnqxgk", qb, kl, preferred_element_type=jnp.float32) * scale
  loc_logit = loc_logit.reshape(b, n * w, hk, g, 2 * w)[:, :t]
  loc_mask = loc_mask.reshape(b, n * w, 2 * w)[:, :t, None, None, :]

  # Graph edges: gather whole rows of k/v (the graph is shared by all heads). Empty slots point
  # at the query itself, so their (zero) gradients do not all pile onto one row.
  idx = jnp.where(mask, idx, jnp.arange(t, dtype=idx.dtype)[None, :, None])
  kg, vg = gather_kv(k, idx), gather_kv(v, idx)  # [b, t, k, hk, d]
  g_logit = _edge_logits(qg, kg) * scale
  if edge_bias is not None:
    eb = edge_bias.astype(jnp.float32)
    eb = eb[:, :, None, None, :] if eb.ndim == 3 else eb.reshape(b, t, hk, g, -1)
    g_logit = g_logit + eb
  (p_loc, p_g), lse = _joint_softmax([loc_logit, g_logit], [loc_mask, mask[:, :, None, None, :]])

  p_loc = jnp.pad(p_loc, [(0, 0), (0, pad)] + [(0, 0)] * 3).reshape(b, n, w, hk, g, 2 * w)
  o = jnp.einsum("bnqxgk,bnkxd->bnqxgd", p_loc.astype(v.dtype), vl, preferred_element_type=jnp.float32)
  o = o.reshape(b, n * w, hk, g, d)[:, :t]
  o = o + _edge_values(p_g, vg)

  if _check_memory(memory_keys, memory_values, memory_mask):
    o_m, lse_m = _memory_part(qg, memory_keys, memory_values, memory_mask, scale, hk)
    mb = None if memory_bias is None else memory_bias.reshape(hk, g)
    o = _merge_memory(o, lse, o_m, lse_m, mb)
  return o.reshape(b, t, h, d).astype(v.dtype)


def graph_attention_step(q, k_cache, v_cache, pos, idx, mask, *, window, edge_bias=None,
                         seg_start=None, memory_keys=None, memory_values=None, memory_mask=None,
                         memory_bias=None, scale=None):
  """One decoding step: the token at `pos` attends to its window and edges in the caches.

  q `[batch, heads, d]`; k_cache, v_cache `[batch, L, kv_heads, d]` (position pos already written);
  pos int32 scalar; idx/mask `[batch, k]`; edge_bias `[batch, heads, k]` or `[batch, k]`;
  seg_start `[batch]` (window keys before it are masked); memory_keys/values
  `[batch, m, heads or kv_heads, d]`, memory_mask `[batch, m]`. Returns `[batch, heads, d]`.
  """
  b, h, d = q.shape
  length, hk = k_cache.shape[1], k_cache.shape[2]
  scale = d ** -0.5 if scale is None else scale
  qg = _split_heads(q, hk)  # [b, hk, g, d]
  g = qg.shape[2]
  wl = min(window, length)
  start = jnp.clip(pos - wl + 1, 0, length - wl)
  kl = jax.lax.dynamic_slice_in_dim(k_cache, start, wl, axis=1)
  vl = jax.lax.dynamic_slice_in_dim(v_cache, start, wl, axis=1)
  j = start + jnp.arange(wl)
  lo = pos - window if seg_start is None else jnp.maximum(pos - window, seg_start[:, None] - 1)
  loc_mask = jnp.broadcast_to((j <= pos) & (j > lo), (b, wl))
  loc_logit = jnp.einsum("bxgd,bkxd->bxgk", qg, kl, preferred_element_type=jnp.float32) * scale
  kg, vg = gather_kv(k_cache, idx), gather_kv(v_cache, idx)  # [b, k, hk, d]
  g_logit = jnp.einsum("bxgd,bkxd->bxgk", qg, kg, preferred_element_type=jnp.float32) * scale
  if edge_bias is not None:
    eb = edge_bias.astype(jnp.float32)
    eb = eb[:, None, None, :] if eb.ndim == 2 else eb.reshape(b, hk, g, -1)
    g_logit = g_logit + eb
  (p_loc, p_g), lse = _joint_softmax([loc_logit, g_logit],
                                     [loc_mask[:, None, None, :], mask[:, None, None, :]])
  o = jnp.einsum("bxgk,bkxd->bxgd", p_loc.astype(vl.dtype), vl, preferred_element_type=jnp.float32)
  o = o + jnp.einsum("bxgk,bkxd->bxgd", p_g.astype(vg.dtype), vg, preferred_element_type=jnp.float32)
  if _check_memory(memory_keys, memory_values, memory_mask):
    o_m, lse_m = _memory_part(qg, memory_keys, memory_values, memory_mask, scale, hk)
    mb = None if memory_bias is None else memory_bias.reshape(hk, g)
    o = _merge_memory(o, lse, o_m, lse_m, mb)
  return o.reshape(b, h, d).astype(v_cache.dtype)


def graph_attention_reference(q, k, v, idx, mask, *, window, edge_bias=None, segment_ids=None,
                              memory_keys=None, memory_values=None, memory_mask=None,
                              memory_bias=None, scale=None):
  """Dense reference: the full `[T, T]` allowed-set mask and one softmax over keys + memory. Tests only.

  Same arguments and result as `graph_attention`.
  """
  b, t, h, d = q.shape
  hk = k.shape[2]
  rep = h // hk
  scale = d ** -0.5 if scale is None else scale
  kf, vf = jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2)
  logit = jnp.einsum("bthd,bshd->bhts", q, kf, precision="highest").astype(jnp.float32) * scale
  tt, ss = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  allowed = jnp.broadcast_to((ss <= tt) & (ss > tt - window), (b, t, t))
  if segment_ids is not None:
    allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
  onehot = jax.nn.one_hot(idx, t, dtype=jnp.float32) * mask[..., None]  # [b, t, k, t]
  allowed = allowed | (onehot.sum(2) > 0)
  if edge_bias is not None:
    eb = edge_bias if edge_bias.ndim == 4 else jnp.broadcast_to(edge_bias[:, :, None], (b, t, h, idx.shape[-1]))
    logit = logit + jnp.einsum("bthk,btks->bhts", eb.astype(jnp.float32), onehot, precision="highest")
  logit = jnp.where(allowed[:, None], logit, -jnp.inf)
  vals = jnp.broadcast_to(vf[:, None], (b, t, t, h, d))  # [b, query, key, h, d]
  if _check_memory(memory_keys, memory_values, memory_mask):
    mrep = h // memory_keys.shape[3]
    mk, mv = jnp.repeat(memory_keys, mrep, 3), jnp.repeat(memory_values, mrep, 3)
    ml = jnp.einsum("bthd,btmhd->bhtm", q, mk, precision="highest").astype(jnp.float32) * scale
    if memory_bias is not None:
      ml = ml + memory_bias[None, :, None, None]
    ml = jnp.where(memory_mask[:, None], ml, -jnp.inf)
    logit = jnp.concatenate([logit, ml], -1)
    vals = jnp.concatenate([vals, mv], 2)
  p = jax.nn.softmax(logit, -1)
  o = jnp.einsum("bhts,btshd->bthd", p, vals.astype(jnp.float32), precision="highest")
  return o.astype(v.dtype)
