"""Conversion to and from flash-linear-attention's Hugging Face layout (HGRN-2 and Gated DeltaNet hybrids).

A fla folder is what `save_pretrained` writes: config.json (model_type 'hgrn2' or
'gated_deltanet', `attn` naming the softmax-attention layers of a hybrid) and model.safetensors
with torch-layout weights (`nn.Linear.weight` is `[out, in]`). The names and shapes below were
read from fla's model, layer and config classes (fla/models/{hgrn2,gated_deltanet},
fla/layers/{hgrn2,gated_deltanet,attn}.py, fla/modules/mlp.py, fla/models/hybrid.py):

  sosm_jax (per-layer layout)                 fla
  embed.embedding [V, D]                      model.embeddings.weight [V, D]
  embed.head [D, V] (untied only)             lm_head.weight [V, D]   (tie_word_embeddings)
  final_norm.scale                            model.norm.weight
  hgrn2_lower_bounds [L, D]                   model.lower_bounds [L, D]  (HGRN-2, use_lower_bound)
  layer_i.mixer_norm / mlp_norm .scale        model.layers.i.attn_norm / mlp_norm .weight
  layer_i.mlp.wi_gate / wi_up / wo .kernel    model.layers.i.mlp.gate_proj / up_proj / down_proj .weight
  hgrn2: mixer.{q,f,i,o}_proj, o_norm         attn.{q,f,i,o}_proj, g_norm
  gdn:   mixer.{q,k,v,a,b,gate,o}_proj,       attn.{q,k,v,a,b,g,o}_proj, A_log, dt_bias,
         A_log, dt_bias, conv_{q,k,v}_weight  {q,k,v}_conv1d.weight [C, 1, W], o_norm.weight
         [W, C], o_norm.scale
  attn:  mixer.{q,k,v,o}_proj                 attn.{q,k,v,o}_proj

What maps exactly, and what is refused (ValueError naming the difference):
- HGRN-2's output norm: sosm_jax normalises each head on its own (o_norm scale [H, Dk]); fla's
  g_norm normalises all H*Dk channels together. Same function only with one head
  (model.hgrn2_head_dim = d_model); other head counts are refused.
- HGRN-2's lower bound: the same learned table and cumulative softmax over depth in both; fla
  skips the bound at layer 0, where sosm_jax's is 0 (floored at 1e-9): same up to 1e-9.
- The output scale of the linear recurrences (fla: q * Dk^-0.5 in GLA; sosm_jax: 1) is followed
  by an RMSNorm in both, so it cancels up to the norm's epsilon.
- Gated DeltaNet: fla's expand_v must be 1 (sosm_jax has value dim = key dim), no separate value
  heads (num_v_heads), gate on, short conv on, allow_neg_eigval off.
- Attention: fla's head_dim is hidden_size // num_heads, so attn_num_heads * attn_head_dim must
  equal d_model; grouped KV heads map one to one (query head h reads KV head h // groups in both);
  RoPE is rotate-half with the same base; the sliding window counts the current token in both.
- A tied head maps to tie_word_embeddings; a factorized embedding (embed_dim > 0), graph layers,
  mixing HGRN-2 with Gated DeltaNet, and fla options without a counterpart (short convs in HGRN-2,
  qkv biases, AttnRes, activations other than swish) are refused.
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from sosm_jax.export import layout
from sosm_jax.models.config import default_model_config, freeze, layer_mixers

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_MODEL_TYPES = {"hgrn2": ("hgrn2", "HGRN2ForCausalLM"),
                "gdn": ("gated_deltanet", "GatedDeltaNetForCausalLM")}


def _refuse(what: str, fix: str):
  raise ValueError(f"no exact fla conversion: {what}; {fix}.")


def _linear_kind(cfg) -> str:
  """'hgrn2' | 'gdn': the one linear mixer of a convertible model (ValueError otherwise)."""
  if cfg.architecture == "sosm" or "graph" in cfg.pattern:
    _refuse("graph-routing layers have no fla counterpart", "export a hybrid or transformer")
  kinds = sorted(set(layer_mixers(cfg)) - {"attn"})
  if len(kinds) != 1:
    _refuse(f"fla models hold one kind of linear layer, this model has {kinds or 'none'}",
            "use a pattern of 'hgrn2' or of 'gdn' layers (with 'attn' layers)")
  return kinds[0]


def fla_config(model_cfg) -> dict:
  """fla's config.json (a dict) for a sosm_jax model config; ValueError naming what differs."""
  cfg = freeze(model_cfg)
  kind = _linear_kind(cfg)
  if cfg.embed_dim > 0:
    _refuse(f"factorized embedding (model.embed_dim={cfg.embed_dim})", "use embed_dim=0")
  mixers = layer_mixers(cfg)
  model_type, arch = _MODEL_TYPES[kind]
  out = {"model_type": model_type, "architectures": [arch], "hidden_size": cfg.d_model,
         "num_hidden_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
         "intermediate_size": cfg.mlp_dim, "hidden_act": "swish", "norm_eps": cfg.norm_eps,
         "tie_word_embeddings": bool(cfg.tie_embeddings), "fuse_norm": True,
         "fuse_swiglu": True, "fuse_cross_entropy": False, "use_cache": True}
  if kind == "hgrn2":
    heads = cfg.d_model // cfg.hgrn2_head_dim
    if heads != 1:
      _refuse(f"HGRN-2 output norm: sosm_jax normalises each of its {heads} heads separately, "
              f"fla's g_norm all {cfg.d_model} channels together", "only one head maps exactly "
              f"(model.hgrn2_head_dim={cfg.d_model})")
    out.update(attn_mode="chunk", num_heads=heads, expand_ratio=cfg.hgrn2_head_dim,
               use_short_conv=False, use_lower_bound=True, elementwise_affine=True)
  else:
    if cfg.gdn_output_gate != "silu":
      _refuse(f"Gated DeltaNet output gate {cfg.gdn_output_gate!r} (fla's is silu(x W_gate))",
              "train with model.gdn_output_gate='silu'")
    out.update(attn_mode="chunk", num_heads=cfg.gdn_num_heads, head_dim=cfg.gdn_head_dim,
               expand_v=1.0, num_v_heads=None, use_gate=True, use_short_conv=True,
               allow_neg_eigval=False, conv_size=cfg.conv_width)
  attn_layers = [i for i, m in enumerate(mixers) if m == "attn"]
  if attn_layers:
    if cfg.attn_num_heads * cfg.attn_head_dim != cfg.d_model:
      _refuse(f"attention head dim: fla uses hidden_size // num_heads = "
              f"{cfg.d_model // cfg.attn_num_heads}, this model {cfg.attn_head_dim}",
              f"set attn_num_heads * attn_head_dim = d_model ({cfg.d_model})")
    out["attn"] = {"layers": attn_layers, "num_heads": cfg.attn_num_heads,
                   "num_kv_heads": cfg.attn_num_kv_heads, "qkv_bias": False,
                   "window_size": cfg.attn_window or None, "rope_theta": float(cfg.rope_base)}
  else:
    out["attn"] = None
  return out


