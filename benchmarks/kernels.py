"""Times the linear-attention ops (ours, and fla / MaxText / cuDNN attention when importable).

For each `T x B` row (16 heads, head dim 128, bf16 by default) and each op ('gdn' gated delta rule,
'gla' HGRN-2 kernel) it times forward and forward+backward (median ms), prints the relative error
of every implementation's output against a float32 chunked reference on the same inputs, and
writes JSON (device, versions, shapes, medians, errors). Decode: one-step latency of the gated
delta rule at batch 1..64 against fla's `fused_recurrent_gated_delta_rule`.

Peers are never part of this repository: fla comes from its wheels installed on the GPU machine,
MaxText's `jax_chunk_gated_delta_rule` is read from its wheel (`--maxtext-wheel`, the function
alone is compiled; MaxText is not imported).

  python benchmarks/kernels.py --rows 4096x16,16384x4,65536x1 --out /tmp/kernels.json
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import zipfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch (fla)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import sosm_jax.ops as ops  # pylint: disable=wrong-import-position

# --------------------------------------------------------------------------- inputs and timing


def make_inputs(op, t, b, h, d, dtype, seed=0):
  """Random inputs like a real layer: unit-norm q, k; mild decays; sigmoid betas."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (b, t, h, d))).astype(dtype)
  k = unit(jax.random.normal(ks[1], (b, t, h, d))).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, d)).astype(dtype)
  do = jax.random.normal(ks[5], (b, t, h, d)).astype(dtype)
  if op == "gdn":
    g = jax.nn.log_sigmoid(2.0 + jax.random.normal(ks[3], (b, t, h)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
    return (q, k, v, g, beta), do
  log_f = jax.nn.log_sigmoid(2.0 + jax.random.normal(ks[3], (b, t, h, d)))
  return (q, k, v, log_f), do


def _median_ms(fn, args, iters, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _rel(a, b):
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# --------------------------------------------------------------------------- JAX implementations


def load_maxtext_gdn(wheel):
  """MaxText's `jax_chunk_gated_delta_rule`, compiled alone from its wheel (no MaxText import)."""
  with zipfile.ZipFile(wheel) as z:
    src = z.read("maxtext/models/qwen3.py").decode()
  tree = ast.parse(src)
  fn = next(n for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name == "jax_chunk_gated_delta_rule")
  module = ast.Module(body=[fn], type_ignores=[])
  namespace = {"jax": jax, "jnp": jnp, "lax": jax.lax, "Array": jax.Array, "math": __import__("math"),
               "l2norm": None, "gdn_cp": None}
  exec(compile(module, wheel + ":qwen3.py", "exec"), namespace)  # pylint: disable=exec-used
  return namespace["jax_chunk_gated_delta_rule"]


def jax_impls(op, maxtext_wheel):
  """name -> f(*inputs) -> o, for the JAX implementations available for `op`: ours by
  `implementation` ('pallas' = the Pallas kernels, 'xla' = the chunked XLA form)."""
  fn = ops.gated_delta_rule if op == "gdn" else ops.gla
  impls = {f"ours_{impl}": functools.partial(fn, implementation=impl) for impl in ("pallas", "xla")}
  impls = {k: (lambda f: lambda *a: f(*a)[0])(f) for k, f in impls.items()}
  if op == "gdn" and maxtext_wheel and os.path.exists(maxtext_wheel):
    mt = load_maxtext_gdn(maxtext_wheel)
    impls["maxtext"] = lambda q, k, v, g, beta: mt(q, k, v, g, beta, chunk_size=64)[0]
  return impls


def time_jax(fn, inputs, do, modes, iters):
  fwd = jax.jit(fn)

  @jax.jit
  def fwdbwd(*args):
    # o is returned too: a training step uses it, and XLA would otherwise drop the kernels that
    # only produce o (fla's timed step computes o as well)
    o, vjp = jax.vjp(fn, *args[:-1])
    return o, vjp(args[-1])

  out = {}
  o = fwd(*inputs)
  if "fwd" in modes:
    out["fwd"] = _median_ms(fwd, inputs, iters)
  if "fwdbwd" in modes:
    out["fwdbwd"] = _median_ms(fwdbwd, tuple(inputs) + (do,), iters)
  return out, o


def time_cudnn_attention(t, b, h, d, iters):
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  q, k, v, do = (jax.random.normal(x, (b, t, h, d), jnp.bfloat16) for x in ks)
  attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                      implementation="cudnn")
  res, _ = time_jax(attn, (q, k, v), do, ("fwd", "fwdbwd"), iters)
  return res


# --------------------------------------------------------------------------- fla (torch)


def fla_available():
  try:
    import fla  # pylint: disable=import-outside-toplevel,unused-import
    import torch  # pylint: disable=import-outside-toplevel
    return torch.cuda.is_available()
  except Exception:  # pylint: disable=broad-except
    return False


def time_fla(op, inputs, do, modes, iters):
  """fla's chunk kernels on the same inputs (via dlpack). Returns (times, output as jax)."""
  import torch  # pylint: disable=import-outside-toplevel
  import triton  # pylint: disable=import-outside-toplevel
  from fla.ops.common import chunk_o  # pylint: disable=import-outside-toplevel
  # fla 0.6 refuses the gated backward on Hopper with triton < 3.7.1 (its issue #640);
  # force it for timing only, as the table did.
  chunk_o.TRITON_ABOVE_3_7_1 = True
  tt = [torch.from_dlpack(x) for x in inputs]
  tdo = torch.from_dlpack(do)
  if op == "gdn":
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as f  # pylint: disable=import-outside-toplevel
    scale = inputs[0].shape[-1] ** -0.5
    call = lambda *a: f(*a, scale=scale, output_final_state=False)[0]
  else:
    from fla.ops.gla import chunk_gla as f  # pylint: disable=import-outside-toplevel
    call = lambda *a: f(*a, scale=1.0, output_final_state=False)[0]
  out = {}
  o = call(*tt)
  if "fwd" in modes:
    out["fwd"] = triton.testing.do_bench(lambda: call(*tt), warmup=25, rep=max(iters * 10, 100),
                                         return_mode="median")
    print(f"fla {op} fwd {out['fwd']:.3f} ms (before its backward's first call)", flush=True)
  if "fwdbwd" in modes:
    tg = [x.detach().clone().requires_grad_(True) for x in tt]

    def step():
      call(*tg).backward(tdo)
    out["fwdbwd"] = triton.testing.do_bench(step, warmup=25, rep=max(iters * 10, 100),
                                            grad_to_none=tg, return_mode="median")
  o_jax = jnp.asarray(o.float().cpu().numpy())
  return out, o_jax


def time_fla_decode(b, h, d, iters):
  import torch  # pylint: disable=import-outside-toplevel
  import triton  # pylint: disable=import-outside-toplevel
  from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as f  # pylint: disable=import-outside-toplevel
  dev = "cuda"
  q = torch.nn.functional.normalize(torch.randn(b, 1, h, d, device=dev), dim=-1).bfloat16()
  k = torch.nn.functional.normalize(torch.randn(b, 1, h, d, device=dev), dim=-1).bfloat16()
  v = torch.randn(b, 1, h, d, device=dev).bfloat16()
  g = torch.nn.functional.logsigmoid(torch.randn(b, 1, h, device=dev) + 2)
  beta = torch.rand(b, 1, h, device=dev)
  s = torch.randn(b, h, d, d, device=dev)
  return triton.testing.do_bench(
      lambda: f(q, k, v, g=g, beta=beta, initial_state=s, output_final_state=True),
      warmup=25, rep=100, return_mode="median")


def time_ours_decode(b, h, d, iters, steps=200):
  """Device time per decode step: `steps` steps inside one jitted loop (no host round trips)."""
  ks = jax.random.split(jax.random.PRNGKey(2), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (b, h, d))).astype(jnp.bfloat16)
  k = unit(jax.random.normal(ks[1], (b, h, d))).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, h, d)).astype(jnp.bfloat16)
  g = jax.nn.log_sigmoid(2.0 + jax.random.normal(ks[3], (b, h)))
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, h)))
  state = jax.random.normal(ks[5], (b, h, d, d))

  @jax.jit
  def run(state, n):
    def body(_, carry):
      s, acc = carry
      o, s = ops.gated_delta_rule_step(q, k, v, g, beta, s)
      return s, acc + o[0, 0, 0].astype(jnp.float32)
    return jax.lax.fori_loop(0, n, body, (state, 0.0))

  one = _median_ms(run, (state, 1), iters)
  many = _median_ms(run, (state, steps + 1), iters)
  return (many - one) / steps


