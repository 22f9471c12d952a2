"""Model configuration: defaults (`default_model_config`), size presets, validation.

Keys (config.model, an ml_collections ConfigDict):
  architecture      'transformer' (all 'attn', pattern ignored) | 'hybrid' | 'sosm' (needs 'graph')
  pattern           mixer names repeated over depth; num_layers % len(pattern) == 0
  num_layers, d_model, vocab_size, mlp_dim (SwiGLU hidden width)
  attn_num_heads, attn_num_kv_heads, attn_head_dim, rope_base
  attn_window       0 = full causal attention; >0 = sliding window of that many tokens
  attn_impl         '' auto ('splash' on TPU; 'cudnn' on GPU for bf16; else 'xla' up to
                    2048 tokens and 'blockwise' beyond) | 'xla' | 'cudnn' | 'splash' |
                    'splash_interpret' | 'blockwise' | 'reference'           (added)
  attn_block_size   block length of the 'blockwise' (O(T)-memory) attention  (added)
  attn_kv_cache_dtype  decoding's KV cache: '' (the activations' dtype) | 'int8' (per token and
                    head absmax scales: half a bf16 cache's bytes; ops/attention.quantize_kv)
  attn_decode_read_len  decoding (cache given, decode=True) attends over the first this many
                    cache positions only, a static slice (0 = the whole cache): the serving
                    engine sets it per dispatch to a bound on the filled positions
  attn_decode_impl  decoding's attention over the cache: '' auto (a Pallas kernel that reads
                    the cache in place on a GPU, for one-token steps and for prefill pieces that
                    continue a cache; the XLA form elsewhere)
                    | 'xla' | 'pallas' | 'pallas_interpret' (ops/decode_attention.py)
  hgrn2_head_dim    HGRN-2 key (state-expansion) dim per head; heads = d_model // hgrn2_head_dim
  gdn_num_heads, gdn_head_dim (key = value dim), conv_width (Gated DeltaNet short conv)
  gdn_output_gate   Gated DeltaNet output gate: 'sigmoid2' (2*sigmoid, zero-init: identity at
                    the start) | 'silu' (the paper's and fla's) | 'none' (layers/gated_deltanet.py)
  chunk_size        chunk of the chunked linear-attention algorithms
  linear_impl       linear-attention ops (HGRN-2, Gated DeltaNet): 'auto' (Pallas kernels on a
                    GPU, chunked XLA elsewhere) | 'xla' | 'pallas' | 'pallas_interpret' (the
                    kernels in interpret mode, any platform) | 'reference' (sequential)
  embed_dim         >0: factorized embedding vocab -> embed_dim -> d_model
  tie_embeddings    output head = embedding transposed
  dtype, param_dtype  activations / parameters
  norm_eps          RMSNorm epsilon                                          (added)
  document_masking  True: segment ids stop attention and recurrent state at document
                    boundaries (on GPU through cuDNN's packed layout); False: ignore them
  scan_layers       nn.scan over repetitions of the pattern (compile time flat in depth)
  loss_chunk_size   >0: the training loss computes the head's logits this many tokens (of
                    the time axis) at a time and recomputes them in the backward pass, never
                    holding [B, T, V] float32 logits; 0: plain logits then cross-entropy
  logits_dtype      the head's output: 'float32', or 'bfloat16' (the head GEMM still
                    accumulates in float32 and the loss reduces in float32; half the logits'
                    memory traffic, ~3 significant digits per logit)
  remat             'none' | 'full' | 'dots' (save matmul outputs without batch dims)
  graph             the graph mixer's keys (sosm_jax/layers/graph.py: default_graph_config)
"""
from __future__ import annotations

import importlib

import ml_collections

ARCHITECTURES = ("transformer", "hybrid", "sosm")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("bfloat16", "float32", "float16")
SOSM_PATTERN = ("hgrn2", "hgrn2", "hgrn2", "graph")
HYBRID_PATTERN = ("hgrn2", "hgrn2", "hgrn2", "attn")
# the same names as sosm_jax.ops.IMPLEMENTATIONS (kept literal: config imports no JAX)
LINEAR_IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret", "reference")
# the names of sosm_jax.ops.attention.IMPLEMENTATIONS besides '' (auto)
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash", "splash_interpret", "blockwise", "reference")
# sosm_jax.ops.attention.KV_CACHE_DTYPES
KV_CACHE_DTYPES = ("", "int8")
# sosm_jax.ops.attention.DECODE_IMPLEMENTATIONS
DECODE_IMPLEMENTATIONS = ("", "xla", "pallas", "pallas_interpret")


def _graph_defaults() -> ml_collections.ConfigDict:
  try:
    graph = importlib.import_module("sosm_jax.layers.graph")
  except ModuleNotFoundError as e:
    if e.name == "sosm_jax.layers.graph":
      return ml_collections.ConfigDict()
    raise
  fn = getattr(graph, "default_graph_config", None)
  return fn() if fn is not None else ml_collections.ConfigDict()


