"""sosm_jax.memory: host memory (FAISS) beyond the window and the segment-by-segment driver."""
from sosm_jax.memory.store import (MEMORY_DEFAULTS, HostMemory, MemoryBank, default_memory_config,
                                   l2_normalize, resolve_config, validate_memory_config)
from sosm_jax.memory.segments import SegmentRunner, memory_layer_indices, search_vectors

__all__ = ["MEMORY_DEFAULTS", "HostMemory", "MemoryBank", "default_memory_config", "l2_normalize",
           "resolve_config", "validate_memory_config", "SegmentRunner", "memory_layer_indices",
           "search_vectors"]
