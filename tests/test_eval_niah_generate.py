"""NIAH's opt-in generation metric: RULER's string_match_all on hand-made strings, the engine's
greedy continuations against `LanguageModel.generate`, the grid, runner and report with it, and
the refusals (host memory, stand-in predictors, no generator)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sosm_jax.data.tokenizers import ByteTokenizer
from sosm_jax.eval import niah, report, runner, scoring
from test_eval_niah import save_tiny_checkpoint, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()


def ruler_string_match_all(pred: str, ref: list[str]) -> float:
  """RULER's string_match_all as its evaluation defines it, for one example: the share of the
  references that occur in the prediction, ignoring case."""
  found = [r.lower() in pred.lower() for r in ref]
  return float(np.mean(found))


def test_ruler_match_all_counts_values_found_in_any_order_case_insensitively():
  values = ["apricot", "blizzard", "compass", "dynamo"]
  cases = [("dynamo, compass, blizzard, apricot.", 1.0),     # permuted: all found
           ("apricot, blizzard, compass.", 0.75),            # one missing
           ("APRICOT, Blizzard, comPass, dynamo", 1.0),      # case does not matter
           ("the answer is apricotblizzard, compassdynamo", 1.0),  # anywhere, as substrings
           ("", 0.0), ("apricots, blizard", 0.25)]
  for text, expected in cases:
    assert niah.ruler_match_all(text, values) == expected == ruler_string_match_all(text, values)
  # A value inside another one's text counts as found, as RULER counts it.
  assert niah.ruler_match_all("1234.", ["123", "1234"]) == 1.0
  assert niah.ruler_match_all("123.", ["1234", "123"]) == 0.5
  assert niah.text_through_stop("1234, 5678. The hidden") == "1234, 5678."
  assert niah.text_through_stop("1234, 56") == "1234, 56"


@pytest.fixture(scope="module")
def tiny():
  """(model, params, a generator over them), the engine stopped afterwards."""
  model, params = tiny_model()
  generator = niah.EngineGenerator(model, params, TOK, max_len=448 + niah.GENERATE_MARGIN,
                                   num_slots=2, prefill_chunk=64)
  yield model, params, generator
  generator.close()


def test_engine_generation_is_the_models_greedy_generate(tiny):
  model, params, generator = tiny
  spec = niah.NiahSpec("single", "number", digits=4)   # one prompt length: one generate compile
  examples = niah.niah_cell_examples(TOK, spec, seq_len=256, num_examples=3, seed=1, depth=0.5)
  p = examples[0].example.prompt_length
  assert {e.example.prompt_length for e in examples} == {p}
  texts = generator(examples)
  n = niah.generation_budget(examples[0])
  prompts = jnp.asarray(np.stack([e.example.tokens[:p] for e in examples]))
  out = np.asarray(model.generate(params, prompts, jax.random.key(0), n))[:, p:]
  for row, text in zip(out, texts):
    row = list(row)
    row = row[:row.index(TOK.eos_id)] if TOK.eos_id in row else row
    assert text == niah.text_through_stop(TOK.decode(row))
  assert any(texts) and len(set(texts)) > 1    # prompts differ, and so do the continuations


def test_grid_with_the_engine_generator_has_ruler_fields(tiny):
  model, params, generator = tiny
  specs = [niah.NiahSpec("single", "number", digits=4), niah.NiahSpec("multivalue", "word")]
  grid = niah.niah_grid(scoring.model_scorer(model, params, batch_size=2), TOK, specs,
                        lengths=(256, 448), depths=(0.0, 1.0), num_examples=2, seed=3,
                        generator=generator)
  for task in grid["tasks"].values():
    scored = [c for c in task["cells"] if c["accuracy"] is not None]
    assert scored and all(len(c["generated"]) == 2 for c in scored)
    for c in scored:
      assert 0.0 <= c["ruler_all"] <= c["ruler_score"] <= 1.0
      assert c["ruler_score"] >= c["accuracy"]   # an exact answer has every value
    assert task["ruler_mean"] == pytest.approx(np.mean([c["ruler_score"] for c in scored]))
  skipped = [c for c in grid["tasks"]["multivalue_word"]["cells"] if c["accuracy"] is None]
  assert skipped and not any("ruler_score" in c for c in skipped)   # 256: too short
  assert grid["ruler_mean"] == pytest.approx(
      np.mean([t["ruler_mean"] for t in grid["tasks"].values()]))


def _fake_generator(change):
  """Answers the examples' values changed by `change(values) -> values`, without a model."""
  return lambda examples: [", ".join(change(list(e.answer_values))) + "." for e in examples]


