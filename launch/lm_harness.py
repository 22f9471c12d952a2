"""lm-evaluation-harness's command line with the model 'sosm_jax' registered (needs the eval extra).

Takes exactly `lm_eval`'s arguments; see sosm_jax/eval/lm_harness.py for the model_args.

  pip install -e ".[eval]"
  python launch/lm_harness.py run --model sosm_jax --model_args workdir=DIR \
      --tasks lambada_openai --batch_size 8 --output_path results/
  python launch/lm_harness.py run --model sosm_jax --model_args workdir=DIR \
      --include_path my_tasks/ --tasks my_local_task      # a local YAML task, no download
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  try:
    from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit("lm-eval is not installed; install the eval extra: pip install -e \".[eval]\"")
  from sosm_jax.eval import lm_harness  # pylint: disable=import-outside-toplevel,unused-import
  cli_evaluate()


if __name__ == "__main__":
  main()
