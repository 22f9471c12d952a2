"""Evaluating checkpoints: loading with checks, the model scorer, launch/evaluate.py end to end."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import helpers
from sosm_jax.data import tasks
from sosm_jax.data.tokenizers import ByteTokenizer
from sosm_jax.eval import loading, scoring
from sosm_jax.train import checkpoint as ckpt_lib
from sosm_jax.train import config as config_lib
from sosm_jax.train.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**model):
  c = config_lib.base_config()
  c.model.update({**dict(architecture="transformer", pattern=("attn",), num_layers=1, d_model=32,
                         mlp_dim=32, attn_num_heads=2, attn_num_kv_heads=1, attn_head_dim=16,
                         vocab_size=260, dtype="float32", chunk_size=16), **model})
  c.curriculum.update(seq_lens=(32,), steps=(1,), tokens_per_step=64)
  return c


def _save(workdir, config, params, step=5, meta_config=None, tokenizer=None):
  zero = np.zeros((), np.int32)
  state = TrainState(step=np.int32(step), params=params, opt_state={"mu": params},
                     nonfinite_streak=zero, nonfinite_total=zero)
  meta = {"config": (meta_config or config).to_dict(), "data_state": None, "stage": 0,
          "tokenizer": tokenizer or ByteTokenizer().identity()}
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(step, state, meta, wait=True)
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())


def _sharded(params):
  """The parameters spread over all (8 simulated) devices, as a multi-device run saves them."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  def put(a):
    spec = P(*([None] * (a.ndim - 1)), "x") if a.shape[-1] % len(jax.devices()) == 0 else P()
    return jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
  return jax.tree.map(put, params)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("evalrun"))
  config = _config()
  params = helpers.random_params(config)
  _save(workdir, config, _sharded(params))
  return workdir, config, params


def test_load_restores_the_saved_parameters(run):
  workdir, config, params = run
  loaded = loading.load_for_eval(workdir)
  assert loaded.step == 5 and loaded.config.model.d_model == 32
  assert tuple(loaded.config.model.pattern) == ("attn",)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded.params, params)
  # Saved across 8 devices, restored onto one: evaluation runs anywhere.
  assert all(len(a.sharding.device_set) == 1 for a in jax.tree.leaves(loaded.params))


def test_model_scorer_matches_the_model_loss(run):
  workdir, _, _ = run
  loaded = loading.load_for_eval(workdir)
  examples = [tasks.mqar_example(ByteTokenizer(), 32, num_pairs=4, seed=i) for i in range(3)]
  batch = tasks.example_batch(examples, ByteTokenizer().pad_id)
  scorer = scoring.model_scorer(loaded.model, loaded.params, batch_size=2)  # 3 rows: pads to 4
  scores = scorer(batch)
  loss, metrics = jax.jit(loaded.model.loss)(loaded.params, batch)
  mask = batch["loss_mask"] > 0
  assert scores.nll.shape == (3, 32)
  np.testing.assert_allclose(scores.nll[mask].mean(), float(loss), rtol=1e-5)
  np.testing.assert_allclose((scores.pred == batch["targets"])[mask].mean(),
                             float(metrics["accuracy"]), atol=1e-6)


def test_config_of_another_model_is_refused_naming_the_key(run):
  workdir, _, _ = run
  with pytest.raises(ValueError, match=r"model.d_model: checkpoint 32, given 48.*own config"):
    loading.load_for_eval(workdir, config=_config(d_model=48))
  # Keys that only change how the same parameters are computed are allowed.
  other = _config(rope_base=40000.0)
  assert loading.load_for_eval(workdir, config=other).config.model.rope_base == 40000.0


def test_a_model_key_removed_since_the_checkpoint_is_not_a_difference():
  saved = {"d_model": 32, "serving_params": False}   # a key today's code no longer has
  assert loading.compare_model_configs(saved, {"d_model": 32}) == []
  assert loading.compare_model_configs(saved, {"d_model": 48}) == [
      "model.d_model: checkpoint 32, given 48"]


def test_checkpoint_whose_parameters_do_not_fit_is_refused(tmp_path):
  # The metadata says one model, the parameters are another's (e.g. a hand-edited config).
  saved_by = _config(mlp_dim=48)
  _save(str(tmp_path), saved_by, helpers.random_params(saved_by), meta_config=_config())
  with pytest.raises(ValueError, match=r"does not fit the model.*wi_gate/kernel: checkpoint "
                                       r"\(1, 32, 48\), model \(1, 32, 32\)"):
    loading.load_for_eval(str(tmp_path))


def test_missing_checkpoint_and_other_tokenizer_are_refused(tmp_path, run):
  with pytest.raises(ValueError, match="no checkpoints/ directory"):
    loading.load_for_eval(str(tmp_path))
  os.makedirs(tmp_path / "checkpoints")
  with pytest.raises(ValueError, match="no finished checkpoint"):
    loading.load_for_eval(str(tmp_path))
  workdir, config, params = run
  with pytest.raises(ValueError, match=r"no checkpoint 7 .* there are \[5\]"):
    loading.load_for_eval(workdir, step=7)
  other = str(tmp_path / "other")
  _save(other, config, params, tokenizer={**ByteTokenizer().identity(), "vocab_size": 300})
  with pytest.raises(ValueError, match="different tokenizer"):
    loading.load_for_eval(other)


def test_evaluate_cli_writes_report_and_plots(run, tmp_path):
  workdir, _, _ = run
  out = str(tmp_path / "report")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), f"--workdir={workdir}",
         f"--out={out}", "--tasks=ppl,mqar,passkey", "--batch_size=4", "--ppl_batches=1",
         "--ppl_batch_size=2", "--mqar_lengths=32", "--mqar_pairs=4,8,64", "--mqar_examples=3",
         "--passkey_lengths=32", "--passkey_depths=0,0.5,1", "--passkey_examples=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "## MQAR accuracy" in proc.stdout and "## Passkey accuracy" in proc.stdout
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  assert report["meta"]["step"] == 5 and report["perplexity"]["tokens"] > 0
  assert [c["num_pairs"] for c in report["mqar"]["cells"]] == [4, 8, 64]
  assert report["mqar"]["cells"][2]["accuracy"] is None
  assert all(0 <= c["accuracy"] <= 1 for c in report["passkey"]["cells"])
  for name in ("report.md", "loss_by_position.png", "mqar_heatmap.png", "passkey_heatmap.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
