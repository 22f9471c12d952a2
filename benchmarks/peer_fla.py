"""The peer's train step: flash-linear-attention's HGRN-2 / Gated DeltaNet 3:1 models on one GPU.

Needs torch, CUDA and fla (`fla-core`, `flash-linear-attention`, installed from their wheels on
the GPU machine, never part of this repository). Builds fla's *ForCausalLM with the recipe's
shape (hidden 768, 12 layers, attention at layers 3/7/11 with 12 query / 4 KV heads, vocabulary
32,000, linear heads of 128, SwiGLU 2,048, tied embeddings), fp32 parameters under bf16
autocast, fla's fused norm/SwiGLU/cross-entropy, fused AdamW; times forward + backward + update
on random tokens (one document per row: plain causal attention), median over steps after the
warm-up (whose first call per shape autotunes fla's Triton kernels).

fla's attention layer calls flash_attn, which the GPU image lacks; it is given torch's
scaled_dot_product_attention instead (cuDNN / flash backends, causal, GQA), as a user without
flash_attn would.

  python3 benchmarks/peer_fla.py --model=hgrn2 --rows=4096x8,16384x2 --steps=10 --out=/tmp/fla.json

The first call's autotuning took 299 s for 8 x 4,096 on an H200 (13 s more for 16,384). Triton
keeps its choices in its cache directory (fla asks it to): run with TRITON_CACHE_DIR=<dir> and
keep that directory's `*.autotune.json` files (~20 KB) for the next machine, where the same
shapes then start in ~16 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def _sdpa_flash_attn(q, k, v, causal=True, window_size=(-1, -1), **_):
  """flash_attn_func's interface ([B, T, H, D]) on torch SDPA."""
  import torch  # pylint: disable=import-outside-toplevel
  if window_size != (-1, -1):
    raise ValueError("the SDPA stand-in has no sliding window")
  o = torch.nn.functional.scaled_dot_product_attention(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
      enable_gqa=q.shape[2] != k.shape[2])
  return o.transpose(1, 2)


def build(kind: str, vocab: int):
  """fla's model of the recipe's shape on the GPU."""
  # pylint: disable=import-outside-toplevel
  import fla.layers.attn as fla_attn
  fla_attn.flash_attn_func = _sdpa_flash_attn
  from fla.models import (GatedDeltaNetConfig, GatedDeltaNetForCausalLM, HGRN2Config,
                          HGRN2ForCausalLM)
  common = dict(hidden_size=768, num_hidden_layers=12, vocab_size=vocab, intermediate_size=2048,
                hidden_act="swish", tie_word_embeddings=True, fuse_norm=True, fuse_swiglu=True,
                fuse_cross_entropy=True, use_cache=False,
                attn={"layers": [3, 7, 11], "num_heads": 12, "num_kv_heads": 4,
                      "qkv_bias": False, "window_size": None, "rope_theta": 10000.0})
  if kind == "hgrn2":
    config = HGRN2Config(attn_mode="chunk", num_heads=6, expand_ratio=128, **common)
    return HGRN2ForCausalLM(config).cuda()
  config = GatedDeltaNetConfig(attn_mode="chunk", num_heads=6, head_dim=128, expand_v=1.0,
                               use_gate=True, use_short_conv=True, **common)
  return GatedDeltaNetForCausalLM(config).cuda()


def measure(model, seq_len: int, rows: int, steps: int, warmup: int, vocab: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
  inputs = torch.randint(0, vocab, (rows, seq_len), device="cuda")

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      # fla shifts `labels` by one itself (the usual Hugging Face call)
      loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  start = time.perf_counter()
  for _ in range(warmup):
    step()
  torch.cuda.synchronize()
  warmup_s = time.perf_counter() - start
  torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return {"seq_len": seq_len, "rows": rows, "median_step_s": median, "min_step_s": min(times),
          "tokens_per_second": rows * seq_len / median, "warmup_s": warmup_s,
          "loss_last": float(loss), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("hgrn2", "gated_deltanet"), default="hgrn2")
  parser.add_argument("--rows", default="4096x8,16384x2", help="SEQxROWS,...")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  import fla  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  model = build(args.model, args.vocab)
  report = {"benchmark": "peer_fla", "model": args.model, "fla": fla.__version__,
            "torch": torch.__version__, "device": torch.cuda.get_device_name(),
            "num_params": sum(p.numel() for p in model.parameters()), "rows": []}
  for spec in args.rows.split(","):
    seq_len, rows = (int(x) for x in spec.split("x"))
    row = measure(model, seq_len, rows, args.steps, args.warmup, args.vocab)
    print(json.dumps({"model": args.model, **row}), flush=True)
    report["rows"].append(row)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
