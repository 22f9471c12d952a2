"""Multi-device scaling of the train step: tokens/s per device on 1 device and on N, per mesh.

Weak scaling (default): every mesh gets the same batch per data-parallel device
(`--per_device_batch` rows of `--seq_len` tokens), so perfect scaling keeps tokens/s per device
constant; the efficiency of a mesh is its tokens/s per device over that of one device.
Strong scaling (`--global_batch=N`): every mesh gets the same N rows; perfect scaling divides the
step time by the device count (`speedup` over one device). With `--profile`, the GPU time per step
of the linear-attention Pallas kernels is summed too (`linear_kernels_ms_per_step`). Runs the trainer's own compiled step
(jit with explicit shardings, donated state, AdamW) on random tokens. Writes JSON: device, jax
version, model, and per mesh the compile time, median step time, tokens/s (total and per device),
efficiency, MFU and peak memory.

  python benchmarks/scaling.py --config=configs/curriculum.py --seq_len=4096 \
      --per_device_batch=4 --meshes=1x1x1,2x1x1,1x2x1 --steps=10 --out=/tmp/scaling.json
  python benchmarks/scaling.py --config=configs/curriculum.py --seq_len=4096 \
      --global_batch=16 --meshes=1x1x1,2x1x1 --steps=10 --profile=20 --out=/tmp/strong.json
  python benchmarks/scaling.py --config=configs/curriculum.py --seq_len=131072 \
      --global_batch=1 --meshes=1x1x1,1x1x1x2 --remat=full --steps=3 --out=/tmp/context.json
Meshes are DATAxFSDPxTENSOR[xCONTEXT] over the first DATA*FSDP*TENSOR*CONTEXT devices (CONTEXT:
devices one sequence is split over, default 1), with an optional ':ROWS' global batch for that
mesh (e.g. 1x1x1:16 for the strong-scaling row); '' = 1 device, then data=N, fsdp=N and (N >= 4)
data=N/2 x fsdp=2 over all N devices.
"""
import json
import math
import os
import re
import statistics
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (shared GPUs)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sosm_jax import models
from sosm_jax.parallel import LOGICAL_AXIS_RULES, batch_sharding, make_mesh
from sosm_jax.train import curriculum, loop, metrics, optimizer as optimizer_lib, state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "tokens per row")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 4, "rows per data-parallel device")
_GLOBAL_BATCH = flags.DEFINE_integer(
    "global_batch", 0, "rows per step on every mesh (strong scaling); 0 = per_device_batch rows "
    "per data-parallel device (weak scaling)")
_MESHES = flags.DEFINE_string("meshes", "",
                              "comma-separated DATAxFSDPxTENSOR[xCONTEXT] ('' = default set)")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps per mesh (after 3 warm-up steps)")
_REMAT = flags.DEFINE_string("remat", "", "remat policy ('' = the config's model.remat)")
_OUT = flags.DEFINE_string("out", "", "JSON output path")
_HLO = flags.DEFINE_string("hlo", "", "write the compiled step's HLO text here (to name profiled kernels)")
_PROFILE = flags.DEFINE_integer(
    "profile", 0, "GPU: print (and store) the N kernels with the most time per step (needs torch)")
_WARMUP = 3
# Pallas kernel names of the linear-attention ops (`name=` of their pallas_calls)
_LINEAR_KERNELS = ("gla_", "gdn_", "chunk_recurrence_")


_AXES = ("data", "fsdp", "tensor", "context")   # the order of a --meshes entry


