"""Train (or resume) a model: python launch/train.py --config=configs/curriculum.py[:variant]."""
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import jax
from ml_collections import config_flags

from sosm_jax.train import checkpoint as ckpt_lib
from sosm_jax.train import config as config_lib
from sosm_jax.train import loop
from sosm_jax.train import resume as resume_lib
from sosm_jax.train import startup_checks

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/curriculum.py:smoke", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (checkpoints, metrics); "
                               "default: the config's workdir. Re-running with it resumes.")

# Errors that are the user's to fix: their message says how, a traceback would only hide it.
_USER_ERRORS = (resume_lib.ResumeRefused, startup_checks.InputCheckFailed, ckpt_lib.SaveFailed,
                loop.NonFiniteLoss, loop.StageDoesNotFit)


def _check_overrides(argv: list[str]) -> None:
  """Names an unknown or repeated --config.* override before the flag parser sees it."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    return   # the flag parser reports it
  module_spec = importlib.util.spec_from_file_location("_train_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
  except Exception:  # pylint: disable=broad-except  (the flag parser reports it)
    return
  try:
    config_lib.check_override_flags(argv, config)
  except ValueError as e:
    sys.exit(f"FATAL Flags parsing error: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO logs (orbax, grain) only when asked for
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  workdir = _WORKDIR.value or config.workdir or "workdir/run"
  if "://" not in workdir:  # a bucket (gs://BUCKET/PATH) is used as given
    workdir = os.path.abspath(workdir)
  print(f"Work directory: {workdir}", flush=True)
  try:
    result = loop.train(config, workdir)
  except _USER_ERRORS as e:
    sys.exit(f"error: {e}")
  except ValueError as e:
    if not str(e).startswith("config."):
      raise
    sys.exit(f"error: {e}")
  if jax.process_index() == 0:
    print(f"{result.status} at step {result.step}; checkpoints and metrics in {workdir}", flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  _check_overrides(sys.argv)
  app.run(main)
