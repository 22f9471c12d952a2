"""Helpers shared by test modules (`import helpers`: pytest puts tests/ on sys.path)."""
import os

import flax.linen as nn
import jax
import numpy as np

from sosm_jax import models
from sosm_jax.data.tokenizers import ByteTokenizer
from sosm_jax.train import checkpoint as ckpt_lib
from sosm_jax.train.state import TrainState


def random_params(config, seed=0, constants=None):
  """Parameters of `config.model` with values 0.3 N(0, 1): `random_model_params` of its model."""
  return random_model_params(models.build_model(config.model), seed, constants=constants)


def random_model_params(model, seed=0, *, constants=None, offsets=None):
  """Parameters of `model` with values 0.3 N(0, 1) (no slow init), as numpy.

  constants: {path fragment: value}; a leaf whose path contains a fragment is filled with its value
  instead (e.g. {"memory_gate": 2.0}: memory visibly matters). offsets: {leaf name: value} added
  to the leaves of that name (e.g. {"scale": 1.0}: norm scales 1 +- 0.3, so that they matter)."""
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), 1, 16)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    for fragment, value in (constants or {}).items():
      if fragment in name:
        return np.full(s.shape, value, s.dtype)
    offset = (offsets or {}).get(getattr(path[-1], "key", None), 0.0)
    return (offset + 0.3 * rng.standard_normal(s.shape)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def compiled_for_speed(fn, *args):
  """jit(fn) compiled for `args` with LLVM's optimisations, which the test session turns off
  (tests/conftest.py): for a program run many times, whose run time, not its compile, dominates
  (about 2x faster steps for a second more of compile)."""
  return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 2})


def save_checkpoint(workdir, config, params, step, tokenizer=None, stage=0):
  """`params` saved as the trainer saves them: <workdir>/checkpoints/<step> with the config and
  tokenizer (bytes unless given) and the curriculum stage in its metadata, no optimizer state."""
  zero = np.zeros((), np.int32)
  state = TrainState(step=np.int32(step), params=params, opt_state={}, nonfinite_streak=zero,
                     nonfinite_total=zero)
  meta = {"config": config.to_dict(), "data_state": None, "stage": stage,
          "tokenizer": (tokenizer or ByteTokenizer()).identity()}
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(step, state, meta, wait=True)
  ckpt.close()


# Trainer runs of configs/curriculum.py variants shared by test modules. The curriculum (its
# learning-rate schedule is part of each step program) and the model are the same in each module
# that uses them, so a step program compiled by one module is found by the next in the test
# session's compile cache (tests/conftest.py). Dotted keys, as given to `update_config`.
TINY_RUN = {   # variant 'tiny' with one layer of each kind (half the layers: half the tracing)
    "model.num_layers": 2, "model.pattern": ("hgrn2", "attn"), "curriculum.seq_lens": (32, 64),
    "curriculum.steps": (6, 4)}
MEMORY_RUN = {   # variant 'memory' made smaller: 2 layers, 32-token windows, 4 per stream row
    "model.num_layers": 2, "model.d_model": 32, "model.mlp_dim": 64, "model.attn_num_heads": 2,
    "model.attn_num_kv_heads": 1, "model.graph.window": 16, "model.graph.select_block_size": 8,
    "model.graph.select_num_blocks": 1, "model.graph.query_chunk": 32,
    "model.graph.key_chunk": 32, "curriculum.seq_lens": (32,), "curriculum.steps": (10,),
    "curriculum.tokens_per_step": 256, "memory.top_k": 4}


def update_config(cfg, updates):
  """Sets {dotted key: value} in the ConfigDict `cfg`; returns it."""
  for key, value in updates.items():
    node = cfg
    *path, name = key.split(".")
    for part in path:
      node = node[part]
    node[name] = value
  return cfg