def default_meshes(n: int) -> list[tuple[int, int, int, int]]:
  meshes = [(1, 1, 1, 1)]
  if n > 1:
    meshes += [(n, 1, 1, 1), (1, n, 1, 1)]
  if n >= 4 and n % 2 == 0:
    meshes.append((n // 2, 2, 1, 1))
  return meshes


def parse_meshes(text: str, n: int) -> list[tuple[tuple[int, int, int, int], int]]:
  """[((data, fsdp, tensor, context), global batch or 0)] from
  'DATAxFSDPxTENSOR[xCONTEXT][:ROWS],...' ('' = default set)."""
  if not text:
    return [(shape, 0) for shape in default_meshes(n)]
  meshes = []
  for spec in text.split(","):
    dims, _, rows = spec.partition(":")
    shape = tuple(int(x) for x in dims.lower().split("x"))
    if len(shape) not in (3, 4) or math.prod(shape) > n or min(shape) < 1:
      raise ValueError(f"--meshes entry {spec!r}: use DATAxFSDPxTENSOR[xCONTEXT][:ROWS] with a "
                       f"product of at most the {n} devices, e.g. 2x1x1, 1x1x1:16 or 1x1x1x2")
    meshes.append((shape + (1,) * (4 - len(shape)), int(rows or 0)))
  return meshes


def random_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """`[rows, seq_len]` random tokens, one document per row, every target counted."""
  tokens = np.random.default_rng(seed).integers(0, vocab, size=(rows, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((rows, seq_len), np.float32),
          "segment_ids": np.ones((rows, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len))}


def measure(config, shape: tuple[int, int, int, int], seq_len: int, per_device_batch: int,
            steps: int, remat: str, global_batch: int = 0) -> dict:
  """Compiles and times the train step on a mesh of shape (data, fsdp, tensor, context)."""
  devices = jax.devices()[:math.prod(shape)]
  mesh = make_mesh(ml_collections.ConfigDict(dict(zip(_AXES, shape))), devices)
  batch = global_batch or per_device_batch * shape[0] * shape[1]
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  model_cfg.remat = remat
  model = models.build_model(model_cfg)
  stage = curriculum.Stage(0, seq_len, steps + _WARMUP, batch, 1, remat, model_cfg.rope_base, 0)
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, 1000)
  init_params = lambda: model.init(jax.random.key(0), 1, model_cfg.chunk_size)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    optimizer = state_lib.place_optimizer(init_params, optimizer, mesh)
    state_sh = state_lib.state_shardings(init_params, optimizer, mesh)
    abstract = state_lib.abstract_train_state(state_sh, init_params, optimizer)
    compiled, info = loop.compile_stage_step(model, optimizer, schedule, stage, abstract, state_sh,
                                             mesh, None)
    state = state_lib.create_train_state(init_params, optimizer, state_sh)
    if _HLO.value:
      with open(_HLO.value, "w", encoding="utf-8") as f:
        f.write(compiled.as_text())
    host = random_batch(batch, seq_len, model_cfg.vocab_size)
    arrays = {k: jax.make_array_from_process_local_data(batch_sharding(mesh), v)
              for k, v in host.items()}
    times = []
    for i in range(steps + _WARMUP):
      start = time.perf_counter()
      state, out = compiled(state, arrays)
      jax.block_until_ready(out)
      if i >= _WARMUP:
        times.append(time.perf_counter() - start)
    loss = float(out["loss"])
    kernels = profile_step(compiled, state, arrays, _PROFILE.value) if _PROFILE.value else None
    parts = attribute_kernels(kernels, compiled.as_text()) if kernels else None
    del state
  median = statistics.median(times)
  tokens = batch * seq_len
  peak = metrics.peak_flops_per_device(devices[0])
  flops = model.flops_per_token(seq_len) * tokens
  result = {"mesh": dict(zip(_AXES, shape)), "devices": len(devices),
            "global_batch": batch, "seq_len": seq_len, "median_step_s": median,
            "min_step_s": min(times), "tokens_per_second": tokens / median,
            "tokens_per_second_per_device": tokens / median / len(devices),
            "mfu": flops / median / (peak * len(devices)) if peak else None, "loss_last": loss,
            **info, **metrics.device_memory(),
            # peak since the process started, per device of this mesh (an earlier mesh's peak on
            # the same device stays in it; compiled_memory_gib is this step's own need)
            "peak_memory_gib_per_device": [
                (d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30 for d in devices]}
  print(json.dumps(result), flush=True)
  if kernels:
    result["kernels_ms_per_step"] = kernels[:_PROFILE.value]
    result["linear_kernels_ms_per_step"] = sum(ms for ms, _, name in kernels
                                               if name.startswith(_LINEAR_KERNELS))
    print(f"linear-attention kernels: {result['linear_kernels_ms_per_step']:.2f} ms per step",
          flush=True)
    result["model_parts_ms_per_step"] = parts
    print("--- per-step GPU ms by model part (XLA fusions by their HLO op_name; library "
          "kernels such as GEMMs and cuDNN by kernel name)")
    for name, ms in list(parts.items())[:_PROFILE.value]:
      print(f"{ms:8.2f} ms  {name}")
  return result


def profile_step(compiled, state, arrays, top: int) -> list:
  """[(ms per step, calls per step, kernel name)] of the `top` kernels, by CUPTI via torch.

  Runs two more steps (the state is donated: the returned state feeds the next one).
  """
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel
  steps = 2
  with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(steps):
      state, out = compiled(state, arrays)
      jax.block_until_ready(out)
  rows = []
  for e in prof.key_averages():
    dev = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
    if dev:
      rows.append((dev / 1e3 / steps, e.count // steps, e.key[:100]))
  rows.sort(reverse=True)
  print(f"--- per-step GPU ms by kernel (total {sum(r[0] for r in rows):.1f} ms)")
  for ms, n, name in rows[:top]:
    print(f"{ms:8.2f} ms  x{n:<4d} {name}")
  return rows


_FUSION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]+)\"")


def model_part(op_name: str) -> str:
  """A coarse name for where an HLO op comes from: 'fwd|bwd <module path without layer index>:
  <primitive>', e.g. 'bwd HybridLM/block_*/mlp: mul'."""
  direction = "bwd" if "transpose(" in op_name else "fwd"
  path = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "jvp(", "transpose(",
                                                                 "checkpoint", "remat"))]
  prim = path[-1] if path else "?"
  modules = "/".join(re.sub(r"_\d+$", "_*", p) for p in path[:-1])
  return f"{direction} {modules}: {prim}"


