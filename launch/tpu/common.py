"""Shared pieces of the Cloud TPU launchers: the training command, checks, and running or printing.

Every launcher builds its whole plan as a list of commands first (each an argv list), then either
prints them (`--dry-run`) or runs them one after another, stopping at the first failure.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Sequence, TextIO

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = "configs/curriculum.py"
# Where --copy-data puts a bucket's data folder on every host (the sources read local paths).
LOCAL_DATA = "/tmp/sosm_data"

Command = list[str]


def train_argv(python: str, config: str, workdir: str, extra: Sequence[str]) -> Command:
  """`python launch/train.py ...` as every host runs it: the same command on every worker.

  `--config.distributed.num_processes=-1` makes each process call `jax.distributed.initialize()`
  without arguments, so JAX discovers the slice (its hosts, this host's id, the coordinator).
  """
  return [python, "launch/train.py", f"--config={config}", f"--workdir={workdir}",
          "--config.distributed.num_processes=-1", *extra]


def compile_argv(python: str, config: str, extra: Sequence[str]) -> Command:
  """`python launch/compile.py ...`: every stage's step compiled on the slice's devices (all
  hosts, as the trainer will run it), exiting non-zero when a stage does not fit in memory."""
  return [python, "launch/compile.py", f"--config={config}",
          "--config.distributed.num_processes=-1", *extra]


def copy_data_command(python: str, src: str, dst: str = LOCAL_DATA) -> str:
  """Shell command that copies gs:// data to this host's disk (skipping files already there)."""
  if not src.startswith("gs://"):
    raise SystemExit(f"error: --copy-data={src}: give a gs://BUCKET/PATH folder")
  return f"{python} launch/tpu/copy_data.py {shlex.quote(src)} {shlex.quote(dst)}"


def check_workdir(workdir: str, *, allow_local: bool) -> None:
  """Multi-host checkpoints are written collectively, so all hosts need one shared directory."""
  if not workdir:
    raise SystemExit("error: --workdir is required, e.g. --workdir=gs://BUCKET/runs/NAME")
  if "://" not in workdir and not allow_local:
    raise SystemExit(
        f"error: --workdir={workdir} is a local path, but every host of a slice writes its part "
        f"of each checkpoint into the work directory: use a bucket (--workdir=gs://BUCKET/runs/"
        f"NAME), or pass --allow-local-workdir for a single-host slice")


def strip_separator(extra: Sequence[str]) -> list[str]:
  """Training flags given after `--` on the launcher's command line."""
  extra = list(extra)
  return extra[1:] if extra[:1] == ["--"] else extra


def take_dry_run(args) -> None:
  """A `--dry-run` among the training flags (after `--`) still means a dry run, never a real one."""
  extra = list(getattr(args, "train_args", None) or [])
  if "--dry-run" in extra:
    args.dry_run = True
    args.train_args = [a for a in extra if a != "--dry-run"]


def shell_join(argv: Sequence[str]) -> str:
  return shlex.join(list(argv))


def run_commands(commands: Sequence[Command], *, dry_run: bool, out: TextIO = sys.stdout) -> int:
  """Prints (dry run) or runs each command in order; returns the exit status of the plan."""
  for argv in commands:
    if dry_run:
      print(shell_join(argv), file=out, flush=True)
      continue
    print(f"+ {shell_join(argv)}", file=out, flush=True)
    status = subprocess.run(argv, check=False).returncode
    if status:
      print(f"error: exit status {status} from: {shell_join(argv)}", file=sys.stderr)
      return status
  return 0
