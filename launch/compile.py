"""Compile every curriculum stage's train step ahead of time and report what it needs per chip.

  python launch/compile.py --config=configs/curriculum.py[:variant] [--config.x=y] \
      [--topology=v5p:4x4x4 | --topology=v5p-128] [--num_slices=N] [--stages=0,5]

With --topology the step is compiled for that TPU topology on this host (no TPU needed; libtpu
from `pip install -e .[tpu]`), with the config's mesh and shardings; without it, for the local
devices (all hosts of a slice with --config.distributed.num_processes=-1, as the trainer runs:
what `launch/tpu/tpu_vm.py train --preflight` does before training; the trainer itself checks
every stage's memory before its first step too, `train.preflight`). Per stage: memory per chip
against the chip's HBM (or --config.train.memory_limit_gib), FLOPs, collectives, and a roofline
estimate of the step time and MFU. Exits with status 1 when a stage does not fit, naming the fix.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import jax
from ml_collections import config_flags

from sosm_jax.parallel import maybe_initialize_distributed
from sosm_jax.train import aot, config as config_lib, metrics

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/curriculum.py:smoke", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU topology (v5p:4x4x4, v5e:4x4, v6e:8x8) or "
                                "accelerator type (v5p-128); '' = the local devices")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices of the topology (multi-slice)")
_STAGES = flags.DEFINE_list("stages", [], "stage indices to compile (default: all)")
_DUMP_DIR = flags.DEFINE_string("dump_dir", "", "also write each stage's compiled HLO and report "
                                "here (aot.load_report reads them back)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  config_lib.validate_config(config)
  if _TOPOLOGY.value:
    devices = aot.topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
    where = f"{_TOPOLOGY.value} x {_NUM_SLICES.value} slice(s)"
  else:
    maybe_initialize_distributed(config.distributed)
    devices = jax.devices()
    where = f"this job's devices, {jax.process_count()} process(es)"
  mesh = aot.mesh_for_devices(config.mesh, devices)
  chip = aot.chip_of(devices[0])
  say = print if jax.process_index() == 0 else lambda *a, **k: None
  say(f"Compiling for {len(devices)} {devices[0].device_kind} devices ({where}), mesh "
        f"{dict(mesh.shape)}" + (f"; {chip.name}: {chip.hbm_bytes / 2**30:.1f} GiB HBM, "
                                 f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
                                 f"{chip.hbm_bandwidth / 1e9:.0f} GB/s" if chip else ""),
        flush=True)
  stages = [int(s) for s in _STAGES.value] or None
  on_stage = lambda r: say(f"  stage {r.stage.index} (seq_len {r.stage.seq_len}) compiled in "
                             f"{r.compile_seconds:.1f}s", flush=True)
  limit = config.train.memory_limit_gib * 2**30 if config.train.memory_limit_gib > 0 else None
  if limit is None and not _TOPOLOGY.value:
    limit = metrics.device_memory_limit_bytes()  # a GPU's own limit; None on a CPU
  reports = aot.compile_curriculum(config, mesh, stages=stages, memory_limit=limit,
                                   on_stage=on_stage, dump_dir=_DUMP_DIR.value)
  say(aot.format_reports(reports, dict(mesh.shape)), flush=True)
  return 1 if any(r.fits is False for r in reports) else 0


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(lambda argv: sys.exit(main(argv)))
