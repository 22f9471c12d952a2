"""Ahead-of-time compilation of every curriculum stage's train step, for the local devices or a
TPU topology compiled on any host (libtpu), and what each compiled step needs: memory per chip,
FLOPs, collectives and a roofline estimate of its time.

The step is the trainer's own (`step.make_train_step` with `state.state_shardings`, the batch
sharding and the donated state), so what compiles here is what `launch/train.py` runs.

  topology_devices('v5p:4x4x4')   TPU devices of a topology without a TPU (needs libtpu)
  compile_stage(...)              one stage: (compiled executable, StageReport)
  compile_curriculum(...)         every stage, for `launch/compile.py`
  fixes(...), does_not_fit_message(...)   what to change when a stage does not fit; the trainer's
                                  preflight (`startup_checks.preflight_stages`) says it too
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Sequence

import flax.linen as nn
import jax
import ml_collections
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from sosm_jax import models
from sosm_jax.parallel import LOGICAL_AXIS_RULES, data_parallel_size
from sosm_jax.parallel import mesh as mesh_lib
from sosm_jax.train import curriculum as curriculum_lib
from sosm_jax.train import optimizer as optimizer_lib
from sosm_jax.train import state as state_lib
from sosm_jax.train import step as step_lib
from sosm_jax.train.hlo_stats import HloStats, hlo_stats


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip numbers of an accelerator (bf16 dense peak)."""
  name: str
  hbm_bytes: float
  peak_flops: float       # FLOP/s
  hbm_bandwidth: float    # bytes/s
  ici_bandwidth: float    # bytes/s, bidirectional per chip (0: not published here)


