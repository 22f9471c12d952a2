"""Deployment programs: the forward pass and one decode step as StableHLO (jax.export) and ONNX (jax2onnx).

Both programs are traced at fixed shapes: forward tokens `[batch, seq_len]` int32 -> logits
`[batch, seq_len, vocab]` float32; decode (token `[batch]` int32, cache) -> (logits
`[batch, vocab]`, cache), the cache holding `max_len` tokens (see `LanguageModel.init_cache`).
The model is traced with its portable paths (`export_model_config`: attn_impl and
attn_decode_impl 'xla', linear_impl 'xla' for StableHLO, no Pallas or cuDNN custom calls) so the
program runs wherever StableHLO / ONNX does. ONNX uses the linear ops' sequential 'reference'
form (the same math, a loop over time): jax2onnx 0.17 cannot trace the custom-VJP triangular
inverse inside the chunked gated delta rule (it converts the traced argument to numpy).

StableHLO (`export_stablehlo`): parameters are arguments (the folder also holds them as
model.safetensors); files forward.jax_exported / decode.jax_exported (`jax.export` serialized,
reload with `jax.export.deserialize` and `.call(params, ...)`) and their .mlir text.
ONNX (`export_onnx`): parameters are baked in as initializers; the cache is flattened into
inputs/outputs named cache_<i> (in `cache_leaves` order, listed in onnx_io.json). jax2onnx cannot
trace flax's layer scan (nn.scan), so the parameters are re-laid out per layer first
(`layout.unrolled`, an exact copy).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sosm_jax import models
from sosm_jax.export import layout

_I32 = jnp.int32


def export_model_config(model_cfg, *, dtype: str | None = None, linear_impl: str = "xla"):
  """The model config with portable kernels (no custom calls), optionally another compute dtype."""
  cfg = layout.copy_config(model_cfg)
  cfg.linear_impl = linear_impl
  cfg.attn_impl = "xla"
  cfg.attn_decode_impl = "xla"
  if dtype:
    cfg.dtype = dtype
  return cfg


def forward_fn(model):
  """(params, tokens `[B, T]`) -> logits `[B, T, V]` float32."""
  return lambda params, tokens: model.apply(params, tokens)


def decode_fn(model):
  """(params, token `[B]`, cache) -> (logits `[B, V]`, cache)."""
  return lambda params, token, cache: model.decode_step(params, token, cache)


def _sds(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype
                                                     if not hasattr(a, "dtype") else a.dtype), tree)


def export_stablehlo(model_cfg, params, out_dir: str, *, batch_size: int, seq_len: int,
                     max_len: int, platforms: tuple[str, ...] = ()) -> dict[str, str]:
  """Writes the forward and decode programs as serialized jax.export modules; returns file paths.

  platforms: lowering platforms (e.g. ('cpu', 'cuda')); () = this machine's.
  """
  model = models.build_model(export_model_config(model_cfg))
  os.makedirs(out_dir, exist_ok=True)
  params_sds = _sds(params)
  cache_sds = _sds(model.init_cache(batch_size, max_len))
  kw = {"platforms": tuple(platforms)} if platforms else {}
  programs = {
      "forward": (forward_fn(model), (params_sds, jax.ShapeDtypeStruct((batch_size, seq_len), _I32))),
      "decode": (decode_fn(model), (params_sds, jax.ShapeDtypeStruct((batch_size,), _I32), cache_sds)),
  }
  paths = {}
  for name, (fn, args) in programs.items():
    exported = jax.export.export(jax.jit(fn), **kw)(*args)
    path = os.path.join(out_dir, f"{name}.jax_exported")
    with open(path, "wb") as f:
      f.write(exported.serialize())
    with open(os.path.join(out_dir, f"{name}.mlir"), "w", encoding="utf-8") as f:
      f.write(exported.mlir_module())
    paths[name] = path
  return paths


def load_stablehlo(path: str):
  """A `jax.export.Exported` from a .jax_exported file; call it with `.call(*args)`."""
  with open(path, "rb") as f:
    return jax.export.deserialize(bytearray(f.read()))


def cache_leaves(cache) -> list[tuple[str, Any]]:
  """[(path string, array)] of a cache in the order the ONNX decode program takes them."""
  flat = jax.tree_util.tree_flatten_with_path(cache)[0]
  return [(jax.tree_util.keystr(p), a) for p, a in flat]


def export_onnx(model_cfg, params, out_dir: str, *, batch_size: int, seq_len: int,
                max_len: int, opset: int = 23) -> dict[str, str]:
  """Writes forward.onnx and decode.onnx (parameters baked in) and onnx_io.json; returns paths."""
  import jax2onnx  # pylint: disable=import-outside-toplevel
  # jax2onnx imports example plugins for other libraries (equinox, dm_pix) and logs each that is
  # missing with a traceback; those are not used here.
  logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
  params, cfg = layout.unrolled(jax.tree.map(np.asarray, params),
                                export_model_config(model_cfg, linear_impl="reference"))
  model = models.build_model(cfg)
  params = jax.tree.map(jnp.asarray, params)
  os.makedirs(out_dir, exist_ok=True)
  cache = model.init_cache(batch_size, max_len)
  names = cache_leaves(cache)
  treedef = jax.tree.structure(cache)

  def decode(token, *leaves):
    logits, new = model.decode_step(params, token, jax.tree.unflatten(treedef, leaves))
    return (logits, *jax.tree.leaves(new))

  def forward(tokens):
    return model.apply(params, tokens)

  cache_names = [f"cache_{i}" for i in range(len(names))]
  io = {"forward": {"inputs": ["tokens"], "outputs": ["logits"],
                    "tokens": [batch_size, seq_len]},
        "decode": {"inputs": ["token"] + cache_names,
                   "outputs": ["logits"] + [f"new_{n}" for n in cache_names],
                   "cache": [{"name": n, "path": p, "shape": list(a.shape),
                              "dtype": str(a.dtype)} for n, (p, a) in zip(cache_names, names)]}}
  paths = {}
  specs = {"forward": (forward, [jax.ShapeDtypeStruct((batch_size, seq_len), _I32)]),
           "decode": (decode, [jax.ShapeDtypeStruct((batch_size,), _I32)]
                      + [jax.ShapeDtypeStruct(a.shape, a.dtype) for _, a in names])}
  for name, (fn, inputs) in specs.items():
    path = os.path.join(out_dir, f"{name}.onnx")
    jax2onnx.to_onnx(fn, inputs, model_name=f"sosm_{name}", opset=opset, return_mode="file",
                     output_path=path, input_names=io[name]["inputs"],
                     output_names=io[name]["outputs"])
    paths[name] = path
  with open(os.path.join(out_dir, "onnx_io.json"), "w", encoding="utf-8") as f:
    json.dump(io, f, indent=2)
  return paths


def onnx_session(path: str):
  """An onnxruntime CPU session for an exported program."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def compare(model_cfg, params, out_dir: str, *, kind: str, batch_size: int, seq_len: int,
            max_len: int, seed: int = 0) -> dict[str, float]:
  """Max |exported - JAX| of forward logits and of decode logits and caches on random tokens.

  kind: 'stablehlo' | 'onnx'. The decode step continues a prefill of seq_len // 2 tokens.
  The reference is the model as trained ('xla' linear ops), in the per-layer layout for ONNX
  (whose programs take the per-layer cache, see the module doc).
  """
  cfg = export_model_config(model_cfg)
  if kind == "onnx":
    params, cfg = layout.unrolled(jax.tree.map(np.asarray, params), cfg)
  model = models.build_model(cfg)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, model.cfg.vocab_size, (batch_size, seq_len)).astype(np.int32)
  prompt = jnp.asarray(tokens[:, :max(1, seq_len // 2)])
  _, cache = jax.jit(model.prefill, static_argnums=(2,))(params, prompt, max_len)
  token = tokens[:, -1]
  ref_logits = np.asarray(jax.jit(model.apply)(params, tokens))
  ref_step = jax.jit(model.decode_step)(params, jnp.asarray(token), cache)
  ref_step = [np.asarray(a) for a in jax.tree.leaves(ref_step)]
  if kind == "stablehlo":
    fwd = load_stablehlo(os.path.join(out_dir, "forward.jax_exported"))
    dec = load_stablehlo(os.path.join(out_dir, "decode.jax_exported"))
    got_logits = np.asarray(fwd.call(params, tokens))
    got_step = [np.asarray(a) for a in jax.tree.leaves(dec.call(params, token, cache))]
  elif kind == "onnx":
    fwd = onnx_session(os.path.join(out_dir, "forward.onnx"))
    dec = onnx_session(os.path.join(out_dir, "decode.onnx"))
    got_logits = fwd.run(None, {"tokens": tokens})[0]
    feeds = {"token": token}
    feeds.update({f"cache_{i}": np.asarray(a) for i, (_, a) in enumerate(cache_leaves(cache))})
    got_step = dec.run(None, feeds)
  else:
    raise ValueError(f"kind {kind!r}: use 'stablehlo' or 'onnx'")
  diff = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
  return {"forward_logits": diff(got_logits, ref_logits),
          "decode_logits": diff(got_step[0], ref_step[0]),
          "decode_cache": max(diff(a, b) for a, b in zip(got_step[1:], ref_step[1:])),
          "logit_scale": float(np.max(np.abs(ref_logits)))}
