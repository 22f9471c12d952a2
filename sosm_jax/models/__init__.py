"""sosm_jax.models: the language model and its one interface over architectures.

  from sosm_jax.models import build_model, default_model_config
  model = build_model(default_model_config())      # or model_config_for('tiny', 'sosm')
  params = model.init(rng, batch_size, seq_len)
"""
from sosm_jax.models.config import (ARCHITECTURES, SIZES, default_model_config, freeze,
                                    model_config_for, validate_model_config)
from sosm_jax.models.hybrid import HybridLM
from sosm_jax.models.lm import LanguageModel, build_model, cross_entropy

__all__ = ["ARCHITECTURES", "SIZES", "default_model_config", "freeze", "model_config_for",
           "validate_model_config", "HybridLM", "LanguageModel", "build_model", "cross_entropy"]
