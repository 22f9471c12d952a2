"""Train (or resume) a model: python launch/train.py --config=configs/curriculum.py[:variant]."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import jax
from ml_collections import config_flags

from sosm_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/curriculum.py:smoke", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (checkpoints, metrics); "
                               "default: the config's workdir. Re-running with it resumes.")


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
  result = loop.train(config, workdir)
  if jax.process_index() == 0:
    print(f"{result.status} at step {result.step}; checkpoints and metrics in {workdir}", flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
