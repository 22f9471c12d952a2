"""Ahead-of-time compilation (sosm_jax/train/aot.py, hlo_stats.py, launch/compile.py): the stage
report on the local CPU devices, the HLO walk against exact counts, and (where libtpu is
installed) the tiny model's step compiled for a TPU v5p topology."""
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sosm_jax.train import aot, hlo_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "curriculum.py")
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
tpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e .[tpu]; "
                         ".ci/run installs it): TPU topologies cannot be compiled for here")


def _tiny_config(**mesh):
  sys.path.insert(0, os.path.dirname(CONFIG))
  import curriculum  # pylint: disable=import-outside-toplevel
  config = curriculum.get_config("tiny")
  config.mesh.update(mesh)
  return config


def test_hlo_walk_counts_loop_bodies_by_their_trip_count():
  """A scan of 6 matmuls plus one outside: XLA's cost analysis counts the loop body once, the
  walk counts it six times (exactly 2 * M * K * N per matmul)."""
  w = jnp.ones((64, 96))
  x = jnp.ones((32, 64))

  def f(w, x):
    body = lambda c, _: (jnp.tanh(c @ w @ w.T), None)
    c, _ = jax.lax.scan(body, x, None, length=6)
    return c @ w

  compiled = jax.jit(f).lower(w, x).compile()
  stats = hlo_stats.hlo_stats(compiled.as_text())
  one = 2 * 32 * 64 * 96
  assert stats.flops == pytest.approx(13 * one)   # 6 x 2 in the loop, 1 after it
  assert 6 in stats.loops and stats.unknown_trip_counts == 0
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert xla["flops"] < 4 * one                   # the loop body once
  assert stats.hbm_bytes >= 6 * 32 * 64 * 4       # at least the carry, read every iteration


def test_hlo_walk_counts_collectives():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  x = jax.device_put(jnp.ones((8, 256), jnp.float32), sharding)
  compiled = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec())).lower(x).compile()
  stats = hlo_stats.hlo_stats(compiled.as_text())
  assert stats.collective_count >= 1 and stats.collective_bytes >= 256 * 4


@pytest.mark.parametrize("name, want", [("v5p:4x4x4", ("v5p", "v5p:4x4x4")),
                                        ("v5p-8", ("v5p", "v5p:2x2x1")),
                                        ("v5p-256", ("v5p", "v5p:4x4x8")),
                                        ("v5litepod-16", ("v5e", "v5e:4x4")),
                                        ("v6e-64", ("v6e", "v6e:8x8")),
                                        ("v4-32", ("v4", "v4:2x2x4"))])
def test_topology_names(name, want):
  assert aot.parse_topology(name) == want


def test_bad_topology_and_platform_choices_are_named():
  with pytest.raises(ValueError, match="GENERATION:SHAPE"):
    aot.parse_topology("h100-8")
  with pytest.raises(ValueError, match="no known slice shape"):
    aot.parse_topology("v5p-12")
  cfg = _tiny_config().model
  tpu_cfg = aot.model_config_for_platform(cfg, "tpu")
  assert (tpu_cfg.attn_impl, tpu_cfg.linear_impl) == ("splash", "xla")
  assert aot.model_config_for_platform(cfg, "cpu").attn_impl == cfg.attn_impl
  cfg.linear_impl = "pallas"
  with pytest.raises(ValueError, match="need a GPU"):
    aot.model_config_for_platform(cfg, "tpu")


