"""The main recipe: a 3:1 HGRN-2 hybrid trained through context lengths 4K -> 100K.

Usage: python launch/train.py --config=configs/curriculum.py[:VARIANT] [--config.a.b=value]
Variants:
  (none)  the full recipe for accelerators: ~150M parameters (hidden 768, 12 layers, attention at
          layers 3, 7, 11, vocabulary 32000), stages 4K, 8K, 16K, 32K, 64K, 100K (102,400 tokens)
          at 524,288 tokens per step (4 x 102,400 in the last stage).
  long_small  a 25.3M-parameter hybrid (hidden 512, 8 layers, attention at layers 3 and 7,
          bytes) through 4K -> 16K -> 64K -> 100K (102,400) in ~6.5 minutes of one H200 with
          start-up and compiles (390 s measured in the third run, 51 / 70 / 247 / 510 ms a step;
          these steps cost the same 287 s of steps), on stdlib text mixed with passkey, NIAH
          and MQAR examples, RoPE base 500,000 throughout; for launch/evaluate.py to 100K.
          Retrieval signal: the loss is a mean over scored tokens, and stdlib scores every
          token while a task example scores only its answer, so the mix weights (which count
          documents; a stdlib file is 17.6 KB) keep stdlib at 0.02: ~27% of the 4K positions are
          text, and the evaluated answers (passkey, NIAH) are ~3.6% of the 4K loss tokens (0.6%
          at stdlib 0.1). At 4K the task examples are 1,024 tokens, four to a task row
          (data.task_length_by_seq_len), from 16K on each fills its row. Per 4K step: ~14
          passkey and ~29 NIAH examples (all eight NIAH tasks in equal numbers).
  smoke   a small hybrid on the CPU in a few minutes: 256 -> 512 -> 1024 tokens, byte-level data.
  tiny    the smallest runnable model, for tests.
  memory  memory beyond the window on the CPU in ~1-2 minutes: a small HGRN-2 + graph model
          trained on 64-token windows, each stream reading 4 consecutive windows of a row with
          the earlier ones in a host FAISS memory (HNSW) attended by the graph layers.
  long_memory  long_small's model with attention layer 3 made a graph layer that reads a host
          FAISS memory (flat, top-8, one kv head), on long_small's kind of data mix: windows of
          2,048 tokens, each stream reading rows of 4 windows (8,192) with the earlier ones in
          its memory; 2,400 steps of 8 x 2,048 (139 ms a step on one H200, host-bound, with the
          search prefetched behind the step). From scratch it learned no retrieval in 5,200
          steps: start it from a trained long_small run (--config.finetune.init_from=DIR
          --config.finetune.init_match=by_name; the graph layer's one kv head then starts as
          the mean of long_small's four, finetune.pool_kv_heads). For launch/evaluate.py
          --memory=auto|off.
  long_cp the full recipe plus a stage of 262,144 tokens (2 sequences per step, one per
          micro-batch), every sequence split over 2 devices (mesh.context=2): needs exactly 2
          devices (e.g. 2 H200s).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sosm_jax.train.config import base_config  # pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None):
  variant = arg or "full"
  if variant == "long_cp":
    return _long_context_parallel()
  c = base_config()
  c.workdir = f"workdir/curriculum-{variant}"
  if variant == "full":
    c.model.update(num_layers=12, d_model=768, mlp_dim=2048, vocab_size=32000,
                   attn_num_heads=12, attn_num_kv_heads=4, attn_head_dim=64,
                   pattern=("hgrn2", "hgrn2", "hgrn2", "attn"), dtype="bfloat16",
                   # 12 layers compile in ~45 s unrolled; the layer scan's stacked residuals
                   # cost 30% of the step on an H100 (197K -> 259K tokens/s at 8 x 4096).
                   scan_layers=False,
                   # bf16 logits (float32 accumulation and loss): a 1.7% shorter step on an H200
                   logits_dtype="bfloat16")
    c.curriculum.update(
        seq_lens=(4096, 8192, 16384, 32768, 65536, 102400),
        steps=(3000, 2000, 1200, 800, 400, 300),
        tokens_per_step=524288,
        global_batch=(0, 0, 0, 0, 0, 4),        # 102,400 does not divide 524,288: 4 sequences
        grad_accum=(8, 8, 8, 8, 8, 4),          # micro-batches of 64K-100K tokens
        # each stage without remat where its compiled step fits the device, else 'dots', else
        # 'full' (the preflight compiles them before step 1)
        remat=("auto",) * 6,
        rope_base=(10000.0, 20000.0, 40000.0, 80000.0, 160000.0, 250000.0))
    # AdamW on flat buffers (one per dtype, decay and sharding of the parameters; fsdp and
    # tensor shards stay on their devices): a 5% shorter step on an H200
    c.optimizer.update(learning_rate=1e-3, warmup_steps=500, fused=True)
    c.train.update(log_every=20, checkpoint_every=250)
  elif variant == "long_small":
    c.model.update(num_layers=8, d_model=512, mlp_dim=1408, vocab_size=260,
                   attn_num_heads=8, attn_num_kv_heads=4, attn_head_dim=64, hgrn2_head_dim=128,
                   pattern=("hgrn2", "hgrn2", "hgrn2", "attn"), dtype="bfloat16",
                   scan_layers=False, logits_dtype="bfloat16",
                   # One base for every stage: a few dozen steps per long stage leave no room to
                   # re-learn positions after a base change; 500K keeps 100K inside one period
                   # of the slowest rotary frequencies, and evaluation uses the same base.
                   rope_base=500000.0)
    # Documents are drawn by weight (a stdlib file is ~4 rows of 4K, a task example 1/4 row at
    # 4K and one row later). The loss averages over scored tokens: at stdlib 0.1 (the second
    # run) text was 98% of them and the evaluated answers 0.6%; at 0.02 text is ~27% of the 4K
    # positions and ~93% of the loss tokens, the passkey and NIAH answers ~3.6% (MQAR's dense
    # answers the rest), and almost every long row is a task.
    c.data.update(source="mix:stdlib=0.02,synthetic:passkey=0.3,synthetic:niah=0.62,"
                         "synthetic:mqar=0.06",
                  # 4 examples a 4K row: 4x the answers of whole-row examples; the needle-to-
                  # question distances beyond 1K are trained from 16K on (whole-row examples)
                  task_length_by_seq_len=((4096, 1024),),
                  # 256 queries a row: dense recall answers (a 100K row asks them across 100K)
                  mqar_num_pairs=64, mqar_num_queries=256, passkey_digits=5, niah_num_needles=4,
                  niah_digits=7)
    c.curriculum.update(
        seq_lens=(4096, 16384, 65536, 102400),
        # The third run's steps. The fourth run moved 700 steps of the 4K tail (36 s) to the
        # 64K / 100K stages (2,800 / 600 / 150 / 125, decay_fraction 0.24) and lost: passkey
        # 94.7% -> 89.4% (4K: 97.7% -> 72.7%), NIAH 35.0% -> 34.4% (RESULTS.md, fourth run).
        # 3,500 x 51.3 ms + 600 x 69.9 + 100 x 246.9 + 80 x 510.4 = 287 s of steps
        steps=(3500, 600, 100, 80),
        tokens_per_step=65536,
        global_batch=(0, 0, 2, 2),      # 16 x 4K, 4 x 16K, then 2 sequences of 64K / 100K
        remat=("auto",) * 4)
    # constant through the 4K stage, then decayed over the long stages: 752 of the 4,180 steps
    # after warmup, from step 3,528 (the 16K stage's 29th)
    c.optimizer.update(learning_rate=1.5e-3, warmup_steps=100, schedule="wsd", decay_fraction=0.18)
    # the end-of-stage checks would compile two more functions per stage: evaluate.py does it once
    c.train.update(log_every=25, checkpoint_every=0, eval_batches=0, passkey_examples=0)
  elif variant == "smoke":
    c.model.update(num_layers=4, d_model=128, mlp_dim=384, vocab_size=260,
                   attn_num_heads=4, attn_num_kv_heads=2, attn_head_dim=32, hgrn2_head_dim=32,
                   pattern=("hgrn2", "hgrn2", "hgrn2", "attn"), dtype="float32")
    c.curriculum.update(seq_lens=(256, 512, 1024), steps=(40, 20, 10), tokens_per_step=4096)
    c.optimizer.update(learning_rate=3e-3, warmup_steps=10)
    c.train.update(log_every=5, checkpoint_every=20, eval_batches=2, passkey_examples=4)
  elif variant == "tiny":
    c.model.update(num_layers=4, d_model=32, mlp_dim=64, vocab_size=260,
                   attn_num_heads=2, attn_num_kv_heads=1, attn_head_dim=16, hgrn2_head_dim=16,
                   gdn_num_heads=2, gdn_head_dim=16, chunk_size=16,
                   pattern=("hgrn2", "hgrn2", "hgrn2", "attn"), dtype="float32")
    c.curriculum.update(seq_lens=(32, 64), steps=(6, 4), tokens_per_step=512)
    c.optimizer.update(learning_rate=3e-3, warmup_steps=2)
    c.train.update(log_every=2, checkpoint_every=0, eval_batches=1, eval_batch_size=2,
                   passkey_examples=2)
  elif variant == "memory":
    c.model.update(architecture="sosm", num_layers=4, d_model=64, mlp_dim=192, vocab_size=260,
                   attn_num_heads=4, attn_num_kv_heads=2, attn_head_dim=16, hgrn2_head_dim=16,
                   chunk_size=16, pattern=("hgrn2", "graph"), dtype="float32")
    c.model.graph.update(window=32, semantic_dim=32, temporal_dim=16,
                         block_weights=(0.5, 0.0, 0.0, 0.3, 0.0, 0.2, 0.0, 0.0),
                         select_block_size=16, select_num_blocks=2, query_chunk=64, key_chunk=64)
    c.curriculum.update(seq_lens=(64,), steps=(80,), tokens_per_step=512)
    c.memory.update(enabled=True, segments=4, index="hnsw", top_k=8, capacity=1024, num_shards=4)
    c.optimizer.update(learning_rate=3e-3, warmup_steps=10)
    c.train.update(log_every=10, checkpoint_every=40, eval_batches=2, eval_batch_size=8,
                   passkey_examples=0)
  elif variant == "long_memory":
    _long_memory(c)
  else:
    raise ValueError(f"unknown variant {variant!r} of configs/curriculum.py: use one of "
                     f"'' (full), 'long_small', 'smoke', 'tiny', 'memory', 'long_memory', "
                     f"'long_cp'")
  return c


def _long_memory(c):
  """long_small's model and data with one graph layer reading a host memory (see the module doc).

  Run twice on one H200 (benchmarks/RESULTS.md, "The memory variant at long context"): 307 ms a
  step before the host path's rework, 139 ms after it with the search prefetched; neither run
  learned retrieval, even inside a window (the second: 5,200 steps, 85M tokens), so the memory had
  nothing to serve. Per step the trainer probes the window, searches every stream's FAISS memory
  on the CPU and copies the top-k keys/values ([streams, window, top_k, kv_heads, head_dim]
  float32) to the device.
  """
  c.model.update(architecture="sosm", num_layers=8, d_model=512, mlp_dim=1408, vocab_size=260,
                 attn_num_heads=8, attn_num_kv_heads=4, attn_head_dim=64, hgrn2_head_dim=128,
                 # long_small's layers with its first attention layer (3) made the memory layer:
                 # one graph layer = one memory per stream (two would double the host work, and
                 # the deeper one's probe is approximate); attention at 7 keeps in-window recall.
                 pattern=("hgrn2", "hgrn2", "hgrn2", "graph", "hgrn2", "hgrn2", "hgrn2", "attn"),
                 dtype="bfloat16", scan_layers=False, logits_dtype="bfloat16", rope_base=500000.0)
  # One kv head: the memory's search vectors and stored keys/values are 64 wide, a quarter of
  # the host search, gather and host-to-device copy of long_small's 4 kv heads (67 MB a step at
  # 8 x 2,048 x top-8 x 2 arrays of float32 instead of 268 MB). Block mode, the defaults' 64-token
  # local window and 8 selected blocks of 64 inside the window.
  c.model.graph.update(num_heads=8, num_kv_heads=1, head_dim=64)
  # Each stream reads a row of 4 windows of 2,048 tokens (8,192, the trained span); windows
  # 1-3 search the earlier ones. 'flat' (exact inner product): at <= 6,144 entries a stream its
  # search cost 10-14 us a query on one shared core of the development machine, while HNSW's add
  # at efConstruction 200 cost 234 us a token (~4 s a step of 16,384 tokens). top_k 8 as the
  # CPU 'memory' variant. capacity 131,072 (4 shards of 32K): evaluation beyond the span keeps
  # every earlier window of a 64K or 100K document; training never fills more than 6,144.
  # prefetch: window s+1's probe and search run behind step s (139 ms a step measured with it;
  # queries one step stale, and a resume inside a row is not bit-identical)
  c.memory.update(enabled=True, segments=4, index="flat", top_k=8, capacity=131072, num_shards=4,
                  layers=(), prefetch=True)
  # long_small's components. With memory the pipeline packs rows of segments x seq_len = 8,192
  # tokens and a task example fills its row (no task_length_by_seq_len): the passkey or needle
  # lies in windows 0-2 (memory) for ~75% of the examples, MQAR's 64 pairs open window 0 and ~75%
  # of its 256 queries come in windows 1-3. A passkey / NIAH row is scored only in its last
  # window (one answer per 4 steps of a stream: ~2 answers a step, against long_small's ~43 at
  # 4K, which learned retrieval only after ~1,750 steps), so MQAR, ~190 answers a row that need
  # the memory, goes from 0.06 to 0.18 (the dense memory signal; the same lookup: a key, then the
  # value after it) and passkey, the simplest evaluated task, from 0.3 to 0.4. stdlib 0.02 (a
  # file is ~2 rows) keeps text at ~4% of rows. long_small, the model to start from, answers no
  # MQAR even inside its window, so those rows teach it: from long_small, 2,400 steps of this mix
  # answered 92.3% of the memory-only MQAR queries (0.9% cut off) but kept few passkeys (RESULTS).
  c.data.update(source="mix:stdlib=0.02,synthetic:passkey=0.4,synthetic:niah=0.4,"
                       "synthetic:mqar=0.18",
                task_length_by_seq_len=(), mqar_num_pairs=64, mqar_num_queries=256,
                passkey_digits=5, niah_num_needles=4, niah_digits=7)
  c.curriculum.update(
      seq_lens=(2048,),
      # 8 streams x 2,048 = 16,384 tokens a step (a quarter of long_small's: the host work grows
      # with the tokens): 139 ms a step on one H200 (118K tokens/s), ~330 s for the 2,400 steps
      # (the host path: benchmarks/memory_host_path.py). The trainer's SIGTERM checkpoint
      # (memory included) lets a later call resume.
      steps=(2400,),
      tokens_per_step=16384,
      global_batch=(8,),
      remat=("auto",))
  c.optimizer.update(learning_rate=1.5e-3, warmup_steps=100, schedule="wsd", decay_fraction=0.18)
  c.train.update(log_every=25, checkpoint_every=0, eval_batches=0, passkey_examples=0)
  # Started from long_small by name, the graph layer's k/v (1 kv head against long_small's 4)
  # would start fresh, and that alone broke the retrieval long_small had learned: on one H200 the
  # answers' accuracy was 5.5-7% from the first steps to step 2,400 (RESULTS, "long_memory
  # started from long_small by name"). The mean of each group of 4 heads keeps the layer close
  # to long_small's.
  c.finetune.update(pool_kv_heads=True)


def _long_context_parallel():
  """The full recipe, then 262,144 tokens per sequence with each sequence split over 2 devices."""
  c = get_config("full")
  c.workdir = "workdir/curriculum-long_cp"
  cur = c.curriculum
  cur.update(seq_lens=tuple(cur.seq_lens) + (262144,), steps=tuple(cur.steps) + (200,),
             global_batch=tuple(cur.global_batch) + (2,), grad_accum=tuple(cur.grad_accum) + (2,),
             remat=tuple(cur.remat) + ("full",), rope_base=tuple(cur.rope_base) + (500000.0,))
  c.mesh.update(data=1, fsdp=1, tensor=1, context=2)
  return c
