"""serve/onerow.py: the decode step written for one token per row over folded serving parameters
is the model's decode step (logits within rounding, the same cache, the same greedy tokens), for
the hybrid and the transformer, batch 1 (two-row residual stream) and batch 2; fewer launched
ops than layout.decode_step; the fused kernels (onerow.fuse_params) hold their members side by
side; unsupported models are refused; the engine decodes one slot through it (generate's text) and
falls back where it does not apply."""
import functools
import queue

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_model_params
from sosm_jax import models
from sosm_jax.data.tokenizers import ByteTokenizer
from sosm_jax.layers import hgrn2
from sosm_jax.models.config import default_model_config
from sosm_jax.serve import engine as engine_lib
from sosm_jax.serve import layout, onerow
from sosm_jax.train import hlo_stats
from test_serve_engine import until_done

pytestmark = pytest.mark.usefixtures("fast_compiles")

_SMALL = dict(num_layers=4, d_model=32, mlp_dim=64, vocab_size=260, attn_num_heads=4,
              attn_num_kv_heads=2, attn_head_dim=8, hgrn2_head_dim=16, chunk_size=8,
              dtype="float32")
_CASES = {"hybrid": dict(pattern=("hgrn2", "attn")), "transformer": dict(scan_layers=False)}


def _model(case, **changes):
  cfg = default_model_config("transformer" if case == "transformer" else "hybrid")
  cfg.update({**_SMALL, **_CASES[case], **changes})
  model = models.build_model(cfg)
  # norm scales 1 +- 0.3, so that folding them is tested
  return model, random_model_params(model, offsets={"scale": 1.0})


def _run(model, params, step, batch, n=6, step_params=None):
  """Prefill a prompt (model, params), then n greedy steps through `step` (with step_params, by
  default params) -> (logits `[n, B, V]`, tokens, cache)."""
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, 260, (batch, 11)), jnp.int32)
  logits, cache = jax.jit(model.prefill, static_argnums=2)(params, prompt, 24)
  params = params if step_params is None else step_params
  step = jax.jit(step)
  token, out = jnp.argmax(logits[:, -1], -1), []
  for _ in range(n):
    step_logits, cache = step(params, token, cache)
    out.append(np.asarray(step_logits))
    token = jnp.argmax(step_logits, -1)
  out = np.stack(out)
  return out, out.argmax(-1), cache


@pytest.mark.parametrize("case,batch", [("hybrid", 1), ("hybrid", 2), ("transformer", 1)])
def test_onerow_step_is_the_model_step(case, batch):
  model, params = _model(case)
  fast, fast_params = layout.serving_layout(model, params)
  folded = onerow.fold_params(fast.cfg, fast_params)
  want, want_tokens, want_cache = _run(fast, fast_params,
                                       functools.partial(layout.decode_step, fast), batch)
  got, got_tokens, got_cache = _run(fast, fast_params,
                                    functools.partial(onerow.decode_step, fast.cfg), batch,
                                    step_params=folded)
  # float32 rounding: fused kernels with folded scales sum in another order (logits ~3: 5e-5
  # absolute is a few ulp of float32 over 6 steps of 4 layers)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)
  np.testing.assert_array_equal(got_tokens, want_tokens)
  assert jax.tree.structure(got_cache) == jax.tree.structure(want_cache)
  for g, w in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=5e-5)
  # and the checkpoint model's own step (scan layers, float32 weights)
  base, base_tokens, _ = _run(model, params, model.decode_step, batch)
  np.testing.assert_allclose(got, base, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got_tokens, base_tokens)


def test_onerow_step_in_bfloat16_is_the_model_step_within_rounding():
  model, params = _model("hybrid", dtype="bfloat16")
  fast, fast_params = layout.serving_layout(model, params)
  folded = onerow.fold_params(fast.cfg, fast_params)
  want, _, _ = _run(fast, fast_params, functools.partial(layout.decode_step, fast), 1, n=1)
  got, _, _ = _run(fast, fast_params, functools.partial(onerow.decode_step, fast.cfg), 1, n=1,
                   step_params=folded)
  scale = np.abs(want).max()
  assert np.abs(got - want).max() < 0.03 * scale, (np.abs(got - want).max(), scale)


def test_fold_params_fuses_the_projections_and_moves_the_norm_scales_into_the_kernels():
  model, params = _model("hybrid")
  fast, fast_params = layout.serving_layout(model, params)
  folded = onerow.fold_params(fast.cfg, fast_params)
  layer = fast_params["layer_0"]
  assert set(folded["layer_0"]) == {"mixer", "mlp"}
  assert set(folded["layer_0"]["mixer"]) == {"qfi_proj", "o_proj"}
  assert set(folded["layer_1"]["mixer"]) == {"qkv_proj", "o_proj"}
  assert "hgrn2_lower_bounds" not in folded and "hgrn2_cumulative_lower_bounds" in folded
  gate_up = np.concatenate([layer["mlp"]["wi_gate"]["kernel"], layer["mlp"]["wi_up"]["kernel"]], 1)
  np.testing.assert_allclose(
      folded["layer_0"]["mlp"]["wi"]["kernel"],
      gate_up * layer["mlp_norm"]["scale"][:, None], rtol=1e-6)
  np.testing.assert_allclose(
      folded["layer_0"]["mixer"]["o_proj"]["kernel"],
      layer["mixer"]["o_proj"]["kernel"] * layer["mixer"]["o_norm"]["scale"][..., None],
      rtol=1e-6)
  np.testing.assert_allclose(folded["final_norm"]["scale"], fast_params["final_norm"]["scale"])


