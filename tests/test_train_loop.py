"""End-to-end trainer tests on the CPU: config flags, a run whose loss falls, resume, SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import helpers
from sosm_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "curriculum.py")


# trainer behaviour, not XLA's optimisations, is tested here: compile ~3x faster
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _parse(*overrides, variant="tiny"):
  argv = ["train.py", f"--config={CONFIG}:{variant}", *overrides]
  fv = flags.FlagValues()
  # sys_argv: config_flags registers the --config.* override flags from the command line it sees.
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _tiny(**updates):
  cfg = _parse()  # data-parallel over the 8 simulated devices
  for key, value in updates.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


# One curriculum for every in-process run, so that identical step programs come from the cache
# (helpers.TINY_RUN: tests/test_faults.py compiles them first in a whole-suite session).
_RUN = {**helpers.TINY_RUN, "train.log_every": 2, "train.checkpoint_every": 3}


def _read_metrics(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_config_overrides_apply():
  cfg = _parse("--config.optimizer.learning_rate=0.01", "--config.curriculum.seq_lens=(16,32,64)",
               "--config.model.d_model=48")
  assert cfg.optimizer.learning_rate == 0.01
  assert tuple(cfg.curriculum.seq_lens) == (16, 32, 64)
  assert cfg.model.d_model == 48


@pytest.mark.parametrize("override, message", [
    ("--config.optimizer.no_such_key=1", "no_such_key"),
    ("--config.optimizer.learning_rate=fast", "learning_rate"),
])
def test_unknown_key_or_wrong_type_fails_naming_it(override, message):
  with pytest.raises(Exception, match=message):
    _parse(override)


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.learning_rate", -1.0, "config.optimizer.learning_rate"),
    ("optimizer.schedule", "linear", "config.optimizer.schedule"),
    ("train.log_every", 0, "config.train.log_every"),
    ("curriculum.remat", ("sometimes",), "config.curriculum.remat"),
])
def test_impossible_values_fail_at_start_naming_the_key(tmp_path, key, value, message):
  cfg = _tiny(**{key: value})
  with pytest.raises(ValueError, match=message):
    loop.train(cfg, str(tmp_path))


def test_unknown_variant_is_named():
  with pytest.raises(Exception, match="unknown variant 'huge'"):
    _parse(variant="huge")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """The _RUN curriculum trained straight once for the module (tests only read it)."""
  workdir = tmp_path_factory.mktemp("tiny") / "run"
  return workdir, loop.train(_tiny(**_RUN), str(workdir))


def test_tiny_run_loss_falls_and_writes_metrics_and_checkpoints(tiny_run):
  workdir, result = tiny_run
  assert result.status == "finished" and result.step == 10
  records = _read_metrics(workdir)
  losses = [r["loss"] for r in records]
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
  logged = [r for r in records if "tokens_per_second" in r]
  assert logged and all(r["tokens_per_second"] > 0 for r in logged)
  evals = _read_metrics(workdir, "eval")
  assert [e["seq_len"] for e in evals] == [32, 64]
  assert all(np.isfinite(e["val_loss"]) and 0 <= e["passkey_accuracy"] <= 1 for e in evals)
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())[-1] == 10


def _final_params(workdir, cfg):
  from sosm_jax.train import checkpoint as ckpt_lib
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.all_steps()[-1]
  state = ckpt._manager.restore(step)  # pylint: disable=protected-access
  ckpt.close()
  return step, jax.tree.map(np.asarray, state["state"]["params"])


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_run, tmp_path):
  # Resumed: a run that stops at step 8 (inside the second stage; its last checkpoint from the
  # interval is step 6), then the rest from the checkpoint the stop wrote. Without the
  # stage-end evaluations, which must not change training: the straight run has them.
  steps = {**_RUN, "train.eval_batches": 0, "train.passkey_examples": 0}
  pieces = str(tmp_path / "pieces")
  first = loop.train(_tiny(**{**steps, "train.stop_at_step": 8}), pieces)
  assert first.status == "interrupted" and first.step == 8
  result = loop.train(_tiny(**steps), pieces)
  assert result.step == 10
  step_a, params_a = _final_params(tiny_run[0], None)
  step_b, params_b = _final_params(pieces, None)
  assert step_a == step_b == 10
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_a,
               params_b)


def test_refused_stage_names_stage_and_fix(tmp_path):
  # the check as each stage starts (tests/test_preflight.py: all stages before the first step)
  cfg = _tiny(**_RUN, **{"train.memory_limit_gib": 1e-6, "train.preflight": "off"})
  with pytest.raises(loop.StageDoesNotFit, match=r"stage 0 \(seq_len 32\).*remat.*grad_accum"):
    loop.train(cfg, str(tmp_path))


def test_sigterm_leaves_a_checkpoint_that_restores(tmp_path):
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={CONFIG}:tiny",
         f"--workdir={workdir}", "--config.curriculum.steps=(100000,)",
         "--config.curriculum.seq_lens=(32,)", "--config.train.log_every=1",
         *(f"--config.{k}={v}" for k, v in helpers.TINY_RUN.items() if k.startswith("model."))]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline:
    if os.path.exists(metrics) and len(_read_metrics(workdir)) >= 3:
      break
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "Stopped at step" in out and "(signal)" in out
  step, params = _final_params(workdir, None)
  assert step >= 3 and all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))
