"""The evaluation benchmarks' pieces: equal sizes, prefill/decode timing, tables and plots."""
import importlib.util
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from sosm_jax import models
from sosm_jax.eval import sizing
from sosm_jax.models.config import default_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
  path = os.path.join(ROOT, "benchmarks", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def scaling():
  return _script("context_scaling")


@pytest.fixture(scope="module")
def study():
  return _script("backbone_study")


def test_transformer_is_sized_like_the_hybrid(scaling):
  configs = scaling.model_configs(quick=True, dtype="float32")
  hybrid, transformer = (sizing.count_params(configs[k]) for k in ("hybrid", "transformer"))
  assert configs["transformer"].mlp_dim != configs["hybrid"].mlp_dim
  assert abs(transformer - hybrid) / hybrid < 0.03, (transformer, hybrid)


def test_prefill_and_decode_are_timed_and_tabled(scaling, tmp_path):
  cfg = default_model_config("transformer")
  cfg.update(num_layers=1, d_model=32, mlp_dim=32, attn_num_heads=2, attn_num_kv_heads=1,
             attn_head_dim=16, chunk_size=16, dtype="float32")
  model = models.build_model(cfg)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), 1, 16)))
  params = jax.tree.map(lambda s: np.full(s.shape, 0.02, s.dtype), shapes)
  row = scaling.measure_length(model, params, 48, decode_steps=3, repeats=1)
  assert row["status"] == "ok" and row["prefill_s"] > 0 and row["decode_ms"] > 0
  assert row["compiled_gib"] is None or row["compiled_gib"] > 0

  fast = {"model": "hybrid", "params": 1e6, "config": {}, "rows": [
      {**row, "length": 1024}, {**row, "length": 2048, "prefill_s": 2 * row["prefill_s"]}]}
  slow = {"model": "transformer", "params": 1e6, "config": {}, "rows": [
      {**row, "length": 1024}, {"length": 2048, "status": "out of memory: RESOURCE_EXHAUSTED"}]}
  for res in (fast, slow):
    scaling.add_ratios(res, gen_tokens=0)
  assert fast["rows"][1]["prefill_ratio"] == pytest.approx(2.0)
  assert fast["rows"][1]["request_ratio"] == pytest.approx(2.0)
  md = scaling.table([slow, fast])
  assert "out of memory" in md and "earlier 8B baseline" in md and "| 16384 |" in md
  path = str(tmp_path / "scaling.png")
  scaling.plot([slow, fast], path)
  assert os.path.getsize(path) > 5000


def test_backbone_table_and_plot(study, tmp_path):
  assert study.pattern_str(("hgrn2",) * 3 + ("attn",)) == "3 hgrn2 : 1 attn"
  assert study.pattern_str(("attn",)) == "attn only"
  rows = [{"variant": v, "pattern": list(study.VARIANTS[v]["pattern"]), "params": 9.5e6,
           "average_recall": r, "mqar_accuracy": r, "passkey_accuracy": r,
           "forward_seconds_2k": t, "final_loss": 1.0}
          for v, r, t in (("transformer", 0.9, 0.2), ("hgrn2_3to1", 0.95, 0.1))]
  md = study.table(rows, {"sosm": "ValueError: no graph | layer"})
  lines = md.splitlines()
  assert lines[2].startswith("| hgrn2_3to1 | 3 hgrn2 : 1 attn | 9.500M | 95.0 |")
  assert "86.7% (6.83M, 0.136 s)" in lines[2] and "failed: ValueError: no graph / layer" in md
  path = str(tmp_path / "study.png")
  study.plot(rows, path)
  assert os.path.getsize(path) > 5000


def test_mqar_by_length_averages_over_pairs(study):
  cells = [{"length": 512, "num_pairs": 16, "accuracy": 1.0},
           {"length": 512, "num_pairs": 32, "accuracy": 0.5},
           {"length": 4096, "num_pairs": 16, "accuracy": None, "skipped": "too long"},
           {"length": 4096, "num_pairs": 32, "accuracy": 0.25}]
  md = study.mqar_by_length([{"variant": "sosm", "mqar": {"cells": cells}}])
  assert md.splitlines()[0] == "| variant | 512 | 4096 |"
  assert md.splitlines()[2] == "| sosm | 75.0 | 25.0 |"


def test_memory_mqar_classes_answers_by_where_their_pair_is_visible():
  mqar = _script("memory_mqar")
  a, b, x, y, bos = 10, 11, 20, 21, 1
  inputs = np.array([[bos, a, x, b, y, a, x, a, x, b, y, b]])   # windows of 4 tokens
  mask = np.zeros_like(inputs, np.float32)
  mask[0, [5, 7, 9, 11]] = 1                        # targets after keys a, a, b, b
  classes = mqar.answer_classes(inputs, np.roll(inputs, -1, 1), mask, window=4)
  # 5: a's pair only in window 0 (memory); 7: a x at 5-6 in its window; 9: b's pair in window 0
  # and 1 only; 11: b y at 9-10 in its window
  assert classes[0].tolist() == [0, 0, 0, 0, 0, 2, 0, 1, 0, 2, 0, 1]
  ids = np.array([[1] * 10 + [0] * 2])
  assert mqar.separate_windows(ids, 4)[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0]
