"""Fine-tuning: LoRA (frozen base, exact merge, adapter-only optimizer state) and distillation (chunked KL)."""
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest
from flax import traverse_util

from sosm_jax import models
from sosm_jax.train import finetune, step as step_lib
from sosm_jax.train.state import TrainState
from recipe_configs import curriculum_config
from test_export import random_params, tiny_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config(**model):
  """test_export's tiny model with one layer of each mixer kind that LoRA targets (hgrn2 and
  attention): what these tests assert holds per layer, and each compile traces 2 layers, not 3."""
  return tiny_config(**{**dict(num_layers=2, pattern=("hgrn2", "attn")), **model})


def _ft(**kw):
  c = finetune.default_config()
  c.update(kw)
  return c


def _batch(seed=0, b=2, t=20):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (b, t + 1))
  return {"inputs": jnp.asarray(x[:, :-1], jnp.int32), "targets": jnp.asarray(x[:, 1:], jnp.int32),
          "loss_mask": jnp.asarray(rng.random((b, t)) < 0.9, jnp.float32)}


def _state(params, opt):
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=opt.init(params), nonfinite_streak=zero,
                    nonfinite_total=zero)


def test_lora_merge_is_exact_and_training_moves_only_the_adapters():
  config = _config()
  model = models.build_model(config.model)
  base = jax.tree.map(jnp.asarray, random_params(config))
  ft = _ft(lora_rank=4, init_from="x")
  lora = finetune.init_lora(jax.random.key(1), base, 4, ft.lora_targets)
  assert "layers/block_0/mixer/o_proj/kernel" in lora and "embed/embedding" not in lora
  assert lora["layers/block_0/mixer/o_proj/kernel"]["a"].shape == (1, 32, 4)   # [groups, H*Dh, R]
  wrapped = finetune.FinetuneModel(ft, model)
  params = {"base": base, "lora": lora}
  merge = jax.jit(wrapped.merged)   # op by op, each primitive would be compiled alone
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), merge(params), base)

  # merged == base + (alpha / R) A B, with A B reshaped to the kernel (o_proj: [H, Dh, D])
  path = "layers/block_0/mixer/o_proj/kernel"
  lora[path]["b"] = jax.random.normal(jax.random.key(2), lora[path]["b"].shape)
  merged = traverse_util.flatten_dict(merge(params), sep="/")
  w = traverse_util.flatten_dict(base, sep="/")[path]
  delta = (np.einsum("gir,gro->gio", lora[path]["a"], lora[path]["b"]) * 16.0 / 4).reshape(w.shape)
  np.testing.assert_allclose(merged[path], np.asarray(w) + delta, rtol=1e-6, atol=1e-6)

  opt = finetune.masked_optimizer(optax.adam(1e-2))
  state = _state(params, opt)
  sizes = lambda t: sum(x.size for x in jax.tree.leaves(t))
  # optimizer state: two moments of the adapters, nothing for the base
  assert sizes(state.opt_state) <= 2 * sizes(lora) + 8
  train_step = jax.jit(step_lib.make_train_step(wrapped.loss, opt, optax.constant_schedule(1e-2)))
  batch = _batch()
  losses = []
  for _ in range(5):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state.params["base"], base)                      # frozen bit for bit
  assert float(jnp.abs(state.params["lora"][path]["b"] - lora[path]["b"]).max()) > 0


def _reference_distill(student, s_params, teacher, t_params, batch, tau, alpha):
  """Full-logit reference of the distillation loss."""
  ls = student.apply(s_params, batch["inputs"]) / tau
  lt = teacher.apply(t_params, batch["inputs"]) / tau
  lps, lpt = jax.nn.log_softmax(ls, -1), jax.nn.log_softmax(lt, -1)
  kl = jnp.sum(jnp.exp(lpt) * (lpt - lps), -1)
  m = batch["loss_mask"]
  kl = jnp.sum(kl * m) / jnp.sum(m) * tau ** 2
  ce, _ = student.loss(s_params, batch)
  return (1 - alpha) * ce + alpha * kl, kl


def test_distillation_from_another_architecture_matches_the_full_logit_reference():
  s_cfg = _config()
  t_cfg = tiny_config(architecture="transformer", pattern=("attn",), num_layers=2, d_model=48,
                      attn_num_heads=3, attn_head_dim=16, mlp_dim=64, tie_embeddings=False)
  student, teacher = models.build_model(s_cfg.model), models.build_model(t_cfg.model)
  s_params = jax.tree.map(jnp.asarray, random_params(s_cfg, seed=1))
  t_params = jax.tree.map(jnp.asarray, random_params(t_cfg, seed=2))
  ft = _ft(teacher="t", distill_temperature=2.0, distill_weight=0.7, distill_chunk_size=8)
  wrapped = finetune.FinetuneModel(ft, student, teacher)
  params = {"student": s_params, "teacher": t_params}
  batch = _batch(t=20)            # 20 tokens: chunks of 8 with padding
  loss_fn = lambda p: wrapped.loss(p, batch)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  ref_fn = lambda sp: _reference_distill(student, sp, teacher, t_params, batch, 2.0, 0.7)[0]
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(ref_fn))(s_params)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  assert float(metrics["kl"]) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads["student"], ref_grads)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["teacher"]))
  # a teacher identical to the student: KL 0
  same = finetune.FinetuneModel(ft, student, student)
  _, m = jax.jit(same.loss)({"student": s_params, "teacher": s_params}, batch)
  assert abs(float(m["kl"])) < 1e-5


