"""Graph routing ops (SOSM): the causal top-K token graph and sparse attention over it.

The code lives in two files; this module re-exports their public functions:
- `sosm_jax.ops.graph_build`: similarity features, streaming / block-selection top-K, filters
  (adaptive K, causal mutual k-NN, temporal gate), hub shortcuts, `build_graph`, `build_graph_step`.
- `sosm_jax.ops.graph_attention`: `graph_attention` (window + edges + memory, one softmax),
  `graph_attention_step` (decode) and the dense `graph_attention_reference`.
"""
from sosm_jax.ops.graph_attention import (gather_kv, graph_attention, graph_attention_reference,
                                          graph_attention_step)
from sosm_jax.ops.graph_build import (Graph, adaptive_k, block_entropy_deficit, build_graph,
                                      build_graph_step, default_opts, edge_scores, hub_flags,
                                      kth_similarity, mutual_knn_keep, random_orthonormal,
                                      segment_cumsum, segment_starts, shortcut_edges,
                                      similarity_features, temporal_gate, temporal_gate_keep,
                                      topk_block_select, topk_dense_reference, topk_streaming)

__all__ = [
    "Graph", "adaptive_k", "block_entropy_deficit", "build_graph", "build_graph_step",
    "default_opts", "edge_scores", "gather_kv", "graph_attention", "graph_attention_reference",
    "graph_attention_step", "hub_flags", "kth_similarity", "mutual_knn_keep", "random_orthonormal",
    "segment_cumsum", "segment_starts", "shortcut_edges", "similarity_features", "temporal_gate",
    "temporal_gate_keep", "topk_block_select", "topk_dense_reference", "topk_streaming",
]
