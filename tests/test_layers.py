"""Tests for sosm_jax/layers: mixers against plain numpy re-derivations, gates, norms, embeddings, axes."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sosm_jax.layers import MIXERS
from sosm_jax.layers.common import RMSNorm
from sosm_jax.layers.embed import Embedder
from sosm_jax.layers.gated_deltanet import GatedDeltaNet
from sosm_jax.layers.hgrn2 import HGRN2, cumulative_lower_bounds, forget_gate
from sosm_jax.models.config import default_model_config, freeze

B, T, D = 2, 10, 16
ALLOWED_AXES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "conv", "layers", "norm",
                None}


def _cfg(**kw):
  c = default_model_config()
  c.update(dict(d_model=D, num_layers=4, vocab_size=64, mlp_dim=32, hgrn2_head_dim=8,
                gdn_num_heads=2, gdn_head_dim=8, conv_width=3, chunk_size=4, attn_num_heads=2,
                attn_num_kv_heads=1, attn_head_dim=8, dtype="float32"))
  c.update(kw)
  return freeze(c)


def _inputs(seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (B, T, D))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  seg = jnp.array([[1] * 4 + [2] * 6, [1] * T], jnp.int32)
  return x, pos, seg


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _silu(z):
  return z * _sigmoid(z)


def _rms(o, scale, eps):
  return o / np.sqrt(np.mean(o * o, -1, keepdims=True) + eps) * scale


def _starts(seg, b, t):
  return t > 0 and seg[b, t] != seg[b, t - 1]


def _init_apply(module, x, pos, seg, **kw):
  params = jax.jit(lambda k: module.init(k, x, positions=pos, segment_ids=seg, **kw))(
      jax.random.PRNGKey(1))["params"]
  y, _ = jax.jit(lambda p: module.apply({"params": p}, x, positions=pos, segment_ids=seg, **kw))(
      params)
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params)), np.asarray(y)


def hgrn2_numpy(p, x, lb, seg, eps):
  """HGRN-2 from the paper's recurrence, token by token, state zeroed at document starts."""
  q = _silu(np.einsum("btd,dhk->bthk", x, p["q_proj"]["kernel"]))
  f = np.einsum("btd,dhk->bthk", x, p["f_proj"]["kernel"])
  i = np.einsum("btd,dhk->bthk", x, p["i_proj"]["kernel"])
  fg = lb + (1 - lb) * _sigmoid(f)
  k = 1 - fg
  o = np.zeros_like(i)
  for b in range(x.shape[0]):
    s = np.zeros(q.shape[2:] + i.shape[-1:])
    for t in range(x.shape[1]):
      if _starts(seg, b, t):
        s = np.zeros_like(s)
      s = fg[b, t][..., None] * s + k[b, t][..., None] * i[b, t][:, None, :]
      o[b, t] = np.einsum("hk,hkv->hv", q[b, t], s)
  o = _rms(o, p["o_norm"]["scale"], eps)
  return np.einsum("bthv,hvd->btd", o, p["o_proj"]["kernel"])


def test_hgrn2_layer_matches_numpy():
  cfg = _cfg()
  x, pos, seg = _inputs()
  lb = jax.random.uniform(jax.random.PRNGKey(2), (D,), maxval=0.9)
  p, y = _init_apply(HGRN2(cfg, layer_index=1), x, pos, seg, lower_bound=lb)
  want = hgrn2_numpy(p, np.asarray(x, np.float64), np.asarray(lb, np.float64).reshape(2, 8),
                     np.asarray(seg), cfg.norm_eps)
  np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-4)


def _conv_numpy(x, w):
  """Causal depthwise conv: y_t = sum_j w[j] x_{t-(W-1)+j}, zeros before the start."""
  width = w.shape[0]
  xp = np.concatenate([np.zeros((x.shape[0], width - 1, x.shape[2])), x], axis=1)
  return sum(xp[:, j:j + x.shape[1]] * w[j] for j in range(width))


