"""Sizing models for fair comparisons: exact parameter counts and matching them by MLP width."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from sosm_jax import models


def count_params(model_cfg) -> int:
  """Exact parameter count of a `config.model` (shapes only: nothing is initialised)."""
  model = models.build_model(model_cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), 1, model_cfg.chunk_size))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes))))


def match_mlp_dim(model_cfg, target: int, multiple: int = 8) -> tuple[int, int]:
  """The MLP width (a multiple of `multiple`) whose parameter count is closest to `target`.

  Parameters are affine in mlp_dim (3 · d_model · mlp_dim per layer for SwiGLU), so two counts
  give the line. Returns (mlp_dim, parameter count at that width); model_cfg is not changed.
  """
  cfg = model_cfg.copy_and_resolve_references()
  counts = {}
  for width in (multiple, 2 * multiple):
    cfg.mlp_dim = width
    counts[width] = count_params(cfg)
  slope = (counts[2 * multiple] - counts[multiple]) / multiple
  best = multiple * max(1, round((multiple + (target - counts[multiple]) / slope) / multiple))
  cfg.mlp_dim = best
  return best, count_params(cfg)
