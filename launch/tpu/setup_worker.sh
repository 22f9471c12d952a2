#!/usr/bin/env bash
# Install sosm_jax's environment on one Cloud TPU host (a TPU VM worker or an xpk container).
# Run from anywhere inside the unpacked repository; tpu_vm.py's `setup` runs it on every worker.
#   bash launch/tpu/setup_worker.sh            # a Python 3.12 venv at $SOSM_VENV (default ~/sosm_venv)
#   bash launch/tpu/setup_worker.sh --system   # into the current python3 (a container image)
# TPU VM images ship Python 3.10, older than jax needs, hence uv for a newer interpreter.
set -euo pipefail
cd "$(dirname "$0")/../.."
# The TPU runtime, and gs:// access: gcsfs for tfds/etils paths, google-cloud-storage for
# TensorBoard files (orbax writes checkpoints to gs:// by itself).
EXTRAS=("jax[tpu]" gcsfs google-cloud-storage)
if [[ "${1:-}" == "--system" ]]; then
  python3 -m pip install --no-cache-dir -r requirements.txt "${EXTRAS[@]}"
  exit 0
fi
VENV="${SOSM_VENV:-$HOME/sosm_venv}"
if ! command -v uv >/dev/null 2>&1 && [[ ! -x "$HOME/.local/bin/uv" ]]; then
  curl -LsSf https://astral.sh/uv/install.sh | sh
fi
UV="$(command -v uv || echo "$HOME/.local/bin/uv")"
"$UV" venv --python 3.12 --allow-existing "$VENV"
"$UV" pip install --python "$VENV/bin/python" -r requirements.txt "${EXTRAS[@]}"
"$VENV/bin/python" -c "import jax, flax, optax, orbax.checkpoint; print('jax', jax.__version__, 'ready')"