NO_ANSWERS = scoring.scorer_from_answers(lambda inputs, *_: np.zeros(np.shape(inputs), np.int32))
SPECS = niah.task_specs()
CONFIG = ml_collections.ConfigDict({"curriculum": {"seq_lens": (350,)},
                                    "data": {"task_vocab_size": 256}})


def test_grid_and_report_score_permuted_values_in_full_and_missing_ones_as_a_fraction():
  grid_of = lambda change: niah.niah_grid(NO_ANSWERS, TOK, SPECS, lengths=(700,),
                                          depths=(0.0, 1.0), num_examples=2, seed=5,
                                          generator=_fake_generator(change))
  reversed_grid = grid_of(lambda v: v[::-1])
  for name, task in reversed_grid["tasks"].items():
    for c in task["cells"]:
      assert (c["accuracy"], c["ruler_score"], c["ruler_all"]) == (0.0, 1.0, 1.0), name
  assert reversed_grid["ruler_mean"] == 1.0 and reversed_grid["mean_accuracy"] == 0.0
  dropped = grid_of(lambda v: v[:-1])
  for name, task in dropped["tasks"].items():
    expected = 0.0 if name.startswith(("single", "multikey")) else 0.75   # 1 of 1, 3 of 4 values
    assert task["ruler_mean"] == expected and all(c["ruler_all"] == 0 for c in task["cells"])
  plain = niah.niah_grid(NO_ANSWERS, TOK, SPECS[:1], lengths=(700,), depths=(0.5,),
                         num_examples=1, seed=5)
  assert "ruler_mean" not in plain
  assert "ruler_score" not in plain["tasks"]["single_number"]["cells"][0]

  options = runner.EvalOptions(tasks=("niah",), niah_lengths=(350, 700), niah_depths=(0.0, 1.0),
                               niah_kinds=("multivalue", "multiquery"), niah_examples=1,
                               niah_generate=True)
  result = runner.run_tasks(NO_ANSWERS, TOK, CONFIG, options, show_progress=False,
                            generator=_fake_generator(lambda v: v[1:] + v[:1]))
  assert result["niah"]["ruler_mean"] == 1.0 and "string_match_all" in result["meta"]["scoring"]
  assert json.loads(json.dumps(result))["niah"]["tasks"]["multiquery_word"]["ruler_mean"] == 1.0
  md = report.to_markdown(result)
  assert "## NIAH, RULER's order-free metric (string_match_all)" in md
  ruler_part = md[md.index("RULER's order-free"):]
  assert "| task | 350* | 700 |" in ruler_part and "| multiquery_word | – | 100.0 |" in ruler_part
  options.niah_generate = False
  plain = runner.run_tasks(NO_ANSWERS, TOK, CONFIG, options, show_progress=False)
  assert "ruler_mean" not in plain["niah"] and "RULER" not in report.to_markdown(plain)


def test_generation_is_refused_with_host_memory_a_stand_in_or_no_generator():
  options = runner.EvalOptions(tasks=("niah",), niah_lengths=(700,), niah_generate=True)
  fake = _fake_generator(lambda v: v)
  with pytest.raises(ValueError, match="--niah_generate.*--memory=off"):
    runner.run_tasks(NO_ANSWERS, TOK, CONFIG, options, memory_span=700, generator=fake)
  with pytest.raises(ValueError, match="--niah_generate.*--memory=off"):
    runner.check_niah_generate(options, memory=True)
  with pytest.raises(ValueError, match="'oracle' stand-in predictor cannot generate"):
    runner.check_niah_generate(options, memory=False, predictor="oracle")
  with pytest.raises(ValueError, match="needs a generator"):
    runner.run_tasks(NO_ANSWERS, TOK, CONFIG, options)
  runner.check_niah_generate(runner.EvalOptions(niah_generate=False), memory=True,
                             predictor="random")   # off: nothing to refuse


def test_evaluate_cli_refuses_generation_with_host_memory_before_compiling(tmp_path):
  """A checkpoint trained with host memory: --niah_generate names --memory=off; nothing runs."""
  config = tiny_config()
  config.memory.enabled = True
  workdir = str(tmp_path / "run")
  save_tiny_checkpoint(workdir, config)
  out = str(tmp_path / "report")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), f"--workdir={workdir}",
         f"--out={out}", "--tasks=niah", "--niah_lengths=512", "--niah_generate"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "--niah_generate does not support host memory" in proc.stderr
  assert "--memory=off" in proc.stderr and not os.path.exists(out)
