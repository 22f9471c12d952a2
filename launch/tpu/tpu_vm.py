"""Run the same training command on every worker of a Cloud TPU VM slice (gcloud, --worker=all).

Usage (from the repository root; `--dry-run` prints every command instead of running it):
  python launch/tpu/tpu_vm.py create --tpu=NAME --zone=ZONE --accelerator=v5p-32
  python launch/tpu/tpu_vm.py setup  --tpu=NAME --zone=ZONE        # code + environment, all workers
  python launch/tpu/tpu_vm.py train  --tpu=NAME --zone=ZONE --workdir=gs://BUCKET/runs/r1 \
      [--config=configs/curriculum.py] [--copy-data=gs://BUCKET/data] [--preflight] \
      -- --config.data.source=... [more --config.* flags]
  python launch/tpu/tpu_vm.py logs   --tpu=NAME --zone=ZONE [--follow]
  python launch/tpu/tpu_vm.py stop   --tpu=NAME --zone=ZONE        # SIGTERM: checkpoint, then exit
  python launch/tpu/tpu_vm.py delete --tpu=NAME --zone=ZONE
--tpu, --zone and --project default to $SOSM_TPU, $SOSM_ZONE and $SOSM_PROJECT.
Running `train` again with the same --workdir resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top

# TPU VM software versions per TPU generation (gcloud compute tpus versions list --zone=ZONE).
_RUNTIMES = (("v6e", "v2-alpha-tpuv6e"), ("v5p", "v2-alpha-tpuv5"),
             ("v5litepod", "v2-alpha-tpuv5-lite"), ("v5e", "v2-alpha-tpuv5-lite"),
             ("v4", "tpu-ubuntu2204-base"))
_REMOTE_DIR = "~/sosm_jax"
_VENV = "~/sosm_venv"
_LOG = "~/sosm_train.log"
_PID = "~/sosm_train.pid"
_ARCHIVE = "/tmp/sosm_jax.tar.gz"


def default_runtime(accelerator: str) -> str:
  for prefix, runtime in _RUNTIMES:
    if accelerator.startswith(prefix + "-"):
      return runtime
  raise SystemExit(f"error: no default --runtime for accelerator {accelerator!r}; pass --runtime "
                   f"(see: gcloud compute tpus versions list --zone=ZONE)")


def _where(args) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _ssh(args, command: str, worker: str = "all") -> common.Command:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, *_where(args),
          f"--worker={worker}", f"--command={command}"]


def plan_create(args) -> list[common.Command]:
  runtime = args.runtime or default_runtime(args.accelerator)
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.tpu, *_where(args),
         f"--accelerator-type={args.accelerator}", f"--version={runtime}"]
  if args.spot:
    cmd.append("--spot")
  return [cmd]


def plan_setup(args) -> list[common.Command]:
  """Ships the committed code (git archive of HEAD) to every worker and installs the environment."""
  local_archive = f"/tmp/sosm_jax-{args.tpu}.tar.gz"
  unpack = (f"mkdir -p {_REMOTE_DIR} && tar -xzf {_ARCHIVE} -C "
            f"{_REMOTE_DIR} && SOSM_VENV={_VENV} bash {_REMOTE_DIR}/launch/tpu/setup_worker.sh")
  return [
      ["git", "-C", common.REPO_ROOT, "archive", "--format=tar.gz", f"--output={local_archive}",
       "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", local_archive, f"{args.tpu}:{_ARCHIVE}",
       *_where(args), "--worker=all"],
      _ssh(args, unpack),
  ]


def plan_train(args) -> list[common.Command]:
  """One ssh to all workers that starts the same training command on each (detached by default)."""
  common.check_workdir(args.workdir, allow_local=args.allow_local_workdir)
  extra = common.strip_separator(args.train_args)
  python, *rest = common.train_argv(f"{_VENV}/bin/python", args.config, args.workdir, extra)
  train = f"{python} {common.shell_join(rest)}"  # `~` left unquoted: it expands on the worker
  job = f"exec {train}"  # exec: the pid file names the trainer itself, which SIGTERM must reach
  if args.preflight:  # every stage compiled on the slice first; a stage that won't fit stops here
    check = common.compile_argv(python, args.config, extra)[1:]
    job = f"{python} {common.shell_join(check)} && {job}"
  if args.copy_data:
    job = f"{common.copy_data_command(python, args.copy_data)} && {job}"
  env = "export PYTHONUNBUFFERED=1"
  if args.foreground:
    remote = f"cd {_REMOTE_DIR} && {env} && ({job}) 2>&1 | tee {_LOG}"
  else:
    remote = (f"if [ -f {_PID} ] && kill -0 $(cat {_PID}) 2>/dev/null; then echo 'training is "
              f"already running on this worker (pid '$(cat {_PID})'); stop it first' >&2; exit 1; "
              f"fi; cd {_REMOTE_DIR} && {env} && setsid nohup bash -c {shlex.quote(job)} > {_LOG} "
              f"2>&1 < /dev/null & echo $! > {_PID}")
  return [_ssh(args, remote)]


def plan_logs(args) -> list[common.Command]:
  return [_ssh(args, f"tail -n {args.lines} {'-F ' if args.follow else ''}{_LOG}",
               worker=str(args.worker))]


def plan_stop(args) -> list[common.Command]:
  """SIGTERM to the trainer on every worker: it saves a checkpoint and exits."""
  return [_ssh(args, f"if [ -f {_PID} ]; then kill -TERM $(cat {_PID}) && echo 'sent SIGTERM to "
                     f"'$(cat {_PID}); rm -f {_PID}; fi")]


def plan_delete(args) -> list[common.Command]:
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.tpu, *_where(args), "--quiet"]]


_PLANS = {"create": plan_create, "setup": plan_setup, "train": plan_train, "logs": plan_logs,
          "stop": plan_stop, "delete": plan_delete}


def parse_args(argv):
  where = argparse.ArgumentParser(add_help=False)
  where.add_argument("--tpu", default=os.environ.get("SOSM_TPU"), help="TPU VM name ($SOSM_TPU)")
  where.add_argument("--zone", default=os.environ.get("SOSM_ZONE"), help="zone ($SOSM_ZONE)")
  where.add_argument("--project", default=os.environ.get("SOSM_PROJECT"),
                     help="project ($SOSM_PROJECT; default: gcloud's)")
  where.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="action", required=True)
  create = sub.add_parser("create", parents=[where], help="create the TPU VM slice")
  create.add_argument("--accelerator", required=True, help="e.g. v5p-32, v6e-64, v4-32")
  create.add_argument("--runtime", default="", help="TPU software version (default per generation)")
  create.add_argument("--spot", action="store_true", help="a Spot (preemptible) slice")
  sub.add_parser("setup", parents=[where], help="copy the code and install it on every worker")
  train = sub.add_parser("train", parents=[where], help="start training on every worker")
  train.add_argument("--workdir", default="", help="gs://BUCKET/PATH shared by all workers")
  train.add_argument("--config", default=common.DEFAULT_CONFIG, help="config[:variant]")
  train.add_argument("--foreground", action="store_true", help="stream output; stops with ssh")
  train.add_argument("--copy-data", default="", metavar="gs://BUCKET/PATH",
                     help=f"first copy this folder to {common.LOCAL_DATA} on every worker")
  train.add_argument("--preflight", action="store_true",
                     help="first compile every stage on the slice (launch/compile.py) and start "
                          "training only if each one fits in memory")
  train.add_argument("--allow-local-workdir", action="store_true",
                     help="accept a local --workdir (single-host slices only)")
  train.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then --config.* flags")
  logs = sub.add_parser("logs", parents=[where], help="show the training log of one worker")
  logs.add_argument("--worker", type=int, default=0)
  logs.add_argument("--lines", type=int, default=100)
  logs.add_argument("--follow", action="store_true")
  sub.add_parser("stop", parents=[where], help="SIGTERM the trainer (it checkpoints first)")
  sub.add_parser("delete", parents=[where], help="delete the TPU VM slice")
  args = parser.parse_args(argv)
  common.take_dry_run(args)
  for name in ("tpu", "zone"):
    if not getattr(args, name):
      parser.error(f"--{name} is required (or set $SOSM_{name.upper()})")
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  return common.run_commands(_PLANS[args.action](args), dry_run=args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
