"""Evaluation: perplexity by position, MQAR, passkey and needle-in-a-haystack grids, reports, plots.

  from sosm_jax.eval import loading, runner, scoring, report
  loaded = loading.load_for_eval("workdir/run")            # newest checkpoint, checked
  scorer = scoring.model_scorer(loaded.model, loaded.params, batch_size=8)
  result = runner.run_tasks(scorer, loaded.tokenizer, loaded.config, runner.EvalOptions())
  report.write_report(result, "workdir/run/eval/<step>")   # JSON, Markdown, PNG plots

Every metric takes a scorer (`scoring.py`), so stand-ins with known scores (`standins.py`:
oracles, random guessers) test the metrics without a trained model. `lm_harness.py` (optional,
needs the `eval` extra) lets lm-evaluation-harness drive a checkpoint; it is not imported here.
"""
from sosm_jax.eval.niah import NiahSpec, niah_example, niah_grid
from sosm_jax.eval.perplexity import loss_by_position, position_bucket_edges
from sosm_jax.eval.recall import mqar_grid, passkey_grid
from sosm_jax.eval.report import to_markdown, write_report
from sosm_jax.eval.runner import EvalOptions, run_tasks
from sosm_jax.eval.scoring import (TokenScores, model_scorer, scorer_from_answers,
                                   scorer_from_logits)

__all__ = ["EvalOptions", "NiahSpec", "TokenScores", "loss_by_position", "model_scorer",
           "mqar_grid", "niah_example", "niah_grid", "passkey_grid", "position_bucket_edges",
           "run_tasks", "scorer_from_answers", "scorer_from_logits", "to_markdown",
           "write_report"]
