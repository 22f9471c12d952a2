"""configs/curriculum.py:long_small (issue 22's one-H200 long-context run) and its 'niah' task rows."""
import os
import re

import jax
import numpy as np
import pytest

from sosm_jax import data, models
from sosm_jax.data import tasks, tokenizers
from sosm_jax.eval import niah, runner
from sosm_jax.train import config as config_lib
from sosm_jax.train import curriculum, loop, optimizer
from recipe_configs import curriculum_config
from test_eval_niah import read_answer

BYTE = tokenizers.ByteTokenizer()

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config(variant="long_small"):
  return curriculum_config(variant)


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
  # the budget: the third run's measured step times (one H200) keep the steps within ~290 s
  step_ms = {4096: 51.3, 16384: 69.9, 65536: 246.9, 102400: 510.4}
  assert sum(s.steps * step_ms[s.seq_len] for s in stages) / 1e3 < 290
  # WSD: constant through 4K, the decay starts within the 16K stage's first 5% of steps
  schedule = optimizer.learning_rate_schedule(cfg.optimizer, stages[-1].end_step)
  peak = cfg.optimizer.learning_rate
  first_long = stages[1]
  assert float(schedule(stages[0].end_step)) == pytest.approx(peak)
  assert float(schedule(first_long.first_step + first_long.steps // 20)) < peak
  assert float(schedule(stages[-1].end_step)) == pytest.approx(peak * cfg.optimizer.min_lr_ratio)


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


def test_niah_training_examples_are_the_evaluations_examples_of_each_task():
  # the training generator draws the task, then the depth, and hands its rng to the evaluation's
  # generator: the same rng state gives the identical example the evaluation would score
  specs = niah.task_specs()
  for index, spec in enumerate(specs):
    for seed in range(2):
      ex = tasks.niah_training_example(BYTE, 1024, seed=np.random.default_rng(seed),
                                       spec_index=index)
      rng = np.random.default_rng(seed)
      depth = float(rng.uniform())
      ref = niah.niah_example(BYTE, 1024, spec, seed=rng, depth=depth).example
      np.testing.assert_array_equal(ex.tokens, ref.tokens)
      np.testing.assert_array_equal(ex.answer_mask, ref.answer_mask)


def _niah_task_of(text: str) -> str:
  """The NIAH task name of an example, from its prompt text."""
  needle = "number" if text.lstrip().startswith("Some hidden numbers") else "word"
  question = text[text.rindex("\n") + 1:]
  if question.startswith("What are all"):
    return f"multivalue_{needle}"
  if question.startswith("What are the"):
    return f"multiquery_{needle}"
  needles = re.findall(r" The hidden (?:number|word) for [a-z]+-[a-z]+ is [a-z0-9]+\.", text)
  return f"{'single' if len(needles) == 1 else 'multikey'}_{needle}"


def test_long_small_4k_rows_train_all_eight_niah_tasks_on_the_answers_the_evaluation_scores():
  cfg = _config().data
  cfg.update(prefetch=0)
  seen, scored_tokens, evaluated = {}, 0, 0
  with data.make_pipeline(cfg, BYTE, seq_len=4096, batch_size=16, seed=0, process_index=0,
                          process_count=1) as pipeline:
    for _ in range(8):
      batch = next(pipeline)
      scored_tokens += int(batch["loss_mask"].sum())
      for row in range(16):
        seg, mask = batch["segment_ids"][row], batch["loss_mask"][row] > 0
        for s in np.unique(seg[seg > 0]):
          piece = np.flatnonzero(seg == s)
          if mask[piece].sum() >= len(piece) // 2:
            continue   # text: every token scored
          text = BYTE.decode(batch["inputs"][row][piece])
          answer = BYTE.decode(batch["targets"][row][piece][mask[piece]])
          if "pass key" in text:
            assert len(piece) == 1024 and re.fullmatch(r"\d{5}", answer)
            evaluated += len(answer)
          elif "hidden" in text:
            assert len(piece) == 1024
            # the answer is the span that closes the example, exactly as the evaluation scores it
            assert text.endswith(answer)
            name = _niah_task_of(text[:-len(answer)])
            expected, _ = read_answer(text[:-len(answer)])   # the evaluation tests' reader
            assert answer == expected, (name, answer, expected)
            seen[name] = seen.get(name, 0) + 1
            evaluated += len(answer)
  assert sorted(seen) == sorted(s.name for s in niah.task_specs())
  counts = np.array(list(seen.values()))
  assert counts.sum() >= 150 and counts.min() >= counts.sum() / 8 / 2.5, seen   # in proportion
  # the evaluated answers are a real share of the mean loss (0.6% at the second run's stdlib 0.1)
  assert evaluated / scored_tokens > 0.025, (evaluated, scored_tokens)


def test_long_small_perplexity_reads_held_out_stdlib_files():
  # The recipe's mix read as it is (its validation split) scored 6,397 tokens at the third run's
  # 8 x 102,400, mostly text under 8K and task answers. The perplexity text drops the mix's
  # tasks: stdlib's own hash split (val_fraction) keeps exactly the files the training mix held
  # out, and every row is text ('--ppl_source=stdlib' reads the source whole, trained files too).
  cfg = _config()
  shape = dict(seq_len=102400, batch_size=8, num_batches=1, seed=1234)
  assert runner.text_source(cfg) == ("stdlib", "validation")
  batch = next(iter(runner.text_batches(cfg, BYTE, **shape)))
  mask = batch["loss_mask"] > 0
  assert mask.mean() > 0.99
  assert mask[batch["positions"] >= 65536].sum() > 10000   # long held-out files: the 64K+ bucket
  held = data.sources.text_documents("", split="validation", val_fraction=cfg.data.val_fraction,
                                stdlib=True)
  trained = data.sources.text_documents("", split="train", val_fraction=cfg.data.val_fraction,
                                   stdlib=True)
  held_bytes = [held[i][0].encode() for i in range(len(held))]
  trained_bytes = [trained[i][0].encode() for i in range(min(len(trained), 300))]
  for row in range(8):
    seg = batch["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      tokens = batch["inputs"][row][seg == s]
      piece = bytes(tokens[tokens < 256].astype(np.uint8))[:400]   # drop BOS
      assert any(piece in h for h in held_bytes), piece[:80]
      assert not any(piece in t for t in trained_bytes), piece[:80]


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
  # trainer's own tests' (test_train_loop.py); one layer of each of its kinds (half the tracing)
  cfg = _config()
  cfg.model.update(num_layers=2, pattern=("hgrn2", "attn"), d_model=32, mlp_dim=64,
                   attn_num_heads=2, attn_num_kv_heads=1, attn_head_dim=16, hgrn2_head_dim=16,
                   chunk_size=16, dtype="float32")
  cfg.curriculum.update(seq_lens=(768,), steps=(2,), tokens_per_step=6144, global_batch=(8,),
                        remat=("none",))
  result = loop.train(cfg, str(tmp_path))
  assert result.status == "finished" and result.step == 2
  assert np.isfinite(result.last_metrics["loss"])
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2]