def test_finetune_config_errors_name_their_key():
  for kw, key in [(dict(lora_rank=-1), "lora_rank"), (dict(lora_rank=4), "init_from"),
                  (dict(distill_weight=1.5), "distill_weight"),
                  (dict(lora_targets="(", init_from="x"), "lora_targets")]:
    with pytest.raises(ValueError, match=f"config.finetune.{key}"):
      finetune.validate_config(_ft(**kw))
  with pytest.raises(ValueError, match="matches no parameter"):
    finetune.lora_targets(random_params(tiny_config()), "nothing_like_this")


def _trainer_config(**finetune_kw):
  c = curriculum_config("tiny")
  # one layer of each mixer kind that LoRA targets: each run traces half the tiny model's layers
  c.model.update(num_layers=2, pattern=("hgrn2", "attn"))
  c.curriculum.update(seq_lens=(32,), steps=(3,), tokens_per_step=256)
  c.train.update(eval_batches=0, passkey_examples=0, checkpoint_every=0, log_every=1)
  c.finetune.update(finetune_kw)
  return c


def test_lora_and_distillation_through_the_trainer_and_export(tmp_path):
  from safetensors.numpy import load_file
  from sosm_jax.export import weights
  from sosm_jax.train import loop
  base_cfg = _trainer_config()
  base = random_params(base_cfg)
  base_dir = weights.write_workdir(str(tmp_path / "base"), base_cfg, base)

  run = str(tmp_path / "lora")
  result = loop.train(_trainer_config(lora_rank=2, init_from=base_dir), run)
  assert result.status == "finished" and result.step == 3
  config, merged, adapters, _ = finetune.load_merged(run)
  ft = config.finetune
  # the frozen base is unchanged bit for bit: merged == the original base + the adapters
  expected = finetune.merge(jax.tree.map(jnp.asarray, base), adapters, ft.lora_alpha, ft.lora_rank)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               merged, expected)
  assert max(float(jnp.abs(ab["b"]).max()) for ab in adapters.values()) > 0   # adapters trained
  out = weights.export_workdir(run, str(tmp_path / "export"))
  exported = load_file(f"{out}/model.safetensors")
  np.testing.assert_array_equal(exported["layers.block_0.mixer.q_proj.kernel"],
                                np.asarray(merged["layers"]["block_0"]["mixer"]["q_proj"]["kernel"]))
  assert len(load_file(f"{out}/adapters.safetensors")) == 2 * len(adapters)

  # distillation: a fresh student of another size learns from the frozen base as teacher
  student = _trainer_config(teacher=base_dir, distill_chunk_size=16)
  student.model.update(d_model=48, mlp_dim=64, hgrn2_head_dim=16, attn_num_heads=3)
  result = loop.train(student, str(tmp_path / "distill"))
  assert result.status == "finished" and np.isfinite(result.last_metrics["loss"])


def _init(model, seed, seq_len):
  """model.init jitted (op by op, each primitive would be compiled alone)."""
  return jax.jit(model.init, static_argnums=(1, 2))(jax.random.key(seed), 1, seq_len)


def _flat(params):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, nn.unbox(params)), sep="/")


def test_init_by_name_loads_what_matches_and_keeps_the_rest_fresh():
  saved = random_params(_config())                         # hgrn2, attn with one kv head
  target = _config(num_layers=3, pattern=("hgrn2", "attn", "hgrn2"), attn_num_kv_heads=2)
  model = models.build_model(target.model)
  like = _init(model, 3, target.model.chunk_size)
  params, match = finetune.match_by_name(saved, like)
  got, fresh_init, old = _flat(params), _flat(like), _flat(saved)
  assert set(got) == set(fresh_init)
  # the attention's k/v (2 kv heads now) and the per-layer HGRN-2 lower bounds (2 layers now)
  assert sorted(match.reshaped) == ["hgrn2_lower_bounds", "layers/block_1/mixer/k_proj/kernel",
                                    "layers/block_1/mixer/v_proj/kernel"]
  assert match.fresh and all(p.startswith("layers/block_2/") for p in match.fresh)
  assert not match.unused
  for path in match.loaded:
    np.testing.assert_array_equal(got[path], old[path])
  for path in match.fresh + match.reshaped:
    np.testing.assert_array_equal(got[path], fresh_init[path])
  assert 0 < match.loaded_values < match.total_values
  assert "fresh (saved with another shape)" in match.summary()

  # the other way round: the saved third layer has no place in a two-layer model
  _, back = finetune.match_by_name(params, model_init := _init(
      models.build_model(_config().model), 0, 8))
  assert back.unused and not back.fresh
  with pytest.raises(ValueError, match="no parameter of the saved weights"):
    finetune.match_by_name({"something": {"else": np.zeros(3)}}, model_init)