def test_splash_kernel_flops_count_the_computed_blocks():
  """Causal attention at 1024 tokens in 512-token blocks computes 3 of 4 blocks; a call of the
  forward kernel does 2 products per block, dq 3 and dkv 4, for this chip's rows and heads."""
  cfg = ml_collections.ConfigDict(dict(attn_num_heads=8, attn_num_kv_heads=4, attn_head_dim=64,
                                       attn_block_size=512, attn_window=0))
  stage = aot.curriculum_lib.Stage(0, 1024, 1, 32, 2, "none", 1e4, 0)   # micro-batch of 16 rows
  calls = {"splash_mha_fwd_residuals": 3, "splash_mha_dq_no_residuals": 1,
           "splash_mha_dkv_no_residuals": 1}
  flops = aot.splash_flops(cfg, stage, {"data": 4, "fsdp": 2, "tensor": 2}, calls)
  product = 2 * 3 * 512**2 * 64 * (8 // 2) * (16 // 8)
  assert flops == (3 * 2 + 3 + 4) * product
  assert aot.splash_flops(cfg, stage, {"data": 8}, {"other_kernel": 2}) == 0


def test_chip_table():
  kinds = {"TPU v5": "TPU v5p", "TPU v5 lite": "TPU v5e", "TPU v6 lite": "TPU v6e",
           "TPU v4": "TPU v4"}
  for kind, chip in kinds.items():
    device = type("D", (), {"device_kind": kind})()
    assert aot.chip_of(device).name == chip
  assert aot.chip_of(jax.devices()[0]) is None
  v5p = aot.CHIPS["v5p"]
  assert v5p.peak_flops == 459e12 and v5p.hbm_bandwidth == 2765e9


def test_local_devices_report_and_a_stage_over_the_limit_is_named_with_fixes():
  """Every stage compiled on the trainer's mesh over the local devices; under a memory limit below
  a stage's compiled need it does not fit, and the message names the stage and the fixes."""
  config = _tiny_config(data=2, fsdp=4)
  config.curriculum.update(seq_lens=(32,), steps=(2,), remat=("dots",))
  mesh = aot.mesh_for_devices(config.mesh, jax.devices())
  (report,) = aot.compile_curriculum(config, mesh)
  assert report.memory_bytes > 0 and report.fits is None  # no limit known for a CPU
  assert report.hlo.flops > report.model_flops > 0        # the program also recomputes (remat)
  over = dataclasses.replace(report, memory_limit=1024)
  assert over.fits is False
  message = aot.does_not_fit_message(over.stage, over.memory_bytes, 1024,
                                     over.fixes(dict(mesh.shape)))
  assert re.match(r"stage 0 \(seq_len 32\) needs [\d.]+ [KMG]iB per device .* but 1\.00 KiB "
                  r"are available; fix: .*remat.*grad_accum", message)


def test_fixes_name_fsdp_when_the_state_dominates():
  stage = aot.curriculum_lib.Stage(3, 32768, 10, 16, 8, "full", 1e4, 0)
  chip = aot.CHIPS["v5e"]
  report = aot.StageReport(stage=stage, devices=16, compile_seconds=1.0,
                           argument_bytes=0.5 * chip.hbm_bytes, output_bytes=0.0, alias_bytes=0.0,
                           temp_bytes=0.6 * chip.hbm_bytes, model_flops=1e12, kernel_flops=2e11,
                           xla_flops=1e11, hlo=hlo_stats.HloStats(flops=8e11), chip=chip)
  assert report.fits is False
  fixes = report.fixes({"data": 16, "fsdp": 1, "tensor": 1})
  assert fixes[0].startswith("fsdp") and "grad_accum" not in " ".join(fixes)  # 1 row per chip
  roof = report.roofline()
  assert roof["step"] == pytest.approx(1e12 / chip.peak_flops) and roof["mfu"] == pytest.approx(1)
  assert report.compute_flops == 1e12


@tpu
def test_tiny_step_compiles_for_a_tpu_topology_with_data_and_fsdp():
  """The tiny model's train step compiled for 4 TPU v5p chips (v5p:2x2x1) on a data x fsdp mesh:
  splash attention and the chunked XLA forms of HGRN-2 and Gated DeltaNet compile, parameters
  are gathered over fsdp and gradients reduced, and the report has TPU memory and a roofline."""
  config = _tiny_config(data=2, fsdp=2)
  config.model.pattern = ("hgrn2", "gdn", "hgrn2", "attn")
  config.curriculum.update(seq_lens=(256,), steps=(2,), tokens_per_step=1024)
  devices = aot.topology_devices("v5p:2x2x1")
  assert len(devices) == 4 and aot.chip_of(devices[0]).name == "TPU v5p"
  mesh = aot.mesh_for_devices(config.mesh, devices)
  stage = aot._stages(config, mesh)[0]  # pylint: disable=protected-access
  compiled, report = aot.compile_stage(config, stage, mesh)
  hlo = compiled.as_text()
  assert "tpu_custom_call" in hlo                     # the splash (Mosaic) kernels
  assert report.fits and 0 < report.memory_bytes < 2**30
  assert {"all-gather", "all-reduce"} <= set(report.hlo.collectives) or (
      "reduce-scatter" in report.hlo.collectives)
  assert report.kernel_flops > 0 and report.compute_flops >= report.model_flops > 0
  assert report.roofline()["step"] > 0
  assert "roofline ms" in aot.format_reports([report], dict(mesh.shape))


def test_compile_script_on_local_devices_fails_a_stage_over_the_limit():
  """launch/compile.py on the local devices (the preflight `tpu_vm.py train --preflight` runs on
  a slice): a report per stage, and exit status 1 naming the fix when a stage is over the
  memory limit."""
  # the script's reports and exit status, not XLA's optimisations nor the model's size, are tested:
  # the tiny model with one layer of each kind, compiled without most optimisations (~5 s less)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  run = lambda *flags: subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "compile.py"), f"--config={CONFIG}:tiny",
       "--stages=0", "--config.mesh.data=8", "--config.model.num_layers=2",
       "--config.model.pattern=('hgrn2', 'attn')", *flags], capture_output=True, text=True,
      env=env, cwd=ROOT, timeout=600)
  proc = run()
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "stage 0 (seq_len 32) compiled" in proc.stdout and "mem/chip" in proc.stdout
  proc = run("--config.train.memory_limit_gib=0.000001")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "stage 0 does not fit; fix: " in proc.stdout and "grad_accum" in proc.stdout
