"""A decode step written for one token per row, over the serving layout's parameters with the
norm scales folded into the projections that read the normalized values.

`layout.decode_step` runs the model's own modules for one token. Per layer that is several
passes over a vector of d_model values besides the matmuls: each RMSNorm is a reduction, then a
pass that multiplies by the reciprocal root and the scale and casts, and only then the matmul.
For a norm that only feeds projections the scale can be part of the projection's kernel and the
reciprocal root can wait until after the matmul (it is one number per row):

    (x * r * s) @ W  =  r * (x @ (diag(s) W))

so the matmul reads the residual stream directly and the norm's own pass is gone; the root is
applied where the projection's outputs are used anyway (the gates, the state update, SwiGLU).
The same holds for HGRN-2's per-head output norm in front of o_proj (the per-head roots are
applied to o, the scale is in o_proj's kernel), and the recurrent state update and its readout
are one expression (a sum over the key axis instead of a dot: XLA can write the new state and
read it out in one fusion). Attention (RoPE at the one position, the KV cache write, the
attention over the cache) and the head are the model's own functions.

With one row (batch 1) `layout.decode_step` runs each projection on a copy of its row made
just before it (XLA:GPU would rewrite a one-row product; layout module doc); here the residual
stream itself is two equal rows from the embedding to the final norm, so every projection reads
it as it is. The state update reads the batch's row; its readout is done for both rows.
The projections that read one input are one matmul (`fuse_params`: their kernels side by side, with
the norm scales folded in; a model with such fused projections alone decoded slower than the
unfused one, 0.461 against 0.438 ms/token at 1K: XLA had merged them already). On an H200
(RESULTS.md, "Decode speed") the recipe hybrid decoded in 0.407 ms/token at 1K and 0.537 at 128K
here, 0.438 / 0.587 through `layout.decode_step` (141.5 kernels per token against 176.5 at 1K): the
engine decodes one slot through this step where it takes the model (`unsupported_reason` is empty).

`fold_params(cfg, params)`: serving-layout parameters (`layout.serving_layout`: unrolled, bf16
matmul weights) -> the fused and folded ones; `decode_step(cfg, folded, token, cache)`: the
model's `decode_step` (same cache tree, logits within rounding; the cache is filled by the
model's own prefill with the serving-layout parameters). The folded kernels are a second copy
of the weights next to the serving-layout ones that prefill reads. Only HGRN-2 and attention
layers (the recipe hybrid and the transformer); `unsupported_reason(cfg)` says why a config is
not one of those.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sosm_jax.layers.common import compute_dtype, rms_norm
from sosm_jax.layers.embed import head_matmul
from sosm_jax.layers.hgrn2 import cumulative_lower_bounds, forget_gate, hgrn2_num_heads
from sosm_jax.models.config import layer_mixers
from sosm_jax.ops import attention as attn_ops

_F32 = jnp.float32
# The projections of one input that become one matmul: {fused kernel: its members, in order},
# per mixer (the layers' Dense names) and for the MLP.
_FUSED = {"hgrn2": {"qfi_proj": ("q_proj", "f_proj", "i_proj")},
          "attn": {"qkv_proj": ("q_proj", "k_proj", "v_proj")}}
_MLP_FUSED = {"wi": ("wi_gate", "wi_up")}
_MIXERS = tuple(_FUSED)


def unsupported_reason(cfg) -> str:
  """'' if `decode_step` runs this model config, else why not."""
  mixers = set(layer_mixers(cfg))
  if not mixers <= set(_MIXERS):
    return f"mixers {sorted(mixers - set(_MIXERS))} (only {_MIXERS})"
  if cfg.scan_layers:
    return "not the serving layout (layout.serving_layout: unrolled layers)"
  if cfg.embed_dim > 0:
    return "a factorized embedding (embed_dim > 0)"
  return ""


def _check(cfg) -> None:
  why = unsupported_reason(cfg)
  if why:
    raise ValueError(f"serve.onerow: this model is not supported: {why}.")


def fuse_params(cfg, params) -> dict:
  """Params of an unrolled model (`scan_layers=False`) -> the same with each group of `_FUSED`
  and `_MLP_FUSED` one kernel `[in, sum of the members' outputs]` (the members' kernels flattened
  to `[in, outputs]`, side by side in order) and the HGRN-2 lower bounds cumulated
  (`hgrn2_cumulative_lower_bounds`). Other mixers keep their projections.
  """
  if cfg.scan_layers:
    raise ValueError("fuse_params: needs the parameters of an unrolled model as trained "
                     "(model.scan_layers=True); unstack_layers first.")
  out = dict(params)
  if "hgrn2_lower_bounds" in out:
    out["hgrn2_cumulative_lower_bounds"] = cumulative_lower_bounds(
        out.pop("hgrn2_lower_bounds")).astype(params["hgrn2_lower_bounds"].dtype)

  def fuse(tree, groups, where):
    tree = dict(tree)
    for fused, members in groups.items():
      missing = [m for m in members if m not in tree]
      if missing:
        raise ValueError(f"fuse_params: {where} has no {missing} (it has {sorted(tree)}); the "
                         f"parameters are not those of an unrolled model as trained (fused "
                         f"already?).")
      kernels = [tree.pop(m)["kernel"] for m in members]
      tree[fused] = {"kernel": jnp.concatenate([k.reshape(k.shape[0], -1) for k in kernels], 1)}
    return tree

  for i, name in enumerate(layer_mixers(cfg)):
    layer = dict(out[f"layer_{i}"])
    if name in _FUSED:
      layer["mixer"] = fuse(layer["mixer"], _FUSED[name], f"layer_{i}/mixer")
    layer["mlp"] = fuse(layer["mlp"], _MLP_FUSED, f"layer_{i}/mlp")
    out[f"layer_{i}"] = layer
  return out


def fold_params(cfg, params) -> dict:
  """Serving-layout params -> their projections fused (`fuse_params`) with each norm
  scale folded into the kernel after it.

  mixer_norm into the mixer's fused input kernel, mlp_norm into the MLP's 'wi', HGRN-2's o_norm
  into its o_proj; the folded scales are removed (the final norm stays: the tied head is the
  embedding table). Kernels are multiplied in float32 and stored in their own dtype.
  """
  _check(cfg)
  params = fuse_params(cfg, params)
  out = dict(params)
  for i, name in enumerate(layer_mixers(cfg)):
    layer = params[f"layer_{i}"]
    mixer = dict(layer["mixer"])
    (fused,) = _FUSED[name]
    mixer[fused] = {"kernel": _scale_rows(mixer[fused]["kernel"], layer["mixer_norm"]["scale"])}
    if name == "hgrn2":
      mixer["o_proj"] = {"kernel": _scale_rows(mixer["o_proj"]["kernel"],
                                               mixer.pop("o_norm")["scale"])}
    mlp = dict(layer["mlp"])
    (wi,) = _MLP_FUSED
    mlp[wi] = {"kernel": _scale_rows(mlp[wi]["kernel"], layer["mlp_norm"]["scale"])}
    out[f"layer_{i}"] = {"mixer": mixer, "mlp": mlp}
  return out


def _scale_rows(kernel, scale):
  """kernel `[in, ...]` with row r multiplied by scale[r] (in float32, stored in its dtype)."""
  s = scale.astype(_F32).reshape(scale.shape + (1,) * (kernel.ndim - scale.ndim))
  return (kernel.astype(_F32) * s).astype(kernel.dtype)


def _matmul(x, kernel):
  """x `[R, K]` @ kernel `[K, N]` in the kernel's dtype -> `[R, N]` float32."""
  return jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=_F32)


