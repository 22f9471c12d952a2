"""configs/curriculum.py:long_memory (issue 22 item 3: the memory variant at long context) is
consistent: memory on one graph layer, windows and streams that divide the rows, task examples
that put the needle in an earlier window, a memory that holds the evaluated lengths."""
import re

import jax
import numpy as np

from sosm_jax import data, models
from sosm_jax.data import tasks, tokenizers
from sosm_jax.eval import memory as eval_memory
from sosm_jax.memory.segments import memory_layer_indices
from sosm_jax.train import config as config_lib
from sosm_jax.train import curriculum
from recipe_configs import curriculum_config

BYTE = tokenizers.ByteTokenizer()


def _config(variant="long_memory"):
  return curriculum_config(variant)


def test_long_memory_model_memory_and_stages():
  cfg = _config()
  config_lib.validate_config(cfg)
  small = _config("long_small")
  assert cfg.memory.enabled and cfg.memory.segments == 4
  # one memory layer (layer 3, long_small's first attention layer); attention stays at 7
  assert memory_layer_indices(cfg.model, tuple(cfg.memory.layers)) == (3,)
  assert models.config.layer_mixers(cfg.model)[7] == "attn"
  for key in ("d_model", "num_layers", "mlp_dim", "vocab_size", "rope_base"):
    assert cfg.model[key] == small.model[key], key
  stages = curriculum.build_stages(cfg.curriculum, data_parallel=1, default_remat="none",
                                   default_rope_base=cfg.model.rope_base)
  assert [(s.seq_len, s.global_batch, s.grad_accum) for s in stages] == [(2048, 8, 1)]
  window, span = eval_memory.memory_window(cfg), eval_memory.memory_span(cfg)
  assert (window, span) == (2048, 8192)   # what evaluate.py --memory=auto reads it with
  # the graph layer's blocks and chunks tile the window
  g = cfg.model.graph
  assert window % g.select_block_size == 0 and g.window < window
  assert g.select_block_size * g.select_num_blocks < window   # the memory is not the only reach
  # params like long_small's (the graph layer has one kv head and the similarity projections)
  model = models.build_model(cfg.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), 1, cfg.model.chunk_size))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert 20e6 <= params <= 30e6, params
  # the memory holds every earlier window of the longest evaluated document (65,536 tokens in
  # .devrun/longmem/run.sh): eviction drops a whole shard, so the guaranteed size is
  # capacity - capacity / num_shards
  m = cfg.memory
  assert m.capacity - m.capacity // m.num_shards >= 65536 - window
  assert m.index == "flat"   # exact: HNSW's inserts would cost seconds a step (see the config)
  # the step estimate (90 ms, not measured; config comment) keeps the steps within ~230 s, so
  # that start-up, the compile and the steps fit run.sh's 300 s of training
  assert sum(s.steps for s in stages) * 0.090 <= 230


def test_long_memory_task_examples_fill_the_stream_row():
  cfg = _config()
  row = cfg.memory.segments * cfg.curriculum.seq_lens[0]
  assert data.config.task_length_for(cfg.data, row) == row   # one example a stream row
  kinds = [c.arg for c in data.sources.parse_source(cfg.data.source) if c.kind == "synthetic"]
  assert sorted(kinds) == ["mqar", "niah", "passkey"]
  for kind in kinds:
    tasks.check_task_length(kind, BYTE, row, cfg.data)
  # MQAR's pairs all lie in the first window: its later queries need the memory
  assert 1 + 2 * cfg.data.mqar_num_pairs < cfg.curriculum.seq_lens[0]


def test_long_memory_passkeys_sit_in_earlier_windows_and_are_asked_in_the_last():
  cfg = _config()
  window = cfg.curriculum.seq_lens[0]
  row = cfg.memory.segments * window
  needle_windows = []
  for seed in range(40):
    ex = tasks.make_example("passkey", BYTE, row, np.random.default_rng(seed), cfg.data)
    text = BYTE.decode(ex.tokens)
    assert len(ex.tokens) == row
    key = bytes(ex.answer.astype(np.uint8)).decode()
    needle = re.search(rf" The pass key is {key}\.", text).start() + 1   # + BOS
    assert ex.answer_positions.min() >= row - window   # the answer is in the last window
    needle_windows.append(needle // window)
  counts = np.bincount(needle_windows, minlength=cfg.memory.segments)
  # depth uniform: ~3/4 of the needles lie in windows 0-2, only reachable through the memory
  assert 0.6 <= counts[:-1].sum() / len(needle_windows) <= 0.9, counts
  assert (counts > 0).all(), counts


def test_long_memory_starts_from_long_small_by_name():
  """`--config.finetune.init_from=<long_small run> --config.finetune.init_match=by_name` (RESULTS:
  the next long_memory run): every parameter but the memory layer's own comes from long_small."""
  from sosm_jax.train import finetune   # pylint: disable=import-outside-toplevel

  def zeros(variant):
    c = _config(variant).model
    m = models.build_model(c)
    shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), 1, c.chunk_size))
    return jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), shapes)

  cfg = _config()
  assert cfg.finetune.pool_kv_heads     # the graph layer's one kv head from long_small's four
  _, match = finetune.match_by_name(zeros("long_small"), zeros("long_memory"),
                                    cfg.finetune.pool_kv_heads)
  assert not match.unused and not match.reshaped
  assert all(p.startswith("layer_3/mixer/") for p in match.fresh)
  assert sorted(match.pooled) == ["layer_3/mixer/k_proj/kernel", "layer_3/mixer/v_proj/kernel"]
  assert match.loaded_values > 0.99 * match.total_values
