"""Export and import: safetensors folders round-trip bit for bit; StableHLO and ONNX programs match JAX."""
import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from sosm_jax import models
from sosm_jax.eval import loading
from sosm_jax.export import weights
from sosm_jax.parallel import LOGICAL_AXIS_RULES, make_mesh
from sosm_jax.train import config as config_lib
from sosm_jax.train import optimizer as optimizer_lib
from sosm_jax.train import state as state_lib
from sosm_jax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("fast_compiles")


def tiny_config(**model):
  c = config_lib.base_config()
  c.model.update({**dict(architecture="hybrid", pattern=("hgrn2", "gdn", "attn"), num_layers=3,
                         d_model=32, mlp_dim=48, attn_num_heads=2, attn_num_kv_heads=1,
                         attn_head_dim=16, hgrn2_head_dim=16, gdn_num_heads=2, gdn_head_dim=16,
                         vocab_size=260, dtype="float32", chunk_size=8), **model})
  c.curriculum.update(seq_lens=(16,), steps=(2,), tokens_per_step=32)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A work directory with a checkpoint of random parameters (as a training run leaves one)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config()
  params = random_params(config)
  weights.write_workdir(workdir, config, params)
  return workdir, config, params


def test_safetensors_round_trip_is_bit_exact(trained, tmp_path):
  workdir, config, params = trained
  out = str(tmp_path / "export")
  weights.export_workdir(workdir, out)
  with open(os.path.join(out, "config.json")) as f:
    header = json.load(f)
  assert header["format"] == "sosm_jax" and header["config"]["model"]["d_model"] == 32
  assert header["tokenizer"]["kind"] == "byte"
  from safetensors.numpy import load_file
  flat = load_file(os.path.join(out, "model.safetensors"))
  assert "layers.block_0.mixer.q_proj.kernel" in flat and "embed.embedding" in flat

  new = str(tmp_path / "imported")
  weights.import_to_workdir(out, new)
  loaded = loading.load_for_eval(new)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded.params, params)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)), jnp.int32)
  model = models.build_model(config.model)
  # jitted: op by op, each primitive would be compiled alone
  np.testing.assert_array_equal(np.asarray(jax.jit(loaded.model.apply)(loaded.params, tokens)),
                                np.asarray(jax.jit(model.apply)(params, tokens)))


def test_imported_workdir_resumes_in_the_trainer(trained, tmp_path):
  """The trainer's own restore path (TrainState with optimizer state) reads the import."""
  workdir, config, params = trained
  out = str(tmp_path / "export")
  weights.export_workdir(workdir, out)
  new = weights.import_to_workdir(out, str(tmp_path / "new"))
  model = models.build_model(config.model)
  init = lambda: model.init(jax.random.key(0), 1, 8)
  optimizer, _ = optimizer_lib.make_optimizer(config.optimizer, 10)
  mesh = make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    shardings = state_lib.state_shardings(init, optimizer, mesh)
    abstract = state_lib.abstract_train_state(shardings, init, optimizer)
  ckpt = Checkpointer(os.path.join(new, "checkpoints"))
  state, meta, step = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 0 and int(state.step) == 0 and meta["data_state"] is None
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params, params)


def test_import_refuses_parameters_of_another_model(trained, tmp_path):
  workdir, _, _ = trained
  out = str(tmp_path / "export")
  weights.export_workdir(workdir, out)
  with open(os.path.join(out, "config.json")) as f:
    header = json.load(f)
  header["config"]["model"]["mlp_dim"] = 64
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(header, f)
  with pytest.raises(ValueError, match=r"wi_gate.kernel: file \(1, 32, 48\), model \(1, 32, 64\)"):
    weights.import_to_workdir(out, str(tmp_path / "new"))
  with pytest.raises(ValueError, match="not an export folder"):
    weights.import_to_workdir(str(tmp_path), str(tmp_path / "new2"))
  with pytest.raises(ValueError, match="already holds checkpoints"):
    header["config"]["model"]["mlp_dim"] = 48
    with open(os.path.join(out, "config.json"), "w") as f:
      json.dump(header, f)
    weights.import_to_workdir(out, workdir)


