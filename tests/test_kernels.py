"""Fast linear-attention paths (`sosm_jax.ops.kernels`) against the sequential references.

Every fast path (pure-XLA recurrence and the Pallas kernel; Pallas runs in interpret mode on CPU
and compiled on a GPU) is checked forward AND gradients on random inputs, with lengths that are
not a multiple of the chunk, with and without an initial state, in fp32 and bf16.
On a GPU: `JAX_PLATFORMS=cuda pytest -q tests/test_kernels.py`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sosm_jax.ops import kernels
from sosm_jax.ops.gated_delta import gated_delta_rule_reference
from sosm_jax.ops.hgrn2 import gla_reference
from sosm_jax.ops.kernels import xla_fast

ON_GPU = jax.default_backend() == "gpu"
BACKENDS = ("xla", "pallas")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "non-finite values"
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(op, seed, b=2, t=45, h=2, dk=16, dv=32, with_state=True):
  rng = np.random.default_rng(seed)
  q = _unit(rng.normal(size=(b, t, h, dk)))
  k = _unit(rng.normal(size=(b, t, h, dk)))
  v = rng.normal(size=(b, t, h, dv))
  if op == "gated_delta_rule":
    gates = (-rng.uniform(0.0, 0.4, size=(b, t, h)), rng.uniform(0.05, 0.95, size=(b, t, h)))
  else:  # HGRN-2 style: k = 1 - f, strong per-channel decays included
    f = rng.uniform(0.02, 0.999, size=(b, t, h, dk))
    k = 1.0 - f
    gates = (np.log(f),)
  h0 = rng.normal(size=(b, h, dk, dv)) if with_state else None
  arrays = [jnp.asarray(x, jnp.float32) for x in (q, k, v) + gates]
  return arrays, (None if h0 is None else jnp.asarray(h0, jnp.float32))


def _outputs_and_grads(fn, seed):
  """jit(args, h0 -> ((o, state), (d args, d h0))) for loss sum(o * R1) + sum(state * R2).

  Fixed random cotangents exercise every output; one compilation gives values and gradients.
  """
  def loss(args, h0):
    o, s = fn(*args, initial_state=h0)
    r = np.random.default_rng(seed + 1)
    r1 = jnp.asarray(r.normal(size=o.shape), jnp.float32)
    r2 = jnp.asarray(r.normal(size=s.shape), jnp.float32)
    return jnp.sum(o.astype(jnp.float32) * r1) + jnp.sum(s * r2), (o, s)

  def run(args, h0):
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(args, h0)
    return out, grads
  return jax.jit(run)


def _reference(op):
  return gated_delta_rule_reference if op == "gated_delta_rule" else gla_reference


def _fast(op, backend, chunk):
  fn = kernels.fast_path(op, backend, interpret=not ON_GPU, block_v=16)
  return functools.partial(fn, chunk_size=chunk)


@functools.lru_cache(maxsize=None)
def _ref_results(op, seed, with_state):
  args, h0 = _inputs(op, seed, with_state=with_state)
  out, grads = _outputs_and_grads(_reference(op), seed)(args, h0)
  return args, h0, out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", kernels.NAMES)
@pytest.mark.parametrize("with_state", [True, False])
def test_fast_path_matches_reference_fp32(op, backend, with_state):
  seed = 3 if with_state else 4
  args, h0, (ro, rs), (rga, rgh) = _ref_results(op, seed, with_state)
  (o, s), (ga, gh) = _outputs_and_grads(_fast(op, backend, chunk=16), seed)(args, h0)
  assert o.shape == ro.shape and s.shape == rs.shape
  assert _rel(o, ro) < 2e-4 and _rel(s, rs) < 2e-4
  for name, x, y in zip("qkvgb", ga, rga):
    assert _rel(x, y) < 5e-4, f"d{name}"
  if with_state:
    assert _rel(gh, rgh) < 5e-4
  else:
    assert gh is None


@pytest.mark.parametrize("op", kernels.NAMES)
def test_fast_path_bf16(op):
  """bf16 inputs: bf16 matmul operands with fp32 accumulation; error at bf16 level."""
  args, h0, (ro, rs), (rga, _) = _ref_results(op, 3, True)
  bf = [x.astype(jnp.bfloat16) for x in args[:3]] + list(args[3:])
  (o, s), (ga, _) = _outputs_and_grads(_fast(op, "pallas", chunk=32), 3)(bf, h0)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert _rel(o, ro) < 3e-2 and _rel(s, rs) < 3e-2
  for name, x, y in zip("qkvgb", ga, rga):
    assert _rel(x, y) < 5e-2, f"d{name}"


def test_unit_lower_inverse_and_its_gradient():
  rng = np.random.default_rng(11)
  n = 32  # two 16-blocks and one merge
  lower = np.tril(rng.normal(size=(2, n, n)) * 0.2, -1)
  t = xla_fast.unit_lower_inverse(jnp.asarray(lower, jnp.float32))
  want = np.linalg.inv(np.eye(n) + lower)
  assert _rel(t, want) < 1e-5
  cot = jnp.asarray(rng.normal(size=lower.shape), jnp.float32)
  solve = lambda l: jnp.linalg.inv(jnp.eye(n) + l)
  g = jax.grad(lambda l: jnp.sum(xla_fast.unit_lower_inverse(l) * cot))(jnp.asarray(lower))
  g_ref = jax.grad(lambda l: jnp.sum(solve(l) * cot))(jnp.asarray(lower, jnp.float32))
  assert _rel(g, np.tril(np.asarray(g_ref), -1)) < 1e-4


def test_registry():
  for name in kernels.NAMES:
    fn = kernels.get(name)
    assert (fn is not None) == ON_GPU
  with pytest.raises(ValueError, match="unknown op"):
    kernels.get("mamba")
  with pytest.raises(ValueError, match="backend"):
    args, h0 = _inputs("gla", 0, t=8)
    kernels.fast_path("gla", "cuda")(*args, initial_state=h0, chunk_size=8)


def test_bad_shapes_raise():
  args, h0 = _inputs("gated_delta_rule", 0, t=8)
  fn = kernels.fast_path("gated_delta_rule", "xla")
  with pytest.raises(ValueError, match="initial_state"):
    fn(*args, initial_state=h0[:, :1], chunk_size=8)
  with pytest.raises(ValueError, match="beta"):
    fn(*args[:4], args[4][:, :4], initial_state=h0, chunk_size=8)


def test_gdn_prep_backward_kernel_matches_xla_form():
  """Both backward forms of the WY preparation (Pallas kernel and batched XLA) agree."""
  from sosm_jax.ops.kernels import pallas_gdn  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(5)
  b, t, h, dk, dv, c = 1, 32, 2, 16, 16, 16
  k = jnp.asarray(_unit(rng.normal(size=(b, t, h, dk))), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, h, dv)), jnp.float32)
  beta = jnp.asarray(rng.uniform(0.1, 0.9, size=(b * h, t)), jnp.float32)
  gam = jnp.asarray(np.cumsum(-rng.uniform(0, 0.3, size=(b * h, t // c, c)), -1).reshape(b * h, t),
                    jnp.float32)
  *_, tmat = pallas_gdn.prep_forward(k, v, beta, gam, chunk=c, interpret=not ON_GPU)
  cts = [jnp.asarray(rng.normal(size=(b * h, t, d)), jnp.float32) for d in (dk, dv, dk)]
  want = pallas_gdn.prep_backward_xla(k, v, beta, gam, tmat, *cts, chunk=c)
  got = pallas_gdn.prep_backward(k, v, beta, gam, tmat, *cts, chunk=c, interpret=not ON_GPU)
  for x, y in zip(got, want):
    assert _rel(x, y) < 1e-4


@pytest.mark.parametrize("op,path", [("gated_delta_rule", None), ("gla", "parallel"),
                                     ("gla", "chunk"), ("gla", "legacy"), ("gla", "split"),
                                     ("gla", "split_exact")])
def test_pallas_chunk64_every_sub_block(op, path, monkeypatch):
  """Chunk 64 = four 16-token sub-blocks (GLA scores below, on and above the diagonal blocks);
  two chunks plus a partial one, with an initial state; every GLA Pallas path."""
  from sosm_jax.ops.kernels import pallas_gla, pallas_gla_split  # pylint: disable=import-outside-toplevel
  if path:
    path, _, diag = path.partition("_")
    monkeypatch.setattr(pallas_gla, "PATH", path)
    diag = diag or "split"
    monkeypatch.setattr(pallas_gla_split, "DIAG", {"scores": diag, "grads": diag})
  args, h0 = _inputs(op, 9, b=1, t=150, h=1)
  (ro, rs), (rga, rgh) = _outputs_and_grads(_reference(op), 9)(args, h0)
  (o, s), (ga, gh) = _outputs_and_grads(_fast(op, "pallas", chunk=64), 9)(args, h0)
  assert _rel(o, ro) < 2e-4 and _rel(s, rs) < 2e-4 and _rel(gh, rgh) < 5e-4
  for name, x, y in zip("qkvgb", ga, rga):
    assert _rel(x, y) < 5e-4, f"d{name}"


def test_gla_auto_path_forward_only(monkeypatch):
  """PATH 'auto': an undifferentiated call runs the 'parallel' kernels (bf16, no initial state)."""
  from sosm_jax.ops.kernels import pallas_gla  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(pallas_gla, "PATH", "auto")
  args, _ = _inputs("gla", 9, b=1, t=150, h=1)
  ro, rs = gla_reference(*args)
  bf = [x.astype(jnp.bfloat16) for x in args[:3]] + [args[3]]
  o, s = jax.jit(_fast("gla", "pallas", chunk=64))(*bf)
  assert o.dtype == jnp.bfloat16
  assert _rel(o, ro) < 3e-2 and _rel(s, rs) < 3e-2


@pytest.mark.parametrize("path", ["split", "legacy"])
def test_gla_extreme_decay_stays_finite(path, monkeypatch):
  """Decays down to e^-40 per token: exact within 16-token blocks (no overflow, no NaN), values
  and gradients against the sequential reference, fp32."""
  from sosm_jax.ops.kernels import pallas_gla  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(pallas_gla, "PATH", path)
  args, h0 = _inputs("gla", 11, b=1, t=80, h=1)
  rng = np.random.default_rng(12)
  log_f = np.where(rng.uniform(size=args[3].shape) < 0.3, -rng.uniform(5.0, 40.0, args[3].shape),
                   np.asarray(args[3]))
  args = args[:3] + [jnp.asarray(log_f, jnp.float32)]
  (ro, rs), (rga, rgh) = _outputs_and_grads(_reference("gla"), 11)(args, h0)
  (o, s), (ga, gh) = _outputs_and_grads(_fast("gla", "pallas", chunk=64), 11)(args, h0)
  assert _rel(o, ro) < 2e-4 and _rel(s, rs) < 2e-4 and _rel(gh, rgh) < 5e-4
  for name, x, y in zip("qkvg", ga, rga):
    assert _rel(x, y) < 5e-4, f"d{name}"