def _inv_rms(x, eps):
  xf = x.astype(_F32)
  return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def _hgrn2(cfg, p, x, r, state, lower_bound, b):
  """x `[R, D]` (the residual stream's rows), r their norm's reciprocal roots `[R, 1]`, the
  batch's rows the first b (R = 2 b: each row twice) -> (y `[R, D]` float32, cache)."""
  dt = compute_dtype(cfg)
  rows = x.shape[0]
  h, dk = hgrn2_num_heads(cfg), cfg.hgrn2_head_dim
  y = (_matmul(x, p["qfi_proj"]["kernel"]) * r).astype(dt).reshape(rows, 3, h, dk)
  q, f, i = jax.nn.silu(y[:, 0]), y[:b, 1], y[:b, 2]
  log_f, k = forget_gate(f, lower_bound.reshape(h, dk))
  k = k.astype(dt)
  new_state = (jnp.exp(log_f)[..., None] * state
               + k.astype(_F32)[..., :, None] * i.astype(_F32)[..., None, :])
  # read out by every row (R = B, or B = 1 and the state broadcasts over the two rows): o
  # `[R, H, Dk]` needs no copy of the batch's rows before o_proj
  o = jnp.sum(q.astype(_F32)[..., None] * new_state, axis=-2).astype(dt)
  o = o.astype(_F32) * _inv_rms(o, cfg.norm_eps)
  return (_matmul(o.astype(dt).reshape(rows, h * dk), p["o_proj"]["kernel"].reshape(h * dk, -1)),
          {"state": new_state})


