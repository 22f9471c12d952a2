"""ops/gemv.py: the Pallas GEMV kernel (interpret mode on CPU) is x @ w in float32 for 1-8 rows,
w `[K, N]` or transposed `[N, K]`, with and without split-K, rows padded to a power of two;
bfloat16 inputs accumulate in float32; shapes the blocks do not divide are refused with an error
naming the block; the default blocks divide the recipe model's shapes and fill the grid; it lowers
to a Triton call for a GPU (traced on the CPU, not compiled); decode_levers' sweep lists the
recipe model's onerow GEMMs."""
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sosm_jax import models
from sosm_jax.ops import gemv as gemv_ops
from sosm_jax.serve import layout, onerow


def _inputs(m, k, n, transpose_w, dtype=jnp.float32, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  w = jax.random.normal(kw, (n, k) if transpose_w else (k, n), jnp.float32).astype(dtype)
  return x, w


def _reference(x, w, transpose_w):
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  return x @ (w.T if transpose_w else w)


@pytest.mark.parametrize("m,k,n,transpose_w,blocks", [
    (1, 256, 128, False, dict(block_n=32, block_k=64)),
    (2, 768, 96, False, dict(block_n=32, block_k=128, split_k=2)),
    (8, 128, 64, False, dict(block_n=16, block_k=16, split_k=4)),
    (3, 192, 48, False, dict(block_n=16, block_k=32, split_k=3)),   # rows padded 3 -> 4
    (1, 256, 80, True, dict(block_n=16, block_k=64, split_k=2)),    # a tied head: w [N, K]
    (5, 64, 32, True, dict(block_n=32, block_k=16)),
])
def test_gemv_is_the_float32_product(m, k, n, transpose_w, blocks):
  x, w = _inputs(m, k, n, transpose_w)
  got = gemv_ops.gemv(x, w, transpose_w=transpose_w, interpret=True, **blocks)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  want = _reference(x, w, transpose_w)
  # float32 sums of K products of N(0,1) numbers (|values| ~ sqrt(K)): a few ulp of sqrt(K)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.sqrt(k))
  # and a product that differs in any column or row would not pass: the columns are distinct
  assert np.abs(want[:, :1] - want[:, 1:]).min() > 1e-5 * np.sqrt(k)


def test_gemv_bfloat16_accumulates_in_float32_and_writes_out_dtype():
  x, w = _inputs(2, 2048, 64, False, jnp.bfloat16, seed=1)
  got = gemv_ops.gemv(x, w, out_dtype=jnp.float32, block_n=32, block_k=128, split_k=4,
                      interpret=True)
  want = _reference(x, w, False)   # exact products of the bf16 values
  assert got.dtype == jnp.float32
  # float32 accumulation over K = 2048: ~1e-6 relative; a bf16 accumulator would be ~1e-2
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * np.abs(want).max())
  half = gemv_ops.gemv(x, w, block_n=32, block_k=128, interpret=True)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(half), np.asarray(jnp.asarray(want, jnp.bfloat16)))


def test_gemv_refuses_shapes_its_blocks_do_not_divide():
  x, w = _inputs(2, 256, 100, False)
  with pytest.raises(ValueError, match="N=100 is not a multiple of block_n=32"):
    gemv_ops.gemv(x, w, block_n=32, interpret=True)
  with pytest.raises(ValueError, match="K=256 is not a multiple of block_k"):
    gemv_ops.gemv(x, w[:, :96], block_n=32, block_k=128, split_k=4, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    gemv_ops.gemv(x, w[:, :96], block_n=48, interpret=True)
  with pytest.raises(ValueError, match="1..8"):
    gemv_ops.gemv(jnp.zeros((9, 256)), w[:, :96], interpret=True)
  with pytest.raises(ValueError, match="contraction mismatch"):
    gemv_ops.gemv(x, w[:, :96], transpose_w=True, interpret=True)
  with pytest.raises(ValueError, match="no block"):
    gemv_ops.default_blocks(768, 100)


# the recipe model's onerow GEMMs (K, N): HGRN-2 qfi and o_proj, attention qkv, MLP wi and wo
@pytest.mark.parametrize("k,n", [(768, 2304), (768, 768), (768, 1280), (768, 4096),
                                 (2048, 768), (768, 32000)])
def test_default_blocks_divide_the_recipe_shapes_and_fill_the_grid(k, n):
  b = gemv_ops.default_blocks(k, n)
  assert n % b["block_n"] == 0 and k % (b["block_k"] * b["split_k"]) == 0
  assert (n // b["block_n"]) * b["split_k"] >= gemv_ops.TARGET_PROGRAMS // 2


def test_gemv_lowers_to_a_triton_call_for_a_gpu():
  """The kernel's Triton lowering (done in Python) accepts its ops at the serving shapes: traced
  and lowered for CUDA on the CPU; compiling it needs the GPU (benchmarks/decode_levers.py)."""
  for transpose_w, shape in ((False, (768, 2304)), (True, (32000, 768))):
    f = jax.jit(lambda x, w, t=transpose_w: gemv_ops.gemv(
        x, w, transpose_w=t, out_dtype=jnp.float32, block_n=32, block_k=128, split_k=2))
    x = jax.ShapeDtypeStruct((2, 768), jnp.bfloat16)
    w = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    text = f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "name = \"gemv\"" in text, text[:400]


def test_decode_levers_lists_the_onerow_gemms_of_the_recipe_model(tmp_path):
  """benchmarks/decode_levers.py --gemv_sweep times these shapes: per token 9 HGRN-2 qfi (768 x
  2304), 12 o_proj (9 HGRN-2 + 3 attention, 768 x 768), 3 attention qkv (768 x 1280), 12 MLP wi
  (768 x 4096) and wo (2048 x 768), the tied head (32,000 x 768, one row): the 49 projections of
  the step (+ 6 attention GEMMs = the 55 GEMM kernels per token profiled on the H200). And the
  blocks file it writes reads back as onerow's {(K, N, transposed): options or None}."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "decode_levers", os.path.join(root, "benchmarks", "decode_levers.py"))
  levers = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(levers)
  cfg = levers.context_scaling.model_configs(False, "bfloat16")["hybrid"]
  model = models.build_model(cfg)

  def folded():
    params = nn.unbox(model.init(jax.random.key(0), 1, cfg.chunk_size))
    serving, serving_params = layout.serving_layout(model, params)
    return onerow.fold_params(serving.cfg, serving_params)

  shapes = levers.gemv_shapes(cfg, jax.eval_shape(folded))
  got = {(s["k"], s["n"], s["transposed"], s["rows"]): s["per_token"] for s in shapes}
  assert got == {(768, 2304, False, 2): 9, (768, 768, False, 2): 12, (768, 1280, False, 2): 3,
                 (768, 4096, False, 2): 12, (2048, 768, False, 2): 12, (768, 32000, True, 1): 1}
  path = tmp_path / "blocks.json"
  path.write_text(json.dumps({"768x2304": {"block_n": 32, "split_k": 2}, "768x32000T": None}))
  assert levers.load_gemv_blocks(str(path)) == {(768, 2304, False): {"block_n": 32, "split_k": 2},
                                                (768, 32000, True): None}
