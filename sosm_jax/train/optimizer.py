"""AdamW with warmup then cosine or WSD decay, global-norm clipping and a weight-decay mask."""
from __future__ import annotations

import optax
from flax import traverse_util

# Parameters whose path contains one of these names get no weight decay: norm scales, biases, and
# (by default) embeddings, which weight decay shrinks towards zero for rare tokens.
_NO_DECAY_NAMES = ("norm", "bias", "scale", "A_log", "dt_bias", "lower_bound")
_EMBEDDING_NAMES = ("embed", "embedding")


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup, then 'cosine' decay to min_lr_ratio·lr or 'wsd' (warmup-stable-decay).

  The schedule is a function of the global step, so it runs on unbroken across curriculum stages.
  """
  warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
  peak, floor = opt_cfg.learning_rate, opt_cfg.learning_rate * opt_cfg.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  warm = optax.linear_schedule(0.0 if warmup else peak, peak, max(warmup, 1))
  if opt_cfg.schedule == "cosine":
    rest = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_cfg.min_lr_ratio)
  elif opt_cfg.schedule == "wsd":
    cool = max(int(round(decay_steps * opt_cfg.decay_fraction)), 1)
    rest = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, cool)],
        [decay_steps - cool])
  elif opt_cfg.schedule == "constant":
    rest = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optimizer.schedule={opt_cfg.schedule!r}: use 'cosine', 'wsd' or 'constant'")
  return optax.join_schedules([warm, rest], [warmup])


def weight_decay_mask(params, decay_embeddings: bool):
  """True for the parameters that get weight decay (matrices), False for norms, biases, ..."""
  flat = traverse_util.flatten_dict(params)

  def decays(path) -> bool:
    names = "/".join(str(p) for p in path)
    if any(n in names for n in _NO_DECAY_NAMES):
      return False
    if not decay_embeddings and any(n in names for n in _EMBEDDING_NAMES):
      return False
    return True

  return traverse_util.unflatten_dict({path: decays(path) for path in flat})


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, schedule). The optimizer clips by global norm, then applies AdamW."""
  schedule = learning_rate_schedule(opt_cfg, total_steps)
  optimizer = optax.chain(
      optax.clip_by_global_norm(opt_cfg.clip_norm) if opt_cfg.clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay,
                  mask=lambda p: weight_decay_mask(p, opt_cfg.decay_embeddings)),
  )
  return optimizer, schedule