def attribute_kernels(kernels: list, hlo_text: str) -> dict[str, float]:
  """{model part: ms per step} from profiled kernels and the compiled HLO's op_name metadata,
  largest first. XLA kernels are named after their fusion instruction ('.' -> '_')."""
  owner = {}
  for line in hlo_text.splitlines():
    m = _FUSION.match(line)
    if m:
      owner[m.group(1).replace(".", "_").replace("-", "_")] = model_part(m.group(2))
  parts: dict[str, float] = {}
  for ms, _, name in kernels:
    key = owner.get(name, f"(kernel) {name[:60]}")
    parts[key] = parts.get(key, 0.0) + ms
  return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def main(argv):
  del argv
  config = _CONFIG.value
  remat = _REMAT.value or config.model.remat
  results = [measure(config, shape, _SEQ_LEN.value, _PER_DEVICE_BATCH.value, _STEPS.value, remat,
                     rows or _GLOBAL_BATCH.value)
             for shape, rows in parse_meshes(_MESHES.value, jax.device_count())]
  single = next((r for r in results if r["devices"] == 1), None)
  for r in results:
    r["scaling_efficiency"] = (r["tokens_per_second_per_device"]
                               / single["tokens_per_second_per_device"] if single else None)
    # strong scaling: against one device at the same global batch, when it was measured
    same = next((x for x in results if x["devices"] == 1
                 and x["global_batch"] == r["global_batch"]), None)
    r["speedup"] = same["median_step_s"] / r["median_step_s"] if same else None
  model = models.build_model(config.model)
  report = {"benchmark": "scaling", "device": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(), "platform": jax.default_backend(),
            "jax": jax.__version__, "num_params": model.num_params_formula(),
            "model": {k: config.model[k] for k in ("architecture", "pattern", "num_layers",
                                                     "d_model", "vocab_size", "dtype")},
            "linear_impl": config.model.linear_impl,
            "remat": remat, "per_device_batch": _PER_DEVICE_BATCH.value,
            "global_batch": _GLOBAL_BATCH.value,
            "steps": _STEPS.value, "command": " ".join(sys.argv),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": results}
  for r in results:
    print(f"mesh {r['mesh']}: {r['tokens_per_second_per_device']:.0f} tokens/s per device, "
          f"efficiency {r['scaling_efficiency'] or float('nan'):.3f}, "
          f"step {r['median_step_s'] * 1e3:.1f} ms (speedup {r['speedup'] or float('nan'):.2f}), "
          f"linear kernels {r.get('linear_kernels_ms_per_step', float('nan')):.1f} ms", flush=True)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
