"""Evaluating a checkpoint trained with host memory: window by window with memory, or without."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from sosm_jax.eval import loading, runner, scoring
from sosm_jax.eval import memory as memory_lib
from sosm_jax.memory.segments import SegmentRunner
from sosm_jax.train import config as config_lib
from sosm_jax.train.memory_train import store_config

pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 32


def memory_config():
  """configs/curriculum.py:memory made tiny: hgrn2 + graph, 32-token windows, 3 per stream."""
  c = config_lib.base_config()
  c.model.update(architecture="sosm", pattern=("hgrn2", "graph"), num_layers=2, d_model=32,
                 mlp_dim=64, vocab_size=260, attn_num_heads=2, attn_num_kv_heads=1,
                 attn_head_dim=16, hgrn2_head_dim=16, chunk_size=16, dtype="float32")
  c.model.graph.update(window=16, semantic_dim=16, temporal_dim=8,
                       block_weights=(0.5, 0.0, 0.3, 0.2), k_max=2, k_min=1, select_block_size=8,
                       select_num_blocks=1, query_chunk=32, key_chunk=32)
  c.curriculum.update(seq_lens=(WINDOW,), steps=(1,), tokens_per_step=256)
  c.memory.update(enabled=True, segments=3, index="flat", top_k=4)
  return c


def save_memory_checkpoint(workdir, config, seed=0):
  """Random parameters (memory gates 2: memory visibly matters) saved as the trainer saves."""
  params = helpers.random_params(config, seed, constants={"memory_gate": 2.0})
  helpers.save_checkpoint(workdir, config, params, step=3)
  return params


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("memrun"))
  save_memory_checkpoint(workdir, memory_config())
  return loading.load_for_eval(workdir)


def _batch(rows, length, seed=0):
  tokens = np.random.default_rng(seed).integers(0, 256, (rows, length + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((rows, length), np.float32),
          "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()}


def test_memory_modes_resolve_as_trained(loaded):
  assert memory_lib.resolve_memory(loaded.config, "auto")
  assert memory_lib.resolve_memory(loaded.config, "on")
  assert not memory_lib.resolve_memory(loaded.config, "off")
  plain = config_lib.base_config()     # a transformer: no graph layer to read memory
  plain.model.update(architecture="transformer", pattern=("attn",))
  assert not memory_lib.resolve_memory(plain, "auto")
  with pytest.raises(ValueError, match="--memory=on:.*graph"):
    memory_lib.resolve_memory(plain, "on")
  with pytest.raises(ValueError, match="--memory='sometimes'"):
    memory_lib.resolve_memory(loaded.config, "sometimes")


def test_memory_scorer_is_the_segment_runner_and_off_is_todays_scorer(loaded):
  """3 windows: memory on = SegmentRunner.run_document's logits; off = the plain model scorer."""
  batch = _batch(3, 3 * WINDOW)          # 3 rows with batch_size 2: the last piece is padded
  on, used = memory_lib.model_scorer(loaded, batch_size=2, mode="auto")
  off, off_used = memory_lib.model_scorer(loaded, batch_size=2, mode="off")
  assert used and not off_used
  got = on(batch)
  assert on.counts.windows == 6 and on.counts.memory_edges > 0     # 2 pieces x 3 windows

  ref_runner = SegmentRunner(loaded.model, store_config(loaded.config.memory), num_streams=3)
  logits = ref_runner.run_document(loaded.params, batch["inputs"], WINDOW,
                                  positions=batch["positions"])
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
  logits = np.asarray(logits)
  want_nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(got.nll, want_nll, atol=2e-4)
  assert np.mean(got.pred == logits.argmax(-1)) > 0.99

  today = scoring.model_scorer(loaded.model, loaded.params, batch_size=2)(batch)
  plain = off(batch)
  np.testing.assert_array_equal(plain.nll, today.nll)
  np.testing.assert_array_equal(plain.pred, today.pred)
  # the first window sees no memory and nothing before it: both ways agree there, and only there
  np.testing.assert_allclose(got.nll[:, :WINDOW], plain.nll[:, :WINDOW], atol=2e-4)
  assert np.abs(got.nll[:, WINDOW:] - plain.nll[:, WINDOW:]).max() > 1e-2


def test_a_stream_forgets_the_previous_document(loaded):
  """Window 2 starts a new document in row 0: its scores do not depend on document 1 (entries
  match the querying token's document, and the stream is reset), row 1's (one document) do."""
  scorer = memory_lib.MemoryScorer(loaded.model, loaded.params, loaded.config, batch_size=2)
  a = _batch(2, 3 * WINDOW, seed=1)
  a["segment_ids"][0, 2 * WINDOW:] = 2
  a["positions"][0, 2 * WINDOW:] -= 2 * WINDOW
  b = {k: v.copy() for k, v in a.items()}
  b["inputs"][:, :WINDOW] = np.random.default_rng(2).integers(0, 256, (2, WINDOW))
  sa, sb = scorer(a), scorer(b)
  np.testing.assert_array_equal(sa.nll[0, 2 * WINDOW:], sb.nll[0, 2 * WINDOW:])
  assert np.abs(sa.nll[1, 2 * WINDOW:] - sb.nll[1, 2 * WINDOW:]).max() > 1e-4  # one document


def test_run_tasks_with_memory_reads_beyond_the_window(loaded):
  scorer, _ = memory_lib.model_scorer(loaded, batch_size=4, mode="on")
  span = memory_lib.memory_span(loaded.config)
  assert span == 3 * WINDOW
  options = runner.EvalOptions(tasks=("ppl", "passkey"), ppl_batches=1, passkey_examples=1,
                               passkey_depths=(0.0,))
  assert runner.memory_lengths(WINDOW, span) == (32, 64, 96, 192)
  report = runner.run_tasks(scorer, loaded.tokenizer, loaded.config, options,
                            batches=[_batch(2, span)], memory_span=span, show_progress=False)
  assert report["meta"]["memory_span"] == span
  assert report["perplexity"]["edges"][-1] == span          # buckets reach beyond the window
  assert [c["length"] for c in report["passkey"]["cells"]] == [32, 64, 96, 192]
  assert scorer.counts.memory_edges > 0


def test_evaluate_cli_uses_memory_as_trained(loaded, tmp_path):
  out = str(tmp_path / "report")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"),
         f"--workdir={loaded.workdir}", f"--out={out}", "--tasks=passkey", "--batch_size=2",
         "--passkey_lengths=96", "--passkey_depths=0", "--passkey_examples=2"]
  # the settings of this process (conftest, fast_compiles): its compiled programs are cached
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  assert report["meta"]["host_memory"].startswith("on (--memory=auto)")
  assert report["memory"]["windows"] == 3 and report["memory"]["memory_edges"] > 0
  with open(os.path.join(out, "report.md")) as f:
    assert "Host memory: 3 windows of 32 tokens scored" in f.read()
