"""The engine's fast decode path: serving layout (cast weights, unrolled layers) and several decode
steps per dispatch give the text of the plain path, token for token, with EOS, stop sequences and
token budgets handled inside a dispatch."""
import queue
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_model_params
from sosm_jax import models
from sosm_jax.data.tokenizers import ByteTokenizer
from sosm_jax.models.config import default_model_config
from sosm_jax.serve import engine as engine_lib
from sosm_jax.serve import layout
from test_serve_engine import until_done

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _model(dtype="float32", num_layers=4):
  cfg = default_model_config("hybrid")
  cfg.update(num_layers=num_layers, d_model=32, mlp_dim=64, vocab_size=260, attn_num_heads=2,
             attn_num_kv_heads=1, attn_head_dim=16, hgrn2_head_dim=16, chunk_size=8,
             pattern=("hgrn2", "attn"), dtype=dtype)
  model = models.build_model(cfg)
  return model, random_model_params(model)


_PROMPT = jnp.asarray(np.random.default_rng(1).integers(0, 260, (1, 11)), jnp.int32)


def test_cast_weights_are_bit_identical_in_bfloat16():
  model, params = _model("bfloat16", num_layers=2)
  cast = layout.cast_matmul_weights(params, jnp.bfloat16)
  kinds = {(p[-1].key, a.dtype.name) for p, a in jax.tree_util.tree_leaves_with_path(cast)}
  assert kinds == {("kernel", "bfloat16"), ("embedding", "bfloat16"), ("scale", "float32"),
                   ("hgrn2_lower_bounds", "float32")}
  prefill = jax.jit(model.prefill, static_argnums=2)
  step = jax.jit(model.decode_step)
  (a, ca), (b, cb) = prefill(params, _PROMPT, 16), prefill(cast, _PROMPT, 16)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(step(params, jnp.array([5]), ca)[0]),
                                np.asarray(step(cast, jnp.array([5]), cb)[0]))


def test_serving_layout_unrolls_the_layer_scan_and_keeps_the_function():
  """Same logits (float32; rounding only) for prefill and for decode steps, the batch-1 ones
  with the projections on two rows (layout.decode_step)."""
  model, params = _model()
  fast, fast_params = layout.serving_layout(model, params)
  assert not fast.cfg.scan_layers and "layer_3" in fast_params and "layers" not in fast_params
  np.testing.assert_array_equal(fast_params["layer_2"]["mlp"]["wo"]["kernel"],
                                params["layers"]["block_0"]["mlp"]["wo"]["kernel"][1])
  (a, ca) = jax.jit(model.prefill, static_argnums=2)(params, _PROMPT, 16)
  (b, cb) = jax.jit(fast.prefill, static_argnums=2)(fast_params, _PROMPT, 16)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  want, _ = jax.jit(model.decode_step)(params, jnp.array([7]), ca)
  got, _ = jax.jit(lambda p, t, c: layout.decode_step(fast, p, t, c))(fast_params,
                                                                      jnp.array([7]), cb)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="not those of a scan_layers model"):
    layout.unstack_layers(model.cfg, fast_params)


def test_one_row_matmuls_run_on_two_rows_only_inside_the_context():
  model, params = _model(num_layers=2)
  cache = model.init_cache(1, 8)
  hlo = lambda f: jax.jit(f).lower(params, jnp.array([1]), cache).as_text()
  plain = hlo(model.decode_step)
  two = hlo(lambda p, t, c: layout.decode_step(model, p, t, c))
  # the MLP's input projection of the one token: [1, 1, d_model] rows, or [2, 1, d_model]
  dot_rows = lambda text: set(re.findall(r"dot_general.*\(tensor<(\d)x1x32xf32>, tensor<32x64xf32>",
                                         text))
  assert dot_rows(plain) == {"1"} and dot_rows(two) == {"2"}


class _Letters(ByteTokenizer):
  """Ids shown as letters (clean text for any id) with a chosen EOS id."""

  def __init__(self, eos_id=ByteTokenizer.eos_id):
    super().__init__()
    self.eos_id = eos_id

  def decode(self, ids):
    return "".join(chr(97 + int(i) % 26) for i in ids if int(i) < 256)


def _texts(model, params, tokenizer, requests, decode_steps, serving_layout=True, num_slots=2):
  """[(text, finish_reason, completion_tokens)] of requests [(prompt, SamplingParams)]."""
  engine = engine_lib.Engine(model, params, tokenizer, engine_lib.EngineConfig(
      num_slots=num_slots, max_len=48, prefill_chunk=8, decode_steps=decode_steps,
      serving_layout=serving_layout)).start()
  queues = [queue.Queue() for _ in requests]
  for (prompt, sampling), q in zip(requests, queues):
    engine.submit(prompt, sampling, q.put)
  out = []
  for q in queues:
    text, done = until_done(q)
    out.append((text, done.finish_reason, done.completion_tokens))
  engine.stop()
  return out


def test_multi_step_decode_is_step_by_step_decode_token_for_token():
  """decode_steps 5 (serving layout) = decode_steps 1 (parameters as given): greedy and sampled,
  a budget that ends inside a dispatch, more requests than slots, a cache that fills up."""
  model, params = _model(num_layers=2)
  tok = ByteTokenizer()
  sp = engine_lib.SamplingParams
  requests = [("first prompt", sp(max_tokens=13, temperature=0.0, ignore_eos=True)),
              ("second one", sp(max_tokens=7, temperature=0.9, top_k=20, seed=3,
                                ignore_eos=True)),
              ("third", sp(max_tokens=9, temperature=1.0, top_p=0.8, seed=4, ignore_eos=True)),
              ("a prompt that fills the cache:", sp(max_tokens=40, temperature=0.0,
                                                   ignore_eos=True))]
  plain = _texts(model, params, tok, requests, decode_steps=1, serving_layout=False)
  fast = _texts(model, params, tok, requests, decode_steps=5)
  assert fast == plain
  assert [n for _, _, n in plain] == [13, 7, 9, 48 - 31]
  assert plain[3][1] == "length"


def test_eos_and_stop_sequences_end_a_request_inside_a_dispatch():
  """One slot (projections on two rows), 5 steps per dispatch: EOS as the 4th generated token,
  a stop string later; the text is generate's, cut there."""
  model, params = _model(num_layers=2)
  letters = _Letters()
  ids = jnp.asarray([[letters.bos_id] + letters.encode("hello")])
  greedy = [int(i) for i in model.generate(params, ids, jax.random.key(0), 12)[0, ids.shape[1]:]]
  eos = _Letters(greedy[3])
  cut = greedy.index(greedy[3])
  text = eos.decode(greedy)
  stop = eos.decode(greedy[5:7])
  out = _texts(model, params, eos, [
      ("hello", engine_lib.SamplingParams(max_tokens=12, temperature=0.0)),
      ("hello", engine_lib.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                          stop=(stop,)))], decode_steps=5, num_slots=1)
  assert out[0] == (eos.decode(greedy[:cut]), "stop", cut)
  assert out[1][:2] == (text[:text.index(stop)], "stop")
