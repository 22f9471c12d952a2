"""Run the training command as an xpk workload on a GKE cluster of Cloud TPU slices.

Usage (from the repository root; `--dry-run` prints every command instead of running it):
  python launch/tpu/xpk.py build  --image=us-docker.pkg.dev/PROJECT/REPO/sosm_jax:TAG
  python launch/tpu/xpk.py create --cluster=CLUSTER --workload=run1 --tpu-type=v5p-128 \
      --image=us-docker.pkg.dev/PROJECT/REPO/sosm_jax:TAG --workdir=gs://BUCKET/runs/run1 \
      [--num-slices=2] [--config=configs/curriculum.py] -- [--config.* flags]
  python launch/tpu/xpk.py list   --cluster=CLUSTER
  python launch/tpu/xpk.py delete --cluster=CLUSTER --workload=run1
`build` makes the image from the committed files with launch/tpu/Dockerfile and pushes it. Instead
of an image, `create --base-image=python:3.12-slim` lets xpk copy this directory into that image and
installs the requirements when the workload starts (slower starts, no docker registry of yours).
--cluster, --project and --zone default to $SOSM_XPK_CLUSTER, $SOSM_PROJECT and $SOSM_ZONE.
Every host of every slice runs the same command; re-creating the workload with the same --workdir
resumes from the last checkpoint (set --max-restarts so preempted workloads do it themselves).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


def _where(args) -> list[str]:
  out = [f"--cluster={args.cluster}"]
  if args.project:
    out.append(f"--project={args.project}")
  if args.zone:
    out.append(f"--zone={args.zone}")
  return out


def plan_build(args) -> list[common.Command]:
  """docker build from `git archive HEAD` (only committed files travel), then docker push."""
  build = (f"git -C {common.shell_join([common.REPO_ROOT])} archive --format=tar HEAD | "
           f"docker build -f launch/tpu/Dockerfile -t {common.shell_join([args.image])} -")
  return [["bash", "-o", "pipefail", "-c", build], ["docker", "push", args.image]]


def workload_command(args, *, install: bool) -> str:
  """The shell command every TPU host of the workload runs."""
  common.check_workdir(args.workdir, allow_local=False)
  train = common.shell_join(common.train_argv("python3", args.config, args.workdir,
                                              common.strip_separator(args.train_args)))
  steps = ["bash launch/tpu/setup_worker.sh --system"] if install else ["cd /app"]
  if args.copy_data:
    steps.append(common.copy_data_command("python3", args.copy_data))
  return " && ".join(steps + [train])


def plan_create(args) -> list[common.Command]:
  if not _NAME.match(args.workload):
    raise SystemExit(f"error: --workload={args.workload!r}: use 1-40 lowercase letters, digits "
                     f"and '-', starting with a letter (it names Kubernetes objects)")
  if bool(args.image) == bool(args.base_image):
    raise SystemExit("error: give exactly one of --image (built by `xpk.py build`) or "
                     "--base-image (xpk copies this directory into it)")
  cmd = ["xpk", "workload", "create", *_where(args), f"--workload={args.workload}",
         f"--tpu-type={args.tpu_type}", f"--num-slices={args.num_slices}"]
  if args.image:
    cmd += [f"--docker-image={args.image}"]
  else:
    cmd += [f"--base-docker-image={args.base_image}", f"--script-dir={common.REPO_ROOT}"]
  cmd += [f"--max-restarts={args.max_restarts}",
          f"--command={workload_command(args, install=bool(args.base_image))}"]
  return [cmd]


def plan_list(args) -> list[common.Command]:
  return [["xpk", "workload", "list", *_where(args)]]


def plan_delete(args) -> list[common.Command]:
  return [["xpk", "workload", "delete", *_where(args), f"--workload={args.workload}"]]


_PLANS = {"build": plan_build, "create": plan_create, "list": plan_list, "delete": plan_delete}


def parse_args(argv):
  dry = argparse.ArgumentParser(add_help=False)
  dry.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  where = argparse.ArgumentParser(add_help=False, parents=[dry])
  where.add_argument("--cluster", default=os.environ.get("SOSM_XPK_CLUSTER"),
                     help="GKE cluster made by `xpk cluster create` ($SOSM_XPK_CLUSTER)")
  where.add_argument("--project", default=os.environ.get("SOSM_PROJECT"))
  where.add_argument("--zone", default=os.environ.get("SOSM_ZONE"))
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="action", required=True)
  build = sub.add_parser("build", parents=[dry], help="build and push the workload image")
  build.add_argument("--image", required=True, help="REGISTRY/NAME:TAG")
  create = sub.add_parser("create", parents=[where], help="start the training workload")
  create.add_argument("--workload", required=True, help="workload name (lowercase, '-')")
  create.add_argument("--tpu-type", required=True, help="e.g. v5p-128, v6e-256")
  create.add_argument("--num-slices", type=int, default=1)
  create.add_argument("--image", default="", help="image made by `build`")
  create.add_argument("--base-image", default="", help="xpk copies this directory into it")
  create.add_argument("--workdir", default="", help="gs://BUCKET/PATH")
  create.add_argument("--config", default=common.DEFAULT_CONFIG, help="config[:variant]")
  create.add_argument("--copy-data", default="", metavar="gs://BUCKET/PATH",
                      help=f"first copy this folder to {common.LOCAL_DATA} on every host")
  create.add_argument("--max-restarts", type=int, default=0,
                      help="restarts after a failure or preemption (each resumes)")
  create.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then --config.* flags")
  sub.add_parser("list", parents=[where], help="list workloads")
  delete = sub.add_parser("delete", parents=[where], help="delete a workload")
  delete.add_argument("--workload", required=True)
  args = parser.parse_args(argv)
  common.take_dry_run(args)
  if args.action != "build" and not args.cluster:
    parser.error("--cluster is required (or set $SOSM_XPK_CLUSTER)")
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  return common.run_commands(_PLANS[args.action](args), dry_run=args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
