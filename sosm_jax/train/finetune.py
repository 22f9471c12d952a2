"""Fine-tuning: LoRA adapters on a frozen base, and distillation from a frozen teacher (KL on logits).

Config (`config.finetune`, `default_config`):
  init_from      '' | a work directory (newest checkpoint) or a safetensors export folder: the
                 starting weights (the frozen base with LoRA, else the weights trained further)
  init_match     'all': init_from holds this very model (checked); 'by_name': another model, e.g.
                 with one layer swapped: every parameter whose path and shape equal a saved one
                 starts from it, the rest from the fresh initialisation (listed when training
                 starts); without LoRA or a teacher
  lora_rank      0 = off; R > 0 trains only rank-R adapters on the kernels whose path (joined by
                 '/') matches `lora_targets` (default: every mixer projection and MLP matrix)
  lora_alpha     adapter scale alpha / R
  teacher        '' | a work directory or export folder: a frozen teacher (any architecture
                 with the same vocabulary) whose logits the student matches
  distill_temperature, distill_weight  tau and alpha of
                 loss = (1 - alpha) CE + alpha tau^2 KL(softmax(teacher/tau) || softmax(student/tau))
  distill_chunk_size  tokens of the time axis whose logits are formed at a time (both models)

Parameters while fine-tuning (the train state's `params`): {'base': frozen model weights,
'lora': {kernel path: {'a', 'b'}}} with LoRA, {'student': weights} without, plus 'teacher':
frozen teacher weights when distilling; plain model weights when only init_from is set. The
optimizer (`masked_optimizer`) updates 'lora' (or 'student') only and holds state for nothing
else. `FinetuneModel.merged` gives the plain model weights (base + adapters); `load_merged` reads
them (and the adapters alone) from a run's checkpoint: what launch/export.py writes.
Trainer hooks (sosm_jax/train/loop.py): `setup` swaps init_params and the optimizer,
`Setup.state_shardings` gives the state's shardings, `Setup.load` puts the weights into the fresh
train state, `Setup.wrap` gives the model whose loss is trained.
While distilling, the validation loss is the combined loss.

LoRA on a kernel W `[*in, *out]` (under the layer scan `[groups, *in, *out]`): W + (alpha / R)
A B with A `[*lead, prod(in), R]` (normal, std 1/sqrt(prod(in))) and B `[*lead, R, prod(out)]`
(zeros), so training starts exactly at the base model.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from sosm_jax.layers.embed import Embedder, masked_sums, mean_loss_metrics

_F32 = jnp.float32
INIT_MATCHES = ("all", "by_name")
DEFAULT_TARGETS = r"(mixer/(q|k|v|o|f|i|gate)_proj|mlp/(wi_gate|wi_up|wo))/kernel$"


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      init_from="", init_match="all", pool_kv_heads=False, lora_rank=0, lora_alpha=16.0,
      lora_targets=DEFAULT_TARGETS,
      teacher="", distill_temperature=2.0, distill_weight=0.5, distill_chunk_size=256))


def enabled(ft_cfg) -> bool:
  return bool(ft_cfg.lora_rank > 0 or ft_cfg.teacher or ft_cfg.init_from)


def validate_config(ft_cfg) -> None:
  """ValueError naming the first bad `config.finetune` key."""
  def need(ok, key, problem, fix):
    if not ok:
      raise ValueError(f"config.finetune.{key}: {problem}; {fix}")
  need(ft_cfg.lora_rank >= 0, "lora_rank", f"{ft_cfg.lora_rank} < 0", "use 0 (off) or e.g. 8")
  need(ft_cfg.lora_alpha > 0, "lora_alpha", "must be positive", "use e.g. 16")
  need(ft_cfg.distill_temperature > 0, "distill_temperature", "must be positive", "use e.g. 2")
  need(0 <= ft_cfg.distill_weight <= 1, "distill_weight", "outside [0, 1]", "use e.g. 0.5")
  need(ft_cfg.distill_chunk_size > 0, "distill_chunk_size", "must be positive", "use e.g. 256")
  need(not ft_cfg.lora_rank or ft_cfg.init_from, "init_from", "LoRA needs base weights",
       "set --config.finetune.init_from=<work directory or export folder>")
  need(ft_cfg.init_match in INIT_MATCHES, "init_match", f"{ft_cfg.init_match!r} is not one of "
       f"{INIT_MATCHES}", "use 'all' (the same model) or 'by_name' (parameters matched by path "
       "and shape)")
  need(ft_cfg.init_match == "all" or (ft_cfg.init_from and not wraps_params(ft_cfg)),
       "init_match", "'by_name' starts a full training run from another model's weights",
       "set init_from, and leave lora_rank at 0 and teacher empty (LoRA and distillation load "
       "the same model: init_match='all')")
  try:
    re.compile(ft_cfg.lora_targets)
  except re.error as e:
    need(False, "lora_targets", f"not a regular expression ({e})", "fix the pattern")


# ----------------------------------------------------------------------------- LoRA

def _in_dims(path: str) -> int:
  """Contracted axes of a Dense kernel: 2 for the heads-to-model output projections, else 1."""
  return 2 if re.search(r"mixer/o_proj/kernel$", path) else 1


def lora_targets(params, pattern: str) -> list[str]:
  """Paths ('a/b/kernel') of the kernels that get adapters; ValueError when none match."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  paths = sorted(p for p in flat if re.search(pattern, p))
  if not paths:
    raise ValueError(f"config.finetune.lora_targets {pattern!r} matches no parameter; paths look "
                     f"like {sorted(flat)[:4]}")
  return paths


