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
             onerow_gemv onerow with its projections and head through the Pallas GEMV kernel
                         (ops/gemv.py), blocks per weight shape from --gemv_blocks (else
                         gemv.default_blocks; a shape whose best was XLA's dot stays XLA's)
             onerow_gemv_nohead  the same with the head through XLA's einsum
             (the variant 'fused', rows2 with fused projections through the model's modules,
             was measured slower than rows2 and removed: RESULTS.md, "Decode speed")
  ATTENTION  ops         the model's decode attention (ops/attention.cached_attention: one
                         jax.nn.dot_product_attention (XLA) over the cache with a mask)
             split       blocks of --block keys as batched matmuls, merged
                         (`split_cached_attention`)
             cudnn       jax.nn.dot_product_attention(implementation='cudnn') over the whole
                         cache with key_value_seq_lengths
With --profile=N the N kernels with the most GPU time per token are printed and stored (CUPTI
through torch.profiler, as benchmarks/scaling.py), with the kernel count per token. With
--hlo_counts each variant's compiled one-token step is counted by opcode (its entry computation:
fusions, dots, custom calls (GEMMs on a GPU), copies), a kernel count that needs no profiler and
runs on a CPU too (`--quick --hlo_counts --repeats=1`).

--gemv_sweep=PATH (no decode timing): for each weight shape of the onerow step (from the folded
parameters: K x N, rows M = 2 for the projections, 1 for the head, and how many per token), the
time of one product through XLA's dot (as onerow runs it) and through the Pallas GEMV kernel over
a staged grid (block_n 16/32/64 x split_k 1/2/4/8, then num_warps 2/4/8 x num_stages 2/3/4,
then block_k 64/128/256, each stage from the best so far, the shapes that cost the step most
first; --gemv_sweep_budget_s bounds it). Each time is over COPIES distinct weights (>= 128
MB together, more than the H200's 50 MB L2, as in decode where ~214 MB of weights stream
through) and distinct rows in one jitted call that takes all of them and returns the products
stacked: (t(COPIES products) - t(COPIES/2)) / (COPIES/2), which cancels the call's fixed cost.
Each kernel's output is checked against XLA's (max relative error in the JSON; over 1e-3 it is
not chosen). Writes PATH (every row) and --gemv_blocks (per shape the fastest configuration, or
null where XLA's dot was faster), which a later run's onerow_gemv reads.

  python benchmarks/decode_levers.py --quick                               # CPU smoke
  python benchmarks/decode_levers.py --lengths=1024 --variants=rows2:ops,onerow:ops --hlo_counts \
      --steps=2 --repeats=1                                                # CPU: op counts
  python benchmarks/decode_levers.py --lengths=1024,131072 --profile=20 --out=/tmp/levers.json
  python benchmarks/decode_levers.py --gemv_sweep=/tmp/sweep.json --gemv_blocks=/tmp/blocks.json
  python benchmarks/decode_levers.py --lengths=1024 --variants=onerow:ops,onerow_gemv:ops \
      --gemv_blocks=/tmp/blocks.json
"""
import collections
import functools
import itertools
import json
import math
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
from sosm_jax import models
from sosm_jax.ops import attention as attn_ops
from sosm_jax.ops import gemv as gemv_ops
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
_GEMV_SWEEP = flags.DEFINE_string("gemv_sweep", "", "Time XLA's dot against the Pallas GEMV per "
                                  "weight shape, write the rows here (module doc); no decode.")
_GEMV_BLOCKS = flags.DEFINE_string("gemv_blocks", "", "GEMV blocks per shape: written by "
                                   "--gemv_sweep, read by the onerow_gemv variants.")
_GEMV_BUDGET = flags.DEFINE_float("gemv_sweep_budget_s", 100.0, "Stop trying new GEMV configs "
                                  "after this many seconds (the XLA and default rows always run).")

_ORIGINAL = attn_ops.cached_attention


def split_cached_attention(q, cache, *, window=0, scale=None, block=1024):
  """`cached_attention` for one query per row, over blocks of `block` keys merged exactly.

  q `[B, 1, H, D]`; cache k, v `[B, S, KV, D]` with S % block == 0 -> `[B, 1, H, D]`.
  Each block's softmax statistics (max, sum, weighted values) in float32, then the blocks'
  results merged: many small independent matmuls instead of one with S as its long axis.
  """
  b, tq, h, d = q.shape
  k, v = cache["k"], cache["v"]
  s_len, kv = k.shape[1], k.shape[2]
  if tq != 1 or s_len % block:
    return _ORIGINAL(q, cache, window=window, scale=scale)
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


def cudnn_cached_attention(q, cache, *, window=0, scale=None):
  """The whole cache through cuDNN with the filled length as key_value_seq_lengths."""
  if q.shape[1] != 1 or window:
    return _ORIGINAL(q, cache, window=window, scale=scale)
  lengths = jnp.broadcast_to(cache["index"], (q.shape[0],)).astype(jnp.int32)
  return jax.nn.dot_product_attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype),
                                      scale=scale, key_value_seq_lengths=lengths,
                                      implementation="cudnn")


def _attention(name: str):
  if name == "ops":
    return _ORIGINAL
  if name == "split":
    return lambda q, cache, **kw: split_cached_attention(q, cache, block=_BLOCK.value, **kw)
  if name == "cudnn":
    return cudnn_cached_attention
  raise app.UsageError(f"unknown attention {name!r}; use ops, split or cudnn")


def random_cache(model, length: int, start: int, key):
  """A cache of `length` positions, random contents, index `start` `[...]`."""
  cache = model.init_cache(1, length)
  leaves, tree = jax.tree.flatten(cache)
  keys = jax.random.split(key, len(leaves))
  fill = lambda a, k: (a if a.ndim == 0 else 0.3 * jax.random.normal(k, a.shape, jnp.float32)
                       ).astype(a.dtype)
  cache = jax.tree.unflatten(tree, [fill(a, k) for a, k in zip(leaves, keys)])
  return jax.tree.map(lambda a: jnp.full_like(a, start) if a.ndim == 0 else a, cache)


def profile_kernels(fn, steps: int, top: int) -> dict:
  """{'kernels_per_token', 'kernel_ms_per_token', 'top': [(ms/token, count/token, name)]}."""
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel
  calls = 2
  with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(calls):
      jax.block_until_ready(fn())
  rows = []
  for e in prof.key_averages():
    dev = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
    if dev:
      rows.append((dev / 1e3 / calls / steps, e.count / calls / steps, e.key[:90]))
  rows.sort(reverse=True)
  for ms, n, name in rows[:top]:
    print(f"  {1e3 * ms:8.2f} us/token  x{n:6.2f}  {name}", flush=True)
  return {"kernels_per_token": sum(r[1] for r in rows),
          "kernel_ms_per_token": sum(r[0] for r in rows), "top": rows[:top]}


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


# --------------------------------------------------------------------------- GEMV sweep

_SWEEP_MB = 128          # distinct weights per timed call: > the H200's 50 MB L2
_MAX_COPIES = 96


def gemv_shapes(cfg, folded) -> list:
  """[{k, n, transposed, rows, per_token}] of the onerow step at batch 1 (rows 2 for the
  projections: the two-row residual stream; 1 for the head), from the folded parameters."""
  counts = collections.Counter()
  for i in range(cfg.num_layers):
    layer = folded[f"layer_{i}"]
    for p in (*layer["mixer"].values(), *layer["mlp"].values()):
      # fused input kernels are [in, outs]; o_proj [heads, head_dim, d_model] reads [R, in]
      kern = p["kernel"]
      counts[(math.prod(kern.shape[:-1]), kern.shape[-1], False, 2)] += 1
  table = folded["embed"]["embedding"]
  if cfg.tie_embeddings:
    counts[(table.shape[1], table.shape[0], True, 1)] += 1
  else:
    head = folded["embed"]["head"]
    counts[(head.shape[0], head.shape[1], False, 1)] += 1
  return [dict(k=k, n=n, transposed=t, rows=m, per_token=c)
          for (k, n, t, m), c in sorted(counts.items())]


def shape_key(k, n, transposed) -> str:
  return f"{k}x{n}" + ("T" if transposed else "")


def load_gemv_blocks(path: str) -> dict:
  """--gemv_blocks JSON {'KxN[T]': options or null} -> onerow's {(K, N, transposed): ...}."""
  with open(path, encoding="utf-8") as f:
    raw = json.load(f)
  out = {}
  for key, opts in raw.items():
    t = key.endswith("T")
    k, n = (int(v) for v in key.rstrip("T").split("x"))
    out[(k, n, t)] = opts
  return out


def _gemv_timer(shape, repeats):
  """-> time(mm) in us per product for one shape (module doc), and the reference output."""
  k, n, t, m = shape["k"], shape["n"], shape["transposed"], shape["rows"]
  wshape = (n, k) if t else (k, n)
  copies = max(8, min(_MAX_COPIES, math.ceil(_SWEEP_MB * 2**20 / (2 * k * n))))
  copies += copies % 2
  key = jax.random.key(k * 7 + n)
  ws = list(jax.jit(lambda: jax.random.normal(key, (copies,) + wshape, jnp.bfloat16))())
  xs = list(jax.jit(lambda: jax.random.normal(jax.random.key(1), (copies, m, k), jnp.bfloat16))())
  half = copies // 2

  def time_mm(mm):
    # both programs take all the arrays and return one (the products stacked: one small copy),
    # so the host's per-argument and per-output costs cancel in the difference
    f = jax.jit(lambda xs, ws, count: jnp.stack([mm(xs[i], ws[i]) for i in range(count)]),
                static_argnums=2)
    full = f(xs, ws, copies)                           # compile, and the output to check
    jax.block_until_ready(f(xs, ws, half))
    timed = lambda count: context_scaling._median_time(  # pylint: disable=protected-access
        lambda: f(xs, ws, count), repeats)
    return 1e6 * (timed(copies) - timed(half)) / (copies - half), full[0]

  return time_mm, copies


def gemv_sweep(cfg, folded, repeats: int, budget_s: float) -> dict:
  """Module doc, --gemv_sweep. -> {'shapes': [...], 'blocks': {key: options or None}}."""
  start = time.perf_counter()
  blocks = {}
  interpret = jax.default_backend() != "gpu"   # the CPU smoke runs the kernel interpreted
  shapes = gemv_shapes(cfg, folded)
  timers = {}
  for shape in shapes:
    k, n, t = shape["k"], shape["n"], shape["transposed"]
    time_mm, copies = _gemv_timer(shape, repeats)
    eq = "rk,nk->rn" if t else "rk,kn->rn"
    xla_us, ref = time_mm(lambda x, w, eq=eq: jnp.einsum(eq, x, w,
                                                         preferred_element_type=jnp.float32))
    shape.update(copies=copies, weight_mb=2 * k * n / 1e6, xla_us=xla_us, configs=[])
    timers[shape_key(k, n, t)] = (time_mm, ref)
    print(f"gemv {shape_key(k, n, t)} rows {shape['rows']}: xla {xla_us:.2f} us "
          f"({shape['weight_mb'] / xla_us:.2f} TB/s), {copies} copies", flush=True)

  def trial(shape, opts):
    time_mm, ref = timers[shape_key(shape["k"], shape["n"], shape["transposed"])]
    row = dict(opts)
    try:
      us, out = time_mm(lambda x, w: gemv_ops.gemv(x, w, out_dtype=jnp.float32,
                                                   transpose_w=shape["transposed"],
                                                   interpret=interpret, **opts))
      err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
      row.update(us=us, rel_err=err, ok=err < 1e-3)   # same bf16 products, f32 sums: ~1e-6
    except Exception as e:  # pylint: disable=broad-except
      row.update(error=f"{type(e).__name__}: {str(e)[:200]}", ok=False)
    shape["configs"].append(row)
    print(f"  {shape_key(shape['k'], shape['n'], shape['transposed'])} {opts}: "
          f"{row.get('us', row.get('error'))}", flush=True)
    return row

  def best(shape):
    good = [r for r in shape["configs"] if r["ok"]]
    return min(good, key=lambda r: r["us"]) if good else None

  opts_of = lambda r: {key: r[key] for key in ("block_n", "block_k", "split_k", "num_warps",
                                               "num_stages")}
  for shape in shapes:   # the default blocks, always
    try:
      opts = gemv_ops.default_blocks(shape["k"], shape["n"])
    except ValueError as e:   # no block divides the shape (the quick model's vocabulary 260)
      shape["default"] = {"error": str(e), "ok": False}
      continue
    shape["default"] = trial(shape, dict(opts, num_warps=4, num_stages=3))

  # the shapes that cost the step most first: the budget may end a stage
  order = sorted(shapes, key=lambda sh: -sh["per_token"] * sh["xla_us"])

  def stage(candidates_of):
    for shape in order:
      base = best(shape)
      if base is None:
        continue
      for opts in candidates_of(shape, opts_of(base)):
        if time.perf_counter() - start > budget_s:
          return
        if opts != opts_of(base) and all(opts != opts_of(r) for r in shape["configs"]):
          if shape["n"] % opts["block_n"] == 0 and shape["k"] % (
              opts["block_k"] * opts["split_k"]) == 0:
            trial(shape, opts)

  def tiles(shape, base):
    for bn, sk in itertools.product((16, 32, 64), (1, 2, 4, 8)):
      bk = base["block_k"]
      while bk > 16 and shape["k"] % (bk * sk):
        bk //= 2
      yield dict(base, block_n=bn, split_k=sk, block_k=bk)

  stage(tiles)
  stage(lambda shape, base: (dict(base, num_warps=w, num_stages=st)
                             for w, st in itertools.product((2, 4, 8), (2, 3, 4))))
  stage(lambda shape, base: (dict(base, block_k=bk) for bk in (64, 128, 256)))
  for shape in shapes:
    b = best(shape)
    key = shape_key(shape["k"], shape["n"], shape["transposed"])
    shape["best"] = b
    blocks[key] = opts_of(b) if b and b["us"] < shape["xla_us"] else None
  return {"shapes": shapes, "blocks": blocks, "sweep_s": time.perf_counter() - start}


def print_gemv_sweep(sweep):
  print("| K x N (T: w [N, K]) | rows | per token | weight MB | XLA us (TB/s) | GEMV default us "
        "| GEMV best us (TB/s) | best config | rel err | chosen |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  tot_xla = tot_best = 0.0
  for s in sweep["shapes"]:
    key = shape_key(s["k"], s["n"], s["transposed"])
    b, d = s["best"], s["default"]
    mb = s["weight_mb"]
    best_us = b["us"] if b else float("nan")
    cfg = ({k: b[k] for k in ("block_n", "block_k", "split_k", "num_warps", "num_stages")}
           if b else "")
    default = f"{d['us']:.2f}" if "us" in d else d.get("error", "")
    err = f"{b['rel_err']:.1e}" if b else ""
    print(f"| {key} | {s['rows']} | {s['per_token']} | {mb:.2f} | {s['xla_us']:.2f} "
          f"({mb / s['xla_us']:.2f}) | {default} | {best_us:.2f} "
          f"({mb / best_us:.2f}) | {cfg} | {err} | "
          f"{'gemv' if sweep['blocks'][key] else 'xla'} |", flush=True)
    tot_xla += s["per_token"] * s["xla_us"]
    tot_best += s["per_token"] * min(s["xla_us"], best_us if b else s["xla_us"])
  print(f"per token (sum over the step's GEMMs): XLA {tot_xla:.1f} us, with the chosen "
        f"{tot_best:.1f} us; sweep {sweep['sweep_s']:.0f} s", flush=True)


def main(argv):
  del argv
  dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  cfg = context_scaling.model_configs(_QUICK.value, dtype)["hybrid"]
  base = models.build_model(cfg)
  base_params = jax.jit(lambda: nn.unbox(base.init(jax.random.key(0), 1, cfg.chunk_size)))()
  forms = {"checkpoint": (base, base_params, base.decode_step),
           "cast": (base, layout.cast_matmul_weights(base_params, jnp.dtype(dtype)),
                    base.decode_step)}
  serving, serving_params = layout.serving_layout(base, base_params)
  forms["serving"] = (serving, serving_params, serving.decode_step)
  forms["rows2"] = (serving, serving_params, functools.partial(layout.decode_step, serving))
  folded = onerow.fold_params(serving.cfg, serving_params)
  forms["onerow"] = (serving, folded, functools.partial(onerow.decode_step, serving.cfg))
  if _GEMV_SWEEP.value:
    sweep = gemv_sweep(serving.cfg, folded, _REPEATS.value, _GEMV_BUDGET.value)
    print_gemv_sweep(sweep)
    with open(_GEMV_SWEEP.value, "w", encoding="utf-8") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                 "command": " ".join(sys.argv), **sweep}, f, indent=1, default=str)
    if _GEMV_BLOCKS.value:
      with open(_GEMV_BLOCKS.value, "w", encoding="utf-8") as f:
        json.dump(sweep["blocks"], f, indent=1)
    return
  blocks = load_gemv_blocks(_GEMV_BLOCKS.value) if _GEMV_BLOCKS.value else {}
  for shape in gemv_shapes(serving.cfg, folded):   # no default blocks (vocab 260): XLA's dot
    key = (shape["k"], shape["n"], shape["transposed"])
    try:
      gemv_ops.default_blocks(shape["k"], shape["n"])
    except ValueError:
      blocks.setdefault(key, None)
  matmul = "pallas_gemv" if jax.default_backend() == "gpu" else "pallas_gemv_interpret"
  for name, head in (("onerow_gemv", True), ("onerow_gemv_nohead", False)):
    forms[name] = (serving, folded, functools.partial(
        onerow.decode_step, serving.cfg, matmul=matmul, gemv_blocks=blocks, gemv_head=head))
  results = []
  for variant in _VARIANTS.value:
    form, attention = variant.split(":")
    if form not in forms:
      raise app.UsageError(f"unknown layout {form!r} in {variant!r}; use one of {sorted(forms)}")
    model, params, step = forms[form]
    attn_ops.cached_attention = _attention(attention)
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
            "gemv_blocks": {shape_key(*k): v for k, v in blocks.items()},
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
