"""Batch-1 decode: where the time goes and what each lever buys (the recipe hybrid, issue 18).

For each variant and context length L: a cache of L positions filled with random keys, values
and states (no prefill, so no prefill compile), then a jitted scan of --steps greedy decode steps
ending at position L; the median per-token time over --repeats calls. A variant is
LAYOUT:ATTENTION:
  LAYOUT     checkpoint  the parameters as trained (float32 weights, layers under nn.scan)
             cast        matmul weights in bfloat16 (serve/layout.cast_matmul_weights)
             serving     cast, and the layers unrolled (serve/layout.serving_layout)
             rows2       serving, and each projection of the one row run on two rows
                         (serve/layout.decode_step: no multiply + reduce rewrite by XLA)
             onerow      serving, through serve/onerow.decode_step (the engine's one-slot step):
                         the projections that read one input fused into one matmul
                         (onerow.fuse_params) with the norm scales folded into them, the residual
                         stream carried as two equal rows (no copy of a row before each
                         projection), the HGRN-2 state update and readout one expression
             (the variant 'fused', rows2 with fused projections through the model's modules,
             was measured slower than rows2 and removed: RESULTS.md, "Decode speed")
  ATTENTION  ops         the model's decode attention (ops/attention.cached_attention, its
                         implementation picked by model.attn_decode_impl = '' (auto))
             xla         the same with attn_decode_impl='xla': two batched products over the
                         cache with a mask
             pallas      attn_decode_impl='pallas': the kernel of ops/decode_attention.py
             split       blocks of --block keys as batched matmuls, merged
                         (`split_cached_attention`)
             cudnn       jax.nn.dot_product_attention(implementation='cudnn') over the whole
                         cache with key_value_seq_lengths
             int8        the model's decode attention over an int8 KV cache
                         (model.attn_kv_cache_dtype='int8': half the bytes of a bf16 cache);
                         int8-xla, int8-pallas with that attn_decode_impl
With --profile=N the N kernels with the most GPU time per token are printed and stored (CUPTI
through torch.profiler, as benchmarks/scaling.py), with the kernel count per token. With
--hlo_counts each variant's compiled one-token step is counted by opcode (its entry computation:
fusions, dots, custom calls (GEMMs on a GPU), copies), a kernel count that needs no profiler and
runs on a CPU too (`--quick --hlo_counts --repeats=1`).

  python benchmarks/decode_levers.py --quick                               # CPU smoke
  python benchmarks/decode_levers.py --lengths=1024 --variants=rows2:ops,onerow:ops --hlo_counts \
      --steps=2 --repeats=1                                                # CPU: op counts
  python benchmarks/decode_levers.py --lengths=1024,131072 --profile=20 --out=/tmp/levers.json
"""
import collections
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
from absl import app, flags

import context_scaling
from kernel_profile import profile_kernels
from sosm_jax import models
from sosm_jax.ops import attention as attn_ops
from sosm_jax.serve import layout, onerow
from sosm_jax.train import hlo_stats

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "131072"], "Context lengths.")
_VARIANTS = flags.DEFINE_list("variants", ["checkpoint:ops", "cast:ops", "serving:ops",
                                           "serving:split"], "LAYOUT:ATTENTION (module doc).")
