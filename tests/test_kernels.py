"""The Pallas forms of the linear-attention ops against the sequential references.

Every Pallas path (interpret mode on CPU, compiled on a GPU) is checked forward AND gradients on
random inputs, with lengths that are not a multiple of the chunk, with and without an initial
state, in fp32 and bf16, with key/value dims the kernels pad, and under extreme decay.
On a GPU: `JAX_PLATFORMS=cuda pytest -q tests/test_kernels.py`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sosm_jax.ops as ops
from sosm_jax.ops.gated_delta.pallas import gated_delta_rule_pallas
from sosm_jax.ops.gla.pallas import gla_pallas

ON_GPU = jax.default_backend() == "gpu"
NAMES = ("gated_delta_rule", "gla")
PALLAS = {"gated_delta_rule": gated_delta_rule_pallas, "gla": gla_pallas}
REFERENCE = {"gated_delta_rule": ops.gated_delta_rule_reference, "gla": ops.gla_reference}


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
  return REFERENCE[op]


def _fast(op, chunk, block_v=16):
  return functools.partial(PALLAS[op], interpret=not ON_GPU, block_v=block_v, chunk_size=chunk)


@functools.lru_cache(maxsize=None)
def _ref_results(op, seed, with_state):
  args, h0 = _inputs(op, seed, with_state=with_state)
  out, grads = _outputs_and_grads(_reference(op), seed)(args, h0)
  return args, h0, out, grads


@pytest.mark.parametrize("op", NAMES)
@pytest.mark.parametrize("with_state", [True, False])
def test_pallas_matches_reference_fp32(op, with_state):
  seed = 3 if with_state else 4
  args, h0, (ro, rs), (rga, rgh) = _ref_results(op, seed, with_state)
  (o, s), (ga, gh) = _outputs_and_grads(_fast(op, chunk=16), seed)(args, h0)
  assert o.shape == ro.shape and s.shape == rs.shape
  assert _rel(o, ro) < 2e-4 and _rel(s, rs) < 2e-4
  for name, x, y in zip("qkvgb", ga, rga):
    assert _rel(x, y) < 5e-4, f"d{name}"
  if with_state:
    assert _rel(gh, rgh) < 5e-4
  else:
    assert gh is None


@pytest.mark.parametrize("op", NAMES)
def test_pallas_bf16(op):
  """bf16 inputs: bf16 matmul operands with fp32 accumulation; error at bf16 level."""
  args, h0, (ro, rs), (rga, _) = _ref_results(op, 3, True)
  bf = [x.astype(jnp.bfloat16) for x in args[:3]] + list(args[3:])
  (o, s), (ga, _) = _outputs_and_grads(_fast(op, chunk=32), 3)(bf, h0)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert _rel(o, ro) < 3e-2 and _rel(s, rs) < 3e-2
  for name, x, y in zip("qkvgb", ga, rga):
    assert _rel(x, y) < 5e-2, f"d{name}"


@pytest.mark.parametrize("op", NAMES)
def test_pallas_pads_small_head_dims(op):
  """key_dim 8 and value_dim 12 are not Triton tiles: zero-padded to 16 inside, same results;
  through the package dispatcher (implementation='pallas_interpret' on CPU)."""
  args, h0 = _inputs(op, 6, t=40, dk=8, dv=12)
  impl = "pallas" if ON_GPU else "pallas_interpret"
  dispatch = getattr(ops, op)
  (ro, rs), (rga, rgh) = _outputs_and_grads(_reference(op), 6)(args, h0)
  fn = functools.partial(dispatch, implementation=impl, chunk_size=16)
  (o, s), (ga, gh) = _outputs_and_grads(fn, 6)(args, h0)
  assert o.shape == ro.shape and s.shape == rs.shape == (2, 2, 8, 12)
  assert _rel(o, ro) < 2e-4 and _rel(s, rs) < 2e-4 and _rel(gh, rgh) < 5e-4
  for name, x, y in zip("qkvgb", ga, rga):
    assert _rel(x, y) < 5e-4, f"d{name}"


@pytest.mark.parametrize("op", NAMES)
def test_bad_shapes_raise(op):
  args, h0 = _inputs(op, 0, t=8)
  with pytest.raises(ValueError, match="initial_state"):
    PALLAS[op](*args, initial_state=h0[:, :1], chunk_size=16, interpret=True)
  with pytest.raises(ValueError, match="chunk_size=24 must be a power of two"):
    PALLAS[op](*args, initial_state=h0, chunk_size=24, interpret=True)
  if op == "gated_delta_rule":
    with pytest.raises(ValueError, match="beta"):
      PALLAS[op](*args[:4], args[4][:, :4], initial_state=h0, chunk_size=16, interpret=True)


@pytest.mark.parametrize("op", NAMES)
def test_pallas_chunk64_every_sub_block(op):
  """Chunk 64 = four 16-token sub-blocks (GLA scores below, on and above the diagonal blocks);
  two chunks plus a partial one, with an initial state."""
  args, h0 = _inputs(op, 9, b=1, t=150, h=1)
  (ro, rs), (rga, rgh) = _outputs_and_grads(_reference(op), 9)(args, h0)
  (o, s), (ga, gh) = _outputs_and_grads(_fast(op, chunk=64), 9)(args, h0)
  assert _rel(o, ro) < 2e-4 and _rel(s, rs) < 2e-4 and _rel(gh, rgh) < 5e-4
  for name, x, y in zip("qkvgb", ga, rga):
    assert _rel(x, y) < 5e-4, f"d{name}"


@pytest.mark.parametrize("with_state", [True, False])
def test_gated_delta_forward_without_backward(with_state):
  """The gated delta rule's forward alone, bf16 (its output stage inside the recurrence kernel,
  no h_in written; without an initial state that kernel starts from zeros instead of reading
  them) against the reference and against the forward that the backward runs (two kernels);
  chunk 32 (two sub-blocks)."""
  args, h0 = _inputs("gated_delta_rule", 13, b=1, t=70, h=2, with_state=with_state)
  (ro, rs), _ = _outputs_and_grads(_reference("gated_delta_rule"), 13)(args, h0)
  args = [x.astype(jnp.bfloat16) for x in args[:3]] + list(args[3:])
  fn = _fast("gated_delta_rule", chunk=32)
  o, s = jax.jit(lambda a, h: fn(*a, initial_state=h))(args, h0)
  (o_vjp, s_vjp), _ = _outputs_and_grads(fn, 13)(args, h0)
  assert o.dtype == jnp.bfloat16 and _rel(o, ro) < 3e-2 and _rel(s, rs) < 3e-2
  assert _rel(o.astype(jnp.float32), o_vjp.astype(jnp.float32)) < 1e-2
  assert _rel(s, s_vjp) < 1e-5


def test_gla_extreme_decay_stays_finite():
  """Decays down to e^-40 per token: exact within 16-token blocks (no overflow, no NaN), values
  and gradients against the sequential reference, fp32."""
  args, h0 = _inputs("gla", 11, b=1, t=80, h=1)
  rng = np.random.default_rng(12)
  log_f = np.where(rng.uniform(size=args[3].shape) < 0.3, -rng.uniform(5.0, 40.0, args[3].shape),
                   np.asarray(args[3]))
  args = args[:3] + [jnp.asarray(log_f, jnp.float32)]
  (ro, rs), (rga, rgh) = _outputs_and_grads(_reference("gla"), 11)(args, h0)
  (o, s), (ga, gh) = _outputs_and_grads(_fast("gla", chunk=64), 11)(args, h0)
  assert _rel(o, ro) < 2e-4 and _rel(s, rs) < 2e-4 and _rel(gh, rgh) < 5e-4
  for name, x, y in zip("qkvg", ga, rga):
    assert _rel(x, y) < 5e-4, f"d{name}"


@pytest.mark.parametrize("sub", [16, 32, 64])
def test_gated_delta_wy_inverse_correlated_keys(sub):
  """T = (I + L)^{-1} of the WY inverse kernel against numpy's inverse when the keys of a chunk
  are nearly parallel and beta near 1 (every token couples to the earlier ones), fp32, chunk 64:
  row substitution on the diagonal blocks is exact to fp32 rounding (the Neumann products of the
  deleted 'fused' prep cancelled large terms here: 3.5e-5 on CPU); with 4x4, 2x2 and 1x1 blocks
  (`sub`, a launch setting)."""
  from sosm_jax.ops.gated_delta import pallas_kernels as kern  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(21)
  c, dk = 64, 32
  f32 = lambda x: np.asarray(x, np.float32).astype(np.float64)  # the kernels' inputs exactly
  k = f32(_unit(rng.normal(size=(1, 1, 1, dk)) + 0.15 * rng.normal(size=(1, c, 1, dk))))
  beta = f32(rng.uniform(0.8, 1.0, size=(1, c)))
  gam = f32(np.cumsum(-rng.uniform(0.0, 0.05, size=(1, c)), axis=-1))
  kk = k[0, :, 0] @ k[0, :, 0].T
  lower = np.tril(beta[0][:, None] * kk * np.exp(gam[0][:, None] - gam[0][None, :]), -1)
  want = np.linalg.inv(np.eye(c) + lower)
  assert np.abs(want - np.eye(c)).max() > 0.5  # strongly coupled, unlike random keys
  f = lambda x: jnp.asarray(x, jnp.float32)
  tmat = kern.wy_inverse(f(k), f(beta), f(gam), chunk=c, interpret=True, sub=sub)
  assert tmat.dtype == jnp.float32 and _rel(tmat[0], want) < 2e-6


def test_gated_delta_launch_settings():
  """A non-default `ForwardLaunch` (what `benchmarks/kernels.py --gdn-sweep` tries): the WY
  inverse from 2x2 blocks of 32 and the forward-only recurrence+output kernel at block_v 16, with
  other warp and stage counts (launch-only in interpret mode). fp32 values and every gradient
  against the reference (the backward's forward runs the inverse too); the bf16 forward without a
  backward against the default launch's (only the inverse's block order differs); bad settings
  raise."""
  from sosm_jax.ops.gated_delta.pallas import ForwardLaunch  # pylint: disable=import-outside-toplevel
  launch = ForwardLaunch(inverse_warps=2, inverse_stages=2, inverse_sub=32, apply_warps=8,
                         apply_stages=2, out_warps=8, out_stages=3, out_block_v=16)
  args, h0 = _inputs("gated_delta_rule", 17, b=1, t=100, h=2)
  (ro, rs), (rga, rgh) = _outputs_and_grads(_reference("gated_delta_rule"), 17)(args, h0)
  fn = functools.partial(_fast("gated_delta_rule", chunk=64, block_v=32), launch=launch)
  (o, s), (ga, gh) = _outputs_and_grads(fn, 17)(args, h0)
  assert _rel(o, ro) < 2e-4 and _rel(s, rs) < 2e-4 and _rel(gh, rgh) < 5e-4
  for name, x, y in zip("qkvgb", ga, rga):
    assert _rel(x, y) < 5e-4, f"d{name}"
  bf = [x.astype(jnp.bfloat16) for x in args[:3]] + list(args[3:])
  fwd = lambda **kw: jax.jit(lambda a, h: _fast("gated_delta_rule", chunk=64, block_v=32)(
      *a, initial_state=h, **kw))(bf, h0)
  (o_l, s_l), (o_d, s_d) = fwd(launch=launch), fwd()
  assert _rel(o_l, ro) < 3e-2 and _rel(s_l, rs) < 3e-2
  assert _rel(o_l.astype(jnp.float32), o_d.astype(jnp.float32)) < 1e-2 and _rel(s_l, s_d) < 1e-2
  with pytest.raises(ValueError, match="inverse_sub=24"):
    gated_delta_rule_pallas(*args, initial_state=h0, chunk_size=64, interpret=True,
                            launch=ForwardLaunch(inverse_sub=24))
  with pytest.raises(ValueError, match="block_v=48 must divide"):
    gated_delta_rule_pallas(*bf, initial_state=h0, chunk_size=64, interpret=True,
                            launch=ForwardLaunch(out_block_v=48))
  with pytest.raises(TypeError, match="ForwardLaunch"):
    gated_delta_rule_pallas(*args, initial_state=h0, chunk_size=64, interpret=True,
                            launch={"inverse_warps": 2})