def _repeat_rows(a, rows):
  return a if a.shape[0] == rows else jnp.concatenate([a] * (rows // a.shape[0]))


def _attention(cfg, p, x, r, cache, position, b):
  dt = compute_dtype(cfg)
  rows = x.shape[0]
  h, kv, dh = cfg.attn_num_heads, cfg.attn_num_kv_heads, cfg.attn_head_dim
  y = (_matmul(x, p["qkv_proj"]["kernel"]) * r)[:b].astype(dt)
  q = y[:, :h * dh].reshape(b, 1, h, dh)
  k = y[:, h * dh:(h + kv) * dh].reshape(b, 1, kv, dh)
  v = y[:, (h + kv) * dh:].reshape(b, 1, kv, dh)
  q = attn_ops.apply_rope(q, position, cfg.rope_base)
  k = attn_ops.apply_rope(k, position, cfg.rope_base)
  cache = attn_ops.update_kv_cache(cache, k, v)
  o = attn_ops.cached_attention(q, cache, window=cfg.attn_window,
                                read_len=cfg.get("attn_decode_read_len", 0),
                                implementation=cfg.get("attn_decode_impl", ""))
  o = _repeat_rows(o.reshape(b, h * dh), rows)
  return _matmul(o, p["o_proj"]["kernel"].reshape(h * dh, -1)), cache


def decode_step(cfg, params, token, cache):
  """`LanguageModel.decode_step` for folded params (`fold_params`): token `[B]` at position
  cache['index'] -> (logits `[B, V]` in cfg.logits_dtype, cache).

  With B = 1 the residual stream is carried as two equal rows from the embedding to the final
  norm (module doc): every projection is a two-row product without a copy of its input.
  """
  _check(cfg)
  dt = compute_dtype(cfg)
  b = token.shape[0]
  table = params["embed"]["embedding"]
  x = jnp.take(jnp.asarray(table), token, axis=0).astype(dt)          # [B, D]
  if b == 1:   # layout module doc: XLA:GPU would rewrite a one-row product
    x = jnp.concatenate([x, x])
  position = jnp.broadcast_to(cache["index"], (b, 1)).astype(jnp.int32)
  bounds = params.get("hgrn2_cumulative_lower_bounds")
  layers = []
  for i, name in enumerate(layer_mixers(cfg)):
    p = params[f"layer_{i}"]
    r = _inv_rms(x, cfg.norm_eps)
    c = cache["layers"][i]
    if name == "hgrn2":
      y, c = _hgrn2(cfg, p["mixer"], x, r, c["state"], bounds[i], b)
    else:
      y, c = _attention(cfg, p["mixer"], x, r, c, position, b)
    layers.append(c)
    x = x + y.astype(dt)
    mlp = p["mlp"]
    g = _matmul(x, mlp["wi"]["kernel"]) * _inv_rms(x, cfg.norm_eps)
    gate, up = g[:, :cfg.mlp_dim].astype(dt), g[:, cfg.mlp_dim:].astype(dt)
    x = x + _matmul(jax.nn.silu(gate) * up, mlp["wo"]["kernel"]).astype(dt)
  x = rms_norm(x[:b], params["final_norm"]["scale"], cfg.norm_eps).astype(dt)
  out_dtype = jnp.dtype(cfg.logits_dtype)
  if cfg.tie_embeddings:
    logits = head_matmul("bd,vd->bv", x, jnp.asarray(table, dt), out_dtype)
  else:
    logits = head_matmul("bd,dv->bv", x, jnp.asarray(params["embed"]["head"], dt), out_dtype)
  return logits, {"index": cache["index"] + 1, "layers": tuple(layers)}