_STEPS = flags.DEFINE_integer("steps", 32, "Decode steps per timed call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (after one warm-up).")
_BLOCK = flags.DEFINE_integer("block", 1024, "Keys per block of the 'split' attention.")
_PROFILE = flags.DEFINE_integer("profile", 0, "GPU: print and store the N costliest kernels.")
_QUICK = flags.DEFINE_bool("quick", False, "The small model of context_scaling --quick.")
_OUT = flags.DEFINE_string("out", "", "Write the result JSON here.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "Write each profiled program's HLO text here.")
_HLO_COUNTS = flags.DEFINE_bool("hlo_counts", False, "Count the one-token step's ops (module doc).")

_ORIGINAL = attn_ops.cached_attention


def split_cached_attention(q, cache, *, window=0, scale=None, read_len=0, implementation="xla",
                           block=1024):
  """`cached_attention` for one query per row, over blocks of `block` keys merged exactly.

  q `[B, 1, H, D]`; cache k, v `[B, KV, S, D]` with S % block == 0 -> `[B, 1, H, D]`.
  Each block's softmax statistics (max, sum, weighted values) in float32, then the blocks'
  results merged: many small independent matmuls instead of one with S as its long axis.
  """
  b, tq, h, d = q.shape
  k, v = jnp.swapaxes(cache["k"], 1, 2), jnp.swapaxes(cache["v"], 1, 2)   # [B, S, KV, D]
  s_len, kv = k.shape[1], k.shape[2]
  if tq != 1 or s_len % block or read_len:   # this benchmark's caches are read whole
    return _ORIGINAL(q, cache, window=window, scale=scale, read_len=read_len,
                     implementation=implementation)
  g, nb = h // kv, s_len // block
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, kv, g, d)
  kb = k.reshape(b, nb, block, kv, d).astype(q.dtype)
  vb = v.reshape(b, nb, block, kv, d).astype(q.dtype)
  s = jnp.einsum("bkgd,bnskd->bkgns", qg, kb, preferred_element_type=jnp.float32) * scale
  pos = jnp.arange(s_len, dtype=jnp.int32).reshape(nb, block)
  last = cache["index"] - 1
  valid = pos <= last
  if window > 0:
    valid &= (last - pos) < window
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m[..., None])
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkgns,bnskd->bkgnd", p.astype(q.dtype), vb, preferred_element_type=jnp.float32)
  top = jnp.max(jnp.where(l > 0, m, -jnp.inf), axis=-1, keepdims=True)
  w = jnp.where(l > 0, jnp.exp(m - top), 0.0)
  out = jnp.sum(w[..., None] * o, axis=-2) / jnp.sum(w * l, axis=-1)[..., None]
  return out.reshape(b, 1, h, d).astype(q.dtype)


def cudnn_cached_attention(q, cache, *, window=0, scale=None, read_len=0, implementation="xla"):
  """The whole cache through cuDNN with the filled length as key_value_seq_lengths."""
  if q.shape[1] != 1 or window or read_len:
    return _ORIGINAL(q, cache, window=window, scale=scale, read_len=read_len,
                     implementation=implementation)
  lengths = jnp.broadcast_to(cache["index"], (q.shape[0],)).astype(jnp.int32)
  k, v = (jnp.swapaxes(cache[n], 1, 2).astype(q.dtype) for n in ("k", "v"))   # [B, S, KV, D]
  return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lengths,
                                      implementation="cudnn")


# ATTENTION of the module doc -> (KV cache dtype, model.attn_decode_impl)
_MODEL_ATTENTION = {"ops": ("", ""), "xla": ("", "xla"), "pallas": ("", "pallas"),
                    "int8": ("int8", ""), "int8-xla": ("int8", "xla"),
                    "int8-pallas": ("int8", "pallas"), "split": ("", "xla"), "cudnn": ("", "xla")}


def _attention(name: str):
  if name not in _MODEL_ATTENTION:
    raise app.UsageError(f"unknown attention {name!r}; use one of {sorted(_MODEL_ATTENTION)}")
  if name == "split":
    return lambda q, cache, **kw: split_cached_attention(q, cache, block=_BLOCK.value, **kw)
  if name == "cudnn":
    return cudnn_cached_attention
  return _ORIGINAL


def random_cache(model, length: int, start: int, key):
  """A cache of `length` positions, random contents, index `start` `[...]`."""
  cache = model.init_cache(1, length)
  leaves, tree = jax.tree.flatten(cache)
  keys = jax.random.split(key, len(leaves))
  fill = lambda a, k: (a if a.ndim == 0 else 0.3 * jax.random.normal(k, a.shape, jnp.float32)
                       ).astype(a.dtype)
  cache = jax.tree.unflatten(tree, [fill(a, k) for a, k in zip(leaves, keys)])
  return jax.tree.map(lambda a: jnp.full_like(a, start) if a.ndim == 0 else a, cache)


# instructions of a compiled entry computation that launch nothing
_FREE_OPS = ("parameter", "get-tuple-element", "tuple", "constant", "bitcast")


def hlo_op_counts(model, params, step, length: int) -> dict:
  """{opcode: count} of the compiled one-token step's entry computation (a cache of `length`),
  and 'launched': the instructions that are not free (`_FREE_OPS`)."""
  cache = jax.eval_shape(lambda: model.init_cache(1, length))
  text = jax.jit(step).lower(params, jax.ShapeDtypeStruct((1,), jnp.int32), cache).compile(
      ).as_text()
  comps, entry = hlo_stats.parse_computations(text)
  counts = collections.Counter(instr.opcode for instr in comps[entry])
  counts = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
  counts["launched"] = sum(n for op, n in counts.items() if op not in _FREE_OPS)
  return counts


