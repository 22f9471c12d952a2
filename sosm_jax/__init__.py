"""sosm_jax: long-context hybrid language models in JAX."""