def default_model_config(architecture: str = "hybrid") -> ml_collections.ConfigDict:
  """The contract's defaults (a ~90M-parameter hybrid at d_model 768); pattern per architecture."""
  c = ml_collections.ConfigDict()
  c.architecture = architecture
  c.pattern = SOSM_PATTERN if architecture == "sosm" else HYBRID_PATTERN
  if architecture == "transformer":
    c.pattern = ("attn",)
  c.num_layers = 12
  c.d_model = 768
  c.vocab_size = 260
  c.mlp_dim = 2048
  c.attn_num_heads = 12
  c.attn_num_kv_heads = 4
  c.attn_head_dim = 64
  c.rope_base = 10000.0
  c.attn_window = 0
  c.attn_impl = ""
  c.attn_block_size = 512
  c.attn_kv_cache_dtype = ""
  c.attn_decode_read_len = 0
  c.attn_decode_impl = ""
  c.hgrn2_head_dim = 128
  c.gdn_num_heads = 6
  c.gdn_head_dim = 128
  c.gdn_output_gate = "sigmoid2"
  c.conv_width = 4
  c.chunk_size = 64
  c.linear_impl = "auto"
  c.embed_dim = 0
  c.tie_embeddings = True
  c.dtype = "bfloat16"
  c.param_dtype = "float32"
  c.norm_eps = 1e-6
  c.document_masking = True
  c.scan_layers = True
  c.loss_chunk_size = 0
  c.logits_dtype = "float32"
  c.remat = "none"
  c.graph = _graph_defaults()
  return c


_PRESETS = {
    # CPU tests and smoke runs
    "tiny": dict(num_layers=4, d_model=64, mlp_dim=128, attn_num_heads=4, attn_num_kv_heads=2,
                 attn_head_dim=16, hgrn2_head_dim=16, gdn_num_heads=2, gdn_head_dim=16,
                 chunk_size=16),
    "small": dict(num_layers=8, d_model=512, mlp_dim=1408, attn_num_heads=8, attn_num_kv_heads=4,
                  attn_head_dim=64, hgrn2_head_dim=128, gdn_num_heads=4, gdn_head_dim=128),
    "150m": dict(num_layers=12, d_model=1024, mlp_dim=2816, attn_num_heads=16,
                 attn_num_kv_heads=4, attn_head_dim=64, hgrn2_head_dim=128, gdn_num_heads=8,
                 gdn_head_dim=128),
}
SIZES = tuple(_PRESETS)


def model_config_for(size: str, architecture: str = "hybrid", **overrides) -> ml_collections.ConfigDict:
  """Preset sizes 'tiny' | 'small' | '150m' (~150M params at vocab 260) for an architecture."""
  if size not in _PRESETS:
    raise ValueError(f"model size {size!r} unknown; choose one of {SIZES}.")
  c = default_model_config(architecture)
  c.update(_PRESETS[size])
  c.update(overrides)
  validate_model_config(c)
  return c


def resolved_pattern(cfg) -> tuple[str, ...]:
  """The mixer pattern actually used: ('attn',) for the transformer baseline, else cfg.pattern."""
  return ("attn",) if cfg.architecture == "transformer" else tuple(cfg.pattern)