def gdn_numpy(p, x, seg, eps, gate_kind="sigmoid2"):
  """Gated DeltaNet token by token; the delta-rule state is zeroed at document starts (the
  short convs run over the whole row, as in the layer). gate_kind: model.gdn_output_gate."""
  h, dk = p["q_proj"]["kernel"].shape[1:]
  def branch(name):
    z = np.einsum("btd,dhk->bthk", x, p[f"{name}_proj"]["kernel"]).reshape(x.shape[:2] + (h * dk,))
    return _silu(_conv_numpy(z, p[f"conv_{name}_weight"])).reshape(x.shape[:2] + (h, dk))
  l2 = lambda z: z / np.sqrt(np.sum(z * z, -1, keepdims=True) + 1e-6)
  q, k, v = l2(branch("q")), l2(branch("k")), branch("v")
  a = np.einsum("btd,dh->bth", x, p["a_proj"]["kernel"])
  g = -np.exp(p["A_log"]) * np.log1p(np.exp(a + p["dt_bias"]))
  beta = _sigmoid(np.einsum("btd,dh->bth", x, p["b_proj"]["kernel"]))
  o = np.zeros_like(v)
  for b in range(x.shape[0]):
    s = np.zeros((h, dk, dk))
    for t in range(x.shape[1]):
      if _starts(seg, b, t):
        s = np.zeros_like(s)
      alpha = np.exp(g[b, t])[:, None, None]
      pred = np.einsum("hk,hkv->hv", k[b, t], alpha * s)
      s = alpha * s + beta[b, t][:, None, None] * k[b, t][:, :, None] * (v[b, t] - pred)[:, None, :]
      o[b, t] = dk ** -0.5 * np.einsum("hk,hkv->hv", q[b, t], s)
  o = _rms(o, p["o_norm"]["scale"], eps)
  if gate_kind != "none":
    gate = np.einsum("btd,dhk->bthk", x, p["gate_proj"]["kernel"])
    o = o * (2 * _sigmoid(gate) if gate_kind == "sigmoid2" else _silu(gate))
  return np.einsum("bthv,hvd->btd", o, p["o_proj"]["kernel"])


@pytest.mark.parametrize("gate", ["sigmoid2", "silu", "none"])
def test_gated_deltanet_layer_matches_numpy(gate):
  cfg = _cfg(gdn_output_gate=gate)
  x, pos, seg = _inputs(3)
  p, y = _init_apply(GatedDeltaNet(cfg), x, pos, seg)
  assert ("gate_proj" in p) == (gate != "none")
  if gate == "sigmoid2":  # starts as the identity; then check the formula with random weights
    assert not p["gate_proj"]["kernel"].any()
    p["gate_proj"]["kernel"] = np.asarray(
        jax.random.normal(jax.random.PRNGKey(5), p["gate_proj"]["kernel"].shape), np.float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    y = np.asarray(jax.jit(GatedDeltaNet(cfg).apply)({"params": params}, x, positions=pos,
                                                     segment_ids=seg)[0])
  want = gdn_numpy(p, np.asarray(x, np.float64), np.asarray(seg), cfg.norm_eps, gate)
  np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-4)


def test_forget_gate_and_lower_bounds():
  z = jnp.linspace(-40.0, 40.0, 33)
  for lb in (0.0, 0.3, 0.97):
    log_f, k = forget_gate(z, lb)
    lb_eff = max(lb, 1e-9)   # the layer's floor on the bound
    f = lb_eff + (1 - lb_eff) / (1 + np.exp(-np.asarray(z, np.float64)))
    np.testing.assert_allclose(np.exp(log_f), f, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(k, 1 - f, rtol=1e-5, atol=1e-7)
    assert np.all(np.exp(log_f) >= lb - 1e-7)
  # gradients stay finite where the bound is exactly 0 (first layer)
  g = jax.grad(lambda lb, z: jnp.sum(forget_gate(z, lb)[0] + forget_gate(z, lb)[1]),
               argnums=(0, 1))(jnp.zeros(33), z)
  assert all(np.all(np.isfinite(a)) for a in g)
  table = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
  lbs = np.asarray(cumulative_lower_bounds(table))
  np.testing.assert_allclose(lbs[0], 0.0, atol=1e-7)
  assert np.all(np.diff(lbs, axis=0) > 0) and np.all(lbs < 1)
  # zero-initialised table: the schedule layer / num_layers used when no table is passed
  np.testing.assert_allclose(cumulative_lower_bounds(jnp.zeros((4, 2)))[:, 0], [0, .25, .5, .75],
                             atol=1e-6)


def test_rmsnorm_per_head_and_vector():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5)) * 3
  for axes, shape in ((("norm",), (5,)), (("heads", "head_dim"), (4, 5))):
    scale = jax.random.normal(jax.random.PRNGKey(1), shape)
    y = RMSNorm(1e-6, axes).apply({"params": {"scale": scale}}, x)
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(y, _rms(xn, np.asarray(scale), 1e-6), rtol=1e-5, atol=1e-5)
  params = jax.eval_shape(RMSNorm(1e-6, ("heads", "head_dim")).init, jax.random.PRNGKey(0), x)
  assert nn.unbox(params)["params"]["scale"].shape == (4, 5)


