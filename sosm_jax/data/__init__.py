"""Input data: sources, tokenizers, the grain pipeline (pack, batch, shard, prefetch), tasks.

    from sosm_jax.data import make_tokenizer, make_pipeline
    tokenizer = make_tokenizer(config.data)
    pipeline = make_pipeline(config.data, tokenizer, seq_len=4096, batch_size=8, seed=0)
    batch = next(pipeline)          # inputs, targets, loss_mask, segment_ids, positions
    state = pipeline.get_state()    # JSON; make_pipeline(..., start_state=state) resumes
"""
from sosm_jax.data import config, packing, sources, tasks, tokenizers
from sosm_jax.data.config import default_data_config, validate_data_config
from sosm_jax.data.pipeline import Pipeline, make_pipeline
from sosm_jax.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer,
                                      check_tokenizer_identity, make_tokenizer)

__all__ = [
    "ByteTokenizer", "Pipeline", "SentencePieceTokenizer", "check_tokenizer_identity", "config",
    "default_data_config", "make_pipeline", "make_tokenizer", "packing", "sources", "tasks",
    "tokenizers", "validate_data_config",
]