def test_pooled_kv_heads_keep_the_layer_when_each_group_of_heads_is_equal():
  """pool_kv_heads: a k/v kernel saved with 4 kv heads starts a 2-kv-head layer as the mean of heads
  (0, 1) and (2, 3). Saved weights whose heads are equal in those pairs compute the very same
  function with 2 kv heads, so the pooled model's logits equal the saved model's (a wrong grouping,
  e.g. (0, 2) and (1, 3), would not); without pooling those kernels start fresh."""
  four = _config(attn_num_heads=4, attn_num_kv_heads=4)
  two = _config(attn_num_heads=4, attn_num_kv_heads=2)
  saved = _flat(random_params(four, seed=5))
  for name in ("k_proj", "v_proj"):
    path = f"layers/block_1/mixer/{name}/kernel"
    w = saved[path].copy()                   # [groups, embed, kv heads, head_dim]
    w[..., 1, :], w[..., 3, :] = w[..., 0, :], w[..., 2, :]
    saved[path] = w
  saved = traverse_util.unflatten_dict(saved, sep="/")
  model_two = models.build_model(two.model)
  like = _init(model_two, 1, two.model.chunk_size)
  pooled, match = finetune.match_by_name(saved, like, pool_kv_heads=True)
  assert sorted(match.pooled) == ["layers/block_1/mixer/k_proj/kernel",
                                  "layers/block_1/mixer/v_proj/kernel"]
  assert not match.reshaped and not match.fresh and match.loaded_values == match.total_values
  assert "kv heads pooled" in match.summary()
  tokens = _batch(t=16)["inputs"]
  np.testing.assert_allclose(jax.jit(model_two.apply)(pooled, tokens),
                             jax.jit(models.build_model(four.model).apply)(saved, tokens),
                             rtol=1e-5, atol=1e-5)
  _, unpooled = finetune.match_by_name(saved, like)
  assert sorted(unpooled.reshaped) == sorted(match.pooled) and not unpooled.pooled


def test_pool_kv_kernel_takes_only_kv_kernels_with_a_multiple_of_the_heads():
  w = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)       # [embed, 6 kv heads, dim]
  np.testing.assert_array_equal(finetune.pool_kv_kernel("a/k_proj/kernel", w, (2, 2, 3)),
                                w.reshape(2, 2, 3, 3).mean(axis=2))
  for path, shape in [("a/q_proj/kernel", (2, 2, 3)),         # not k/v
                      ("a/v_proj/kernel", (2, 4, 3)),         # 6 is no multiple of 4
                      ("a/k_proj/kernel", (2, 6, 3)),         # same heads: a plain load
                      ("a/k_proj/kernel", (2, 3, 2)),         # head_dim differs
                      ("a/k_proj/kernel", (3, 2, 3))]:        # embed differs
    assert finetune.pool_kv_kernel(path, w, shape) is None, (path, shape)


def test_init_match_config_errors_name_their_key():
  for kw in [dict(init_match="shape", init_from="x"), dict(init_match="by_name"),
             dict(init_match="by_name", init_from="x", lora_rank=2),
             dict(init_match="by_name", init_from="x", teacher="y")]:
    with pytest.raises(ValueError, match="config.finetune.init_match"):
      finetune.validate_config(_ft(**kw))


def test_init_by_name_through_the_trainer(tmp_path, capsys):
  from sosm_jax.export import weights
  from sosm_jax.train import loop
  base_cfg = _trainer_config()
  base_dir = weights.write_workdir(str(tmp_path / "base"), base_cfg, random_params(base_cfg))
  other = _trainer_config(init_from=base_dir)          # the attention layer with 2 kv heads
  other.model.update(attn_num_kv_heads=2)
  with pytest.raises(ValueError, match="config.finetune.init_from: its model differs"):
    loop.train(other, str(tmp_path / "same"))           # 'all' (default) checks the model
  other.finetune.init_match = "by_name"
  result = loop.train(other, str(tmp_path / "by_name"))
  assert result.status == "finished" and np.isfinite(result.last_metrics["loss"])
  out = capsys.readouterr().out
  assert "init_from by name:" in out and "k_proj/kernel" in out