@pytest.mark.parametrize("embed_dim,tie", [(0, True), (8, True), (0, False), (8, False)])
def test_embedder_tied_untied_factorized(embed_dim, tie):
  cfg = _cfg(embed_dim=embed_dim, tie_embeddings=tie)
  tokens = jnp.array([[1, 5, 63]])
  module = Embedder(cfg)
  p = nn.unbox(module.init(jax.random.PRNGKey(0), tokens)["params"])
  x = module.apply({"params": p}, tokens)
  h = jax.random.normal(jax.random.PRNGKey(1), (1, 3, D))
  logits = module.apply({"params": p}, h, method=Embedder.logits)
  e = np.asarray(p["embedding"])
  proj = np.asarray(p["embed_proj"]) if embed_dim else np.eye(D)
  np.testing.assert_allclose(x[0], e[[1, 5, 63]] @ proj, rtol=1e-5, atol=1e-6)
  head = (e @ proj).T if tie else np.asarray(p["head"])
  np.testing.assert_allclose(logits[0], np.asarray(h[0]) @ head, rtol=1e-4, atol=1e-5)
  assert logits.dtype == jnp.float32
  assert sum(a.size for a in jax.tree.leaves(p)) == Embedder.param_count(cfg)


def test_every_param_has_logical_axes():
  """All params of every registered mixer (and the model around them) carry valid axis names."""
  from sosm_jax.models import build_model  # pylint: disable=import-outside-toplevel
  names = tuple(sorted(MIXERS))
  arch = "sosm" if "graph" in names else "hybrid"
  cfg = _cfg(architecture=arch, pattern=names, num_layers=len(names), embed_dim=8,
             tie_embeddings=False)
  model = build_model(cfg)
  shapes = jax.eval_shape(functools.partial(model.init, batch_size=1, seq_len=8),
                          jax.random.PRNGKey(0))
  leaves = jax.tree.leaves(shapes, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim, leaf
    assert set(leaf.names) <= ALLOWED_AXES, leaf.names
  specs = jax.tree.leaves(nn.get_partition_spec(shapes),
                          is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert all(s[0] == "layers" for s in specs if len(s) and s[0] is not None and "layers" in s)


def test_mixer_registry_interface():
  cfg = _cfg()
  for name in ("attn", "gdn", "hgrn2"):
    cls = MIXERS[name]
    assert isinstance(cls.param_count(cfg), int)
    assert cls.forward_flops_per_token(cfg, 128) > 0
    cache = cls(cfg=cfg, layer_index=0).init_cache(2, 32)
    assert all(a.shape[0] == 2 for a in jax.tree.leaves(cache) if a.ndim)


def test_head_matmul_gradients_match_einsum():
  """The output head's custom backward equals einsum's (float32) and stays bf16 for bf16 inputs."""
  from sosm_jax.layers.embed import head_matmul  # pylint: disable=import-outside-toplevel
  ka, kb, kg = jax.random.split(jax.random.key(3), 3)
  a = jax.random.normal(ka, (2, 5, 8))
  b = jax.random.normal(kb, (11, 8))
  g = jax.random.normal(kg, (2, 5, 11))
  ours = lambda a, b: jnp.sum(head_matmul("btd,vd->btv", a, b) * g)
  plain = lambda a, b: jnp.sum(jnp.einsum("btd,vd->btv", a, b) * g)
  for x, y in zip(jax.grad(ours, (0, 1))(a, b), jax.grad(plain, (0, 1))(a, b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  half = [x.astype(jnp.bfloat16) for x in (a, b)]
  grads = jax.grad(ours, (0, 1))(*half)
  want = jax.grad(plain, (0, 1))(*[x.astype(jnp.float32) for x in half])
  for x, y in zip(grads, want):
    assert x.dtype == jnp.bfloat16
    assert float(jnp.linalg.norm(x.astype(jnp.float32) - y) / jnp.linalg.norm(y)) < 1e-2