# --------------------------------------------------------------------------- main


def profile_kernels(op, fn, inputs, do, top=30, hlo_path=None):
  """Per-kernel GPU time of one forward+backward (CUPTI through torch.profiler sees XLA's kernels)."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel

  @jax.jit
  def fwdbwd(*args):
    # o is returned too: a training step uses it, and XLA would otherwise drop the kernels that
    # only produce o (fla's timed step computes o as well)
    o, vjp = jax.vjp(fn, *args[:-1])
    return o, vjp(args[-1])
  jax.block_until_ready(fwdbwd(*inputs, do))
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(fwdbwd.lower(*inputs, do).compile().as_text())
  with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
      jax.block_until_ready(fwdbwd(*inputs, do))
    torch.cuda.synchronize()
  rows = []
  for e in prof.key_averages():
    dev = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
    if dev:
      rows.append((dev / 3e3, e.count // 3, e.key[:90]))
  rows.sort(reverse=True)
  print(f"--- {op}: per-call GPU ms by kernel (total {sum(r[0] for r in rows):.2f} ms)")
  for ms, n, name in rows[:top]:
    print(f"{ms:8.3f} ms  x{n:<3d} {name}")
  return rows


def check_gradients(t=200, b=2, h=2, d=128, chunk=64, seed=0, op_names=("gdn", "gla"),
                    dtypes=("bfloat16", "float32"), with_xla=True):
  """Relative errors of ours (Pallas kernels, compiled on a GPU; and the XLA chunked form) against
  the sequential reference, forward and all gradients (loss = <o, R1> + <final state, R2>), bf16
  and fp32 inputs, with an initial state; t is not a multiple of the chunk."""
  out = []
  pallas = "pallas" if jax.default_backend() == "gpu" else "pallas_interpret"
  for op in op_names:
    inputs, _ = make_inputs(op, t, b, h, d, jnp.float32, seed)
    h0 = jax.random.normal(jax.random.PRNGKey(seed + 7), (b, h, d, d))
    fn = ops.gated_delta_rule if op == "gdn" else ops.gla

    def run(impl, args, h0, fn=fn):
      def loss(args, h0):
        o, s = fn(*args, initial_state=h0, chunk_size=chunk, implementation=impl)
        r1 = jax.random.normal(jax.random.PRNGKey(1), o.shape)
        r2 = jax.random.normal(jax.random.PRNGKey(2), s.shape)
        return jnp.sum(o.astype(jnp.float32) * r1) + jnp.sum(s * r2), (o, s)
      (_, res), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(args, h0)
      return jax.tree.leaves((res, grads))
    want = run("reference", inputs, h0)
    for impl in (pallas, "xla") if with_xla else (pallas,):
      for dtype in dtypes:
        args = [x.astype(dtype) for x in inputs[:3]] + list(inputs[3:])
        t0 = time.perf_counter()
        errs = [_rel(x, y) for x, y in zip(run(impl, args, h0), want)]
        entry = {"op": op, "impl": impl, "dtype": jnp.dtype(dtype).name, "T": t, "B": b,
                 "chunk": chunk, "max_rel_err": max(errs), "rel_err_o_state_grads": errs,
                 "seconds_incl_compile": round(time.perf_counter() - t0, 1)}
        print("check", json.dumps(entry), flush=True)
        out.append(entry)
  return out


# --gdn-stages: the gated delta rule's forward kernels timed one by one (bf16), most telling
# first (a call that runs out of time loses the tail). Each entry: (label, settings).
# 'prep': `pallas_kernels.prep_forward` as the forward without a backward runs it (no kd);
# 'inverse', 'apply': its two kernels alone ('apply' writes kd, as the backward's forward does);
# 'fwd_out*': the forward-only recurrence with the output stage in its loop
# (`pallas_recurrence.forward_output`), then with other launch settings; 'rec_fwd', 'output_fwd':
# the backward's forward. Candidates that measured slower are in sosm_jax/ops/NOTES.md.
GDN_STAGE_SWEEP = (
    ("prep", dict(stage="prep", with_kd=False)),
    ("inverse", dict(stage="inverse")),
    ("apply", dict(stage="apply")),
    ("fwd_out", dict(stage="fwd_out")),
    ("rec_fwd", dict(stage="rec_fwd")),
    ("output_fwd", dict(stage="output_fwd")),
    ("fwd_out_bv32", dict(stage="fwd_out", block_v=32)),
    ("fwd_out_stages3", dict(stage="fwd_out", num_stages=3)),
    ("fwd_out_bv128_w8", dict(stage="fwd_out", block_v=128, num_warps=8)),
)


def _gdn_stage_maker(t, b, h, d, chunk=64):
  """make(settings) -> a no-argument function running one forward kernel (a GDN_STAGE_SWEEP or
  GDN_LAUNCH_GRID entry) on the inputs of `make_inputs` (bf16), laid out as
  `gated_delta_rule_pallas` lays them out. Off a GPU the kernels run in interpret mode (a smoke
  test of the callers, not a timing)."""
  ip = dict(interpret=jax.default_backend() != "gpu")
  from sosm_jax.ops.common.chunks import to_chunks  # pylint: disable=import-outside-toplevel
  from sosm_jax.ops.gated_delta import pallas as gdn_pallas  # pylint: disable=import-outside-toplevel
  from sosm_jax.ops.gated_delta import pallas_kernels as kern  # pylint: disable=import-outside-toplevel
  from sosm_jax.ops.gated_delta import pallas_recurrence as rec  # pylint: disable=import-outside-toplevel
  (q, k, v, g, beta), _ = make_inputs("gdn", t, b, h, d, jnp.bfloat16)
  bh, n = b * h, t // chunk
  bhs = lambda x: to_chunks(x.astype(jnp.float32), chunk).reshape(bh, t)
  gam = jnp.cumsum(to_chunks(g.astype(jnp.float32), chunk), axis=-1).reshape(bh, t)
  beta = bhs(beta)
  scale = d ** -0.5
  w, u, kd, tmat = kern.prep_forward(k, v, beta, gam, chunk=chunk, **ip)
  per_chunk = lambda x: x.reshape(bh, n, chunk, x.shape[-1])
  w, u, kd = per_chunk(w), per_chunk(u), per_chunk(kd)
  a = gdn_pallas.chunk_state_decay(gam, chunk, d)
  h0 = jnp.zeros((bh, d, d), jnp.float32)
  h_in, vn, _ = rec.forward(w, u, kd, a, h0, **ip)

  def make(opts):
    opts = dict(opts)
    stage = opts.pop("stage")
    if stage == "prep":
      return lambda: kern.prep_forward(k, v, beta, gam, chunk=chunk, **opts, **ip)
    if stage == "inverse":
      return lambda: kern.wy_inverse(k, beta, gam, chunk=chunk, **opts, **ip)
    if stage == "apply":
      return lambda: kern.wy_apply(k, v, beta, gam, tmat, chunk=chunk, **opts, **ip)
    if stage == "fwd_out":
      # no initial state, as the op runs it on these inputs (zeros neither written nor read)
      return lambda: rec.forward_output(w, u, None, q, k, gam, scale=scale, **opts, **ip)
    if stage == "rec_fwd":
      return lambda: rec.forward(w, u, kd, a, h0, **opts, **ip)
    assert stage == "output_fwd", stage
    return lambda: kern.output_forward(q, k, gam, h_in, vn, scale=scale, **opts, **ip)
  return make


def _time_stage(fn, iters, entry):
  """Fills entry with first_call_s (compile + run) and ms (median), or error."""
  try:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    entry["first_call_s"] = round(time.perf_counter() - t0, 2)
    entry["ms"] = _median_ms(fn, (), max(iters, 20))
  except Exception as e:  # pylint: disable=broad-except
    entry["error"] = repr(e)[:500]
  return entry


def time_gdn_stages(t, b, h, d, iters, record, chunk=64):
  """Median ms of each --gdn-stages entry (`_gdn_stage_maker`). A failing entry is recorded with
  its error."""
  make = _gdn_stage_maker(t, b, h, d, chunk)
  out = []
  for label, opts in GDN_STAGE_SWEEP:
    entry = {"op": "gdn_stage", "stage": label, "T": t, "B": b, "settings": repr(opts)}
    try:
      fn = make(opts)
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = repr(e)[:500]
    else:
      _time_stage(fn, iters, entry)
    record(entry)
    out.append(entry)
  return out


# --gdn-sweep: launch-setting grids of the three kernels of the bf16 forward without a backward,
# each kernel timed alone (`_gdn_stage_maker`), today's defaults first in each grid; the fastest
# of each is then plugged into the whole op (`pallas.ForwardLaunch`). 'apply' without kd, as
# that forward runs it. wy_inverse and wy_apply have no loop over chunks (one chunk per program),
# so they get one stages>1 probe each (yet wy_apply measured faster at 2 stages than at 1 on an
# H200, 0.547 vs 0.624 ms, why not profiled); the recurrence+output loop gets the full range. wy_inverse's `sub`: its block size (16: 4x4 blocks; 32: 2x2).
GDN_LAUNCH_GRID = {
    "inverse": ([dict(warps=w, stages=1, sub=16) for w in (1, 2, 4)]
                + [dict(warps=w, stages=1, sub=32) for w in (1, 2, 4)]
                + [dict(warps=1, stages=2, sub=16)]),
    "apply": ([dict(warps=4, stages=2, with_kd=False)]
              + [dict(warps=w, stages=1, with_kd=False) for w in (4, 2, 8, 1)]),
    "fwd_out": ([dict(block_v=64, num_warps=4, num_stages=2)]
                + [dict(block_v=bv, num_warps=w, num_stages=st)
                   for bv in (64, 32, 128) for w in (4, 8) for st in (1, 2, 3)
                   if (bv, w, st) != (64, 4, 2)]
                + [dict(block_v=bv, num_warps=2, num_stages=2) for bv in (16, 32, 64)]
                + [dict(block_v=16, num_warps=4, num_stages=2)]),
}
# grid entry -> ForwardLaunch field
_LAUNCH_FIELDS = {"inverse": dict(warps="inverse_warps", stages="inverse_stages",
                                  sub="inverse_sub"),
                  "apply": dict(warps="apply_warps", stages="apply_stages"),
                  "fwd_out": dict(block_v="out_block_v", num_warps="out_warps",
                                  num_stages="out_stages")}


def time_gdn_sweep(t, b, h, d, iters, record, chunk=64, grid=None, budget_s=150.0, modes=("fwd",)):
  """Each `grid` (default GDN_LAUNCH_GRID) entry timed alone (compiled once, median of
  max(iters, 20) calls; failures recorded with their error; entries left when a kernel's share of
  `budget_s` (by grid size, plus what earlier kernels left) is spent are recorded as skipped),
  then the whole op (`gated_delta_rule_pallas`) with the default launch and with each kernel's
  fastest entry: `modes` median ms, o's relative error against the fp32 chunked reference and
  against the default launch's o. Returns {"kernels", "best", "best_launch", "whole_op"}."""
  from sosm_jax.ops.gated_delta import pallas as gdn_pallas  # pylint: disable=import-outside-toplevel
  grid = GDN_LAUNCH_GRID if grid is None else grid
  make = _gdn_stage_maker(t, b, h, d, chunk)
  t_start = time.perf_counter()
  total, done = sum(len(e) for e in grid.values()), 0
  kernels, best = {}, {}
  for stage, entries in grid.items():
    kernels[stage] = []
    # each kernel's share of the budget (by grid size) plus what the ones before left unspent
    done += len(entries)
    deadline = t_start + budget_s * done / total
    for opts in entries:
      entry = {"op": "gdn_sweep", "stage": stage, "T": t, "B": b, "heads": h, "dim": d,
               "chunk": chunk, "settings": dict(opts)}
      if time.perf_counter() > deadline:
        entry["skipped"] = f"skipped: {stage}'s share of the {budget_s} s sweep budget spent"
      else:
        _time_stage(make(dict(opts, stage=stage)), iters, entry)
      record(entry)
      kernels[stage].append(entry)
    timed = [e for e in kernels[stage] if "ms" in e]
    if timed:
      best[stage] = min(timed, key=lambda e: e["ms"])["settings"]
  fields = {_LAUNCH_FIELDS[st][k]: v for st, opts in best.items() for k, v in opts.items()
            if k in _LAUNCH_FIELDS[st]}
  launches = {"default": gdn_pallas.DEFAULT_LAUNCH, "best": gdn_pallas.ForwardLaunch(**fields)}
  interpret = jax.default_backend() != "gpu"
  inputs, do = make_inputs("gdn", t, b, h, d, jnp.bfloat16)
  ref = reference_output("gdn", inputs)
  whole, outs = [], {}
  for name, launch in launches.items():
    if name == "best" and launch == launches["default"]:
      continue
    fn = functools.partial(gdn_pallas.gated_delta_rule_pallas, chunk_size=chunk, launch=launch,
                           interpret=interpret)
    entry = {"op": "gdn", "impl": f"ours_pallas[{name}]", "T": t, "B": b,
             "launch": dataclasses.asdict(launch)}
    try:
      times, o = time_jax(lambda *a, fn=fn: fn(*a)[0], inputs, do, modes, iters)
      entry.update(times, rel_err=_rel(o, ref))
      if "default" in outs:  # same math, other blocking: bf16-rounding-level differences only
        entry["rel_diff_vs_default"] = _rel(o, outs["default"])
      outs[name] = o
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = repr(e)[:500]
    record(entry)
    whole.append(entry)
  return {"kernels": kernels, "best": best, "best_launch": dataclasses.asdict(launches["best"]),
          "whole_op": whole}


