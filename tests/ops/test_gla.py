"""Tests of sosm_jax/ops/gla/: chunked GLA and step against the reference, strong decay."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sosm_jax.ops.common import implementation as impl_lib

# the package (the attribute sosm_jax.ops.gla is the function)
hgrn2 = importlib.import_module("sosm_jax.ops.gla")

B, H, K, V = 2, 2, 16, 8


def _inputs(seed, t, dtype=jnp.float32, log_f=None):
  rng = np.random.default_rng(seed)
  rn = lambda *s: rng.standard_normal(s).astype(np.float32)
  f = 1.0 / (1.0 + np.exp(-(rn(B, t, H, K) + 1.0)))
  x = dict(
      q=rn(B, t, H, K), k=1.0 - f, v=rn(B, t, H, V),  # HGRN-2 style: k = 1 - f
      log_f=np.log(f) if log_f is None else np.full((B, t, H, K), log_f, np.float32),
      initial_state=rn(B, H, K, V))
  return {n: jnp.asarray(a, dtype if n in ("q", "k", "v") else jnp.float32) for n, a in x.items()}


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _with_grads(fn):
  """jit of x -> ((loss, (o, S)), grads) with loss = sum(o*wo) + sum(S*ws)."""
  def loss(x, wo, ws):
    o, s = fn(x["q"], x["k"], x["v"], x["log_f"], initial_state=x["initial_state"])
    return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws), (o, s)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


# Module-level compiled functions: each shape compiles once and is reused across tests.
_RUN = {"reference": _with_grads(hgrn2.gla_reference)}
_RUN.update({c: _with_grads(functools.partial(hgrn2.gla_chunked, chunk_size=c)) for c in (16, 64)})
_STEP = jax.jit(hgrn2.gla_step)
_CASES = {37: 16, 100: 64}  # time length -> chunk size (neither a multiple of the chunk)


def _run(impl, x):
  """(o, S, loss, grads) of implementation `impl` on inputs x."""
  t = x["q"].shape[1]
  rng = np.random.default_rng(t)
  wo = jnp.asarray(rng.standard_normal((B, t, H, V)), jnp.float32)
  ws = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
  (loss, (o, s)), grads = _RUN[impl](x, wo, ws)
  return o, s, loss, grads


def _assert_close(x, impl, tol=1e-4):
  o_ref, s_ref, l_ref, g_ref = _run("reference", x)
  o, s, l, g = _run(impl, x)
  assert o.shape == o_ref.shape and s.shape == (B, H, K, V)
  assert np.all(np.isfinite(o)) and np.all(np.isfinite(s))
  assert _rel_err(o, o_ref) < tol
  assert _rel_err(s, s_ref) < tol
  assert abs(float(l) - float(l_ref)) <= tol * abs(float(l_ref))
  for name in x:
    assert np.all(np.isfinite(g[name])), name
    if name != "log_f":
      assert _rel_err(g[name], g_ref[name]) < tol, name
  # d loss / d log_f is a reverse cumulative sum of terms of size |q*dq| and |k*dk| that cancel
  # almost exactly under strong decay (the true gradient is ~e^-20 there), so its float32 error is
  # relative to that scale, not to the (tiny) result itself.
  scale = max(np.max(np.abs(g_ref["log_f"])), np.max(np.abs(x["q"] * g_ref["q"])),
              np.max(np.abs(x["k"] * g_ref["k"])))
  assert np.max(np.abs(g["log_f"] - g_ref["log_f"])) < tol * scale


@pytest.mark.parametrize("t", sorted(_CASES))
def test_chunked_matches_reference_forward_and_grads(t):
  _assert_close(_inputs(t, t), _CASES[t])


@pytest.mark.parametrize("log_f", [-20.0, -0.01])
def test_strong_and_weak_decay_chunk_64(log_f):
  # log_f = -20 per step puts cumulative decays at -1280 inside one chunk of 64: the naive
  # factorisation exp(b_t) * exp(-b_i) would overflow float32 here.
  _assert_close(_inputs(11, 100, log_f=log_f), 64)


def test_mixed_extreme_decays():
  # per-channel decays spanning 0 to -30 in one sequence
  x = _inputs(12, 100)
  rng = np.random.default_rng(0)
  x["log_f"] = jnp.asarray(-30.0 * rng.uniform(size=x["log_f"].shape) ** 3, jnp.float32)
  _assert_close(x, 64)


def test_split_sequence_carries_state():
  x = _inputs(3, 74)
  o_ref, s_ref = jax.jit(hgrn2.gla_reference)(**x)
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
    o, state = _STEP(x["q"][:, i], x["k"][:, i], x["v"][:, i], x["log_f"][:, i], state)
    outs.append(o)
  assert _rel_err(jnp.stack(outs, axis=1), o_ref) < 1e-5
  assert _rel_err(state, s_ref) < 1e-5


def test_bf16_inputs_close_to_fp32_reference():
  x16 = _inputs(5, 100, jnp.bfloat16)
  x32 = {n: a.astype(jnp.float32) for n, a in x16.items()}  # the same (rounded) values in fp32
  o_ref, s_ref, _, _ = _run("reference", x32)
  o, s = jax.jit(functools.partial(hgrn2.gla_chunked, chunk_size=64))(**x16)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert _rel_err(o, o_ref) < 1.5e-2
  assert _rel_err(s, s_ref) < 1.5e-2


def test_dispatcher_routes_by_name(monkeypatch):
  calls = []
  fake = lambda tag: (lambda *a, **kw: calls.append((tag, sorted(kw))) or tag)
  monkeypatch.setattr(hgrn2, "gla_chunked", fake("xla"))
  monkeypatch.setattr(hgrn2, "gla_reference", fake("reference"))
  monkeypatch.setattr(importlib.import_module("sosm_jax.ops.gla.pallas"), "gla_pallas",
                      fake("pallas"))
  args = (None,) * 4
  assert hgrn2.gla(*args, implementation="xla", chunk_size=32) == "xla"
  assert calls[-1] == ("xla", ["chunk_size", "initial_state", "scale"])
  assert hgrn2.gla(*args, implementation="reference") == "reference"
  assert hgrn2.gla(*args) == "xla"  # cpu: chunked
  assert hgrn2.gla(*args, implementation="pallas_interpret") == "pallas"
  assert calls[-1] == ("pallas", ["chunk_size", "initial_state", "interpret", "scale"])
  with pytest.raises(ValueError, match="implementation"):
    hgrn2.gla(*args, implementation="triton")
  with pytest.raises(ValueError, match="pallas_interpret"):  # compiled kernels need a GPU
    hgrn2.gla(*args, implementation="pallas")
  monkeypatch.setattr(impl_lib.jax, "default_backend", lambda: "gpu")
  assert hgrn2.gla(*args) == "pallas"


def test_bad_arguments_raise_value_error():
  x = _inputs(7, 8)
  with pytest.raises(ValueError, match="log_f"):
    hgrn2.gla_chunked(**{**x, "log_f": x["log_f"][..., :4]})
  with pytest.raises(ValueError, match="initial_state"):
    hgrn2.gla_reference(**{**x, "initial_state": x["initial_state"][..., :3]})
  with pytest.raises(ValueError, match="sub_chunk_size"):
    hgrn2.gla_chunked(**x, chunk_size=16, sub_chunk_size=5)
