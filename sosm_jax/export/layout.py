"""Parameter layouts of the layer scan: stacked `[groups, ...]` per pattern position <-> one dict per layer.

With model.scan_layers the parameters of pattern position p live under
params['layers'][f'block_{p}'] with a leading axis over the groups (repetitions of the pattern);
without it, layer i = g * len(pattern) + p lives under params[f'layer_{i}']. Both compute the
same function; these two functions move exact copies of the arrays between the layouts.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from sosm_jax.models.config import resolved_pattern


def unrolled(params: dict, model_cfg) -> tuple[dict, ml_collections.ConfigDict]:
  """(params, model config) in the per-layer layout (scan_layers=False); unchanged if already."""
  cfg = copy_config(model_cfg)
  if not cfg.scan_layers:
    return params, cfg
  p = len(resolved_pattern(cfg))
  groups = cfg.num_layers // p
  out = {k: v for k, v in params.items() if k != "layers"}
  stacked = params["layers"]
  for g in range(groups):
    for pos in range(p):
      block = stacked[f"block_{pos}"]
      out[f"layer_{g * p + pos}"] = _tree_map(lambda a, g=g: np.asarray(a)[g], block)
  cfg.scan_layers = False
  return out, cfg


def scanned(params: dict, model_cfg) -> tuple[dict, ml_collections.ConfigDict]:
  """(params, model config) in the stacked layout (scan_layers=True); unchanged if already."""
  cfg = copy_config(model_cfg)
  if cfg.scan_layers:
    return params, cfg
  p = len(resolved_pattern(cfg))
  groups = cfg.num_layers // p
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out["layers"] = {}
  for pos in range(p):
    layers = [params[f"layer_{g * p + pos}"] for g in range(groups)]
    out["layers"][f"block_{pos}"] = _tree_map(lambda *a: np.stack([np.asarray(x) for x in a]),
                                              *layers)
  cfg.scan_layers = True
  return out, cfg


def copy_config(cfg) -> ml_collections.ConfigDict:
  """A mutable copy of a (frozen or not) ConfigDict or dict."""
  if isinstance(cfg, ml_collections.FrozenConfigDict):
    return ml_collections.ConfigDict(cfg.as_configdict().to_dict())
  return ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def _tree_map(fn, tree, *rest):
  if isinstance(tree, dict):
    return {k: _tree_map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
  return fn(tree, *rest)
