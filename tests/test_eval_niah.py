"""Needle-in-a-haystack tasks: generation (depth, answers, determinism), the grid with stand-ins,
the report, and a tiny model end to end (teacher-forced exact match = greedy generation)."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import random_model_params
from sosm_jax import models
from sosm_jax.data import tasks
from sosm_jax.data.tokenizers import ByteTokenizer
from sosm_jax.eval import niah, report, runner, scoring

pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()
SPECS = niah.task_specs()
_NEEDLE_RE = re.compile(r"The hidden (number|word) for ([a-z]+-[a-z]+) is ([a-z0-9]+)\.")


def read_answer(text: str) -> tuple[str, int]:
  """An independent reader: (answer, where the answer starts) from an example's text alone.

  Finds the needles with a regular expression and answers the question after the last
  '\\nWhat ', without the generator's bookkeeping.
  """
  q = text.rindex("\nWhat ")
  start = max(text.rfind(" is ", q), text.rfind(" are ", q))
  start += 4 if text[start:start + 4] == " is " else 5
  needles = [m.groups() for m in _NEEDLE_RE.finditer(text[:q])]
  question = text[q:start]
  by_key = {}
  for _, key, value in needles:
    by_key.setdefault(key, []).append(value)
  if question.startswith("\nWhat is"):
    key = re.search(r"for ([a-z]+-[a-z]+)\?", question).group(1)
    (value,) = by_key[key]
    return value + ".", start
  if question.startswith("\nWhat are all"):
    key = re.search(r"for ([a-z]+-[a-z]+),", question).group(1)
    return ", ".join(by_key[key]) + ".", start
  asked = re.findall(r"[a-z]+-[a-z]+", question.split("?")[0])
  return ", ".join(by_key[k][0] for k in asked) + ".", start


def reader_answers(inputs, positions, segment_ids):
  """answer_fn: at the position before each answer token, the reader's answer token."""
  del positions, segment_ids
  out = np.zeros(np.shape(inputs), np.int32)
  for row, tokens in enumerate(np.asarray(inputs)):
    answer, start = read_answer(TOK.decode(tokens[1:]))
    ids = TOK.encode_array(answer)
    first = 1 + start  # byte tokenizer on ASCII text: characters are tokens (+1 for BOS)
    out[row, first - 1:first - 1 + len(ids)] = ids[:len(tokens) - first]
  return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_example_has_its_needles_at_the_depth_and_the_right_answer(spec):
  for length, depth in [(600, 0.0), (900, 0.4), (1500, 1.0)]:
    ex = niah.niah_example(TOK, length, spec, seed=7, depth=depth)
    e = ex.example
    assert len(e.tokens) == length and e.tokens[0] == TOK.bos_id
    text = TOK.decode(e.tokens[1:])
    prompt = text[:text.rindex("\nWhat ")]   # the header, haystack and needles
    # The answer is the final span, marked, and is what the reader finds from the prompt alone.
    assert TOK.decode(e.tokens[e.answer_positions]) == ex.answer_text
    assert e.answer_positions[-1] == length - 1 and e.prompt_length == e.answer_positions[0]
    assert np.all(np.diff(e.answer_positions) == 1)
    assert read_answer(text) == (ex.answer_text, e.prompt_length - 1)
    # Every needle starts where needle_starts says; the target at the requested depth, within
    # half a sentence (needles go to sentence boundaries).
    n = 1 if spec.kind == "single" else spec.num_needles
    assert len(ex.needle_starts) == n == len(_NEEDLE_RE.findall(prompt))
    for s in ex.needle_starts:
      assert TOK.decode(e.tokens[s:s + 12]) == " The hidden "
    header = len(TOK.encode(niah._HEADER.format(kind=spec.needle)))
    needle_len = [len(m.group(0)) + 1 for m in _NEEDLE_RE.finditer(prompt)]  # + leading space
    question = text[text.rindex("\nWhat "):e.prompt_length - 1]
    fill = length - 1 - header - sum(needle_len) - len(question) - len(e.answer_positions)
    hay_before = ex.needle_starts[ex.target] - 1 - header - sum(needle_len[:ex.target])
    assert hay_before / fill == pytest.approx(ex.depth, abs=1e-9)
    longest = 5 + sum(max(len(w) for w in words) for words in
                      (niah._SUBJECTS, niah._ACTIONS, niah._PLACES, niah._TIMES))
    assert abs(ex.depth - depth) <= 0.5 * longest / fill + 1e-9
    # Keys, value words and digits occur only in needles and question (not in the haystack).
    hay = _NEEDLE_RE.sub("", prompt)
    values = [m.group(3) for m in _NEEDLE_RE.finditer(prompt)]
    keys = [m.group(2) for m in _NEEDLE_RE.finditer(prompt)]
    assert not any(v in hay for v in values) and not any(k in hay for k in keys)
    assert not re.search(r"[0-9]", hay)


