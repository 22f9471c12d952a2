"""Conversion to/from flash-linear-attention's HF layout: names, shapes, exact round trips, refusals."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sosm_jax import models
from sosm_jax.eval import loading
from sosm_jax.export import fla, weights
from test_export import random_params, tiny_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


def gdn_hybrid(**kw):
  return tiny_config(**{**dict(pattern=("gdn", "gdn", "attn"), num_layers=3, attn_num_heads=2,
                               attn_head_dim=16, attn_num_kv_heads=1, tie_embeddings=False,
                               gdn_output_gate="silu"), **kw})


def hgrn2_hybrid(**kw):
  return tiny_config(**{**dict(pattern=("hgrn2", "attn"), num_layers=4, hgrn2_head_dim=32,
                               attn_num_heads=2, attn_head_dim=16, attn_num_kv_heads=1), **kw})


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_gdn_hybrid_names_shapes_and_exact_round_trip():
  config = gdn_hybrid()
  params = random_params(config)
  state, fc = fla.to_fla(params, config.model)
  assert fc["model_type"] == "gated_deltanet" and fc["expand_v"] == 1.0
  assert fc["attn"]["layers"] == [2] and fc["attn"]["num_kv_heads"] == 1
  assert not fc["tie_word_embeddings"]
  # fla's parameter names and torch layouts ([out, in] linears, [C, 1, W] convs)
  layer0 = {k[len("model.layers.0."):]: v.shape for k, v in state.items()
            if k.startswith("model.layers.0.")}
  assert layer0 == {
      "attn_norm.weight": (32,), "mlp_norm.weight": (32,), "mlp.gate_proj.weight": (48, 32),
      "mlp.up_proj.weight": (48, 32), "mlp.down_proj.weight": (32, 48),
      "attn.q_proj.weight": (32, 32), "attn.k_proj.weight": (32, 32),
      "attn.v_proj.weight": (32, 32), "attn.a_proj.weight": (2, 32), "attn.b_proj.weight": (2, 32),
      "attn.g_proj.weight": (32, 32), "attn.o_proj.weight": (32, 32), "attn.o_norm.weight": (16,),
      "attn.A_log": (2,), "attn.dt_bias": (2,), "attn.q_conv1d.weight": (32, 1, 4),
      "attn.k_conv1d.weight": (32, 1, 4), "attn.v_conv1d.weight": (32, 1, 4)}
  assert state["model.layers.2.attn.k_proj.weight"].shape == (16, 32)   # one KV head
  assert state["lm_head.weight"].shape == (260, 32)
  # q_proj: output channel (head h, dim j) is row h * 16 + j of the torch weight
  kernel = params["layers"]["block_0"]["mixer"]["q_proj"]["kernel"][0]     # [32, 2, 16]
  np.testing.assert_array_equal(state["model.layers.0.attn.q_proj.weight"][16 + 3], kernel[:, 1, 3])
  conv = params["layers"]["block_1"]["mixer"]["conv_k_weight"][0]          # layer 1, [4, 32]
  np.testing.assert_array_equal(state["model.layers.1.attn.k_conv1d.weight"][:, 0, :], conv.T)

  cfg2, params2 = fla.from_fla(state, fc)
  for key in ("pattern", "num_layers", "d_model", "mlp_dim", "gdn_num_heads", "gdn_head_dim",
              "attn_num_heads", "attn_num_kv_heads", "attn_head_dim", "tie_embeddings"):
    assert cfg2[key] == config.model[key], key
  _assert_same(params2, params)


def test_hgrn2_hybrid_round_trip_through_a_fla_folder_and_a_work_directory(tmp_path):
  config = hgrn2_hybrid()
  params = random_params(config)
  out = fla.save_fla(str(tmp_path / "fla"), params, config.model)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  state, fc = fla.to_fla(params, config.model)
  assert fc["model_type"] == "hgrn2" and fc["expand_ratio"] == 32 and fc["num_heads"] == 1
  assert "lm_head.weight" not in state    # tied head
  assert state["model.lower_bounds"].shape == (4, 32)
  assert state["model.layers.0.attn.g_norm.weight"].shape == (32,)
  new, loaded_params = fla.load_fla(out)
  _assert_same(loaded_params, params)
  workdir = weights.write_workdir(str(tmp_path / "run"), new, loaded_params)
  loaded = loading.load_for_eval(workdir)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 16)), jnp.int32)
  # Same parameters; the imported config has the default chunk size (64, the test's is 8), so
  # the chunked recurrence sums in another order.
  np.testing.assert_allclose(
      np.asarray(jax.jit(loaded.model.apply)(loaded.params, tokens)),
      np.asarray(jax.jit(models.build_model(config.model).apply)(params, tokens)), atol=1e-5)


def test_differences_are_refused_with_their_name():
  with pytest.raises(ValueError, match="HGRN-2 output norm.*2 heads separately"):
    fla.fla_config(tiny_config(pattern=("hgrn2", "attn"), num_layers=2).model)
  with pytest.raises(ValueError, match="attention head dim"):
    fla.fla_config(gdn_hybrid(attn_head_dim=8).model)
  with pytest.raises(ValueError, match="one kind of linear layer"):
    fla.fla_config(tiny_config().model)   # hgrn2 + gdn + attn
  with pytest.raises(ValueError, match="factorized embedding"):
    fla.fla_config(gdn_hybrid(embed_dim=8).model)
  config = gdn_hybrid()
  state, fc = fla.to_fla(random_params(config), config.model)
  with pytest.raises(ValueError, match="expand_v=2"):
    fla.from_fla(state, {**fc, "expand_v": 2.0})
  with pytest.raises(ValueError, match="separate value heads"):
    fla.from_fla(state, {**fc, "num_v_heads": 4})
  with pytest.raises(ValueError, match="without a sosm_jax counterpart.*q_norm"):
    fla.from_fla({**state, "model.layers.2.attn.q_norm.weight": np.ones(16, np.float32)}, fc)
  with pytest.raises(ValueError, match="lack 'model.norm.weight'"):
    fla.from_fla({k: v for k, v in state.items() if k != "model.norm.weight"}, fc)


def test_export_cli_writes_and_imports_a_fla_folder(tmp_path):
  from test_export import _cli
  config = gdn_hybrid()
  params = random_params(config)
  workdir = weights.write_workdir(str(tmp_path / "run"), config, params)
  out = str(tmp_path / "fla")
  assert _cli(f"--workdir={workdir}", "--format=fla", f"--out={out}")["format"] == "fla"
  new = str(tmp_path / "imported")
  _cli(f"--import_from={out}", "--from_format=fla", f"--workdir={new}")
  _assert_same(loading.load_for_eval(new).params, params)
