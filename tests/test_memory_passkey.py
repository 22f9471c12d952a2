"""Passkey beyond the window: a tiny graph-layer LM retrieves a key from earlier segments via memory."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sosm_jax.memory.segments import SegmentRunner
from sosm_jax.models.config import default_model_config

VOCAB, QUERY, KEYS, FILL = 32, 1, range(2, 10), range(10, 32)
B, L, S = 32, 16, 3          # streams, segment (= window) length, segments per document


def tiny_cfg():
  """One graph layer whose local window is one segment: earlier segments only via memory."""
  c = default_model_config("sosm")
  c.update(dict(pattern=("graph",), num_layers=1, d_model=32, vocab_size=VOCAB, mlp_dim=64,
                attn_num_heads=2, attn_num_kv_heads=1, attn_head_dim=16, dtype="float32",
                scan_layers=False))
  c.graph.update(dict(window=L, semantic_dim=16, temporal_dim=8, block_weights=(0.5, 0.0, 0.3, 0.2),
                      k_max=2, k_min=1, select_block_size=8, select_num_blocks=1, query_chunk=L,
                      key_chunk=L))
  return c


def documents(rng, n):
  """[n, S*L] tokens: a key token somewhere in segments 0..S-2, the query token last; answers [n]."""
  docs = rng.choice(np.array(FILL), size=(n, S * L))
  keys = rng.choice(np.array(KEYS), size=n)
  where = rng.integers(0, (S - 1) * L, size=n)
  docs[np.arange(n), where] = keys
  docs[:, -1] = QUERY
  return docs, keys


def make_step(runner):
  opt = optax.adam(3e-3)

  def loss_fn(params, seg, mem, answers):
    logits = runner.apply(params, seg, mem)[:, -1]
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(logp, answers[:, None], 1))
    return loss, jnp.mean(jnp.argmax(logits, -1) == answers)

  @jax.jit
  def step(params, opt_state, seg, mem, answers, lr_scale):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, seg, mem, answers)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: u * lr_scale, updates))
    return params, opt_state, loss, acc
  return opt, step


def run(runner, step, opt, *, use_memory, steps, eval_batches, seed):
  """Trains on fresh documents; accuracy on unseen documents afterwards (no updates)."""
  rng = np.random.default_rng(seed)
  params = runner.init(jax.random.PRNGKey(seed), B, L)
  opt_state = opt.init(params)
  accs = []
  for i in range(steps + eval_batches):
    docs, answers = documents(rng, B)
    segs = docs.reshape(B * S, L)                       # all segments probed in one call
    probed = runner.probe(params, jnp.asarray(segs))
    runner.reset()                                      # new documents: memories start empty
    last = {}
    for layer, arrs in probed.items():
      arrs = [np.asarray(a).reshape((B, S) + a.shape[1:]) for a in arrs]
      last[layer] = tuple(a[:, -1] for a in arrs)
      for s in range(S - 1):
        runner.add({layer: tuple(a[:, s] for a in arrs)}, segment=s)
    mem = runner.retrieve(last) if use_memory else runner.empty_memory(B, L)
    lr = 1.0 if i < steps else 0.0
    params, opt_state, _, acc = step(params, opt_state, jnp.asarray(docs[:, -L:]), mem,
                                     jnp.asarray(answers), lr)
    if i >= steps:
      accs.append(float(acc))
  return float(np.mean(accs)), params


def test_passkey_beyond_window_needs_memory():
  t0 = time.time()
  runner = SegmentRunner(tiny_cfg(), None, num_streams=B, index="flat", top_k=8)
  opt, step = make_step(runner)
  acc_mem, params = run(runner, step, opt, use_memory=True, steps=120, eval_batches=4, seed=0)
  acc_none, _ = run(runner, step, opt, use_memory=False, steps=40, eval_batches=4, seed=1)
  # generation over a document longer than the window: the first generated token is the key
  docs, answers = documents(np.random.default_rng(2), B)
  out = runner.generate(params, docs, L, 2)
  acc_gen = float(np.mean(out[:, S * L] == answers))
  print(f"passkey beyond the window: accuracy with memory {acc_mem:.3f} (generated {acc_gen:.3f}), "
        f"without {acc_none:.3f} (chance {1 / len(KEYS):.3f}); {time.time() - t0:.1f} s")
  assert out.shape == (B, S * L + 2)
  assert acc_mem >= 0.9 and acc_gen >= 0.9
  assert acc_none <= 0.5   # the key is not in the window: without memory it cannot be known
