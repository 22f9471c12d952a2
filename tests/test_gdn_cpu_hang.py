"""Regression test for the CPU hang of the chunked gated delta rule (issue 22), run in a subprocess.

With jaxlib 0.10 the chunked form's batched `lax.linalg.triangular_solve` was a LAPACK custom
call that blocks XLA:CPU's intra-op thread pool while it waits for its own batch pieces; a
jitted gradient (several solves that may run at once) deadlocked within a few calls on a 2-core
machine. The chunked form now inverts the unit-lower-triangular system in plain jnp. The
repro runs in a child process with a timeout, so a regression fails here instead of hanging.
"""
import os
import subprocess
import sys
import textwrap

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The repro: a jitted grad of the xla (chunked) form, q, k, v [128, 32, 2, 32] float32,
# chunk 16, called repeatedly with each call's inputs depending on the previous call's gradients
# (as a training loop's steps do), without waiting in between.
_REPRO = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from sosm_jax.ops import gated_delta_rule
    b, t, h, d = 128, 32, 2, 32
    ks = jax.random.split(jax.random.key(0), 5)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    x = (unit(jax.random.normal(ks[0], (b, t, h, d))),
         unit(jax.random.normal(ks[1], (b, t, h, d))),
         jax.random.normal(ks[2], (b, t, h, d)),
         -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h))),
         jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h))))

    def loss(*x):
      o, _ = gated_delta_rule(*x, chunk_size=16, implementation="xla")
      return jnp.sum(o * o)

    grad = jax.jit(jax.grad(loss, argnums=range(5)))
    for _ in range(CALLS):
      x = tuple(a - 1e-6 * g for a, g in zip(x, grad(*x)))
    jax.block_until_ready(x)
    print("finished", bool(jnp.all(jnp.isfinite(x[0]))))
""")


def test_chunked_gated_delta_grad_does_not_hang_on_cpu():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_REPO)
  # the hang needs as many concurrent solves as the intra-op pool has threads: one device
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  try:
    proc = subprocess.run([sys.executable, "-c", _REPRO.replace("CALLS", "60")], env=env,
                          capture_output=True, text=True, timeout=150, check=False)
  except subprocess.TimeoutExpired:
    raise AssertionError(
        "60 jitted gradients of gated_delta_rule(implementation='xla') did not finish in 150 s: "
        "the XLA:CPU deadlock of issue 22 is back (a LAPACK custom call such as "
        "lax.linalg.triangular_solve in the chunked form?)") from None
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "finished True" in proc.stdout, proc.stdout[-2000:]