def _period(mixers: list[str]) -> tuple[str, ...]:
  n = len(mixers)
  for p in range(1, n + 1):
    if n % p == 0 and mixers == mixers[:p] * (n // p):
      return tuple(mixers[:p])
  return tuple(mixers)


def model_config_from_fla(fc: dict) -> ml_collections.ConfigDict:
  """sosm_jax `config.model` for a fla config.json dict; ValueError naming what differs."""
  mt = fc.get("model_type")
  kind = {"hgrn2": "hgrn2", "gated_deltanet": "gdn"}.get(mt)
  if kind is None:
    _refuse(f"fla model_type {mt!r}", "convert 'hgrn2' or 'gated_deltanet' models")
  if fc.get("hidden_act", "swish") != "swish":
    _refuse(f"MLP activation {fc['hidden_act']!r} (sosm_jax: SwiGLU)", "use hidden_act='swish'")
  if fc.get("attnres_block_size") is not None:
    _refuse("AttnRes (attnres_block_size) residuals", "use plain residuals")
  d, n = int(fc["hidden_size"]), int(fc["num_hidden_layers"])
  attn = fc.get("attn")
  if isinstance(attn, list):
    if len(attn) != 1:
      _refuse(f"{len(attn)} attention specifications (sosm_jax has one attention setting)",
              "use one 'attn' dict")
    attn = attn[0]
  attn_layers = set(attn["layers"]) if attn else set()
  mixers = ["attn" if i in attn_layers else kind for i in range(n)]
  c = default_model_config("hybrid")
  mlp = fc.get("intermediate_size")
  if mlp is None:   # fla's GatedMLP default width
    mlp = int(d * (fc.get("hidden_ratio") or 4) * 2 / 3)
    mlp = 256 * ((mlp + 255) // 256)
  c.update(pattern=_period(mixers), num_layers=n, d_model=d, vocab_size=int(fc["vocab_size"]),
           mlp_dim=int(mlp), norm_eps=float(fc.get("norm_eps", 1e-6)),
           tie_embeddings=bool(fc.get("tie_word_embeddings", False)), embed_dim=0,
           dtype="float32", param_dtype="float32")
  if kind == "hgrn2":
    if fc.get("use_short_conv"):
      _refuse("short convolutions in HGRN-2 (use_short_conv)", "use_short_conv=False")
    if not fc.get("use_lower_bound", True):
      _refuse("HGRN-2 without a lower bound (use_lower_bound=False)", "use_lower_bound=True")
    if fc.get("elementwise_affine") is False:
      _refuse("HGRN-2 norm without a scale (elementwise_affine=False)", "elementwise_affine=True")
    expand = fc.get("expand_ratio") or d // int(fc["num_heads"])
    if d // expand != 1:
      _refuse(f"HGRN-2 output norm over all heads ({d // expand} heads; sosm_jax normalises each "
              f"head separately)", "only one head (expand_ratio = hidden_size) maps exactly")
    c.hgrn2_head_dim = int(expand)
  else:
    if float(fc.get("expand_v", 2.0)) != 1.0:
      _refuse(f"Gated DeltaNet expand_v={fc.get('expand_v', 2.0)} (sosm_jax: value dim = key "
              f"dim)", "use expand_v=1")
    if fc.get("num_v_heads") not in (None, fc.get("num_heads")):
      _refuse(f"separate value heads (num_v_heads={fc['num_v_heads']})", "num_v_heads=None")
    if not fc.get("use_gate", True) or not fc.get("use_short_conv", True):
      _refuse("Gated DeltaNet without output gate or short conv", "use_gate and use_short_conv")
    if fc.get("allow_neg_eigval"):
      _refuse("allow_neg_eigval (beta in (0, 2))", "allow_neg_eigval=False")
    c.update(gdn_num_heads=int(fc.get("num_heads", 6)), gdn_head_dim=int(fc.get("head_dim", 256)),
             conv_width=int(fc.get("conv_size", 4)), gdn_output_gate="silu")
  if attn:
    if attn.get("qkv_bias"):
      _refuse("attention qkv biases", "qkv_bias=False")
    heads = int(attn["num_heads"])
    c.update(attn_num_heads=heads, attn_num_kv_heads=int(attn.get("num_kv_heads") or heads),
             attn_head_dim=d // heads, attn_window=int(attn.get("window_size") or 0),
             rope_base=float(attn.get("rope_theta", 10000.0)))
  freeze(c)   # validates
  return c


def _lin(kernel, in_dims: int) -> np.ndarray:
  """Our kernel `[*in, *out]` -> torch Linear weight `[prod(out), prod(in)]`."""
  k = np.asarray(kernel)
  n_in = int(np.prod(k.shape[:in_dims]))
  return np.ascontiguousarray(k.reshape(n_in, -1).T)


def _unlin(weight, in_shape, out_shape) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(weight).T.reshape(tuple(in_shape) + tuple(out_shape)))


def _mixer_map(kind: str) -> list[tuple[str, str, str]]:
  """(our name under mixer/, fla name under attn., how) for a mixer kind."""
  if kind == "hgrn2":
    return [("q_proj", "q_proj", "lin"), ("f_proj", "f_proj", "lin"), ("i_proj", "i_proj", "lin"),
            ("o_proj", "o_proj", "lin2"), ("o_norm", "g_norm", "flat")]
  if kind == "gdn":
    return [("q_proj", "q_proj", "lin"), ("k_proj", "k_proj", "lin"), ("v_proj", "v_proj", "lin"),
            ("a_proj", "a_proj", "lin"), ("b_proj", "b_proj", "lin"),
            ("gate_proj", "g_proj", "lin"), ("o_proj", "o_proj", "lin2"),
            ("o_norm", "o_norm", "flat"), ("A_log", "A_log", "raw"), ("dt_bias", "dt_bias", "raw"),
            ("conv_q_weight", "q_conv1d", "conv"), ("conv_k_weight", "k_conv1d", "conv"),
            ("conv_v_weight", "v_conv1d", "conv")]
  return [("q_proj", "q_proj", "lin"), ("k_proj", "k_proj", "lin"), ("v_proj", "v_proj", "lin"),
          ("o_proj", "o_proj", "lin2")]


_MLP = (("wi_gate", "gate_proj", 1), ("wi_up", "up_proj", 1), ("wo", "down_proj", 1))


def to_fla(params, model_cfg) -> tuple[dict[str, np.ndarray], dict]:
  """(fla state dict {name: numpy array, torch layout}, fla config dict) of sosm_jax params."""
  fc = fla_config(model_cfg)
  params, cfg = layout.unrolled(params, model_cfg)
  out = {"model.embeddings.weight": np.asarray(params["embed"]["embedding"]),
         "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["embed"]["head"]).T)
  if "hgrn2_lower_bounds" in params:
    out["model.lower_bounds"] = np.asarray(params["hgrn2_lower_bounds"])
  for i, mixer in enumerate(layer_mixers(freeze(cfg))):
    ours, pre = params[f"layer_{i}"], f"model.layers.{i}."
    out[pre + "attn_norm.weight"] = np.asarray(ours["mixer_norm"]["scale"])
    out[pre + "mlp_norm.weight"] = np.asarray(ours["mlp_norm"]["scale"])
    for name, fname, _ in _MLP:
      out[pre + f"mlp.{fname}.weight"] = _lin(ours["mlp"][name]["kernel"], 1)
    for name, fname, how in _mixer_map(mixer):
      p = ours["mixer"][name]
      if how == "lin":
        out[pre + f"attn.{fname}.weight"] = _lin(p["kernel"], 1)
      elif how == "lin2":
        out[pre + f"attn.{fname}.weight"] = _lin(p["kernel"], 2)
      elif how == "flat":
        out[pre + f"attn.{fname}.weight"] = np.asarray(p["scale"]).reshape(-1)
      elif how == "conv":
        out[pre + f"attn.{fname}.weight"] = np.ascontiguousarray(np.asarray(p).T[:, None, :])
      else:
        out[pre + f"attn.{fname}"] = np.asarray(p)
  return out, fc


def from_fla(state: dict[str, np.ndarray], fc: dict) -> tuple[ml_collections.ConfigDict, dict]:
  """(sosm_jax model config, params in the layer-scan layout) from a fla state dict and config.

  Every tensor of `state` must be used and every parameter found; ValueError names the rest.
  """
  from sosm_jax.export import weights  # pylint: disable=import-outside-toplevel
  cfg = model_config_from_fla(fc)
  cfg.scan_layers = False
  shapes = {k: v[0] for k, v in weights.expected_shapes(cfg).items()}
  # fla checkpoints are often bfloat16; sosm_jax parameters are float32 (exact widening)
  state = {k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind in "fV" or
           str(np.asarray(v).dtype) == "bfloat16" else np.asarray(v) for k, v in state.items()}
  used = set()

  def take(name):
    if name not in state:
      raise ValueError(f"the fla weights lack {name!r}; is this a {fc.get('model_type')} "
                       f"checkpoint saved by fla's save_pretrained?")
    used.add(name)
    return state[name]

  def shape(path):
    return shapes[path]

  params = {"embed": {"embedding": take("model.embeddings.weight")},
            "final_norm": {"scale": take("model.norm.weight")}}
  if cfg.tie_embeddings:
    if "lm_head.weight" in state:
      used.add("lm_head.weight")
      if not np.array_equal(state["lm_head.weight"], state["model.embeddings.weight"]):
        _refuse("tie_word_embeddings is set but lm_head.weight differs from the embeddings",
                "set tie_word_embeddings=False in config.json")
  else:
    params["embed"]["head"] = np.ascontiguousarray(take("lm_head.weight").T)
  if "hgrn2_lower_bounds" in shapes:
    params["hgrn2_lower_bounds"] = take("model.lower_bounds")
  for i, mixer in enumerate(layer_mixers(freeze(cfg))):
    pre, base = f"model.layers.{i}.", f"layer_{i}"
    layer = {"mixer_norm": {"scale": take(pre + "attn_norm.weight")},
             "mlp_norm": {"scale": take(pre + "mlp_norm.weight")}, "mlp": {}, "mixer": {}}
    for name, fname, _ in _MLP:
      s = shape(f"{base}.mlp.{name}.kernel")
      layer["mlp"][name] = {"kernel": _unlin(take(pre + f"mlp.{fname}.weight"), s[:1], s[1:])}
    for name, fname, how in _mixer_map(mixer):
      if how in ("lin", "lin2"):
        s = shape(f"{base}.mixer.{name}.kernel")
        n_in = 1 if how == "lin" else 2
        layer["mixer"][name] = {"kernel": _unlin(take(pre + f"attn.{fname}.weight"), s[:n_in],
                                                 s[n_in:])}
      elif how == "flat":
        s = shape(f"{base}.mixer.{name}.scale")
        layer["mixer"][name] = {"scale": take(pre + f"attn.{fname}.weight").reshape(s)}
      elif how == "conv":
        layer["mixer"][name] = np.ascontiguousarray(take(pre + f"attn.{fname}.weight")[:, 0, :].T)
      else:
        layer["mixer"][name] = take(pre + f"attn.{fname}")
    params[base] = layer
  extra = sorted(set(state) - used)
  if extra:
    _refuse(f"fla tensors without a sosm_jax counterpart: {extra[:6]}"
            f"{' ...' if len(extra) > 6 else ''}", "convert a model without those options")
  weights.check_names_and_shapes(weights.flatten(params), cfg, "the converted fla weights")
  params, cfg = layout.scanned(params, cfg)
  return cfg, params


def save_fla(out_dir: str, params, model_cfg) -> str:
  """Writes a fla folder (config.json + model.safetensors) that fla's from_pretrained reads."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  state, fc = to_fla(params, model_cfg)
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(fc, f, indent=2)
  return out_dir


def load_fla(path: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(full trainer config, params) of a fla folder (config.json + *.safetensors)."""
  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file
  from sosm_jax.train import config as config_lib
  with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
    fc = json.load(f)
  files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  if not files:
    raise ValueError(f"{path!r} holds no .safetensors weights; save the fla model with "
                     f"save_pretrained(..., safe_serialization=True)")
  state = {}
  for name in files:
    state.update(load_file(os.path.join(path, name)))
  model_cfg, params = from_fla(state, fc)
  config = config_lib.base_config()
  config.model = model_cfg
  return config, params
