"""Evaluation metrics on stand-ins with known scores: oracles score 100%, guessers score chance."""
import json
import math
import os

import numpy as np
import pytest

from sosm_jax.data import tasks
from sosm_jax.data.tokenizers import ByteTokenizer
from sosm_jax.eval import perplexity, recall, report, runner, scoring, standins
from sosm_jax.eval.report import write_report

TOK = ByteTokenizer()
V = TOK.vocab_size


def _binomial_ok(hits: float, n: int, p: float, sigmas: float = 4.5) -> bool:
  return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def _text_batch(rows=3, length=64, seed=0, doc_starts=(0, 40)):
  """A packed-text-like batch: random tokens, documents restarting at doc_starts."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, size=(rows, length + 1)).astype(np.int32)
  positions = np.zeros(length, np.int32)
  segments = np.zeros(length, np.int32)
  for i, start in enumerate(doc_starts):
    end = doc_starts[i + 1] if i + 1 < len(doc_starts) else length
    positions[start:end] = np.arange(end - start)
    segments[start:end] = i + 1
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((rows, length), np.float32),
          "segment_ids": np.tile(segments, (rows, 1)), "positions": np.tile(positions, (rows, 1))}


def test_bucket_edges_are_geometric_and_cover_the_length():
  assert perplexity.position_bucket_edges(256, 16) == [0, 16, 32, 64, 128, 256]
  assert perplexity.position_bucket_edges(100, 16) == [0, 16, 32, 64, 100]
  assert perplexity.position_bucket_edges(8, 16) == [0, 8]
  with pytest.raises(ValueError, match="positive"):
    perplexity.position_bucket_edges(0)


def test_loss_by_position_recovers_a_known_loss_curve():
  # p(correct) depends on the position within the document: loss per bucket is -log p exactly.
  batch = _text_batch()
  probs = {0: 0.001, 16: 0.5, 32: 0.9}  # 0.001 is below the others' share: wrong argmax
  prob_at = lambda pos: np.where(pos < 16, probs[0], np.where(pos < 32, probs[16], probs[32]))
  targets_of = lambda inputs: batch["targets"]
  scorer = scoring.scorer_from_logits(standins.fixed_probability_logits(targets_of, V, prob_at))
  out = perplexity.loss_by_position(scorer, [batch], perplexity.position_bucket_edges(64, 16))
  got = {b["start"]: b for b in out["buckets"]}
  for start, p in probs.items():
    assert got[start]["loss"] == pytest.approx(-math.log(p), rel=1e-4)
    assert got[start]["perplexity"] == pytest.approx(1 / p, rel=1e-4)
  # Documents restart at 40: positions 0..39 and 0..23, 3 rows each.
  counts = {b["start"]: b["tokens"] for b in out["buckets"]}
  assert counts == {0: 3 * 32, 16: 3 * 24, 32: 3 * 8}
  assert out["tokens"] == 3 * 64
  assert got[32]["accuracy"] == 1.0 and got[0]["accuracy"] == 0.0
  assert out["context_gain"] == pytest.approx(math.log(0.9 / 0.001), rel=1e-4)
  assert out["still_falling"] is True


def test_perplexity_oracle_is_one_and_random_is_the_vocabulary():
  batch = _text_batch(seed=1)
  edges = perplexity.position_bucket_edges(64, 16)
  oracle = perplexity.loss_by_position(
      scoring.scorer_from_logits(standins.target_oracle(batch, V)), [batch], edges)
  assert oracle["perplexity"] == pytest.approx(1.0, abs=1e-3)
  assert all(b["accuracy"] == 1.0 for b in oracle["buckets"] if b["tokens"])
  uniform = lambda inputs, positions, segment_ids: np.zeros((*np.shape(inputs), V), np.float32)
  flat = perplexity.loss_by_position(scoring.scorer_from_logits(uniform), [batch], edges)
  assert flat["perplexity"] == pytest.approx(V, rel=1e-4)
  assert all(b["loss"] == pytest.approx(math.log(V), rel=1e-5) for b in flat["buckets"]
             if b["tokens"])


def test_mqar_oracle_scores_100_and_guesser_scores_chance():
  oracle = scoring.scorer_from_answers(standins.induction_oracle())
  grid = recall.mqar_grid(oracle, TOK, lengths=(64, 128), num_pairs=(4, 16, 32, 200),
                          num_examples=3, seed=7)
  scored = [c for c in grid["cells"] if c["accuracy"] is not None]
  assert len(grid["cells"]) == 8
  assert {(c["length"], c["num_pairs"]) for c in scored} == {(64, 4), (64, 16), (128, 4),
                                                             (128, 16), (128, 32)}
  assert all(c["accuracy"] == 1.0 and c["example_accuracy"] == 1.0 for c in scored)
  assert grid["mean_accuracy"] == 1.0
  skipped = {(c["length"], c["num_pairs"]): c["skipped"] for c in grid["cells"] if "skipped" in c}
  assert "distinct keys" in skipped[(128, 200)] and "cannot hold" in skipped[(64, 32)]
  # 64 tokens hold BOS, 16 pairs and only 15 queries: the cell says so.
  assert [c["num_queries"] for c in scored if c["length"] == 64 and c["num_pairs"] == 16] == [15]

  values = TOK.task_ids(256)[128:]
  guesser = scoring.scorer_from_answers(standins.random_guesser(values, seed=3))
  g = recall.mqar_grid(guesser, TOK, lengths=(256,), num_pairs=(32,), num_examples=40, seed=8)
  cell = g["cells"][0]
  assert g["chance"] == pytest.approx(1 / 128)
  assert _binomial_ok(cell["accuracy"] * cell["queries"], cell["queries"], g["chance"])
  # A guesser that always says the same value is right only when that value was drawn.
  const = scoring.scorer_from_answers(lambda i, p, s: np.full(np.shape(i), values[0]))
  c = recall.mqar_grid(const, TOK, lengths=(256,), num_pairs=(32,), num_examples=40,
                       seed=8)["cells"][0]
  assert _binomial_ok(c["accuracy"] * c["queries"], c["queries"], 1 / 128)


def test_passkey_oracle_scores_100_and_digit_guesser_scores_chance():
  oracle = scoring.scorer_from_answers(standins.induction_oracle())
  # 64 tokens: the generator's terse form ('#12345' ... '#'); 256, 384: the full sentence form.
  grid = recall.passkey_grid(oracle, TOK, lengths=(8, 64, 256, 384), depths=(0.0, 0.5, 1.0),
                             num_examples=2, seed=1)
  too_short = [c for c in grid["cells"] if c["length"] == 8]
  assert all(c["accuracy"] is None and "shorter" in c["skipped"] for c in too_short)
  scored = [c for c in grid["cells"] if c["accuracy"] is not None]
  assert len(scored) == 9 and all(c["accuracy"] == 1.0 for c in scored)

  digits = TOK.encode_array("0123456789")
  guesser = scoring.scorer_from_answers(standins.random_guesser(digits, seed=5))
  g = recall.passkey_grid(guesser, TOK, lengths=(256,), depths=(0.3,), num_examples=300,
                          digits=1, seed=2)
  acc = g["cells"][0]["accuracy"]
  assert g["chance"] == pytest.approx(0.1)
  assert _binomial_ok(acc * 300, 300, 0.1)
  g5 = recall.passkey_grid(guesser, TOK, lengths=(256,), depths=(0.3,), num_examples=50,
                           digits=5, seed=2)
  assert g5["cells"][0]["accuracy"] <= 0.04  # chance 1e-5
  assert _binomial_ok(g5["cells"][0]["digit_accuracy"] * 250, 250, 0.1)


def test_scorer_shape_errors_are_named():
  batch = _text_batch(rows=2, length=16, doc_starts=(0,))
  bad = scoring.scorer_from_logits(lambda i, p, s: np.zeros((2, 15, V)))
  with pytest.raises(ValueError, match=r"expected \[batch, time, vocab\]"):
    bad(batch)
  with pytest.raises(ValueError, match="lacks"):
    bad({"inputs": batch["inputs"]})
  answers_only = scoring.scorer_from_answers(lambda i, p, s: np.zeros(np.shape(i), np.int32))
  with pytest.raises(ValueError, match="no likelihoods"):
    perplexity.loss_by_position(answers_only, [batch], [0, 16])
  with pytest.raises(ValueError, match="unknown tasks"):
    runner.EvalOptions(tasks=("ppl", "ruler")).check()


def test_run_tasks_writes_json_markdown_and_plots(tmp_path):
  import ml_collections
  config = ml_collections.ConfigDict({"curriculum": {"seq_lens": (64,)},
                                      "data": {"task_vocab_size": 256}})
  batch = _text_batch(seed=3)
  prob_at = lambda pos: np.clip(0.1 + pos / 80.0, 0, 0.95)
  logits_fn = standins.fixed_probability_logits(lambda i: batch["targets"], V, prob_at)
  oracle_answers = standins.induction_oracle()

  def combined(inputs, positions, segment_ids):
    """Likelihoods from the known curve on the text batch, oracle answers on task rows."""
    if np.shape(inputs) == np.shape(batch["inputs"]) and np.array_equal(inputs, batch["inputs"]):
      return logits_fn(inputs, positions, segment_ids)
    pred = oracle_answers(inputs, positions, segment_ids)
    return np.eye(V, dtype=np.float32)[pred] * 10

  options = runner.EvalOptions(tasks=("ppl", "mqar", "passkey"), mqar_lengths=(64, 128),
                               mqar_pairs=(4, 8, 64), mqar_examples=2,
                               passkey_depths=(0.0, 0.5, 1.0), passkey_examples=1,
                               ppl_first_edge=8)
  result = runner.run_tasks(scoring.scorer_from_logits(combined), TOK, config, options,
                            batches=[batch], show_progress=False)
  assert result["passkey"]["mean_accuracy"] == 1.0 and result["mqar"]["mean_accuracy"] == 1.0
  assert result["average_recall"] == 1.0
  losses = [b["loss"] for b in result["perplexity"]["buckets"] if b["tokens"]]
  assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1] + 0.5
  # Passkey lengths default to 1/8 .. 2x the trained length, at least 32 tokens.
  assert sorted({c["length"] for c in result["passkey"]["cells"]}) == [32, 64, 128]

  paths = write_report(result, str(tmp_path / "eval"))
  assert set(paths) == {"json", "markdown", "loss_plot", "passkey_heatmap", "mqar_heatmap"}
  for key in ("loss_plot", "passkey_heatmap", "mqar_heatmap"):
    with open(paths[key], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(paths[key]) > 5000
  with open(paths["json"]) as f:
    assert json.load(f)["mqar"]["mean_accuracy"] == 1.0
  md = open(paths["markdown"]).read()
  assert "| length | 4 | 8 | 64 |" in md and "| 64 | 100.0 | 100.0 | – |" in md
  assert "| length | 0.00 | 0.50 | 1.00 |" in md and "| 128 | 100.0 | 100.0 | 100.0 |" in md
  assert "Average recall" in md
  assert "positions" in report.to_markdown({"perplexity": result["perplexity"]})
  assert "lower in the last bucket than in the first, and still falling" in md


def test_perplexity_text_of_a_task_only_model_is_stdlib():
  from sosm_jax.train.config import base_config
  config = base_config()
  config.data.source = "mix:synthetic:mqar=0.6,synthetic:passkey=0.4"
  assert runner.text_source(config) == ("stdlib", "all")  # answers say nothing of text
  assert runner.text_source(config, "text:/data/*.txt") == ("text:/data/*.txt", "all")
  # a mix's text: its held-out split, the tasks dropped (their rows score only answers)
  config.data.source = "mix:stdlib=0.9,synthetic:passkey=0.1"
  assert runner.text_source(config) == ("stdlib", "validation")
  config.data.source = "mix:text:/a/*.txt=3,synthetic:niah=1,stdlib=1"
  assert runner.text_source(config) == ("mix:text:/a/*.txt=3,stdlib=1", "validation")
  config.data.source = "text:/a/*.txt"
  assert runner.text_source(config) == ("text:/a/*.txt", "validation")
  config.data.eval_source = "text:/held/*.txt"   # an evaluation source is read whole
  assert runner.text_source(config) == ("text:/held/*.txt", "all")


def _binder(num_pairs_of_row):
  """answer_fn: at a position holding a key of its row's context, the value bound to it; else pad.

  It answers exactly where a query key sits, so it scores 100% only if the evaluator (and the
  training loss mask) score exactly the positions after a query key."""

  def answer(inputs, positions, segment_ids):
    inputs = np.asarray(inputs)
    out = np.full(inputs.shape, TOK.pad_id, np.int32)
    for r, row in enumerate(inputs):
      p = num_pairs_of_row(row)
      table = dict(zip(row[1:1 + 2 * p:2].tolist(), row[2:2 + 2 * p:2].tolist()))
      for t in range(1 + 2 * p, len(row)):
        out[r, t] = table.get(int(row[t]), TOK.pad_id)
    return out

  return answer


def _pairs_of_row(row):
  """Context pairs of an MQAR row: the keys before the first SEP are all distinct."""
  seen, i = set(), 1
  while i + 1 < len(row) and row[i] != TOK.sep_id and int(row[i]) not in seen:
    seen.add(int(row[i]))
    i += 2
  return len(seen)


def test_mqar_evaluator_and_training_loss_score_the_same_positions():
  from sosm_jax import data
  binder = scoring.scorer_from_answers(_binder(_pairs_of_row))
  grid = recall.mqar_grid(binder, TOK, lengths=(64, 128), num_pairs=(4, 8, 16), num_examples=4,
                          seed=3)
  assert grid["mean_accuracy"] == 1.0 and all(c["accuracy"] == 1.0 for c in grid["cells"])
  assert grid["bag_chance"] == pytest.approx(np.mean([1 / 4, 1 / 8, 1 / 16]))
  dense = recall.mqar_grid(binder, TOK, lengths=(32,), num_pairs=(2, 4), num_examples=2,
                           num_queries=12)  # 32 tokens hold 13 queries after 2 pairs, 11 after 4
  assert [c["num_queries"] for c in dense["cells"]] == [12, 11]
  assert [c["queries"] for c in dense["cells"]] == [24, 22] and dense["mean_accuracy"] == 1.0
  # The training pipeline's loss mask: the same positions, the same answers.
  cfg = data.default_data_config()
  cfg.update(source="synthetic:mqar", mqar_num_pairs=8, prefetch=0)
  with data.make_pipeline(cfg, TOK, seq_len=64, batch_size=4, seed=0, process_index=0,
                          process_count=1) as p:
    batch = next(p)
  pred = binder(batch).pred
  scored = batch["loss_mask"] > 0
  assert scored.sum() == 4 * 8
  np.testing.assert_array_equal(pred[scored], batch["targets"][scored])
  np.testing.assert_array_equal(pred != TOK.pad_id, scored)  # answers exactly at the query keys