def _split(path: str, shape) -> tuple[tuple[int, ...], int, int]:
  """(leading stacked axes, prod(in), prod(out)) of a kernel's shape."""
  lead = 1 if path.startswith("layers/") else 0
  n_in = _in_dims(path)
  return (tuple(shape[:lead]), int(np.prod(shape[lead:lead + n_in])),
          int(np.prod(shape[lead + n_in:])))


def init_lora(rng, params, rank: int, pattern: str) -> dict[str, dict[str, jax.Array]]:
  """{path: {'a': `[*lead, in, R]`, 'b': `[*lead, R, out]` zeros}} for the targeted kernels."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  out = {}
  for i, path in enumerate(lora_targets(params, pattern)):
    lead, n_in, n_out = _split(path, flat[path].shape)
    a = jax.random.normal(jax.random.fold_in(rng, i), lead + (n_in, rank), _F32) / np.sqrt(n_in)
    out[path] = {"a": a, "b": jnp.zeros(lead + (rank, n_out), _F32)}
  return out


def merge(base, lora: dict, alpha: float, rank: int):
  """Base params with every adapted kernel replaced by W + (alpha / R) A B (W's dtype)."""
  flat = traverse_util.flatten_dict(base, sep="/")
  for path, ab in lora.items():
    w = flat[path]
    delta = jnp.einsum("...ir,...ro->...io", ab["a"], ab["b"]) * (alpha / rank)
    flat[path] = (w.astype(_F32) + delta.reshape(w.shape)).astype(w.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------- distillation

def final_hidden(module, params, batch, chunk: int):
  """Final-norm output h `[B, T, D]` of a HybridLM, without forming `[B, T, V]` logits.

  The model is run in its chunked-loss mode (logits `chunk` tokens at a time) and the final
  norm's output is captured; returns (h, (loss, metrics)).
  """
  targets = (batch["targets"], batch["loss_mask"])
  out, state = module.clone(cfg=_with_chunk(module.cfg, chunk)).apply(
      {"params": params}, batch["inputs"], positions=batch.get("positions"),
      segment_ids=batch.get("segment_ids"), loss_targets=targets,
      capture_intermediates=lambda mdl, _: mdl.name == "final_norm", mutable=["intermediates"])
  return state["intermediates"]["final_norm"]["__call__"][0], out


def _with_chunk(cfg, chunk: int):
  if cfg.loss_chunk_size > 0:
    return cfg
  d = cfg.as_configdict() if hasattr(cfg, "as_configdict") else ml_collections.ConfigDict(cfg)
  d.loss_chunk_size = chunk
  return ml_collections.FrozenConfigDict(d)


def distill_kl(student_cfg, student_embed, h_s, teacher_cfg, teacher_embed, h_t, mask,
               temperature: float, chunk: int):
  """Masked mean over tokens of KL(p_t || p_s) at temperature tau, times tau^2, in float32.

  h_s, h_t `[B, T, D_s]`, `[B, T, D_t]` final hidden states; *_embed the models' 'embed'
  params; mask `[B, T]`. The time axis is cut into chunks; each chunk's logits live only inside a
  rematerialised scan step (as `Embedder.cross_entropy`).
  """
  b, t = mask.shape
  pad = (-t) % chunk
  mask = mask.astype(_F32)
  if pad:
    h_s = jnp.pad(h_s, ((0, 0), (0, pad), (0, 0)))
    h_t = jnp.pad(h_t, ((0, 0), (0, pad), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  n = (t + pad) // chunk
  chunks = lambda x: jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)
  s_head = lambda h: Embedder(student_cfg).apply({"params": student_embed}, h, method="logits")
  t_head = lambda h: Embedder(teacher_cfg).apply({"params": teacher_embed}, h, method="logits")

  @jax.checkpoint
  def chunk_kl(hs, ht, m):
    log_ps = jax.nn.log_softmax(s_head(hs).astype(_F32) / temperature, -1)
    log_pt = jax.nn.log_softmax(jax.lax.stop_gradient(t_head(ht)).astype(_F32) / temperature, -1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), -1)
    return jnp.sum(kl * m)

  def step(total, xs):
    return total + chunk_kl(*xs), None

  total, _ = jax.lax.scan(step, jnp.zeros((), _F32), (chunks(h_s), chunks(h_t), chunks(mask)))
  return total / jnp.maximum(jnp.sum(mask), 1.0) * temperature ** 2


# ----------------------------------------------------------------------------- the wrapped model

class FinetuneModel:
  """The trainer's model while fine-tuning: `loss(params, batch)` over the fine-tuning params.

  Wraps the student `LanguageModel` (`model`); `teacher` is a LanguageModel or None. Exposes
  `loss`, `flops_per_token`, `num_params_formula`, `cfg`, and `module` whose `apply` takes the
  fine-tuning params (merged to plain weights first), so evaluation code runs unchanged.
  """

  def __init__(self, ft_cfg, model, teacher=None):
    self.ft, self.student, self.teacher = ft_cfg, model, teacher
    self.cfg = model.cfg
    self.module = _MergedModule(model.module, self.merged)

  def merged(self, params):
    """The student's plain parameter tree (base + adapters) from the fine-tuning params."""
    if "lora" in params:
      return merge(jax.lax.stop_gradient(params["base"]), params["lora"], self.ft.lora_alpha,
                   self.ft.lora_rank)
    return params["student"]

  def loss(self, params, batch):
    student = self.merged(params)
    if self.teacher is None:
      return self.student.loss(student, batch)
    chunk = self.ft.distill_chunk_size
    h_s, (ce, metrics) = final_hidden(self.student.module, student, batch, chunk)
    teacher_params = jax.lax.stop_gradient(params["teacher"])
    h_t, _ = final_hidden(self.teacher.module, teacher_params, batch, chunk)
    kl = distill_kl(self.student.cfg, student["embed"], h_s, self.teacher.cfg,
                    teacher_params["embed"], h_t, batch["loss_mask"],
                    self.ft.distill_temperature, chunk)
    alpha = self.ft.distill_weight
    total = (1.0 - alpha) * ce + alpha * kl
    return total, {**metrics, "loss": total, "ce": ce, "kl": kl}

  def flops_per_token(self, seq_len: int) -> float:
    extra = 0.0 if self.teacher is None else self.teacher.flops_per_token(seq_len) / 3.0
    return self.student.flops_per_token(seq_len) + extra

  def num_params_formula(self) -> int:
    return self.student.num_params_formula()


class _MergedModule:
  """`module.apply({'params': finetune params}, ...)` -> the student module on merged weights."""

  def __init__(self, module, merged):
    self._module, self._merged = module, merged

  def apply(self, variables, *args, **kwargs):
    variables = dict(variables, params=self._merged(variables["params"]))
    return self._module.apply(variables, *args, **kwargs)


def wrap_init(ft_cfg, init_params, teacher_init=None, rng=None):
  """`init_params()` -> the fine-tuning params ({'base','lora'} or {'student'}, + 'teacher').

  Values are the model's fresh initialisation (shapes and shardings come from here);
  `load_weights` replaces base / student / teacher by the real weights after creation.
  """
  rng = jax.random.key(0) if rng is None else rng

  def init():
    params = init_params()
    out = ({"base": params, "lora": init_lora(rng, params, ft_cfg.lora_rank, ft_cfg.lora_targets)}
           if ft_cfg.lora_rank > 0 else {"student": params})
    if teacher_init is not None:
      out["teacher"] = teacher_init()
    return out
  return init


_TRAINABLE = ("lora", "student")


def _trainable(tree):
  return None if tree is None else {k: v for k, v in tree.items() if k in _TRAINABLE}


def masked_optimizer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` on the trainable part ('lora' or 'student') only; zero updates for the frozen part.

  The optimizer state is `inner`'s state over the trainable subtree alone: no moments for the
  base or the teacher (`Setup.state_shardings` gives its shardings).
  """
  def init(params):
    return inner.init(_trainable(params))

  def update(grads, state, params=None):
    updates, state = inner.update(_trainable(grads), state, _trainable(params))
    full = {k: updates[k] if k in _TRAINABLE else jax.tree.map(jnp.zeros_like, v)
            for k, v in grads.items()}
    return full, state

  return optax.GradientTransformation(init, update)


def state_shardings(init_params, inner: optax.GradientTransformation, mesh):
  """TrainState shardings for fine-tuning params and `masked_optimizer(inner)`'s state."""
  # pylint: disable=import-outside-toplevel
  from sosm_jax.parallel import logical_shardings, replicated_sharding, unbox_values
  from sosm_jax.train.state import TrainState
  boxed = jax.eval_shape(init_params)
  param_sh = logical_shardings(boxed, mesh)
  abstract_opt = jax.eval_shape(inner.init, _trainable(unbox_values(boxed)))
  replicated = replicated_sharding(mesh)
  opt_sh = optax.tree_utils.tree_map_params(
      inner, lambda _, sharding: sharding, abstract_opt, _trainable(param_sh),
      transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                    nonfinite_streak=replicated, nonfinite_total=replicated)


def load_weights(state, ft_cfg, base_params=None, teacher_params=None):
  """The train state with base / student / teacher weights replaced (shardings kept)."""
  params = dict(state.params)
  key = "base" if "base" in params else "student"
  if base_params is not None:
    params[key] = _put_like(base_params, params[key])
  if teacher_params is not None:
    params["teacher"] = _put_like(teacher_params, params["teacher"])
  return state.replace(params=params)


@dataclasses.dataclass(frozen=True)
class NameMatch:
  """Which parameters `match_by_name` took from the saved weights (paths joined by '/')."""
  loaded: tuple[str, ...]
  fresh: tuple[str, ...]            # in the model, not saved under that path
  reshaped: tuple[str, ...]         # saved under that path with another shape: fresh
  pooled: tuple[str, ...]           # k/v kernels saved with more kv heads: their group means
  unused: tuple[str, ...]           # saved, not in the model
  loaded_values: int
  total_values: int

  def summary(self) -> str:
    def some(paths):
      return ", ".join(paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
    total = len(self.loaded) + len(self.pooled) + len(self.fresh) + len(self.reshaped)
    parts = [f"init_from by name: {len(self.loaded)} of {total} parameters loaded "
             f"({100 * self.loaded_values / max(self.total_values, 1):.1f}% of the values)"]
    if self.pooled:
      parts.append(f"kv heads pooled: {some(self.pooled)}")
    if self.fresh:
      parts.append(f"fresh (not saved): {some(self.fresh)}")
    if self.reshaped:
      parts.append(f"fresh (saved with another shape): {some(self.reshaped)}")
    if self.unused:
      parts.append(f"saved, not in this model: {some(self.unused)}")
    return "; ".join(parts)


def match_by_name(saved, like, pool_kv_heads: bool = False):
  """(params shaped as `like`, NameMatch): each leaf of `like` replaced by the saved leaf of the
  same path and shape, cast to its dtype and placed with its sharding; with `pool_kv_heads`, a
  k/v kernel saved with a multiple of the kv heads by its group means (`pool_kv_kernel`).

  ValueError when no parameter matches (init_from is then not a relative of this model).
  """
  saved_flat = traverse_util.flatten_dict(nn.unbox(saved), sep="/")
  like_flat = traverse_util.flatten_dict(nn.unbox(like), sep="/")
  loaded, pooled, fresh, reshaped, out = [], [], [], [], {}
  loaded_values = 0
  for path, leaf in like_flat.items():
    value = saved_flat.get(path)
    if value is None:
      fresh.append(path)
      out[path] = leaf
    elif tuple(np.shape(value)) == tuple(leaf.shape):
      loaded.append(path)
      loaded_values += leaf.size
      out[path] = _put_leaf(value, leaf)
    elif pool_kv_heads and (means := pool_kv_kernel(path, value, leaf.shape)) is not None:
      pooled.append(path)
      loaded_values += leaf.size
      out[path] = _put_leaf(means, leaf)
    else:
      reshaped.append(path)
      out[path] = leaf
  match = NameMatch(tuple(loaded), tuple(fresh), tuple(reshaped), tuple(pooled),
                    tuple(sorted(set(saved_flat) - set(like_flat))), loaded_values,
                    sum(leaf.size for leaf in like_flat.values()))
  if not loaded:
    raise ValueError("config.finetune.init_from: no parameter of the saved weights has a path "
                     "and shape of this model's (" + match.summary() + "); point init_from at a "
                     "run of a related model")
  return traverse_util.unflatten_dict(out, sep="/"), match


_KV_KERNEL = re.compile(r"(^|/)(k|v)_proj/kernel$")


def pool_kv_kernel(path: str, value, shape):
  """A k/v kernel `[..., H, head_dim]` as `[..., h, head_dim]` by the mean of each group of H / h
  consecutive heads (kv head j of the new layer serves the query heads that used saved kv heads
  j * H/h ... (j + 1) * H/h - 1: the ops repeat each kv head over consecutive query heads), or
  None when `path` is not a k/v kernel or the shapes differ otherwise."""
  saved = tuple(np.shape(value))
  shape = tuple(shape)
  if (not _KV_KERNEL.search(path) or len(saved) != len(shape) or len(shape) < 2
      or saved[:-2] != shape[:-2] or saved[-1] != shape[-1] or saved[-2] <= shape[-2]
      or saved[-2] % shape[-2]):
    return None
  groups = saved[-2] // shape[-2]
  grouped = np.asarray(value, np.float32).reshape(*shape[:-1], groups, shape[-1])
  return grouped.mean(axis=-2)


def _put_leaf(value, like):
  """value as an array of like's dtype, placed with like's sharding."""
  return jax.device_put(jnp.asarray(value, like.dtype), like.sharding)


def _put_like(values, like):
  return jax.tree.map(_put_leaf, nn.unbox(values), like)


def adapters(params) -> dict:
  """The adapters alone ({path: {'a', 'b'}}), what a LoRA run adds to its base."""
  return params["lora"]


def read_weights(path: str):
  """(model config, params) of a work directory (newest checkpoint) or an export folder."""
  # pylint: disable=import-outside-toplevel
  if os.path.isfile(os.path.join(path, "model.safetensors")):
    from sosm_jax.export import weights
    config, params, _ = weights.load(path)
    return config.model, params
  from sosm_jax.eval import loading
  loaded = loading.load_for_eval(path)
  return loaded.config.model, loaded.params


# ----------------------------------------------------------------------------- the trainer's hooks

def wraps_params(ft_cfg) -> bool:
  """True when the train state's params are the fine-tuning tree (LoRA or a teacher)."""
  return bool(ft_cfg.lora_rank > 0 or ft_cfg.teacher)


@dataclasses.dataclass
class Setup:
  """What the trainer swaps in while fine-tuning (see `setup`)."""
  ft: Any
  init_params: Callable[[], Any]
  optimizer: optax.GradientTransformation
  teacher: Any                 # LanguageModel or None
  base_weights: Any            # init_from weights or None
  teacher_weights: Any
  inner_optimizer: optax.GradientTransformation = None   # the trainer's, before masking

  def state_shardings(self, init_params, optimizer, mesh):
    """As `state.state_shardings` (which it calls when the params are not wrapped)."""
    if not wraps_params(self.ft):
      from sosm_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
      return state_lib.state_shardings(init_params, optimizer, mesh)
    return state_shardings(init_params, self.inner_optimizer, mesh)

  def wrap(self, model):
    """The stage's model -> the one the step trains (`FinetuneModel`, or model unchanged)."""
    return FinetuneModel(self.ft, model, self.teacher) if wraps_params(self.ft) else model

  def load(self, state):
    """A freshly created train state with the init_from / teacher weights put in."""
    if not wraps_params(self.ft):
      if self.ft.init_match == "by_name":
        params, match = match_by_name(self.base_weights, state.params, self.ft.pool_kv_heads)
        print(match.summary(), flush=True)
        return state.replace(params=params)
      return state.replace(params=_put_like(self.base_weights, state.params))
    return load_weights(state, self.ft, self.base_weights, self.teacher_weights)


def _check_same_model(saved_cfg, cfg, what: str) -> None:
  from sosm_jax.eval import loading  # pylint: disable=import-outside-toplevel
  saved = saved_cfg.to_dict() if hasattr(saved_cfg, "to_dict") else dict(saved_cfg)
  diffs = loading.compare_model_configs(saved, cfg.to_dict())
  if diffs:
    raise ValueError(f"config.finetune.{what}: its model differs from config.model: "
                     + "; ".join(diffs[:4]) + ". Set config.model to the model that was saved.")


def setup(config, model, init_params, optimizer) -> Setup | None:
  """The fine-tuning pieces for `config.finetune`, or None when it asks for nothing.

  Reads the init_from and teacher weights (host memory) and checks them against the configs.
  """
  ft = config.get("finetune")
  if ft is None or not enabled(ft):
    return None
  validate_config(ft)
  base = teacher = teacher_weights = None
  if ft.init_from:
    saved_cfg, base = read_weights(ft.init_from)
    if ft.init_match == "all":
      _check_same_model(saved_cfg, config.model, "init_from")
  teacher_init = None
  if ft.teacher:
    from sosm_jax import models  # pylint: disable=import-outside-toplevel
    teacher_cfg, teacher_weights = read_weights(ft.teacher)
    teacher = models.build_model(teacher_cfg)
    if teacher.cfg.vocab_size != model.cfg.vocab_size:
      raise ValueError(f"config.finetune.teacher: vocabulary {teacher.cfg.vocab_size} differs from "
                       f"the student's {model.cfg.vocab_size}; distill between models of one "
                       f"tokenizer")
    teacher_init = lambda: teacher.init(jax.random.key(0), 1, teacher.cfg.chunk_size)
  if not wraps_params(ft):
    return Setup(ft, init_params, optimizer, None, base, None)
  wrapped_init = wrap_init(ft, init_params, teacher_init, jax.random.key(config.seed + 1))
  return Setup(ft, wrapped_init, masked_optimizer(optimizer), teacher, base, teacher_weights,
               optimizer)


def load_merged(workdir: str, step: int | None = None):
  """(config, merged plain params, adapters or None, step) of a fine-tuning run's checkpoint."""
  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp
  from sosm_jax import models
  from sosm_jax.eval import loading
  steps = loading.checkpoint_steps(workdir)
  step = steps[-1] if step is None else step
  meta = loading.read_meta(workdir, step)
  config = loading.config_from_dict(meta["config"])
  ft = config.finetune
  model = models.build_model(config.model)
  init = lambda: model.init(jax.random.key(0), 1, config.model.chunk_size)
  teacher_init = None
  if ft.teacher:
    t_cfg, _ = read_weights(ft.teacher)
    teacher = models.build_model(t_cfg)
    teacher_init = lambda: teacher.init(jax.random.key(0), 1, teacher.cfg.chunk_size)
  abstract = nn.unbox(jax.eval_shape(wrap_init(ft, init, teacher_init)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  with loading._manager(workdir) as m:  # pylint: disable=protected-access
    restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target}, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}))))
  params = restored.state["params"]
  merged = FinetuneModel(ft, model).merged(params)
  return config, merged, params.get("lora"), step
