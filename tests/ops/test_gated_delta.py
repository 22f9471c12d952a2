"""Tests of sosm_jax/ops/gated_delta/: chunked and step forms against the sequential reference."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sosm_jax.ops import gated_delta as gd
from sosm_jax.ops.common import implementation as impl_lib

B, H, K, V = 2, 2, 16, 8


def _inputs(seed, t, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  rn = lambda *s: rng.standard_normal(s).astype(np.float32)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  x = dict(
      q=unit(rn(B, t, H, K)), k=unit(rn(B, t, H, K)), v=rn(B, t, H, V),
      # log-decays from ~-3 to ~0, so some chunks decay strongly and some barely
      g=-np.exp(rn(B, t, H) - 1.0), beta=1.0 / (1.0 + np.exp(-rn(B, t, H))),
      initial_state=rn(B, H, K, V))
  return {n: jnp.asarray(a, dtype if n in ("q", "k", "v") else jnp.float32) for n, a in x.items()}


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _with_grads(fn):
  """jit of x -> ((loss, (o, S)), grads) with loss = sum(o*wo) + sum(S*ws), fixed random wo, ws."""
  def loss(x, wo, ws):
    o, s = fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"])
    return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws), (o, s)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


# Module-level compiled functions: each shape compiles once and is reused across tests.
_RUN = {"reference": _with_grads(gd.gated_delta_rule_reference)}
_RUN.update({c: _with_grads(functools.partial(gd.gated_delta_rule_chunked, chunk_size=c))
             for c in (16, 64)})
_STEP = jax.jit(gd.gated_delta_rule_step)
_CASES = {37: 16, 100: 64}  # time length -> chunk size (neither a multiple of the chunk)


def _run(impl, x):
  """(o, S, loss, grads) of implementation `impl` on inputs x."""
  t = x["q"].shape[1]
  rng = np.random.default_rng(t)
  wo = jnp.asarray(rng.standard_normal((B, t, H, V)), jnp.float32)
  ws = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
  (loss, (o, s)), grads = _RUN[impl](x, wo, ws)
  return o, s, loss, grads


@pytest.mark.parametrize("t", sorted(_CASES))
def test_chunked_matches_reference_forward_and_grads(t):
  x = _inputs(t, t)
  o_ref, s_ref, l_ref, g_ref = _run("reference", x)
  o, s, l, g = _run(_CASES[t], x)
  assert o.shape == (B, t, H, V) and s.shape == (B, H, K, V)
  assert _rel_err(o, o_ref) < 1e-4
  assert _rel_err(s, s_ref) < 1e-4
  assert abs(float(l) - float(l_ref)) <= 1e-4 * abs(float(l_ref))
  for name in x:
    assert np.all(np.isfinite(g[name])), name
    assert _rel_err(g[name], g_ref[name]) < 1e-4, name


def test_split_sequence_carries_state():
  x = _inputs(3, 74)
  o_ref, s_ref = jax.jit(gd.gated_delta_rule_reference)(**x)
  first = {n: (a[:, :37] if n != "initial_state" else a) for n, a in x.items()}
  o1, s1, _, _ = _run(16, first)
  second = {n: a[:, 37:] for n, a in x.items() if n != "initial_state"}
  o2, s2, _, _ = _run(16, {**second, "initial_state": s1})
  assert _rel_err(jnp.concatenate([o1, o2], axis=1), o_ref) < 1e-4
  assert _rel_err(s2, s_ref) < 1e-4


def test_step_token_by_token_matches_reference():
  x = _inputs(37, 37)
  o_ref, s_ref, _, _ = _run("reference", x)
  state, outs = x["initial_state"], []
  for i in range(x["q"].shape[1]):
    o, state = _STEP(x["q"][:, i], x["k"][:, i], x["v"][:, i], x["g"][:, i], x["beta"][:, i], state)
    outs.append(o)
  assert _rel_err(jnp.stack(outs, axis=1), o_ref) < 1e-5
  assert _rel_err(state, s_ref) < 1e-5


def test_bf16_inputs_close_to_fp32_reference():
  x16 = _inputs(5, 100, jnp.bfloat16)
  x32 = {n: a.astype(jnp.float32) for n, a in x16.items()}  # the same (rounded) values in fp32
  o_ref, s_ref, _, _ = _run("reference", x32)
  o, s = jax.jit(functools.partial(gd.gated_delta_rule_chunked, chunk_size=64))(**x16)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert _rel_err(o, o_ref) < 1.5e-2
  assert _rel_err(s, s_ref) < 1.5e-2


def test_dispatcher_routes_by_name(monkeypatch):
  calls = []
  fake = lambda tag: (lambda *a, **kw: calls.append((tag, sorted(kw))) or tag)
  monkeypatch.setattr(gd, "gated_delta_rule_chunked", fake("xla"))
  monkeypatch.setattr(gd, "gated_delta_rule_reference", fake("reference"))
  monkeypatch.setattr(importlib.import_module("sosm_jax.ops.gated_delta.pallas"),
                      "gated_delta_rule_pallas", fake("pallas"))
  args = (None,) * 5
  assert gd.gated_delta_rule(*args, implementation="xla", chunk_size=32) == "xla"
  assert calls[-1] == ("xla", ["chunk_size", "initial_state", "scale"])
  assert gd.gated_delta_rule(*args, implementation="reference") == "reference"
  assert gd.gated_delta_rule(*args) == "xla"  # cpu: chunked
  assert gd.gated_delta_rule(*args, implementation="pallas_interpret") == "pallas"
  assert calls[-1] == ("pallas", ["chunk_size", "initial_state", "interpret", "scale"])
  with pytest.raises(ValueError, match="implementation"):
    gd.gated_delta_rule(*args, implementation="triton")
  with pytest.raises(ValueError, match="GPU"):
    gd.gated_delta_rule(*args, implementation="pallas")
  monkeypatch.setattr(impl_lib.jax, "default_backend", lambda: "gpu")
  # 'auto' runs this op's kernels on a GPU (verified there, ops/NOTES.md); 'xla' stays the XLA form
  assert "gated_delta_rule" in impl_lib.AUTO_PALLAS_ON_GPU
  assert gd.gated_delta_rule(*args) == ("pallas" if impl_lib._pallas_triton_available() else "xla")
  assert gd.gated_delta_rule(*args, implementation="xla") == "xla"
  assert gd.gated_delta_rule(*args, implementation="pallas") == "pallas"


def test_bad_shapes_raise_value_error():
  x = _inputs(7, 8)
  with pytest.raises(ValueError, match="beta"):
    gd.gated_delta_rule_chunked(**{**x, "beta": x["beta"][:, :4]})
  with pytest.raises(ValueError, match="initial_state"):
    gd.gated_delta_rule_reference(**{**x, "initial_state": x["initial_state"][..., :3]})
  with pytest.raises(ValueError, match="chunk_size"):
    gd.gated_delta_rule_chunked(**x, chunk_size=0)
  with pytest.raises(ValueError, match="step"):
    gd.gated_delta_rule_step(x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"])
