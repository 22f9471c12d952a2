"""Synthetic tasks (answers follow from prompts) and tokenizers (round trip, identity checks)."""
import re

import numpy as np
import pytest

from sosm_jax import data
from sosm_jax.data import tasks, tokenizers

BYTE = tokenizers.ByteTokenizer()


@pytest.mark.parametrize("length, pairs, queries", [(64, 8, 0), (200, 20, 5), (41, 10, 10)])
def test_mqar_answer_is_the_value_paired_with_the_queried_key(length, pairs, queries):
  for seed in range(5):
    ex = tasks.mqar_example(BYTE, length, num_pairs=pairs, num_queries=queries, seed=seed,
                            vocab_size=64)
    t = ex.tokens
    assert t.shape == (length,) and t[0] == BYTE.bos_id
    keys, values = t[1:1 + 2 * pairs:2], t[2:2 + 2 * pairs:2]
    assert len(set(keys.tolist())) == pairs and keys.max() < 32 <= values.min()
    table = dict(zip(keys.tolist(), values.tolist()))
    assert len(ex.answer_positions) == (queries or pairs)
    assert ex.answer_positions.min() > 2 * pairs  # every answer is asked after the context
    for p in ex.answer_positions:
      assert table[int(t[p - 1])] == t[p]  # the key just before the answer decides it
    np.testing.assert_array_equal(np.flatnonzero(ex.answer_mask), ex.answer_positions)
    np.testing.assert_array_equal(ex.answer, t[ex.answer_positions])


def _unasked_values_guess(ex, pairs: int) -> float:
  """Expected accuracy of a guesser that never binds a key: for each query it picks uniformly
  among the values of the pairs not asked yet (it reads the keys and values already answered)."""
  t = ex.tokens
  keys, values = t[1:1 + 2 * pairs:2].tolist(), t[2:2 + 2 * pairs:2].tolist()
  asked, hits = set(), 0.0
  for p in ex.answer_positions:
    candidates = [v for k, v in zip(keys, values) if k not in asked]
    if candidates:
      hits += candidates.count(int(t[p])) / len(candidates)
    asked.add(int(t[p - 1]))
  return hits / len(ex.answer_positions)


@pytest.mark.parametrize("pairs", [8, 32])
def test_mqar_answers_are_not_given_away_by_the_answers_before_them(pairs):
  # Teacher forcing shows each answered value. When every pair was asked exactly once, the
  # pairs not asked yet narrowed the answer down (the last query had one candidate), and a model
  # that bound no key to its value scored H(N)/N (2.7x chance at 8 pairs, 4x at 32): the study's
  # models learned that instead of recall. Now the values left over carry ~no information.
  guess = np.mean([_unasked_values_guess(
      tasks.mqar_example(BYTE, 4 * pairs + 8, num_pairs=pairs, seed=seed), pairs)
                   for seed in range(100)])
  assert guess < 1.5 / pairs


