"""Train-step throughput of a model config: tokens/s, MFU and peak memory per (batch × length).

Runs the trainer's own compiled step (AdamW, clipping, donated state) on random tokens, so it
measures the model and the step, not the input pipeline. Writes JSON with device, shapes, medians.

  python benchmarks/train_throughput.py --config=configs/curriculum.py \
      --shapes=8x4096,2x16384 --steps=10 --out=/tmp/train_throughput.json
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sosm_jax import models
from sosm_jax.parallel import LOGICAL_AXIS_RULES, batch_sharding, make_mesh
from sosm_jax.train import curriculum, loop, metrics, optimizer as optimizer_lib, state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_SHAPES = flags.DEFINE_string("shapes", "8x4096,2x16384", "comma-separated BATCHxLENGTH")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps per shape (after 2 warm-up steps)")
_OUT = flags.DEFINE_string("out", "", "JSON output path")


def measure(config, batch: int, seq_len: int, steps: int) -> dict:
  mesh = make_mesh(config.mesh)
  stage = curriculum.Stage(0, seq_len, steps + 2, batch, 1, config.model.remat,
                           config.model.rope_base, 0)
  model = models.build_model(config.model)
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, 1000)
  init_params = lambda: model.init(jax.random.key(0), 1, config.model.chunk_size)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    state_sh = state_lib.state_shardings(init_params, optimizer, mesh)
    abstract = state_lib.abstract_train_state(state_sh, init_params, optimizer)
    compiled, info = loop.compile_stage_step(model, optimizer, schedule, stage, abstract, state_sh,
                                             mesh, None)
    state = state_lib.create_train_state(init_params, optimizer, state_sh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, size=(batch, seq_len + 1), dtype=np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((batch, seq_len), np.float32),
            "segment_ids": np.ones((batch, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))}
    batch_arrays = loop._global_batch(host, batch_sharding(mesh))  # pylint: disable=protected-access
    times = []
    for i in range(steps + 2):
      start = time.perf_counter()
      state, out = compiled(state, batch_arrays)
      jax.block_until_ready(out)
      if i >= 2:
        times.append(time.perf_counter() - start)
  median = statistics.median(times)
  tokens_per_step = batch * seq_len
  flops = model.flops_per_token(seq_len) * tokens_per_step
  peak = metrics.peak_flops_per_device()
  result = {"batch": batch, "seq_len": seq_len, "median_step_s": median,
            "tokens_per_second": tokens_per_step / median,
            "mfu": flops / median / (peak * jax.device_count()) if peak else None,
            "loss_last": float(out["loss"]), **info, **metrics.device_memory()}
  print(json.dumps(result), flush=True)
  return result


def main(argv):
  del argv
  config = _CONFIG.value
  num_params = None
  results = []
  for shape in _SHAPES.value.split(","):
    batch, seq_len = (int(x) for x in shape.lower().split("x"))
    results.append(measure(config, batch, seq_len, _STEPS.value))
  model = models.build_model(config.model)
  num_params = model.num_params_formula()
  report = {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
            "jax": jax.__version__, "num_params": num_params,
            "model": {k: config.model[k] for k in ("architecture", "pattern", "num_layers",
                                                     "d_model", "vocab_size", "dtype", "remat")},
            "results": results}
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, default=str)
  print(json.dumps(report, default=str))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
