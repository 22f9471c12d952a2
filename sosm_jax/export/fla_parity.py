"""GPU check that converted weights give fla's logits, and int8 decode speed: python -m sosm_jax.export.fla_parity --out=DIR.

Needs torch, CUDA and fla (fla-core, flash-linear-attention) beside JAX: the GPU machine. For a
Gated DeltaNet model and a one-head HGRN-2 model (random weights, the lower-bound table random
too), it writes the fla folder with `fla.save_fla`, loads it into fla's *ForCausalLM (strict: every
tensor must be used), and compares logits with sosm_jax's on the same tokens in float32 and in
bfloat16 (both sides computing in that dtype). fla's attention layers need flash_attn, which the
GPU machine lacks, so the hybrids' attention layers are checked on the CPU only (names, shapes,
round trip). Then, time allowing, the decode speed of float vs int8 weights (`int8.py`).
Results: DIR/fla_parity.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sosm_jax import models
from sosm_jax.export import fla, int8

_CASES = {
    "gated_deltanet": dict(pattern=("gdn",), num_layers=2, d_model=128, gdn_num_heads=2,
                           gdn_head_dim=64, mlp_dim=256, tie_embeddings=False,
                           gdn_output_gate="silu"),
    "hgrn2": dict(pattern=("hgrn2",), num_layers=2, d_model=128, hgrn2_head_dim=128, mlp_dim=256,
                  tie_embeddings=True),
}


def _model_cfg(dtype: str, **kw):
  return models.model_config_for("tiny", "hybrid", vocab_size=260, dtype=dtype, linear_impl="xla",
                                 attn_impl="xla", **kw)


def _fla_model(folder: str, fc: dict):
  """fla's *ForCausalLM with the folder's weights on the GPU; strict about tensor names."""
  # pylint: disable=import-outside-toplevel
  import torch
  from safetensors.torch import load_file
  from fla.models import (GatedDeltaNetConfig, GatedDeltaNetForCausalLM, HGRN2Config,
                          HGRN2ForCausalLM)
  classes = {"hgrn2": (HGRN2Config, HGRN2ForCausalLM),
             "gated_deltanet": (GatedDeltaNetConfig, GatedDeltaNetForCausalLM)}
  config_cls, model_cls = classes[fc["model_type"]]
  kwargs = {k: v for k, v in fc.items() if k not in ("model_type", "architectures")}
  model = model_cls(config_cls(**kwargs)).cuda().eval()
  state = load_file(os.path.join(folder, fla.WEIGHTS_FILE))
  missing, unexpected = model.load_state_dict(state, strict=False)
  allowed_missing = {"lm_head.weight"} if fc["tie_word_embeddings"] else set()
  if unexpected or set(missing) - allowed_missing:
    raise ValueError(f"fla model and converted weights differ: missing {missing}, "
                     f"unexpected {unexpected}")
  if fc["tie_word_embeddings"]:
    model.tie_weights()
  return model, torch


def parity(out_dir: str, seq_len: int) -> dict:
  results = {}
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (2, seq_len)).astype(np.int32)
  for name, kw in _CASES.items():
    cfg32 = _model_cfg("float32", **kw)
    model = models.build_model(cfg32)
    params = nn.unbox(model.init(jax.random.key(1), 1, 64))
    if "hgrn2_lower_bounds" in params:   # a non-trivial bound in every layer but the first
      params["hgrn2_lower_bounds"] = jnp.asarray(rng.standard_normal(
          params["hgrn2_lower_bounds"].shape), jnp.float32)
    params = jax.tree.map(np.asarray, params)
    folder = fla.save_fla(os.path.join(out_dir, name), params, cfg32)
    state, fc = fla.to_fla(params, cfg32)
    tmodel, torch = _fla_model(folder, fc)
    row = {"tensors": len(state), "seq_len": seq_len}
    for dtype, tdtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
      ours = np.asarray(models.build_model(_model_cfg(dtype, **kw)).apply(params, tokens),
                        np.float32)
      with torch.no_grad():
        theirs = tmodel.to(tdtype)(input_ids=torch.as_tensor(tokens, dtype=torch.long).cuda())
        theirs = theirs.logits.float().cpu().numpy()
      row[dtype] = {"max_abs_diff": float(np.max(np.abs(ours - theirs))),
                    "mean_abs_diff": float(np.mean(np.abs(ours - theirs))),
                    "max_abs_logit": float(np.max(np.abs(theirs))),
                    "argmax_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))}
    results[name] = row
    print(name, json.dumps(row), flush=True)
  return results


def decode_speed(batch: int, prompt: int, new_tokens: int, size: str = "small") -> dict:
  """Tokens/s of greedy generation with float (bf16 compute) vs int8 weights, a preset size."""
  cfg = models.model_config_for(size, "hybrid", vocab_size=32000, dtype="bfloat16",
                                linear_impl="xla", scan_layers=False)
  model = models.build_model(cfg)
  params = nn.unbox(model.init(jax.random.key(0), 1, 64))
  qmodel, qparams = int8.int8_model(cfg), int8.quantize_params(params, cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, prompt)), jnp.int32)
  out = {"size": size, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
         "float_bytes": int8.size_bytes(params), "int8_bytes": int8.size_bytes(qparams)}
  for label, m, p in (("float", model, params), ("int8", qmodel, qparams)):
    jax.block_until_ready(m.generate(p, tokens, jax.random.key(0), new_tokens))   # compile
    start = time.perf_counter()
    jax.block_until_ready(m.generate(p, tokens, jax.random.key(0), new_tokens))
    out[f"{label}_tokens_per_s"] = batch * new_tokens / (time.perf_counter() - start)
  print("decode", json.dumps(out), flush=True)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--decode_budget_s", type=float, default=150.0,
                      help="skip the decode timing when parity took longer than this")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  results = {"devices": [str(d) for d in jax.devices()]}
  path = os.path.join(args.out, "fla_parity.json")
  try:
    results["parity"] = parity(args.out, args.seq_len)
  except Exception as e:  # pylint: disable=broad-except
    results["parity_error"] = f"{type(e).__name__}: {e}"
  results["parity_seconds"] = time.time() - start
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  if time.time() - start < args.decode_budget_s:
    try:
      results["decode"] = decode_speed(batch=8, prompt=128, new_tokens=128)
    except Exception as e:  # pylint: disable=broad-except
      results["decode_error"] = f"{type(e).__name__}: {e}"
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