@pytest.mark.parametrize("length", [30, 300, 2000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_answer_is_the_number_hidden_at_the_depth(length, depth):
  ex = tasks.passkey_example(BYTE, length, seed=11, depth=depth)
  assert ex.tokens.shape == (length,) and ex.tokens[0] == BYTE.bos_id
  prompt = BYTE.decode(ex.tokens[:ex.prompt_length])
  answer = BYTE.decode(ex.answer)
  assert answer == ex.answer_text and len(answer) == 5
  assert ex.prompt_length + len(ex.answer) == length  # the answer ends the example
  needles = list(re.finditer(r" The pass key is (\d{5})\. Remember it: \1 is the pass key\. |"
                             r"#(\d{5})(?!$)", prompt))
  assert len(needles) == 1 and answer in needles[0].groups()  # hidden once, asked for at the end
  # The needle sits at `depth` of the filler between the header and the question.
  header = len(tasks._HEADER) if length > 200 else 0
  question = len(tasks._QUESTION) if length > 200 else len(tasks._TERSE_QUESTION)
  m = needles[0]
  filler = len(prompt) - header - question - (m.end() - m.start())  # (decode drops the BOS)
  assert abs((m.start() - header) - depth * filler) <= 0.5


def test_copy_answer_repeats_the_prompt():
  ex = tasks.copy_example(BYTE, 51, seed=3, vocab_size=16)
  n = (51 - 2) // 2
  np.testing.assert_array_equal(ex.answer, ex.tokens[1:1 + n])
  assert ex.tokens[1 + n] == BYTE.sep_id and ex.answer.max() < 16


def test_examples_are_deterministic_in_the_seed():
  a = tasks.mqar_example(BYTE, 128, num_pairs=16, seed=5)
  b = tasks.mqar_example(BYTE, 128, num_pairs=16, seed=5)
  c = tasks.mqar_example(BYTE, 128, num_pairs=16, seed=6)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


def test_task_settings_that_cannot_fit_are_errors():
  with pytest.raises(ValueError, match="mqar_num_pairs"):
    tasks.mqar_example(BYTE, 1000, num_pairs=200, seed=0, vocab_size=256)
  with pytest.raises(ValueError, match="cannot hold"):
    tasks.mqar_example(BYTE, 20, num_pairs=8, seed=0)
  with pytest.raises(ValueError, match="shorter"):
    tasks.passkey_example(BYTE, 10, seed=0)


def test_eval_batches_score_exactly_the_answer_tokens():
  batch = tasks.passkey_eval_batch(BYTE, seq_len=256, num_examples=4, seed=0)
  assert batch["inputs"].shape == (4, 256)
  for row in range(4):
    scored = batch["targets"][row][batch["loss_mask"][row] > 0]
    assert len(scored) == 5 and BYTE.decode(scored).isdigit()
    prompt = BYTE.decode(batch["inputs"][row][:256 - 5])
    assert BYTE.decode(scored) in prompt
  mqar = tasks.mqar_eval_batch(BYTE, seq_len=128, num_examples=2, seed=0, num_pairs=8)
  assert mqar["loss_mask"].sum() == 16


def test_task_pipeline_fills_each_row_with_one_example_scoring_answers_only():
  cfg = data.default_data_config()
  cfg.source, cfg.mqar_num_pairs, cfg.mqar_num_queries = "synthetic:mqar", 6, 4
  p = data.make_pipeline(cfg, BYTE, seq_len=48, batch_size=3, seed=0, process_index=0,
                         process_count=1)
  batch = next(p)
  assert (batch["segment_ids"] == 1).all() and (batch["inputs"][:, 0] == BYTE.bos_id).all()
  np.testing.assert_array_equal(batch["loss_mask"].sum(axis=1), [4, 4, 4])
  for row in range(3):
    inputs, targets = batch["inputs"][row], batch["targets"][row]
    table = dict(zip(inputs[1:13:2].tolist(), inputs[2:13:2].tolist()))
    for pos in np.flatnonzero(batch["loss_mask"][row]):
      assert table[int(inputs[pos])] == targets[pos]
  p.close()


def _task_rows(cfg, seq_len, batches=2):
  with data.make_pipeline(cfg, BYTE, seq_len=seq_len, batch_size=3, seed=0, process_index=0,
                          process_count=1) as p:
    return [next(p) for _ in range(batches)]


def test_task_length_by_seq_len_packs_short_examples_only_at_its_seq_len():
  cfg = data.default_data_config()
  cfg.update(source="synthetic:passkey", prefetch=0, task_length_by_seq_len=((512, 128),))
  for batch in _task_rows(cfg, 512):
    for row in range(3):
      seg, inputs = batch["segment_ids"][row], batch["inputs"][row]
      assert sorted(set(seg.tolist())) == [1, 2, 3, 4]   # four examples, each its own document
      for s in (1, 2, 3, 4):
        piece = np.flatnonzero(seg == s)
        assert len(piece) == 128 and inputs[piece[0]] == BYTE.bos_id
        np.testing.assert_array_equal(batch["positions"][row][piece], np.arange(128))
        scored = piece[batch["loss_mask"][row][piece] > 0]   # the piece's own 5-digit answer
        assert len(scored) == 5 and scored[-1] == piece[-1] - 1
        key = BYTE.decode(batch["targets"][row][scored])
        assert key.isdigit() and f"#{key}" in BYTE.decode(inputs[piece[0]:scored[0]])
      assert batch["loss_mask"][row].sum() == 20
  for batch in _task_rows(cfg, 256):   # other seq_lens keep task_length (0: one example a row)
    assert (batch["segment_ids"] == 1).all() and (batch["loss_mask"].sum(axis=1) == 5).all()


def test_task_length_by_seq_len_bad_values_name_the_key():
  cfg = data.default_data_config()
  for bad, problem in [(((512, 1024),), "exceeds its seq_len"), (((512, 128), (512, 64)), "twice"),
                       (((512, 0),), "positive integers"), ((512, 128), "pairs"),
                       (((512.0, 128),), "positive integers")]:
    cfg.task_length_by_seq_len = bad
    with pytest.raises(ValueError, match=f"config.data.task_length_by_seq_len: .*{problem}"):
      data.validate_data_config(cfg)
  cfg.update(source="mix:stdlib=0.5,synthetic:niah=0.5", prefetch=0,
             task_length_by_seq_len=((1024, 300),))
  with pytest.raises(ValueError, match="task_length_by_seq_len gives 300 at seq_len=1024, too "
                                       "short for synthetic:niah"):
    data.make_pipeline(cfg, BYTE, seq_len=1024, batch_size=2, seed=0, process_index=0,
                       process_count=1)


def test_byte_tokenizer_round_trips_and_marks_specials():
  text = "héllo\n\tworld ✓"
  ids = BYTE.encode(text)
  assert BYTE.decode(ids) == text and max(ids) < 256
  assert BYTE.decode([BYTE.bos_id] + ids + [BYTE.eos_id, BYTE.pad_id]) == text
  assert BYTE.vocab_size == 260


def test_sentencepiece_training_round_trip_and_identity(tmp_path):
  texts = [f"def function_{i}(x):\n    return x * {i}  # héllo\n" for i in range(300)]
  path = tokenizers.train_sentencepiece(iter(texts), str(tmp_path / "sp"), vocab_size=320)
  cfg = data.default_data_config()
  cfg.tokenizer = f"sentencepiece:{path}"
  tok = data.make_tokenizer(cfg)
  sample = "def function_7(x):\n    return x * 7  # héllo ✓\n"
  assert tok.decode(tok.encode(sample)) == sample
  ident = tok.identity()
  assert ident["kind"] == "sentencepiece" and ident["vocab_size"] == tok.vocab_size
  data.check_tokenizer_identity(ident, dict(ident, path="/elsewhere/sp.model"))  # moved: fine
  with pytest.raises(ValueError, match="different tokenizer"):
    data.check_tokenizer_identity(ident, BYTE.identity())
  ids = tok.task_ids(8)
  assert len(set(ids.tolist())) == 8 and not {tok.pad_id, tok.bos_id, tok.eos_id} & set(ids)
  ex = tasks.mqar_example(tok, 64, num_pairs=4, seed=0, vocab_size=8)
  assert ex.tokens.max() < tok.vocab_size


def test_tokenizer_mismatch_and_missing_model_are_errors(tmp_path):
  with pytest.raises(ValueError, match="different tokenizer"):
    data.check_tokenizer_identity(BYTE.identity(), dict(BYTE.identity(), vocab_size=300))
  cfg = data.default_data_config()
  cfg.tokenizer = f"sentencepiece:{tmp_path}/missing.model"
  with pytest.raises(ValueError, match="does not exist"):
    data.make_tokenizer(cfg)
  # A saved data state carries the tokenizer; resuming it with another one is refused.
  p = data.make_pipeline(data.default_data_config(), BYTE, seq_len=16, batch_size=1, seed=0,
                         process_index=0, process_count=1)
  state = p.get_state()
  state["meta"]["tokenizer"] = dict(state["meta"]["tokenizer"], vocab_size=999)
  with pytest.raises(ValueError, match="different tokenizer"):
    p.set_state(state)
  p.close()


def test_task_answer_weight_scales_answers_only_and_the_loss_is_their_weighted_mean():
  import jax  # pylint: disable=import-outside-toplevel
  from sosm_jax.models.lm import cross_entropy  # pylint: disable=import-outside-toplevel
  cfg = data.default_data_config()
  cfg.update(source="mix:stdlib=0.1,synthetic:passkey=0.9", prefetch=0,
             task_length_by_seq_len=((512, 128),))
  plain = _task_rows(cfg, 512, batches=4)
  cfg.task_answer_weight = 4
  data.validate_data_config(cfg)
  weighted = _task_rows(cfg, 512, batches=4)
  for a, b in zip(plain, weighted):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])   # same rows, only weights differ
    np.testing.assert_array_equal(a["loss_mask"] > 0, b["loss_mask"] > 0)
  masks = np.stack([b["loss_mask"] for b in weighted])
  targets = np.stack([b["targets"] for b in weighted])
  assert set(np.unique(np.stack([a["loss_mask"] for a in plain]))) == {0.0, 1.0}
  assert set(np.unique(masks)) == {0.0, 1.0, 4.0}           # text and answers both present
  # weight 4 exactly at task answers: the digits closing each passkey example
  assert all(chr(t).isdigit() for t in targets[masks == 4.0])
  b = weighted[0]
  logits = jax.random.normal(jax.random.key(0), b["inputs"].shape + (260,))
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), b["targets"][..., None],
                            -1)[..., 0]
  loss, metrics = cross_entropy(logits, b["targets"], b["loss_mask"])
  w = b["loss_mask"]
  np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)
  assert float(metrics["tokens"]) == w.sum()
  for bad in (0, 256):   # (a float is refused by the ConfigDict itself)
    cfg.task_answer_weight = bad
    with pytest.raises(ValueError, match="config.data.task_answer_weight: .*integer in"):
      data.validate_data_config(cfg)


