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
  """Parameters of `config.model` with values 0.3 N(0, 1) (no slow init), as numpy.

  constants: {path fragment: value}; a leaf whose path contains a fragment is filled with its value
  instead (e.g. {"memory_gate": 2.0}: memory visibly matters)."""
  model = models.build_model(config.model)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), 1, 16)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    for fragment, value in (constants or {}).items():
      if fragment in name:
        return np.full(s.shape, value, s.dtype)
    return (0.3 * rng.standard_normal(s.shape)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


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