def reference_output(op, inputs):
  """float32 chunked XLA form (tested against the sequential recurrence)."""
  f32 = [x.astype(jnp.float32) for x in inputs]
  if op == "gdn":
    return jax.jit(ops.gated_delta_rule_chunked)(*f32)[0]
  return jax.jit(ops.gla_chunked)(*f32)[0]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", default="4096x16,16384x4,65536x1", help="TxB,TxB,...")
  p.add_argument("--ops", default="gdn,gla")
  p.add_argument("--impls", default="ours_pallas,ours_xla,maxtext,fla,cudnn")
  p.add_argument("--modes", default="fwd,fwdbwd")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--decode", default="1,4,16,64", help="decode batch sizes ('' to skip)")
  p.add_argument("--maxtext-wheel", default=".whl/maxtext-0.2.5-py3-none-any.whl")
  p.add_argument("--no-error", action="store_true", help="skip the fp32 reference")
  p.add_argument("--out", default="kernels.json")
  p.add_argument("--profile", default="", help="impl name: print its per-kernel GPU times")
  p.add_argument("--error-rows", type=int, default=1, help="rows that get the fp32 reference")
  p.add_argument("--check", action="store_true",
                 help="first compare ours (pallas, xla) with the sequential reference (values, "
                      "gradients) for --ops")
  p.add_argument("--check-dtypes", default="bfloat16,float32", help="dtypes of --check, in order")
  p.add_argument("--check-xla", type=int, default=1, help="0: --check only the Pallas path")
  p.add_argument("--gdn-stages", action="store_true",
                 help="after the rows: time the gated delta rule's forward kernels one by one "
                      "(GDN_STAGE_SWEEP) at the first row")
  p.add_argument("--gdn-sweep", action="store_true",
                 help="after the rows (and --gdn-stages): time GDN_LAUNCH_GRID (each forward "
                      "kernel alone) at the first row, then the whole op with the default launch "
                      "and with each kernel's fastest (--modes)")
  p.add_argument("--sweep-budget-s", type=float, default=150.0,
                 help="--gdn-sweep: grid entries left after this many seconds are skipped")
  args = p.parse_args(argv)
  wanted = set(args.impls.split(","))
  modes = tuple(args.modes.split(","))
  h, d = args.heads, args.dim
  have_fla = "fla" in wanted and fla_available()
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "heads": h, "dim": d,
            "dtype": "bfloat16", "results": [], "decode": []}

  if args.check:
    report["check"] = check_gradients(op_names=tuple(args.ops.split(",")),
                                      dtypes=tuple(args.check_dtypes.split(",")),
                                      with_xla=bool(args.check_xla))

  def record(entry):
    report["results"].append(entry)
    print(json.dumps(entry), flush=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)

  for i, row in enumerate(r for r in args.rows.split(",") if r):
    t, b = (int(x) for x in row.split("x"))
    for op in args.ops.split(","):
      inputs, do = make_inputs(op, t, b, h, d, jnp.bfloat16)
      ref = None if args.no_error or i >= args.error_rows else reference_output(op, inputs)
      impls = {k: f for k, f in jax_impls(op, args.maxtext_wheel).items() if k in wanted}
      if args.profile in impls:
        hlo = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"hlo_{op}_{t}x{b}.txt")
        profile_kernels(op, jax_impls(op, "")[args.profile], inputs, do, hlo_path=hlo)
      for name, fn in impls.items():
        try:
          times, o = time_jax(fn, inputs, do, modes, args.iters)
          err = None if ref is None else _rel(o, ref)
          del o
          record({"op": op, "impl": name, "T": t, "B": b, **times, "rel_err": err})
        except Exception as e:  # pylint: disable=broad-except
          record({"op": op, "impl": name, "T": t, "B": b, "error": repr(e)[:500]})
      if have_fla:
        try:
          times, o = time_fla(op, inputs, do, modes, args.iters)
          err = None if ref is None else _rel(o, ref)
          record({"op": op, "impl": "fla", "T": t, "B": b, **times, "rel_err": err})
        except Exception as e:  # pylint: disable=broad-except
          record({"op": op, "impl": "fla", "T": t, "B": b, "error": repr(e)[:500]})
      del inputs, do, ref
    if "cudnn" in wanted and jax.default_backend() == "gpu":
      try:
        record({"op": "attn", "impl": "cudnn", "T": t, "B": b,
                **time_cudnn_attention(t, b, h, d, args.iters)})
      except Exception as e:  # pylint: disable=broad-except
        record({"op": "attn", "impl": "cudnn", "T": t, "B": b, "error": repr(e)[:500]})

  stage_rows = [r for r in args.rows.split(",") if r][:1]
  if args.gdn_stages and stage_rows:
    t, b = (int(x) for x in stage_rows[0].split("x"))
    report["gdn_stages"] = time_gdn_stages(t, b, h, d, args.iters, record)
  if args.gdn_sweep and stage_rows:
    t, b = (int(x) for x in stage_rows[0].split("x"))
    report["gdn_sweep"] = time_gdn_sweep(t, b, h, d, args.iters, record,
                                         budget_s=args.sweep_budget_s, modes=modes)

  for b in [int(x) for x in args.decode.split(",") if x]:
    entry = {"B": b, "ours_step_ms": time_ours_decode(b, h, d, args.iters)}
    if have_fla:
      entry["fla_fused_recurrent_ms"] = time_fla_decode(b, h, d, args.iters)
    report["decode"].append(entry)
    print(json.dumps(entry), flush=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print_table(report)


def _stage_cell(r):
  if "ms" in r:
    return f"{r['ms']:.3f} ms (first call {r['first_call_s']:.1f} s)"
  return r.get("skipped") or "ERR " + r.get("error", "")[:100]


def print_table(report):
  rows = {}
  for r in report["results"]:
    if r["op"] == "gdn_stage":
      print(f"gdn stage {r['T']}x{r['B']} {r['stage']:24s} {_stage_cell(r)}")
      continue
    if r["op"] == "gdn_sweep":
      continue  # printed below, fastest first
    rows.setdefault((r["op"], r["T"], r["B"]), []).append(r)
  sweep = report.get("gdn_sweep")
  for stage, entries in (sweep or {}).get("kernels", {}).items():
    for r in sorted(entries, key=lambda r: r.get("ms", float("inf"))):
      cfg = " ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "with_kd")
      print(f"gdn sweep {r['T']}x{r['B']} {stage:8s} {cfg:40s} {_stage_cell(r)}")
  if sweep:
    print("gdn sweep best launch:", sweep["best_launch"])
    for r in sweep["whole_op"]:
      diff = r.get("rel_diff_vs_default")
      print(f"gdn whole op {r['impl']:22s} fwd {r.get('fwd', float('nan')):.3f} ms  fwdbwd "
            f"{r.get('fwdbwd', float('nan')):.3f} ms  rel_err {r.get('rel_err', float('nan')):.2e}"
            + ("" if diff is None else f"  vs default {diff:.2e}") + (
                f"  ERR {r['error'][:100]}" if "error" in r else ""))
  for (op, t, b), rs in rows.items():
    cells = []
    for r in rs:
      if "error" in r:
        cells.append(f"{r['impl']}=ERR")
      else:
        err = "" if r.get("rel_err") is None else f" e={r['rel_err']:.1e}"
        cells.append(f"{r['impl']}={r.get('fwd', float('nan')):.2f}/{r.get('fwdbwd', float('nan')):.2f}{err}")
    print(f"{op} {t}x{b}: " + "  ".join(cells))
  for r in report["decode"]:
    print("decode", r)


if __name__ == "__main__":
  main()