def _passkey_depth(ex) -> float:
  """The relative depth of a long-form passkey needle in its filler."""
  prompt = BYTE.decode(ex.tokens[:ex.prompt_length])
  m = re.search(r" The pass key is \d{5}\. Remember it: \d{5} is the pass key\. ", prompt)
  filler = len(prompt) - len(tasks._HEADER) - len(tasks._QUESTION) - (m.end() - m.start())
  return (m.start() - len(tasks._HEADER)) / filler


def test_arcsine_depths_put_more_needles_near_both_ends_than_uniform():
  rng = np.random.default_rng(0)
  edge = lambda d: (d < 0.02) | (d > 0.98)
  arcsine = np.array([tasks.random_depth(rng, "arcsine") for _ in range(4000)])
  uniform = np.array([tasks.random_depth(rng, "uniform") for _ in range(4000)])
  assert arcsine.min() >= 0 and arcsine.max() <= 1
  # Beta(1/2, 1/2): P(edge) = 4 asin(sqrt(0.02)) / pi = 18.0%; uniform 4%
  assert 0.15 < edge(arcsine).mean() < 0.21 and 0.025 < edge(uniform).mean() < 0.055
  assert 0.45 < np.mean(arcsine < 0.5) < 0.55   # symmetric
  depths = np.array([_passkey_depth(tasks.passkey_example(BYTE, 600, seed=s, depths="arcsine"))
                     for s in range(200)])
  assert 0.1 < edge(depths).mean() < 0.3   # the passkey generator draws from it
  with pytest.raises(ValueError, match="'edges'"):
    tasks.random_depth(rng, "edges")