# Google Cloud TPU documentation, "TPU v4" / "TPU v5e" / "TPU v5p" / "TPU v6e" (system
# architecture tables, cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}, read 2026-11-30):
#   v4:  275 TFLOP/s bf16, HBM2 32 GiB at 1200 GB/s
#   v5e: 197 TFLOP/s bf16, HBM2 16 GB at 819 GB/s, ICI 400 GB/s bidirectional per chip
#   v5p: 459 TFLOP/s bf16, HBM2e 95 GiB at 2765 GB/s, ICI 1200 GB/s bidirectional per chip
#   v6e: 918 TFLOP/s bf16, HBM 32 GB at 1638 GB/s, ICI 800 GB/s bidirectional per chip
CHIPS = {
    "v4": Chip("TPU v4", 32 * 2**30, 275e12, 1200e9, 0.0),
    "v5e": Chip("TPU v5e", 16e9, 197e12, 819e9, 400e9),
    "v5p": Chip("TPU v5p", 95 * 2**30, 459e12, 2765e9, 1200e9),
    "v6e": Chip("TPU v6e", 32e9, 918e12, 1638e9, 800e9),
}
# device_kind as libtpu reports it -> generation ('lite' first: 'TPU v5 lite' is a v5e).
_DEVICE_KINDS = (("v6 lite", "v6e"), ("v6e", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"),
                 ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"))
# Slice shapes of the accelerator types (cloud.google.com/tpu/docs/v5p, v5e, v6e): chips -> shape.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


# --------------------------------------------------------------------------- TPU topologies


def parse_topology(name: str) -> tuple[str, str]:
  """('v5p', 'v5p:4x4x4') for 'v5p:4x4x4' or the accelerator type 'v5p-128'.

  Accelerator types count TensorCores for v4/v5p (two per chip) and chips for v5e/v6e.
  """
  m = re.fullmatch(r"(v\d+[a-z]*)[:-](\S+)", name.strip().lower())
  gen = _ALIASES.get(m.group(1), m.group(1)) if m else ""
  if not m or gen not in CHIPS:
    raise ValueError(f"--topology={name!r}: give GENERATION:SHAPE (e.g. v5p:4x4x4, v5e:4x4, "
                     f"v6e:8x8) or an accelerator type (e.g. v5p-128, v5e-16); generations: "
                     f"{tuple(CHIPS)}")
  rest = m.group(2)
  if "x" in rest:
    return gen, f"{gen}:{rest}"
  count = int(rest) // (2 if gen in ("v4", "v5p") else 1)
  shapes = _SHAPES_3D if gen in ("v4", "v5p") else _SHAPES_2D
  if count not in shapes:
    raise ValueError(f"--topology={name!r}: no known slice shape for {count} chips; give the "
                     f"shape, e.g. {gen}:{next(iter(shapes.values()))}")
  return gen, f"{gen}:{shapes[count]}"


def topology_devices(name: str, num_slices: int = 1) -> list:
  """The TPU devices of a topology (all slices), compiled for from this host through libtpu."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # Compiling opens no chip, so several processes (test workers, other jobs) may load libtpu at
  # once; without this libtpu refuses all but the first through its lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  _, topology = parse_topology(name)
  dims = [int(d) for d in topology.split(":")[1].split("x")]
  per_host = tuple(min(2, d) for d in dims[:2]) + (1,)  # 4 chips per host (2x2)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name="default", chips_per_host_bounds=per_host,
                                        num_slices=num_slices)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"cannot describe TPU topology {topology} ({e}); compiling for a TPU "
                       f"without one needs libtpu: pip install -e .[tpu]") from e
  return list(desc.devices)


def chip_of(device) -> Chip | None:
  """The Chip table entry of a device (None for CPUs and GPUs)."""
  kind = device.device_kind.lower()
  for key, gen in _DEVICE_KINDS:
    if key in kind:
      return CHIPS[gen]
  return None


def mesh_for_devices(mesh_cfg, devices: Sequence) -> Mesh:
  """The trainer's mesh (axes parallel.mesh.MESH_AXES, as make_mesh builds it) over `devices`,
  laid out on the topology (ICI rings; the 'data' axis across slices of a multi-slice job)."""
  sizes = [mesh_cfg.get(a, 1) for a in mesh_lib.MESH_AXES]  # an axis a config lacks: size 1
  shape = mesh_lib.resolve_mesh_shape(sizes, len(devices))
  types = (AxisType.Auto,) * len(shape)
  slices = len({getattr(d, "slice_index", 0) or 0 for d in devices})
  if slices > 1:
    within, across = mesh_lib.split_over_slices(shape, slices)
    grid = mesh_utils.create_hybrid_device_mesh(within, across, devices)
  else:
    grid = mesh_utils.create_device_mesh(shape, devices)
  return Mesh(grid, mesh_lib.MESH_AXES, axis_types=types)


# --------------------------------------------------------------------------- compiling a stage


def model_config_for_platform(model_cfg, platform: str) -> ml_collections.ConfigDict:
  """The model config with 'auto' implementations named for `platform` ('tpu', 'gpu', 'cpu').

  'auto' resolves through `jax.default_backend()` while tracing, which is the host's platform;
  a program compiled here for a TPU topology must name the TPU's choices: splash attention and
  the chunked XLA linear-attention forms (the Pallas linear-attention kernels are Triton, GPU).
  """
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  if platform != "tpu":
    return cfg
  if cfg.get("attn_impl", "") == "":
    cfg.attn_impl = "splash"
  linear = cfg.get("linear_impl", "auto")
  if linear in ("", "auto"):
    cfg.linear_impl = "xla"
  elif linear == "pallas":
    raise ValueError("model.linear_impl='pallas' runs Triton kernels, which need a GPU; for a TPU "
                     "use --config.model.linear_impl=xla (or auto)")
  return cfg


def stage_model_config(config, stage: curriculum_lib.Stage) -> ml_collections.ConfigDict:
  """The model config a stage trains with: its remat policy and RoPE base.

  A stage whose remat is still 'auto' (chosen when its train step compiles, see
  `startup_checks.compile_fitting_remat`) gets 'none': forward-only uses keep no activations
  for a backward.
  """
  cfg = ml_collections.ConfigDict(config.model.to_dict())
  cfg.remat = "none" if stage.remat == "auto" else stage.remat
  cfg.rope_base = stage.rope_base
  return cfg


@dataclasses.dataclass
class StageReport:
  """What one stage's compiled train step needs per chip (sizes in bytes, times in seconds)."""
  stage: curriculum_lib.Stage
  devices: int
  compile_seconds: float
  argument_bytes: float      # train state + batch shard
  output_bytes: float
  alias_bytes: float         # donated state reused for the new one
  temp_bytes: float          # activations, gradients, workspace
  model_flops: float         # analytic training FLOPs per step per chip (MFU's numerator)
  kernel_flops: float        # FLOPs of the Pallas kernels (splash attention) per step per chip
  xla_flops: float           # XLA's cost analysis (each loop body counted once)
  hlo: HloStats              # matmul FLOPs, HBM bytes, collectives with loop trip counts
  chip: Chip | None = None
  memory_limit: float | None = None  # bytes per device; default the chip's HBM

  @property
  def memory_bytes(self) -> float:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def compute_flops(self) -> float:
    """Matmul FLOPs of the compiled program plus those of its kernels, per chip per step."""
    return self.hlo.flops + self.kernel_flops

  @property
  def limit_bytes(self) -> float | None:
    return self.memory_limit or (self.chip.hbm_bytes if self.chip else None)

  @property
  def fits(self) -> bool | None:
    return None if self.limit_bytes is None else self.memory_bytes <= self.limit_bytes

  def roofline(self) -> dict[str, float] | None:
    """Roofline estimate of the step time: the largest of compute at peak FLOP/s, the HBM
    traffic at full bandwidth and the collectives at the ICI bandwidth (perfect overlap)."""
    if self.chip is None:
      return None
    times = {"compute": self.compute_flops / self.chip.peak_flops,
             "hbm": self.hlo.hbm_bytes / self.chip.hbm_bandwidth,
             "ici": (self.hlo.collective_bytes / self.chip.ici_bandwidth
                     if self.chip.ici_bandwidth else 0.0)}
    times["step"] = max(times.values())
    times["mfu"] = (self.model_flops / (times["step"] * self.chip.peak_flops)
                    if times["step"] else 0.0)
    return times

  def fixes(self, mesh_shape: dict[str, int]) -> list[str]:
    """What would make a stage that does not fit fit, most effective first."""
    if self.fits is not False:
      return []
    return fixes(self.stage, self.argument_bytes, self.limit_bytes, mesh_shape, self.devices)


def fixes(stage: curriculum_lib.Stage, state_bytes: float, limit_bytes: float,
          mesh_shape: dict[str, int], devices: int) -> list[str]:
  """The config changes that lower a stage's memory per device, most effective first: fsdp when
  the train state (state_bytes, per device) is a large part of the limit, a heavier remat policy,
  more micro-batches; context parallelism when none of those is left."""
  s, out = stage, []
  if state_bytes > 0.3 * limit_bytes and mesh_shape.get("fsdp", 1) < devices:
    out.append("fsdp: shard parameters and optimizer state over the chips "
               "(--config.mesh.fsdp=-1 --config.mesh.data=1)")
  if s.remat != "full":
    out.append(f"remat: recompute the layers in the backward pass (--config.curriculum.remat, "
               f"'full' for stage {s.index}; now '{s.remat}')")
  rows = s.global_batch // s.grad_accum // max(1, mesh_shape.get("data", 1) *
                                                mesh_shape.get("fsdp", 1))
  if rows > 1:
    out.append(f"grad_accum: more micro-batches (--config.curriculum.grad_accum, "
               f"{s.grad_accum * 2} for stage {s.index}: {rows // 2} rows per chip per "
               f"micro-batch instead of {rows})")
  if not out:
    out.append("none of remat / grad_accum / fsdp is left: split each sequence over chips "
               "(--config.mesh.context=N) or use a shorter seq_len")
  return out


def does_not_fit_message(stage: curriculum_lib.Stage, need_bytes: float, limit_bytes: float,
                         stage_fixes: Sequence[str], limit_from: str = "") -> str:
  """The error of a stage whose compiled step needs more memory per device than there is;
  limit_from: where the limit comes from, e.g. ' (train.memory_limit_gib)'."""
  return (f"{stage.name} needs {size_text(need_bytes)} per device by its compiled memory "
          f"analysis but {size_text(limit_bytes)} are available{limit_from}; fix: "
          + "; or ".join(stage_fixes))


def size_text(n_bytes: float) -> str:
  """'17.2 GiB', '312 MiB', '5.00 KiB': three significant digits in the largest unit below it."""
  scale, unit = ((2**30, "GiB") if n_bytes >= 2**30 else (2**20, "MiB") if n_bytes >= 2**20
                 else (2**10, "KiB"))
  value = n_bytes / scale
  return f"{value:.{max(0, 3 - len(str(int(value))))}f} {unit}"


# Matmuls of one call of each splash attention kernel, in [block x block x head_dim] products per
# computed block: the forward does QK^T and PV; the dq kernel recomputes QK^T, then dP = dO V^T
# and dQ = dS K; the dkv kernel recomputes QK^T, then dP, dV = P^T dO and dK = dS^T Q.
_SPLASH_MATMULS = (("splash_mha_fwd", 2), ("splash_mha_dq", 3), ("splash_mha_dkv", 4))


def splash_flops(model_cfg, stage: curriculum_lib.Stage, mesh_shape: dict[str, int],
                 custom_calls: dict[str, float]) -> float:
  """FLOPs per chip of the splash attention kernel calls in a compiled step (XLA sees none).

  Each call covers this chip's rows of a micro-batch and its heads; the kernels compute whole
  blocks: the causal block triangle (or the blocks a sliding window touches).
  """
  calls = {unit: sum(n for name, n in custom_calls.items() if name.startswith(prefix))
           for prefix, unit in _SPLASH_MATMULS}
  if not any(calls.values()):
    return 0.0
  dp = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  micro = stage.global_batch // stage.grad_accum
  rows = micro // dp if micro % dp == 0 else micro
  tp = mesh_shape.get("tensor", 1)
  h, kv = model_cfg.attn_num_heads, model_cfg.attn_num_kv_heads
  heads = h // tp if h % tp == 0 and kv % tp == 0 else h
  t = stage.seq_len
  block = min(_round_up(model_cfg.attn_block_size, 128), _round_up(t, 128))
  n = -(-t // block)
  window = model_cfg.attn_window
  per_row = (n * (n + 1) // 2 if window <= 0 else n * min(n, -(-window // block) + 1)) * block**2
  product = 2.0 * per_row * model_cfg.attn_head_dim * heads * rows
  return sum(unit * n_calls * product for unit, n_calls in calls.items())


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def compile_stage(config, stage: curriculum_lib.Stage, mesh: Mesh, *,
                  platform: str | None = None, memory_limit: float | None = None):
  """Lowers and compiles one stage's train step on `mesh`: (compiled, StageReport).

  platform: the devices' platform ('tpu' for a topology compiled from a CPU host); by default the
  mesh's own. The model config's 'auto' implementations are named for it.
  memory_limit: bytes per device the stage must fit in (default: the chip table's HBM).
  """
  devices = mesh.devices.flat
  first = next(iter(devices))
  platform = platform or first.platform
  if config.memory.get("enabled", False):
    raise ValueError("config.memory.enabled: the ahead-of-time compile covers the plain train "
                     "step; compile memory training with the trainer itself")
  n_steps = curriculum_lib.total_steps(_stages(config, mesh))
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, n_steps)
  model = models.build_model(model_config_for_platform(stage_model_config(config, stage),
                                                       platform))
  base = models.build_model(config.model)
  init_params = lambda: base.init(jax.random.key(config.seed), 1, config.model.chunk_size)
  start = time.time()
  # The abstract mesh, not the devices: optax runs small ops eagerly while deriving shardings,
  # which must not be placed on devices this host cannot run (a TPU topology).
  rules = nn.logical_axis_rules(LOGICAL_AXIS_RULES)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), rules:
    optimizer = state_lib.place_optimizer(init_params, optimizer, mesh)
    state_sh = state_lib.state_shardings(init_params, optimizer, mesh)
    abstract_state = state_lib.abstract_train_state(state_sh, init_params, optimizer)
    jitted, batch_sh = step_lib.jit_train_step(model.loss, optimizer, schedule, stage.grad_accum,
                                               config.train.max_update_ratio, state_sh, mesh)
    compiled = jitted.lower(abstract_state, step_lib.abstract_batch(stage, batch_sh)).compile()
  seconds = time.time() - start
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n = mesh.devices.size
  stats = hlo_stats(compiled.as_text())
  report = StageReport(
      stage=stage, devices=n, compile_seconds=seconds,
      argument_bytes=float(getattr(mem, "argument_size_in_bytes", 0)),
      output_bytes=float(getattr(mem, "output_size_in_bytes", 0)),
      alias_bytes=float(getattr(mem, "alias_size_in_bytes", 0)),
      temp_bytes=float(getattr(mem, "temp_size_in_bytes", 0)),
      model_flops=model.flops_per_token(stage.seq_len) * stage.tokens_per_step / n,
      kernel_flops=splash_flops(model.cfg, stage, dict(mesh.shape), stats.custom_calls),
      xla_flops=float(cost.get("flops", 0.0)), hlo=stats,
      chip=chip_of(first), memory_limit=memory_limit)
  return compiled, report


def _stages(config, mesh: Mesh) -> list[curriculum_lib.Stage]:
  return curriculum_lib.build_stages(config.curriculum, data_parallel=data_parallel_size(mesh),
                                     default_remat=config.model.remat,
                                     default_rope_base=config.model.rope_base)


def compile_curriculum(config, mesh: Mesh, *, stages: Sequence[int] | None = None,
                       platform: str | None = None, memory_limit: float | None = None,
                       on_stage=None, dump_dir: str = "") -> list[StageReport]:
  """Compiles every stage (or the given stage indices) of `config` on `mesh`; on_stage(report)
  is called as each one finishes (for printing progress). dump_dir: also write each stage's
  compiled HLO text and report there (`load_report` reads them back)."""
  reports = []
  for stage in _stages(config, mesh):
    if stages is not None and stage.index not in stages:
      continue
    for policy in curriculum_lib.remat_candidates(stage):   # 'auto': the lightest that fits
      compiled, report = compile_stage(config, dataclasses.replace(stage, remat=policy), mesh,
                                       platform=platform, memory_limit=memory_limit)
      if report.fits is not False:
        break
    if dump_dir:
      dump_report(report, compiled.as_text(), dump_dir)
    reports.append(report)
    if on_stage is not None:
      on_stage(report)
  return reports


def dump_report(report: StageReport, hlo_text: str, directory: str) -> None:
  """Writes stage<i>.hlo.txt and stage<i>.json (the report without its HLO statistics)."""
  os.makedirs(directory, exist_ok=True)
  base = os.path.join(directory, f"stage{report.stage.index}")
  with open(base + ".hlo.txt", "w", encoding="utf-8") as f:
    f.write(hlo_text)
  fields = {k: v for k, v in dataclasses.asdict(report).items() if k != "hlo"}
  with open(base + ".json", "w", encoding="utf-8") as f:
    json.dump(fields, f, indent=1)


def load_report(directory: str, index: int) -> StageReport:
  """A report written by `dump_report`, its HLO statistics computed again from the HLO text."""
  base = os.path.join(directory, f"stage{index}")
  with open(base + ".json", encoding="utf-8") as f:
    fields = json.load(f)
  with open(base + ".hlo.txt", encoding="utf-8") as f:
    stats = hlo_stats(f.read())
  fields["stage"] = curriculum_lib.Stage(**fields["stage"])
  fields["chip"] = Chip(**fields["chip"]) if fields["chip"] else None
  return StageReport(**fields, hlo=stats)


# --------------------------------------------------------------------------- report


def _gib(b: float) -> str:
  return f"{b / 2**30:.2f}"


def format_reports(reports: Sequence[StageReport], mesh_shape: dict[str, int]) -> str:
  """A per-stage table: memory per chip against HBM, FLOPs, collectives, roofline time, MFU."""
  if not reports:
    return "no stages compiled"
  chip = reports[0].chip
  lines = []
  head = (f"{'stage':>5} {'seq_len':>7} {'batch':>9} {'remat':>5} {'compile':>8} "
          f"{'mem/chip GiB':>14} {'fits':>4} {'TFLOP/chip':>10} {'model TF':>8} "
          f"{'HBM GB':>7} {'collectives':>17}")
  if chip:
    head += f" {'roofline ms (compute/hbm/ici)':>31} {'MFU':>5}"
  lines.append(head)
  for r in reports:
    s = r.stage
    hbm = f"/{_gib(r.limit_bytes)}" if r.limit_bytes else ""
    fits = {None: "?", True: "yes", False: "NO"}[r.fits]
    line = (f"{s.index:>5} {s.seq_len:>7} {f'{s.global_batch}x{s.grad_accum}':>9} "
            f"{s.remat:>5} {r.compile_seconds:>7.1f}s {_gib(r.memory_bytes) + hbm:>14} "
            f"{fits:>4} {r.compute_flops / 1e12:>10.2f} {r.model_flops / 1e12:>8.2f} "
            f"{r.hlo.hbm_bytes / 1e9:>7.1f} "
            f"{f'{r.hlo.collective_count:.0f} / {r.hlo.collective_bytes / 1e9:.2f} GB':>17}")
    roof = r.roofline()
    if roof:
      parts = "/".join(f"{roof[k] * 1e3:.0f}" for k in ("compute", "hbm", "ici"))
      step_ms = f"{roof['step'] * 1e3:.0f} ({parts})"
      line += f" {step_ms:>31} {roof['mfu']:>5.1%}"
    lines.append(line)
  for r in reports:
    kinds = ", ".join(f"{k} {n:.0f}x {b / 1e9:.2f} GB" for k, (n, b) in sorted(
        r.hlo.collectives.items()))
    lines.append(f"stage {r.stage.index}: collectives per step per chip: {kinds or 'none'}; "
                 f"loops {sorted(set(r.hlo.loops))} (trip counts), XLA cost analysis "
                 f"{r.xla_flops / 1e12:.2f} TFLOP with loop bodies counted once")
    for fix in r.fixes(mesh_shape):
      lines.append(f"stage {r.stage.index} does not fit; fix: {fix}")
  lines.append("mem/chip: compiled memory analysis (arguments + outputs - donated + temporaries). "
               "TFLOP/chip: matmul FLOPs of the compiled program (loops times their trip counts)"
               " plus the splash attention kernels' (from their calls and block counts); model "
               "TF: analytic training FLOPs (MFU's numerator).")
  if chip:
    lines.append(f"roofline ms: an estimate, not a measurement: max(FLOPs / "
                 f"{chip.peak_flops / 1e12:.0f} TFLOP/s, HBM bytes / "
                 f"{chip.hbm_bandwidth / 1e9:.0f} GB/s, collective bytes / "
                 f"{chip.ici_bandwidth / 1e9:.0f} GB/s ICI) per {chip.name} chip; MFU = model "
                 f"FLOPs / (roofline time x peak).")
  return "\n".join(lines)
