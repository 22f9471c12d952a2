"""sosm_jax.layers: Flax linen modules wrapping the ops (projections, gates, norms, caches).

`MIXERS` maps a pattern name to its mixer class. Every mixer has fields `(cfg, layer_index)` and
  __call__(x [B,T,D], *, positions [B,T], segment_ids [B,T] or None, cache=None, decode=False)
      -> (y [B,T,D], cache)        (cache None in, None out)
  init_cache(batch_size, max_len) -> cache pytree
and, for the analytic counts in sosm_jax/models, static `param_count(cfg)` and
`forward_flops_per_token(cfg, seq_len)`. Under the model's layer scan `layer_index` is a traced
int32 scalar (the depth of the layer), so do not branch on it in Python.

'graph' comes from `sosm_jax/layers/graph.py` (GRAPH helper) when that file exists: it should
export `MIXER` (its mixer class) or call `register_mixer('graph', cls)`.
"""
from __future__ import annotations

import importlib

from sosm_jax.layers.attention import Attention
from sosm_jax.layers.common import MLP, Dense, RMSNorm
from sosm_jax.layers.embed import Embedder
from sosm_jax.layers.gated_deltanet import GatedDeltaNet
from sosm_jax.layers.hgrn2 import HGRN2

MIXERS = {"attn": Attention, "gdn": GatedDeltaNet, "hgrn2": HGRN2}
KNOWN_MIXER_NAMES = ("attn", "gdn", "hgrn2", "graph")
_GRAPH_CLASS_NAMES = ("MIXER", "GraphMixer", "GraphAttention", "GraphLayer", "GraphRouting")


def register_mixer(name: str, cls) -> None:
  """Adds a mixer class under `name` (used by optional mixers such as 'graph')."""
  MIXERS[name] = cls


def _load_graph() -> None:
  """Registers the graph mixer if sosm_jax/layers/graph.py exists (it may not yet)."""
  try:
    graph = importlib.import_module("sosm_jax.layers.graph")
  except ModuleNotFoundError as e:
    if e.name == "sosm_jax.layers.graph":
      return
    raise
  if "graph" in MIXERS:
    return
  for attr in _GRAPH_CLASS_NAMES:
    cls = getattr(graph, attr, None)
    if cls is not None:
      MIXERS["graph"] = cls
      return


_load_graph()

__all__ = ["MIXERS", "KNOWN_MIXER_NAMES", "register_mixer", "Attention", "GatedDeltaNet", "HGRN2",
           "MLP", "Dense", "RMSNorm", "Embedder"]
