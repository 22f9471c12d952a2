"""A tiny Gated DeltaNet-only model with the default layer learns MQAR on the CPU (issue 22).

The project's model, data pipeline (`synthetic:mqar`), optimizer and loss; one GDN layer (no
attention anywhere), so only the delta-rule state can bind keys to values. With the output gate
as first shipped (`silu`, fan-in initialised) such models often sat on the "some value token"
plateau for hundreds of steps (benchmarks/RESULTS.md, "Gated DeltaNet output gate").
"""
import flax.linen as nn
import jax
import numpy as np
import optax

import helpers
from sosm_jax import data as data_lib
from sosm_jax import models
from sosm_jax.eval import loading
from sosm_jax.train import config as config_lib
from sosm_jax.train import optimizer as optimizer_lib

STEPS = 250


def _train_mqar(seed: int) -> list[float]:
  """Train accuracy (answer tokens) per step of a 1-layer GDN model on 4-pair MQAR."""
  cfg = config_lib.base_config().model
  cfg.update(architecture="hybrid", pattern=("gdn",), num_layers=1, d_model=32, mlp_dim=64,
             vocab_size=260, gdn_num_heads=2, gdn_head_dim=16, chunk_size=16, dtype="float32",
             scan_layers=False)
  model = models.build_model(cfg)
  data_cfg = config_lib.base_config().data
  data_cfg.update(source="synthetic:mqar", mqar_num_pairs=4, mqar_num_queries=4,
                  task_vocab_size=64, prefetch=2)
  pipeline = data_lib.make_pipeline(data_cfg, data_lib.make_tokenizer(data_cfg), seq_len=24,
                                    batch_size=64, seed=seed, process_index=0, process_count=1)
  # jitted: op by op, each primitive of the init would be compiled alone
  params = nn.unbox(jax.jit(model.init, static_argnums=(1, 2))(jax.random.key(seed), 1, 24))
  opt_cfg = config_lib.base_config().optimizer
  opt_cfg.update(learning_rate=1e-2, warmup_steps=10, weight_decay=0.1)
  optimizer, _ = optimizer_lib.make_optimizer(opt_cfg, STEPS)
  opt_state = optimizer.init(params)

  def step(p, s, batch):
    (_, metrics), grads = jax.value_and_grad(model.loss, has_aux=True)(p, batch)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, metrics["accuracy"]

  accuracy = []
  try:
    batches = [next(pipeline) for _ in range(STEPS)]
    fast_step = helpers.compiled_for_speed(step, params, opt_state, batches[0])
    for batch in batches:
      params, opt_state, acc = fast_step(params, opt_state, batch)
      accuracy.append(acc)
  finally:
    pipeline.close()
  return [float(a) for a in accuracy]


def test_default_gdn_layer_learns_mqar():
  accuracy = _train_mqar(seed=0)
  assert np.mean(accuracy[:10]) < 0.1, "the task should start near chance"
  last = float(np.mean(accuracy[-25:]))
  assert last > 0.9, f"train accuracy over the last 25 of {STEPS} steps: {last:.3f} (want > 0.9)"


def test_config_saved_before_the_gate_key_keeps_the_silu_gate():
  saved = config_lib.base_config().to_dict()
  del saved["model"]["gdn_output_gate"]
  assert loading.config_from_dict(saved).model.gdn_output_gate == "silu"
  assert config_lib.base_config().model.gdn_output_gate == "sigmoid2"
  saved["model"]["gdn_output_gate"] = "none"
  assert loading.config_from_dict(saved).model.gdn_output_gate == "none"
