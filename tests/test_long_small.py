"""configs/curriculum.py:long_small (issue 22's one-H200 long-context run) and its 'niah' task rows."""
import importlib.util
import os

import jax
import numpy as np
import pytest

from sosm_jax import data, models
from sosm_jax.data import tasks, tokenizers
from sosm_jax.eval import niah
from sosm_jax.train import config as config_lib
from sosm_jax.train import curriculum, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTE = tokenizers.ByteTokenizer()

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config(variant="long_small"):
  spec = importlib.util.spec_from_file_location(
      "curriculum_config", os.path.join(ROOT, "configs", "curriculum.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def test_long_small_stages_size_and_data_mix():
  cfg = _config()
  config_lib.validate_config(cfg)
  stages = curriculum.build_stages(cfg.curriculum, data_parallel=1, default_remat="none",
                                   default_rope_base=cfg.model.rope_base)
  assert [(s.seq_len, s.global_batch, s.grad_accum) for s in stages] == [
      (4096, 16, 1), (16384, 4, 1), (65536, 2, 1), (102400, 2, 1)]
  assert {s.rope_base for s in stages} == {500000.0}   # evaluation builds model.rope_base
  model = models.build_model(cfg.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), 1, cfg.model.chunk_size))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert 20e6 <= params <= 60e6, params
  kinds = [c.arg for c in data.sources.parse_source(cfg.data.source) if c.kind == "synthetic"]
  assert sorted(kinds) == ["mqar", "niah", "passkey"]
  # 4 task examples a 4K row, whole-row examples from 16K on; every task fits 1,024 tokens
  lengths = [data.config.task_length_for(cfg.data, s.seq_len) for s in stages]
  assert lengths == [1024, 16384, 65536, 102400]
  for kind in kinds:
    tasks.check_task_length(kind, BYTE, 1024, cfg.data)


def test_niah_rows_are_the_evaluation_format_with_their_answer_last():
  names = [s.name for s in niah.task_specs()]
  seen = set()
  for seed in range(24):
    ex = tasks.make_example("niah", BYTE, 1024, np.random.default_rng(seed), data.default_data_config())
    text = bytes(ex.tokens[1:].astype(np.uint8)).decode()
    assert len(ex.tokens) == 1024 and ex.tokens[0] == BYTE.bos_id
    answer = bytes(ex.answer.astype(np.uint8)).decode()
    assert text.endswith(answer) and answer.endswith(".")
    np.testing.assert_array_equal(ex.answer_positions, np.arange(1024 - len(answer), 1024))
    for value in answer.rstrip(".").split(", "):   # every answered value is a needle of the text
      assert f" is {value}." in text[:-len(answer)]
    seen.add(("numbers" if "number" in text[:80] else "words", "are" in text[-len(answer) - 40:]))
  assert len(seen) == 4   # number and word needles, one- and many-value questions
  again = tasks.make_example("niah", BYTE, 1024, np.random.default_rng(3), data.default_data_config())
  first = tasks.make_example("niah", BYTE, 1024, np.random.default_rng(3), data.default_data_config())
  np.testing.assert_array_equal(again.tokens, first.tokens)
  assert len(names) == 8


def test_niah_in_a_mix_marks_answers_and_refuses_a_length_too_short():
  cfg = data.default_data_config()
  cfg.update(source="mix:stdlib=0.5,synthetic:niah=0.5", prefetch=0)
  with data.make_pipeline(cfg, BYTE, seq_len=1024, batch_size=8, seed=0, process_index=0,
                          process_count=1) as pipeline:
    batch = next(pipeline)
  scored = batch["loss_mask"].sum(axis=1)
  task_rows = np.flatnonzero((scored > 0) & (scored < 60))
  assert len(task_rows) > 0
  for r in task_rows:   # a NIAH row scores exactly its closing answer
    targets = batch["targets"][r][batch["loss_mask"][r] > 0]
    assert bytes(targets.astype(np.uint8)).decode().endswith(".")
  with pytest.raises(ValueError, match="NIAH multi"):
    data.make_pipeline(cfg, BYTE, seq_len=300, batch_size=8, seed=0, process_index=0,
                       process_count=1)


def test_shrunk_long_small_trains_and_checkpoints(tmp_path):
  # its data mix (MQAR rows need 641 tokens) through the trainer; the stage changes are the
  # trainer's own tests' (test_train_loop.py)
  cfg = _config()
  cfg.model.update(num_layers=4, d_model=32, mlp_dim=64, attn_num_heads=2, attn_num_kv_heads=1,
                   attn_head_dim=16, hgrn2_head_dim=16, chunk_size=16, dtype="float32")
  cfg.curriculum.update(seq_lens=(768,), steps=(2,), tokens_per_step=6144, global_batch=(8,),
                        remat=("none",))
  result = loop.train(cfg, str(tmp_path))
  assert result.status == "finished" and result.step == 2
  assert np.isfinite(result.last_metrics["loss"])
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2]