def test_examples_are_deterministic_by_seed_and_differ_between_seeds():
  spec = niah.NiahSpec("multiquery", "word")
  a = niah.niah_example(TOK, 800, spec, seed=3, depth=0.5).example.tokens
  b = niah.niah_example(TOK, 800, spec, seed=3, depth=0.5).example.tokens
  c = niah.niah_example(TOK, 800, spec, seed=4, depth=0.5).example.tokens
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  b1 = niah.niah_eval_batch(TOK, spec, seq_len=800, num_examples=3, seed=11, depth=0.25)
  b2 = niah.niah_eval_batch(TOK, spec, seq_len=800, num_examples=3, seed=11, depth=0.25)
  for k in b1:
    np.testing.assert_array_equal(b1[k], b2[k])
  assert len({row.tobytes() for row in b1["inputs"]}) == 3


def test_repeat_haystack_and_errors_name_the_problem():
  ex = niah.niah_example(TOK, 400, niah.NiahSpec("single", "number", haystack="repeat"), seed=0,
                         depth=0.5)
  assert "Rivers run to the sea." in TOK.decode(ex.example.tokens[1:])
  with pytest.raises(ValueError, match="length 300 is shorter than the"):
    niah.niah_example(TOK, 300, niah.NiahSpec("multivalue", "number"), seed=0)
  with pytest.raises(ValueError, match="kind 'multi' is unknown"):
    niah.NiahSpec("multi", "number").check()
  with pytest.raises(ValueError, match="niah depths"):
    runner.EvalOptions(tasks=("niah",), niah_depths=(1.5,)).check()
  with pytest.raises(ValueError, match="needle 'digits' is unknown"):
    runner.EvalOptions(tasks=("niah",), niah_needles=("digits",)).check()


def test_text_file_haystack_leaves_out_sentences_with_the_examples_keys_and_values(tmp_path):
  # A "book" in which every value word occurs, and numbers too.
  lines = [f"Chapter {i}: the {w} was found in 19{i:02d}. Nobody spoke of it again!"
           for i, w in enumerate(niah._VALUE_WORDS)]
  (tmp_path / "book.txt").write_text("\n".join(lines) + "\nThe end. Or is it?\n")
  spec = niah.NiahSpec("multivalue", "word", haystack=f"text:{tmp_path}/*.txt")
  for seed in range(3):
    ex = niah.niah_example(TOK, 900, spec, seed=seed, depth=0.5)
    text = TOK.decode(ex.example.tokens[1:])
    prompt = text[:text.rindex("\nWhat ")]
    assert read_answer(text) == (ex.answer_text, ex.example.prompt_length - 1)
    hay = _NEEDLE_RE.sub("", prompt)
    assert "Nobody spoke of it again!" in hay   # the file's sentences, split at . ! ?
    for value in [m.group(3) for m in _NEEDLE_RE.finditer(prompt)]:
      assert value not in hay
  again = niah.niah_example(TOK, 900, spec, seed=2, depth=0.5).example.tokens
  np.testing.assert_array_equal(again, ex.example.tokens)
  with pytest.raises(ValueError, match="does not exist"):
    niah.NiahSpec("single", "word", haystack=f"text:{tmp_path}/missing").check()