def layer_mixers(cfg) -> tuple[str, ...]:
  """Mixer name of every layer, `[num_layers]`."""
  p = resolved_pattern(cfg)
  return p * (cfg.num_layers // len(p))


def _fail(key: str, problem: str, fix: str):
  raise ValueError(f"model.{key}: {problem}; {fix}.")


def _positive(cfg, *keys):
  for key in keys:
    v = cfg[key]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      _fail(key, f"must be a positive int, got {v!r}", f"set model.{key} to e.g. 64")


def validate_model_config(cfg) -> None:
  """Raises ValueError naming the first bad key and how to fix it."""
  from sosm_jax.layers import KNOWN_MIXER_NAMES  # pylint: disable=import-outside-toplevel
  if cfg.architecture not in ARCHITECTURES:
    _fail("architecture", f"unknown value {cfg.architecture!r}", f"choose one of {ARCHITECTURES}")
  _positive(cfg, "num_layers", "d_model", "vocab_size", "mlp_dim", "chunk_size", "conv_width")
  pattern = resolved_pattern(cfg)
  if not pattern:
    _fail("pattern", "is empty", "give at least one mixer name, e.g. ('hgrn2','hgrn2','hgrn2','attn')")
  for name in pattern:
    if name not in KNOWN_MIXER_NAMES:
      _fail("pattern", f"unknown mixer {name!r}", f"use names from {KNOWN_MIXER_NAMES}")
  if cfg.architecture == "sosm" and "graph" not in pattern:
    _fail("pattern", f"architecture 'sosm' needs a 'graph' mixer, got {pattern}",
          f"set model.pattern={SOSM_PATTERN}")
  if "graph" in pattern:
    graph = importlib.import_module("sosm_jax.layers.graph")
    check = getattr(graph, "validate_graph_config", None)
    if check is not None:
      check(cfg.graph)
  if cfg.architecture == "hybrid" and "graph" in pattern:
    _fail("architecture", "'graph' mixers belong to architecture 'sosm'", "set model.architecture='sosm'")
  if cfg.num_layers % len(pattern):
    _fail("num_layers", f"{cfg.num_layers} is not a multiple of len(model.pattern)={len(pattern)}",
          f"use a multiple of {len(pattern)} or change model.pattern")
  if cfg.loss_chunk_size < 0:
    _fail("loss_chunk_size", f"{cfg.loss_chunk_size} < 0", "use 0 (plain logits) or e.g. 1024")
  if "attn" in pattern:
    _positive(cfg, "attn_num_heads", "attn_num_kv_heads", "attn_head_dim")
    if cfg.attn_num_heads % cfg.attn_num_kv_heads:
      _fail("attn_num_kv_heads", f"{cfg.attn_num_kv_heads} does not divide attn_num_heads="
            f"{cfg.attn_num_heads}", "pick a divisor of attn_num_heads")
    if cfg.attn_head_dim % 2:
      _fail("attn_head_dim", f"{cfg.attn_head_dim} is odd (RoPE rotates pairs)", "use an even value")
    if cfg.attn_window < 0:
      _fail("attn_window", f"{cfg.attn_window} < 0", "use 0 (full causal) or a positive window")
    if cfg.attn_impl not in ("", *ATTENTION_IMPLEMENTATIONS):
      _fail("attn_impl", f"unknown value {cfg.attn_impl!r}",
            f"use '' (auto) or one of {ATTENTION_IMPLEMENTATIONS}")
    _positive(cfg, "attn_block_size")
    if cfg.get("attn_kv_cache_dtype", "") not in KV_CACHE_DTYPES:
      _fail("attn_kv_cache_dtype", f"unknown value {cfg.attn_kv_cache_dtype!r}",
            f"use one of {KV_CACHE_DTYPES} ('' = the activations' dtype)")
    if cfg.get("attn_decode_impl", "") not in DECODE_IMPLEMENTATIONS:
      _fail("attn_decode_impl", f"unknown value {cfg.attn_decode_impl!r}",
            f"use one of {DECODE_IMPLEMENTATIONS} ('' = auto)")
    read_len = cfg.get("attn_decode_read_len", 0)
    if not isinstance(read_len, int) or isinstance(read_len, bool) or read_len < 0:
      _fail("attn_decode_read_len", f"must be an int >= 0, got {read_len!r}",
            "use 0 (the whole cache) or a cache length such as 1024")
  if "hgrn2" in pattern:
    _positive(cfg, "hgrn2_head_dim")
    if cfg.d_model % cfg.hgrn2_head_dim:
      _fail("hgrn2_head_dim", f"{cfg.hgrn2_head_dim} does not divide d_model={cfg.d_model}",
            "pick a divisor of d_model (heads = d_model // hgrn2_head_dim)")
  if "gdn" in pattern:
    _positive(cfg, "gdn_num_heads", "gdn_head_dim")
    gates = importlib.import_module("sosm_jax.layers.gated_deltanet").OUTPUT_GATES
    if cfg.gdn_output_gate not in gates:
      _fail("gdn_output_gate", f"unknown value {cfg.gdn_output_gate!r}", f"use one of {gates}")
  if cfg.linear_impl not in LINEAR_IMPLEMENTATIONS:
    _fail("linear_impl", f"unknown value {cfg.linear_impl!r}",
          f"use one of {LINEAR_IMPLEMENTATIONS}")
  if not isinstance(cfg.embed_dim, int) or cfg.embed_dim < 0:
    _fail("embed_dim", f"must be an int >= 0, got {cfg.embed_dim!r}", "use 0 (no factorization) or e.g. 128")
  if cfg.logits_dtype not in ("float32", "bfloat16"):
    _fail("logits_dtype", f"unknown value {cfg.logits_dtype!r}", "use 'float32' or 'bfloat16'")
  for key in ("dtype", "param_dtype"):
    if cfg[key] not in DTYPES:
      _fail(key, f"unknown dtype {cfg[key]!r}", f"use one of {DTYPES}")
  if cfg.remat not in REMAT_POLICIES:
    _fail("remat", f"unknown policy {cfg.remat!r}", f"use one of {REMAT_POLICIES}")
  if not cfg.norm_eps > 0:
    _fail("norm_eps", f"must be > 0, got {cfg.norm_eps!r}", "use e.g. 1e-6")


def freeze(cfg) -> ml_collections.FrozenConfigDict:
  """Validated, hashable, immutable copy (what modules hold as their `cfg` field).

  Keys missing from `cfg` (e.g. a config saved before a key was added) take their defaults.
  """
  full = default_model_config(cfg.get("architecture", "hybrid"))
  full.update(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
  validate_model_config(full)
  return ml_collections.FrozenConfigDict(full)