def test_niah_kind_weights_choose_the_kinds_of_training_examples():
  from sosm_jax.eval import niah  # pylint: disable=import-outside-toplevel
  asks = {k: niah._QUESTIONS[k].split("{")[0] for k in niah.KINDS}   # the question's opening
  kinds = lambda ex: {k for k, q in asks.items()
                      if q in BYTE.decode(ex.tokens[:ex.prompt_length])}
  only = [tasks.niah_training_example(BYTE, 800, seed=s, kind_weights=(0, 0, 1, 0))
          for s in range(12)]
  assert all("multivalue" in kinds(ex) and "multiquery" not in kinds(ex) for ex in only)
  mixed = [tasks.niah_training_example(BYTE, 800, seed=s, kind_weights=(0, 0, 1, 3))
           for s in range(60)]
  share = np.mean(["multiquery" in kinds(ex) for ex in mixed])
  assert 0.6 < share < 0.9   # 3 of 4 expected
  assert all(kinds(ex) & {"multivalue", "multiquery"} for ex in mixed)   # no single / multikey
  equal = [tasks.niah_training_example(BYTE, 800, seed=s) for s in range(60)]
  assert 0.3 < np.mean([kinds(ex) == {"single", "multikey"} for ex in equal]) < 0.7   # () = equal


def test_task_depths_and_niah_kind_weights_are_checked():
  cfg = data.default_data_config()
  for key, bad in [("task_depths", "edges"), ("niah_kind_weights", (1, 1)),
                   ("niah_kind_weights", (1, -1, 1, 1)), ("niah_kind_weights", (0, 0, 0, 0))]:
    bad_cfg = data.default_data_config()
    bad_cfg[key] = bad
    with pytest.raises(ValueError, match=f"config.data.{key}"):
      data.validate_data_config(bad_cfg)
  data.validate_data_config(cfg)