def test_grid_reader_scores_100_a_near_miss_0_and_the_report_marks_the_trained_length(tmp_path):
  reader = scoring.scorer_from_answers(reader_answers)
  grid = niah.niah_grid(reader, TOK, SPECS, lengths=(300, 700), depths=(0.0, 0.5, 1.0),
                        num_examples=2, seed=5)
  assert set(grid["tasks"]) == {s.name for s in SPECS}
  for name, task in grid["tasks"].items():
    scored = [c for c in task["cells"] if c["accuracy"] is not None]
    assert all(c["accuracy"] == 1.0 for c in scored) and len(scored) >= 3, name
  skipped = [c for c in grid["tasks"]["multivalue_number"]["cells"] if c["accuracy"] is None]
  assert {c["length"] for c in skipped} == {300} and "shorter" in skipped[0]["skipped"]

  def off_by_one(inputs, positions, segment_ids):
    """The reader's answers with the token before the final full stop changed."""
    pred = reader_answers(inputs, positions, segment_ids)
    for row in pred:
      last = np.flatnonzero(row == ord("."))[-1]
      row[last - 1] = ord("x") if row[last - 1] != ord("x") else ord("y")
    return pred

  near = niah.niah_grid(scoring.scorer_from_answers(off_by_one), TOK, SPECS[:2], lengths=(700,),
                        depths=(0.5,), num_examples=2, seed=5)
  for task in near["tasks"].values():
    assert task["cells"][0]["accuracy"] == 0.0 and task["cells"][0]["token_accuracy"] > 0.8

  config = ml_collections.ConfigDict({"curriculum": {"seq_lens": (350,)},
                                      "data": {"task_vocab_size": 256}})
  options = runner.EvalOptions(tasks=("niah",), niah_lengths=(350, 700), niah_depths=(0.0, 1.0),
                               niah_kinds=("single", "multikey"), niah_examples=1)
  result = runner.run_tasks(reader, TOK, config, options, show_progress=False)
  assert result["niah"]["mean_accuracy"] == 1.0 and result["average_recall"] == 1.0
  paths = report.write_report(result, str(tmp_path / "eval"))
  assert {"niah_heatmaps", "niah_by_length"} <= set(paths)
  for key in ("niah_heatmaps", "niah_by_length"):
    with open(paths[key], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  md = open(paths["markdown"]).read()
  assert "| task | 350* | 700 |" in md and "| single_word | 100.0 | 100.0 |" in md
  assert "| 700 | 100.0 | 100.0 |" in md
  assert report.length_row_boundary([350, 700], 350) == 0.5
  assert report.length_row_boundary([100, 350], 350) is None
  assert report.length_marks({"trained_length": 2048, "memory_span": 8192}) == [
      (2048, "trained"), (8192, "memory span")]
  assert report.length_marks({"trained_length": 350}) == [(350, "trained")]
  assert report.length_marks({}) == []
  # a memory checkpoint's report marks its memory span too (here beyond the trained 350)
  result["meta"]["memory_span"] = 700
  marked = report.write_report(result, str(tmp_path / "eval_memory"))
  for key in ("niah_heatmaps", "niah_by_length"):
    with open(marked[key], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(paths["json"]) as f:
    assert json.load(f)["niah"]["tasks"]["multikey_number"]["mean_accuracy"] == 1.0


def _reader_with(change):
  """A scorer whose answers are the reader's with `change(values) -> values` applied."""
  def answers(inputs, positions, segment_ids):
    del positions, segment_ids
    out = np.zeros(np.shape(inputs), np.int32)
    for row, tokens in enumerate(np.asarray(inputs)):
      answer, start = read_answer(TOK.decode(tokens[1:]))
      ids = TOK.encode_array(", ".join(change(answer[:-1].split(", "))) + ".")
      out[row, start:start + len(ids)] = ids[:len(tokens) - 1 - start]
    return out
  return scoring.scorer_from_answers(answers)


def test_values_are_scored_one_by_one_and_a_wrong_needle_is_told_from_a_slip(tmp_path):
  specs = [s for s in SPECS if s.kind in ("multivalue", "multiquery")]
  grid_of = lambda change: niah.niah_grid(_reader_with(change), TOK, specs, lengths=(700,),
                                          depths=(0.0, 1.0), num_examples=2, seed=5)
  for task in grid_of(lambda v: v)["tasks"].values():
    for c in task["cells"]:
      assert c["value_accuracy"] == [1.0] * 4 and c["wrong_values"] == 0
  begun_apart = []   # swapped values whose first characters differ: begun with a wrong token

  def swap(v):
    begun_apart.append(2 * (v[1][0] != v[2][0]))
    return [v[0], v[2], v[1], v[3]]                # two needles in each other's places
  swapped = grid_of(swap)
  # numbers: values of one length, so the swap moves no other value
  cells = [c for name, task in swapped["tasks"].items() for c in task["cells"]
           if name.endswith("number")]
  begun_apart = begun_apart[:2 * 2] + begun_apart[2 * 4:2 * 6]  # rows: tasks x depths x 2
  assert all(c["value_accuracy"] == [1.0, 0.0, 0.0, 1.0] and c["accuracy"] == 0.0 for c in cells)
  assert sum(c["wrong_values"] for c in cells) == sum(begun_apart) > 0
  assert all(c["wrong_values_other_needle"] == c["wrong_values"] for c in cells)
  slip = lambda v: [v[0][:2] + ("x" if v[0][2] != "x" else "y") + v[0][3:]] + v[1:]
  for task in grid_of(slip)["tasks"].values():
    for c in task["cells"]:   # a wrong character inside the first value: no value begun wrong
      assert c["value_accuracy"] == [0.0, 1.0, 1.0, 1.0] and c["wrong_values"] == 0
  begun_wrong = grid_of(lambda v: ["#" + v[0][1:]] + v[1:])   # '#' starts no value
  for task in begun_wrong["tasks"].values():
    for c in task["cells"]:
      assert c["wrong_values"] == 2 and c["wrong_values_other_needle"] == 0
  md = "\n".join(report._niah_values_markdown(swapped, str))   # pylint: disable=protected-access
  assert "| multivalue_number | 700 | " in md and "| 100.0 / 0.0 / 0.0 / 100.0 |" in md


def test_value_spans_follow_the_tokenizers_pieces():
  spec = niah.NiahSpec("multiquery", "number", num_needles=3, digits=4)
  ex = niah.niah_example(TOK, 400, spec, seed=3)
  assert ex.answer_text == ", ".join(ex.answer_values) + "."
  assert sorted(ex.answer_values) == sorted(ex.values)
  spans = niah.value_token_spans(TOK, ex)
  assert [TOK.decode(ex.example.answer[s]) for s in spans] == list(ex.answer_values)

  class Pairs:
    """Two bytes a token (the last may be one): pieces that straddle ', '."""
    def decode(self, ids):
      return "".join(chr(i // 256) + chr(i % 256) if i >= 256 else chr(i) for i in ids)
  text = ex.answer_text
  ids = [ord(text[i]) * 256 + ord(text[i + 1]) for i in range(0, len(text) - 1, 2)]
  ids += [ord(text[-1])] if len(text) % 2 else []
  pair_ex = niah.NiahExample(
      example=ex.example.__class__(**{**ex.example.__dict__, "answer": np.asarray(ids)}),
      needle_starts=ex.needle_starts, target=ex.target, depth=ex.depth, answer_text=text,
      values=ex.values, answer_values=ex.answer_values)
  for value, span in zip(ex.answer_values, niah.value_token_spans(Pairs(), pair_ex)):
    start = text.index(value)
    assert span[0] == start // 2 and span[-1] == (start + len(value) - 1) // 2
  bad = niah.NiahExample(**{**pair_ex.__dict__, "answer_text": "z" + text})
  assert niah.value_token_spans(Pairs(), bad) is None


def tiny_config():
  from sosm_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()
  c.model.update(architecture="transformer", pattern=("attn",), num_layers=1, d_model=32,
                 mlp_dim=32, attn_num_heads=2, attn_num_kv_heads=1, attn_head_dim=16,
                 vocab_size=260, dtype="float32", chunk_size=16)
  c.curriculum.update(seq_lens=(256,), steps=(1,), tokens_per_step=512)
  return c


def tiny_model():
  model = models.build_model(tiny_config().model)
  return model, random_model_params(model)


def test_tiny_model_exact_match_is_greedy_generation():
  """The scorer's exact match on a real model equals 'greedy generation gives the answer'."""
  model, params = tiny_model()
  scorer = scoring.model_scorer(model, params, batch_size=4)
  spec = niah.NiahSpec("single", "number", digits=4)
  batch = niah.niah_eval_batch(TOK, spec, seq_len=256, num_examples=4, seed=1, depth=0.5)
  p = int(np.flatnonzero(batch["loss_mask"][0])[0]) + 1   # prompt length (answers: 5 tokens)
  a = 256 - p
  gen = np.asarray(model.generate(params, jnp.asarray(batch["inputs"][:, :p]), jax.random.key(0),
                                  a))[:, p:]
  hits = scoring.answer_correct(scorer(batch), batch)[:, p - 1:p - 1 + a]
  np.testing.assert_array_equal(hits.all(axis=1), (gen == batch["inputs"][:, p:]).all(axis=1))
  # With the model's own greedy continuation as the answer, every row is an exact match.
  own = [tasks.TaskExample(tokens=np.concatenate([row[:p], g]).astype(np.int32),
                           answer_mask=batch["loss_mask"][0] * 0 + np.r_[np.zeros(p), np.ones(a)],
                           answer_positions=np.arange(p, 256), answer=g, answer_text="",
                           prompt_length=p) for row, g in zip(batch["inputs"], gen)]
  own_batch = tasks.example_batch(own, TOK.pad_id)
  own_hits = scoring.answer_correct(scorer(own_batch), own_batch)
  assert own_hits[own_batch["loss_mask"] > 0].all()
  # The grid on the real model: every cell scored, accuracies are fractions of the examples.
  grid = niah.niah_grid(scorer, TOK, [spec, niah.NiahSpec("multikey", "word")], lengths=(512,),
                        depths=(0.0, 1.0), num_examples=2, seed=3)
  cells = [c for t in grid["tasks"].values() for c in t["cells"]]
  assert len(cells) == 4 and all(c["accuracy"] in (0.0, 0.5, 1.0) for c in cells)


def save_tiny_checkpoint(workdir: str, config) -> None:
  """The tiny model's random parameters as step 3 of a run in workdir, with `config`."""
  from sosm_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from sosm_jax.train.state import TrainState  # pylint: disable=import-outside-toplevel
  _, params = tiny_model()
  zero = np.zeros((), np.int32)
  state = TrainState(step=np.int32(3), params=params, opt_state={"mu": params},
                     nonfinite_streak=zero, nonfinite_total=zero)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(3, state, {"config": config.to_dict(), "data_state": None, "stage": 0,
                       "tokenizer": TOK.identity()}, wait=True)
  ckpt.close()


def test_evaluate_cli_runs_niah_on_a_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  save_tiny_checkpoint(workdir, tiny_config())
  out = str(tmp_path / "report")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), f"--workdir={workdir}",
         f"--out={out}", "--tasks=niah", "--batch_size=4", "--niah_lengths=256,512",
         "--niah_depths=0,1", "--niah_kinds=single,multiquery", "--niah_needles=word",
         "--niah_examples=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "## Needle in a haystack" in proc.stdout and "| task | 256* | 512 |" in proc.stdout
  with open(os.path.join(out, "report.json")) as f:
    result = json.load(f)
  assert set(result["niah"]["tasks"]) == {"single_word", "multiquery_word"}
  cells = result["niah"]["tasks"]["multiquery_word"]["cells"]
  assert [c["accuracy"] is None for c in cells] == [True, True, False, False]  # 256 too short
  for name in ("niah_heatmaps.png", "niah_by_length.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
