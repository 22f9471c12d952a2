"""The trainer's preflight (train.preflight, sosm_jax/train/startup_checks.py): every stage's step
compiled and checked against the memory limit before the first step and before the workdir is
touched; the loop then runs those executables."""
import contextlib
import dataclasses
import io
import json
import os
import sys

import numpy as np
import pytest

from sosm_jax.train import config as config_lib
from sosm_jax.train import curriculum as curriculum_lib
from sosm_jax.train import loop, startup_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# trainer behaviour, not XLA's optimisations, is tested here: compile ~3x faster
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config(**train):
  """The tiny model, three stages of one step; stage 2 holds 4x the tokens of stage 1 per
  device."""
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import curriculum  # pylint: disable=import-outside-toplevel
  c = curriculum.get_config("tiny")
  c.model.update(num_layers=2, pattern=("hgrn2", "attn"))
  c.curriculum.update(seq_lens=(32, 64, 256), steps=(1, 1, 1), global_batch=(16, 8, 8))
  c.train.update(eval_batches=0, passkey_examples=0, log_every=1, checkpoint_every=0, **train)
  return c


def _records(workdir, kind):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def _run_recording_compiles(config, workdir):
  """loop.train, recording each stage compile: (stage index, whether the workdir existed)."""
  calls = []
  compile_stage_step = loop.compile_stage_step

  def recording(model, optimizer, schedule, stage, *args, **kwargs):
    calls.append((stage.index, os.path.exists(workdir)))
    return compile_stage_step(model, optimizer, schedule, stage, *args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, "compile_stage_step", recording)
    result = loop.train(config, workdir)
  return result, calls


@pytest.fixture(scope="module")
def preflighted(tmp_path_factory):
  """A run with train.preflight='all_stages': (workdir, compile calls, result, what it printed)."""
  workdir = str(tmp_path_factory.mktemp("preflight") / "run")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    result, calls = _run_recording_compiles(_config(preflight="all_stages"), workdir)
  return workdir, calls, result, printed.getvalue()


def test_every_stage_compiles_once_before_the_workdir_then_trains(preflighted):
  workdir, calls, result, printed = preflighted
  # longest sequences first, all before the workdir exists; the loop compiled nothing again but
  # ran those executables, each at its stage's shapes
  assert calls == [(2, False), (1, False), (0, False)]
  assert "Preflight (1/3): stage 2 (seq_len 256) compiled in " in printed
  assert result.status == "finished" and result.step == 3
  stages = _records(workdir, "stage")
  assert [(r["stage"], r["step"]) for r in stages] == [(0, 0), (1, 1), (2, 2)]
  assert all(r["compiled_memory_gib"] > 0 and r["compile_seconds"] > 0 for r in stages)
  losses = [r["loss"] for r in _records(workdir, "train")]
  assert len(losses) == 3 and np.all(np.isfinite(losses))


def _snapshot(root):
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(folder, name)
      st = os.stat(path)
      out[os.path.relpath(path, root)] = (st.st_mtime_ns, None if name in dirs else
                                          open(path, "rb").read())
  return out