def measure(model, params, step, length: int, steps: int, repeats: int, profile: int,
            hlo_path: str = "") -> dict:
  cache = random_cache(model, length, length - steps, jax.random.key(length))

  decode = functools.partial(context_scaling.greedy_decode, step, num_steps=steps)

  first = jnp.zeros((1,), jnp.int32)
  start = time.perf_counter()
  compiled = jax.jit(decode).lower(params, first, cache).compile()
  row = {"length": length, "compile_s": time.perf_counter() - start}
  jax.block_until_ready(compiled(params, first, cache))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, first, cache))
    times.append(time.perf_counter() - start)
  row["decode_ms"] = 1e3 * statistics.median(times) / steps
  row["decode_ms_min"] = 1e3 * min(times) / steps
  if hlo_path:
    with open(hlo_path, "w", encoding="utf-8") as f:
      f.write(compiled.as_text())
  if profile:
    try:   # the timings above stand without it (no torch, no CUPTI)
      row["profile"] = profile_kernels(lambda: compiled(params, first, cache), steps, profile)
    except Exception as e:  # pylint: disable=broad-except
      row["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  return row


def decode_forms(base, base_params, dtype) -> dict:
  """LAYOUT -> (model, params, decode step) of the module doc, for one base model."""
  forms = {"checkpoint": (base, base_params, base.decode_step),
           "cast": (base, layout.cast_matmul_weights(base_params, jnp.dtype(dtype)),
                    base.decode_step)}
  serving, serving_params = layout.serving_layout(base, base_params)
  forms["serving"] = (serving, serving_params, serving.decode_step)
  forms["rows2"] = (serving, serving_params, functools.partial(layout.decode_step, serving))
  forms["onerow"] = (serving, onerow.fold_params(serving.cfg, serving_params),
                     functools.partial(onerow.decode_step, serving.cfg))
  return forms


def main(argv):
  del argv
  dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  cfg = context_scaling.model_configs(_QUICK.value, dtype)["hybrid"]
  base = models.build_model(cfg)
  base_params = jax.jit(lambda: nn.unbox(base.init(jax.random.key(0), 1, cfg.chunk_size)))()
  forms_by_cache = {}
  results = []
  for variant in _VARIANTS.value:
    form, attention = variant.split(":")
    patched = _attention(attention)
    model_attention = _MODEL_ATTENTION[attention]
    if model_attention not in forms_by_cache:
      cache_dtype, impl = model_attention
      forms_by_cache[model_attention] = decode_forms(
          layout.with_decode_impl(layout.with_kv_cache_dtype(base, cache_dtype), impl),
          base_params, dtype)
    forms = forms_by_cache[model_attention]
    if form not in forms:
      raise app.UsageError(f"unknown layout {form!r} in {variant!r}; use one of {sorted(forms)}")
    model, params, step = forms[form]
    attn_ops.cached_attention = patched
    for length in (int(x) for x in _LENGTHS.value):
      print(f"{variant} @ {length}", flush=True)
      try:
        hlo = (os.path.join(_HLO_DIR.value, f"{variant.replace(':', '_')}_{length}.hlo.txt")
               if _HLO_DIR.value and _PROFILE.value else "")
        row = measure(model, params, step, length, _STEPS.value, _REPEATS.value, _PROFILE.value, hlo)
        if _HLO_COUNTS.value:
          row["hlo_counts"] = hlo_op_counts(model, params, step, length)
      except Exception as e:  # pylint: disable=broad-except
        row = {"length": length, "error": f"{type(e).__name__}: {str(e)[:300]}"}
      row["variant"] = variant
      print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
      results.append(row)
    attn_ops.cached_attention = _ORIGINAL
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "dtype": dtype,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps": _STEPS.value,
            "command": " ".join(sys.argv), "results": results}
  print("| variant | tokens | decode ms/token | min | kernels/token | kernel ms/token | "
        "step's launched ops (fusion / dot / custom-call) |")
  for r in results:
    prof, ops = r.get("profile", {}), r.get("hlo_counts", {})
    launched = (f"{ops['launched']} ({ops.get('fusion', 0)} / {ops.get('dot', 0)} / "
                f"{ops.get('custom-call', 0)})" if ops else "")
    print(f"| {r['variant']} | {r['length']} | {r.get('decode_ms', r.get('error'))} | "
          f"{r.get('decode_ms_min', '')} | {prof.get('kernels_per_token', '')} | "
          f"{prof.get('kernel_ms_per_token', '')} | {launched} |", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
