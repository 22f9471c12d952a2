"""sosm_jax.memory: host memory (FAISS) beyond the window and the segment-by-segment driver."""
from sosm_jax.memory.store import (MEMORY_DEFAULTS, HostMemory, MemoryBank, default_memory_config,
                                   l2_normalize, resolve_config, validate_memory_config)
from sosm_jax.memory.segments import MemoryLM, SegmentRunner, search_vectors

__all__ = ["MEMORY_DEFAULTS", "HostMemory", "MemoryBank", "default_memory_config", "l2_normalize",
           "resolve_config", "validate_memory_config", "MemoryLM", "SegmentRunner", "search_vectors"]