# StableHLO and ONNX programs: equal to JAX's outputs within these (float32 on the CPU; the
# exported programs are the same math, reassociated by another compiler for ONNX).
STABLEHLO_ATOL = 1e-5
ONNX_ATOL = 1e-4


def test_stablehlo_forward_and_decode_match_jax(trained, tmp_path):
  from sosm_jax.export import programs
  _, config, params = trained
  out = str(tmp_path / "shlo")
  shapes = dict(batch_size=2, seq_len=16, max_len=24)
  paths = programs.export_stablehlo(config.model, params, out, **shapes)
  assert "stablehlo" in open(os.path.join(out, "forward.mlir")).read()
  assert set(paths) == {"forward", "decode"}
  portable = programs.export_model_config(config.model)   # no Triton kernel even on a GPU
  assert (portable.attn_impl, portable.attn_decode_impl) == ("xla", "xla")
  diffs = programs.compare(config.model, params, out, kind="stablehlo", **shapes)
  assert diffs["forward_logits"] <= STABLEHLO_ATOL, diffs
  assert diffs["decode_logits"] <= STABLEHLO_ATOL and diffs["decode_cache"] <= STABLEHLO_ATOL, diffs


HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("jax2onnx", "onnxruntime"))


@pytest.mark.skipif(not HAVE_ONNX, reason="jax2onnx/onnxruntime are not installed (the 'export' "
                    "extra plus `pip install --no-deps jax2onnx`; .ci/run installs them)")
def test_onnx_forward_and_decode_match_jax_in_onnxruntime(trained, tmp_path):
  from sosm_jax.export import programs
  _, config, params = trained
  out = str(tmp_path / "onnx")
  shapes = dict(batch_size=2, seq_len=16, max_len=24)
  programs.export_onnx(config.model, params, out, **shapes)
  io = json.load(open(os.path.join(out, "onnx_io.json")))
  assert io["decode"]["inputs"][0] == "token" and len(io["decode"]["cache"]) > 3
  diffs = programs.compare(config.model, params, out, kind="onnx", **shapes)
  assert diffs["logit_scale"] > 1.0    # the comparison is not between near-zero outputs
  assert diffs["forward_logits"] <= ONNX_ATOL, diffs
  assert diffs["decode_logits"] <= ONNX_ATOL and diffs["decode_cache"] <= ONNX_ATOL, diffs


def _cli(*args):
  # one CPU device, compiled as the test session compiles (tests/conftest.py's XLA flags)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export.py"), *args],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_export_cli_stablehlo_then_import(trained, tmp_path):
  workdir, _, params = trained
  out = str(tmp_path / "out")
  result = _cli(f"--workdir={workdir}", "--format=stablehlo", f"--out={out}", "--batch_size=1",
                "--seq_len=16", "--max_len=20")
  assert result["max_abs_diff"]["forward_logits"] <= STABLEHLO_ATOL, result
  assert os.path.exists(os.path.join(out, "decode.jax_exported"))
  new = str(tmp_path / "new")
  assert _cli(f"--import_from={out}", f"--workdir={new}")["workdir"] == new
  loaded = loading.load_for_eval(new)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded.params, params)


def test_export_carries_a_hugging_face_tokenizer(tmp_path):
  from test_data_sources import _hf_tokenizer_dir
  folder = _hf_tokenizer_dir(str(tmp_path / "tok"))
  config = tiny_config(vocab_size=300)
  config.data.tokenizer = f"hf:{folder}"
  params = random_params(config)
  run = weights.write_workdir(str(tmp_path / "run"), config, params)
  out = weights.export_workdir(run, str(tmp_path / "export"))
  assert sorted(os.listdir(os.path.join(out, "tokenizer"))) == ["tokenizer.json",
                                                                 "tokenizer_config.json"]
  new = weights.import_to_workdir(out, str(tmp_path / "new"))
  loaded = loading.load_for_eval(new)    # checks the tokenizer's identity against the checkpoint
  assert loaded.tokenizer.identity()["kind"] == "hf" and loaded.tokenizer.bos_id == 1
  assert loaded.config.data.tokenizer.startswith(f"hf:{new}")