def test_a_stage_over_the_limit_stops_the_run_before_the_workdir_is_touched(preflighted, tmp_path):
  need = {r["stage"]: r["compiled_memory_gib"] for r in _records(preflighted[0], "stage")}
  assert need[2] > max(need[0], need[1])
  limit_gib = (max(need[0], need[1]) + need[2]) / 2   # stages 0 and 1 fit, stage 2 does not
  # an earlier run's files, and an unfinished save that opening its checkpoints would clean up
  workdir = tmp_path / "earlier"
  (workdir / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
  (workdir / "checkpoints" / "4.orbax-checkpoint-tmp-1" / "part").write_text("x")
  (workdir / "config.json").write_text("{}")
  (workdir / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
  before = _snapshot(workdir)
  config = _config(memory_limit_gib=limit_gib)   # preflight 'auto': a limit is known
  result = None
  with pytest.raises(loop.StageDoesNotFit) as error:
    result = _run_recording_compiles(config, str(workdir))
  assert result is None
  message = str(error.value)
  assert message.startswith("stage 2 (seq_len 256) needs ")
  needed, available = (float(m.split()[0]) for m in
                       (message.split(" needs ")[1], message.split(" but ")[1]))
  assert needed > available > 0
  assert "remat" in message
  assert "are available (the device's limit, or train.memory_limit_gib where set); fix: " in message
  assert _snapshot(workdir) == before


def _stages():
  return curriculum_lib.build_stages(_config().curriculum, data_parallel=8,
                                     default_remat="none", default_rope_base=1e4)


def test_which_stages_the_preflight_compiles():
  stages = _stages()   # steps [0, 1), [1, 2), [2, 3)
  pick = lambda *a: [s.index for s in startup_checks.stages_to_preflight(*a)]
  assert pick("auto", stages, 0, 0, None) == []           # a CPU: no limit to check against
  assert pick("auto", stages, 0, 0, 2**30) == [2, 1, 0]
  assert pick("all_stages", stages, 0, 0, None) == [2, 1, 0]
  assert pick("all_stages", stages, 1, 0, None) == [2, 1]  # resumed at step 1: stage 0 is done
  assert pick("all_stages", stages, 2, 3, None) == [2]
  assert pick("all_stages", stages, 0, 2, None) == [1, 0]  # stop_at_step=2: stage 2 not reached
  assert pick("off", stages, 0, 0, 2**30) == []
  with pytest.raises(ValueError, match="train.preflight"):
    pick("first", stages, 0, 0, None)
  config = _config(preflight="first")
  with pytest.raises(ValueError, match=r"config.train.preflight: 'first' is unknown"):
    config_lib.validate_config(config)


def test_newest_checkpoint_step_reads_folder_names_only(tmp_path):
  assert startup_checks.newest_checkpoint_step(str(tmp_path / "none")) == 0
  for name in ("4", "10", "12.orbax-checkpoint-tmp-3", "corrupt"):
    (tmp_path / name).mkdir()
  (tmp_path / "20").write_text("")   # a file, not a checkpoint
  assert startup_checks.newest_checkpoint_step(str(tmp_path)) == 10


# ---------------------------------------------------------------- curriculum.remat 'auto'

def test_auto_remat_tries_policies_lightest_first():
  stage = curriculum_lib.Stage(0, 64, 1, 8, 1, "auto", 10000.0, 0)
  tried = []

  def compile_with(s, fits=("full",)):
    tried.append(s.remat)
    if s.remat not in fits:
      raise startup_checks.StageDoesNotFit(f"{s.remat} does not fit")
    return "compiled", {"compile_seconds": 1.0}

  assert startup_checks.compile_fitting_remat(stage, compile_with) == (
      "compiled", {"compile_seconds": 1.0, "remat": "full"})
  assert tried == ["none", "dots", "full"]
  with pytest.raises(startup_checks.StageDoesNotFit, match="full does not fit"):
    startup_checks.compile_fitting_remat(stage, lambda s: compile_with(s, fits=()))
  tried.clear()   # a named policy is compiled as it is, never replaced
  with pytest.raises(startup_checks.StageDoesNotFit, match="none does not fit"):
    startup_checks.compile_fitting_remat(dataclasses.replace(stage, remat="none"), compile_with)
  assert tried == ["none"]


def test_auto_remat_keeps_no_remat_where_it_fits_and_recomputes_where_not(preflighted, tmp_path):
  """With a memory limit just under the last stage's need without remat (the preflighted run's),
  'auto' trains the short stages without remat and the last one with a policy that fits."""
  need_without = {r["stage"]: r["compiled_memory_gib"] for r in _records(preflighted[0], "stage")}
  limit_gib = need_without[2] - 1 / 2**30
  assert need_without[1] < limit_gib
  config = _config(preflight="all_stages", memory_limit_gib=limit_gib)
  config.curriculum.remat = ("auto", "auto", "auto")
  workdir = str(tmp_path / "run")
  result = loop.train(config, workdir)
  assert result.status == "finished"
  stages = _records(workdir, "stage")
  assert [r["remat"] for r in stages[:2]] == ["none", "none"]
  assert stages[2]["remat"] in ("dots", "full") and stages[2]["compiled_memory_gib"] <= limit_gib
