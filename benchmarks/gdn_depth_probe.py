"""Signal and gradient per layer at initialisation of a backbone-study model (issue 22, GDN at depth).

Builds a variant of benchmarks/backbone_study.py at a setting (default: firm, 12 layers, d_model
256, float32, XLA forms so it runs on CPU), takes one batch of the study's task mix, and prints per
layer: the RMS of the residual stream entering the block, of the mixer's output and of the MLP's
output, and the gradient norm of the mixer's and the MLP's parameters; then the loss at init.
A depth defect of a mixer (a branch far larger or smaller than the others, gradients vanishing
toward the bottom) shows up here before any training.

  JAX_PLATFORMS=cpu python benchmarks/gdn_depth_probe.py --variants=gdn_3to1,hgrn2_3to1
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from benchmarks import backbone_study as bb
from sosm_jax import data as data_lib
from sosm_jax import models
from sosm_jax.models.config import layer_mixers

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", ["gdn_3to1", "hgrn2_3to1"], "backbone_study variants.")
flags.DEFINE_string("setting", "firm", "backbone_study setting.")
flags.DEFINE_integer("rows", 2, "Rows of the probe batch (of the setting's first seq_len).")
flags.DEFINE_integer("seed", 0, "Init and data seed.")


def rms(x) -> float:
  return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(x, jnp.float32)))))


def norm(tree) -> float:
  """Euclidean norm of all leaves of a gradient tree."""
  return float(optax.global_norm(tree))


def probe(name: str, setting: dict, rows: int, seed: int) -> None:
  cfg = bb.variant_config(name, setting, "float32", 0, bb.TASK_MIX, seed)
  cfg.model.update(linear_impl="xla", scan_layers=False, remat="none")
  model = models.build_model(cfg.model)
  seq_len = setting["seq_lens"][0]
  params = nn.unbox(model.init(jax.random.key(seed), 1, 64))  # shapes do not depend on length
  tokenizer = data_lib.make_tokenizer(cfg.data)
  pipeline = data_lib.make_pipeline(cfg.data, tokenizer, seq_len=seq_len, batch_size=rows,
                                    seed=seed, process_index=0, process_count=1)
  batch = {k: jnp.asarray(v) for k, v in next(pipeline).items()}
  pipeline.close()
  kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
  capture = lambda m, _: m.name in ("mixer", "mlp") or (m.name or "").startswith("layer_")
  _, inter = jax.jit(lambda p: model.module.apply({"params": p}, batch["inputs"], **kwargs,
                                                  capture_intermediates=capture,
                                                  mutable=["intermediates"]))(params)
  (loss, _), grads = jax.jit(jax.value_and_grad(model.loss, has_aux=True))(params, batch)
  inter = inter["intermediates"]
  print(f"{name}: loss at init {float(loss):.3f}")
  print("layer mixer  | x_in rms | mixer out rms | mlp out rms | |grad mixer| | |grad mlp|")
  emb = None
  for i, mixer in enumerate(layer_mixers(cfg.model)):
    layer = inter[f"layer_{i}"]
    y = layer["mixer"]["__call__"][0][0]
    m = layer["mlp"]["__call__"][0]
    out = layer["__call__"][0][0]
    x_in = out - y - m
    if emb is None:
      emb = rms(x_in)
    g = grads[f"layer_{i}"]
    print(f"{i:5d} {mixer:6s} | {rms(x_in):8.3f} | {rms(y):13.3f} | {rms(m):11.3f} | "
          f"{norm(g['mixer']):11.4f} | {norm(g['mlp']):9.4f}")
  # the optimizer clips the global norm (optimizer.clip_norm, 1.0): what share the bottom takes
  print(f"embedding rms {emb:.3f}; |grad embed| {norm(grads['embed']):.4f}; global grad norm "
        f"{norm(grads):.4f}")


def main(argv):
  del argv
  for name in FLAGS.variants:
    probe(name, bb.SETTINGS[FLAGS.setting], FLAGS.rows, FLAGS.seed)


if __name__ == "__main__":
  app.run(main)