def test_fuse_params_puts_each_groups_kernels_side_by_side():
  """onerow.fuse_params (the steps above check the fused kernels through onerow's step): each
  group's kernels side by side in the layers' order, the HGRN-2 bounds cumulated, a mixer
  without groups (Gated DeltaNet) left as it is; fusing twice or a scan_layers tree is refused."""
  model, params = _model("hybrid", pattern=("hgrn2", "attn", "gdn"), num_layers=3,
                         gdn_num_heads=2, gdn_head_dim=16, scan_layers=False)
  fused = onerow.fuse_params(model.cfg, params)
  flat = lambda kernel: kernel.reshape(kernel.shape[0], -1)
  for layer, group, members in (("layer_0", "qfi_proj", ("q_proj", "f_proj", "i_proj")),
                                ("layer_1", "qkv_proj", ("q_proj", "k_proj", "v_proj"))):
    expected = np.concatenate([flat(params[layer]["mixer"][m]["kernel"]) for m in members], 1)
    np.testing.assert_array_equal(fused[layer]["mixer"][group]["kernel"], expected)
    assert not set(members) & set(fused[layer]["mixer"])
  mlp = params["layer_2"]["mlp"]
  np.testing.assert_array_equal(fused["layer_2"]["mlp"]["wi"]["kernel"], np.concatenate(
      [mlp["wi_gate"]["kernel"], mlp["wi_up"]["kernel"]], 1))
  assert fused["layer_2"]["mixer"].keys() == params["layer_2"]["mixer"].keys()
  np.testing.assert_allclose(fused["hgrn2_cumulative_lower_bounds"],
                             np.asarray(hgrn2.cumulative_lower_bounds(
                                 jnp.asarray(params["hgrn2_lower_bounds"]))))
  with pytest.raises(ValueError, match="fused already"):
    onerow.fuse_params(model.cfg, fused)
  model, params = _model("hybrid")
  with pytest.raises(ValueError, match="unstack_layers first"):
    onerow.fuse_params(model.cfg, params)


def _launched(model, params, step):
  cache = jax.eval_shape(lambda: model.init_cache(1, 16))
  text = jax.jit(step).lower(params, jax.ShapeDtypeStruct((1,), jnp.int32), cache).compile(
      ).as_text()
  comps, entry = hlo_stats.parse_computations(text)
  ops = [instr.opcode for instr in comps[entry]]
  free = ("parameter", "get-tuple-element", "tuple", "constant", "bitcast")
  return sum(op not in free for op in ops), ops.count("concatenate")


def test_onerow_step_launches_fewer_ops():
  """No copy of the row before each projection: fewer launched ops (CPU compile) and no
  unfused concatenate."""
  model, params = _model("hybrid")
  fast, fast_params = layout.serving_layout(model, params)
  before, _ = _launched(fast, fast_params, functools.partial(layout.decode_step, fast))
  after, concats = _launched(fast, onerow.fold_params(fast.cfg, fast_params),
                             functools.partial(onerow.decode_step, fast.cfg))
  assert after < before, (after, before)
  assert concats == 0


def test_unsupported_models_are_refused():
  model, params = _model("hybrid", pattern=("hgrn2", "gdn"), gdn_num_heads=2, gdn_head_dim=16)
  fast, fast_params = layout.serving_layout(model, params)
  assert "gdn" in onerow.unsupported_reason(fast.cfg)
  with pytest.raises(ValueError, match="not supported"):
    onerow.fold_params(fast.cfg, fast_params)
  model, params = _model("hybrid")
  assert "serving layout" in onerow.unsupported_reason(model.cfg)
  with pytest.raises(ValueError, match="serving layout"):
    onerow.decode_step(model.cfg, params, jnp.zeros((1,), jnp.int32), model.init_cache(1, 16))
  fast, fast_params = layout.serving_layout(model, params)
  folded = onerow.fold_params(fast.cfg, fast_params)
  with pytest.raises(ValueError, match="not those of an unrolled model as trained"):   # twice
    onerow.fold_params(fast.cfg, folded)


def _engine(model, params, num_slots):
  return engine_lib.Engine(model, params, ByteTokenizer(), engine_lib.EngineConfig(
      num_slots=num_slots, max_len=32, prefill_chunk=8, decode_steps=4))


def test_engine_decodes_one_slot_through_onerow_with_generates_text():
  """One slot, the hybrid: onerow (its folded parameters, the serving-layout model's prefill);
  the greedy text (up to 10 tokens, 4 a dispatch) is generate's with the checkpoint parameters."""
  model, params = _model("hybrid")
  engine = _engine(model, params, num_slots=1)
  assert engine.decode_path == "onerow"
  assert "wi" in engine._step_params["layer_0"]["mlp"]   # pylint: disable=protected-access
  engine.start()
  events = queue.Queue()
  prompt, n = "a prompt of 20 bytes", 10
  engine.submit(prompt, engine_lib.SamplingParams(max_tokens=n, temperature=0.0), events.put)
  text, done = until_done(events)
  engine.stop()
  ids = jnp.asarray([engine.encode(prompt)])
  want = list(np.asarray(model.generate(params, ids, jax.random.key(0), n)[0, ids.shape[1]:]))
  eos = ByteTokenizer.eos_id
  want = want[:want.index(eos)] if eos in want else want
  assert done.completion_tokens == len(want) and len(want) > 4   # past the first dispatch
  assert text == ByteTokenizer().decode(want)


def test_engine_falls_back_where_onerow_does_not_apply():
  model, params = _model("hybrid", pattern=("hgrn2", "gdn"), gdn_num_heads=2, gdn_head_dim=16)
  assert _engine(model, params, num_slots=1).decode_path == "two_rows"
  model, params = _model("hybrid")
  assert _engine(model, params, num_slots=2).decode_path == "model"
