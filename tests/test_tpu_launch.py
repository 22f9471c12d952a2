"""The Cloud TPU launchers (launch/tpu): what their --dry-run prints; a real run runs just that."""
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "launch", "tpu", "tpu_vm.py")
XPK = os.path.join(ROOT, "launch", "tpu", "xpk.py")
WHERE = ["--tpu=sosm-v5p", "--zone=us-east5-a", "--project=proj"]
# A flag whose value needs quoting on its way through two shells (local, then the worker's).
GLOB_FLAG = "--config.data.source=array_record:gs://bkt/data/train-*.array_record"


def _launch(script, *args, env=None, check=True):
  proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, cwd=ROOT, timeout=60)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def _commands(script, *args):
  """The dry run's commands, each split back into its argv."""
  return [shlex.split(line) for line in _launch(script, *args, "--dry-run").stdout.splitlines()]


def _flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def _job(remote):
  """The words of the job a remote command starts: inside `bash -c '...'` when detached."""
  words = shlex.split(remote.replace(";", " ; "))
  if "nohup" in words:
    return shlex.split(words[words.index("-c") + 1])
  return shlex.split(remote.replace("(", "( ").replace(")", " )"))


def _train_part(words):
  """The `python launch/train.py ...` argv that the job execs."""
  start = words.index("exec") + 1
  stop = next((i for i in range(start, len(words)) if words[i] in (")", "&&", "|", ">", "2>&1")),
              len(words))
  return words[start:stop]


def test_train_runs_the_same_command_on_every_worker():
  (cmd,) = _commands(TPU_VM, "train", *WHERE, "--workdir=gs://bkt/runs/r1",
                     "--config=configs/curriculum.py:smoke", "--", "--config.mesh.fsdp=4",
                     GLOB_FLAG)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sosm-v5p"]
  assert _flag(cmd, "worker") == "all"
  assert _flag(cmd, "zone") == "us-east5-a" and _flag(cmd, "project") == "proj"
  remote = _flag(cmd, "command")
  subprocess.run(["bash", "-n", "-c", remote], check=True)  # valid shell on the worker
  train = _train_part(_job(remote))
  assert train[0] == "~/sosm_venv/bin/python" and train[1] == "launch/train.py"
  assert train[2:] == ["--config=configs/curriculum.py:smoke", "--workdir=gs://bkt/runs/r1",
                       "--config.distributed.num_processes=-1", "--config.mesh.fsdp=4", GLOB_FLAG]
  assert "setsid nohup" in remote and "> ~/sosm_train.log" in remote  # detached, logged
  assert "kill -0" in remote  # refuses to start twice
  assert "copy_data.py" not in remote


def test_copy_data_runs_on_every_worker_before_training():
  (cmd,) = _commands(TPU_VM, "train", *WHERE, "--workdir=gs://bkt/r", "--copy-data=gs://bkt/data",
                     "--", "--config.data.source=array_record:/tmp/sosm_data/*.array_record")
  remote = _flag(cmd, "command")
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  job = _job(remote)
  assert job[:4] == ["~/sosm_venv/bin/python", "launch/tpu/copy_data.py", "gs://bkt/data",
                     "/tmp/sosm_data"] and job[4] == "&&"
  assert _train_part(job)[-1] == "--config.data.source=array_record:/tmp/sosm_data/*.array_record"


def test_preflight_compiles_every_stage_on_the_slice_before_training():
  """--preflight: launch/compile.py with the same config and flags (on all hosts, as the trainer)
  runs first in the job, and training starts only if it succeeds (&&)."""
  (cmd,) = _commands(TPU_VM, "train", *WHERE, "--workdir=gs://bkt/r", "--preflight",
                     "--copy-data=gs://bkt/data", "--", "--config.mesh.fsdp=4", GLOB_FLAG)
  remote = _flag(cmd, "command")
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  job = _job(remote)
  start = job.index("launch/compile.py") - 1
  stop = job.index("&&", start)
  assert job[start:stop] == ["~/sosm_venv/bin/python", "launch/compile.py",
                             "--config=configs/curriculum.py",
                             "--config.distributed.num_processes=-1", "--config.mesh.fsdp=4",
                             GLOB_FLAG]
  assert job[stop + 1] == "exec"
  assert job.index("launch/tpu/copy_data.py") < start  # copy the data, check, train
  assert _train_part(job)[2:] == ["--config=configs/curriculum.py", "--workdir=gs://bkt/r",
                                  "--config.distributed.num_processes=-1", "--config.mesh.fsdp=4",
                                  GLOB_FLAG]
  (plain,) = _commands(TPU_VM, "train", *WHERE, "--workdir=gs://bkt/r")
  assert "launch/compile.py" not in _flag(plain, "command")


def test_foreground_train_streams_instead_of_detaching():
  (cmd,) = _commands(TPU_VM, "train", *WHERE, "--workdir=gs://bkt/r", "--foreground")
  remote = _flag(cmd, "command")
  assert "nohup" not in remote and "| tee ~/sosm_train.log" in remote
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  assert _train_part(_job(remote))[2:4] == ["--config=configs/curriculum.py",
                                            "--workdir=gs://bkt/r"]


def test_tpu_hosts_get_the_tpu_runtime_and_gs_access():
  for path in ("setup_worker.sh", "Dockerfile"):
    with open(os.path.join(ROOT, "launch", "tpu", path)) as f:
      text = f.read()
    assert all(p in text for p in ('"jax[tpu]"', "gcsfs", "google-cloud-storage",
                                   "requirements.txt")), path


def test_setup_ships_the_committed_code_and_installs_on_all_workers():
  archive, scp, ssh = _commands(TPU_VM, "setup", *WHERE)
  assert archive[:4] == ["git", "-C", ROOT, "archive"] and archive[-1] == "HEAD"
  local = _flag(archive, "output")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and local in scp
  assert _flag(scp, "worker") == "all" and "sosm-v5p:/tmp/sosm_jax.tar.gz" in scp
  remote = _flag(ssh, "command")
  assert _flag(ssh, "worker") == "all"
  assert "tar -xzf /tmp/sosm_jax.tar.gz -C ~/sosm_jax" in remote
  assert "launch/tpu/setup_worker.sh" in remote
  subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", "tpu", "setup_worker.sh")],
                 check=True)


@pytest.mark.parametrize("accelerator, runtime", [("v5p-32", "v2-alpha-tpuv5"),
                                                   ("v6e-64", "v2-alpha-tpuv6e"),
                                                   ("v4-32", "tpu-ubuntu2204-base")])
def test_create_picks_the_runtime_of_the_generation(accelerator, runtime):
  (cmd,) = _commands(TPU_VM, "create", *WHERE, f"--accelerator={accelerator}", "--spot")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sosm-v5p"]
  assert _flag(cmd, "accelerator-type") == accelerator and _flag(cmd, "version") == runtime
  assert "--spot" in cmd


def test_logs_stop_delete():
  (logs,) = _commands(TPU_VM, "logs", *WHERE, "--worker=3", "--follow")
  assert _flag(logs, "worker") == "3" and _flag(logs, "command").startswith("tail -n 100 -F")
  (stop,) = _commands(TPU_VM, "stop", *WHERE)
  assert _flag(stop, "worker") == "all" and "kill -TERM $(cat ~/sosm_train.pid)" in _flag(
      stop, "command")
  (delete,) = _commands(TPU_VM, "delete", *WHERE)
  assert delete[4:6] == ["delete", "sosm-v5p"] and "--quiet" in delete


@pytest.mark.parametrize("args, message", [
    (["train", *WHERE, "--workdir=/tmp/run"], "is a local path"),
    (["train", *WHERE], "--workdir is required"),
    (["train", "--zone=z", "--workdir=gs://b/r"], "--tpu is required"),
    (["create", *WHERE, "--accelerator=v9-8"], "no default --runtime"),
])
def test_bad_arguments_are_named(args, message):
  proc = _launch(TPU_VM, *args, "--dry-run", env={"SOSM_TPU": ""}, check=False)
  assert proc.returncode != 0 and message in proc.stderr and not proc.stdout


def test_environment_supplies_defaults():
  proc = _launch(TPU_VM, "delete", "--dry-run", env={"SOSM_TPU": "envtpu", "SOSM_ZONE": "envzone"})
  (cmd,) = [shlex.split(line) for line in proc.stdout.splitlines()]
  assert cmd[5] == "envtpu" and _flag(cmd, "zone") == "envzone"


def test_without_dry_run_the_printed_commands_are_run(tmp_path):
  """A fake gcloud on PATH records its arguments: they equal the dry run's commands."""
  log = tmp_path / "calls"
  fake = tmp_path / "gcloud"
  fake.write_text(f"#!/usr/bin/env python3\nimport json, sys\n"
                  f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
  args = ["train", *WHERE, "--workdir=gs://bkt/r", "--", GLOB_FLAG]
  dry = _launch(TPU_VM, *args, "--dry-run", env=env)
  assert not log.exists()  # the dry run ran nothing (its --dry-run came after `--`, too)
  _launch(TPU_VM, *args, env=env)
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert [["gcloud", *c] for c in calls] == [shlex.split(x) for x in dry.stdout.splitlines()]


XPK_WHERE = ["--cluster=tpu-cluster", "--project=proj", "--zone=us-east5-a"]


def test_xpk_workload_runs_the_train_command_on_every_host():
  (cmd,) = _commands(XPK, "create", *XPK_WHERE, "--workload=r1", "--tpu-type=v5p-128",
                     "--num-slices=2", "--image=us-docker.pkg.dev/proj/repo/sosm:1",
                     "--workdir=gs://bkt/runs/r1", "--max-restarts=3", "--",
                     "--config.mesh.fsdp=64", GLOB_FLAG)
  assert cmd[:3] == ["xpk", "workload", "create"]
  assert _flag(cmd, "cluster") == "tpu-cluster" and _flag(cmd, "workload") == "r1"
  assert _flag(cmd, "tpu-type") == "v5p-128" and _flag(cmd, "num-slices") == "2"
  assert _flag(cmd, "docker-image") == "us-docker.pkg.dev/proj/repo/sosm:1"
  assert _flag(cmd, "max-restarts") == "3"
  remote = _flag(cmd, "command")
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  assert shlex.split(remote) == ["cd", "/app", "&&", "python3", "launch/train.py",
                                 "--config=configs/curriculum.py", "--workdir=gs://bkt/runs/r1",
                                 "--config.distributed.num_processes=-1", "--config.mesh.fsdp=64",
                                 GLOB_FLAG]


def test_xpk_copy_data_comes_before_training():
  (cmd,) = _commands(XPK, "create", *XPK_WHERE, "--workload=r1", "--tpu-type=v5p-8",
                     "--image=img", "--workdir=gs://bkt/r", "--copy-data=gs://bkt/data")
  steps = _flag(cmd, "command").split(" && ")
  assert steps[:2] == ["cd /app", "python3 launch/tpu/copy_data.py gs://bkt/data /tmp/sosm_data"]
  assert steps[2].startswith("python3 launch/train.py")


def test_copy_data_copies_a_folder_and_skips_what_is_there(tmp_path):
  src = tmp_path / "bucket" / "data"
  (src / "sub").mkdir(parents=True)
  (src / "a.txt").write_text("alpha")
  (src / "sub" / "b.txt").write_text("beta beta")
  dst = tmp_path / "local"
  script = os.path.join(ROOT, "launch", "tpu", "copy_data.py")
  out = _launch(script, f"file://{src}", str(dst)).stdout
  assert "copied 2 files, 0 already present" in out
  assert (dst / "a.txt").read_text() == "alpha" and (dst / "sub" / "b.txt").read_text() == (
      "beta beta")
  (src / "c.txt").write_text("gamma")
  assert "copied 1 files, 2 already present" in _launch(script, f"file://{src}", str(dst)).stdout
  proc = _launch(script, f"file://{tmp_path}/missing", str(dst), check=False)
  assert proc.returncode != 0


def test_xpk_base_image_installs_at_start_and_build_pushes():
  (cmd,) = _commands(XPK, "create", *XPK_WHERE, "--workload=r2", "--tpu-type=v6e-256",
                     "--base-image=python:3.12-slim", "--workdir=gs://bkt/r2")
  assert _flag(cmd, "base-docker-image") == "python:3.12-slim"
  assert _flag(cmd, "script-dir") == ROOT
  assert _flag(cmd, "command").startswith("bash launch/tpu/setup_worker.sh --system && python3 "
                                          "launch/train.py")
  build, push = _commands(XPK, "build", "--image=reg/sosm:2")
  assert build[:3] == ["bash", "-o", "pipefail"]
  assert "archive --format=tar HEAD | docker build -f launch/tpu/Dockerfile -t reg/sosm:2 -" in (
      build[-1])
  assert push == ["docker", "push", "reg/sosm:2"]
  (lst,) = _commands(XPK, "list", *XPK_WHERE)
  (delete,) = _commands(XPK, "delete", *XPK_WHERE, "--workload=r2")
  assert lst[:3] == ["xpk", "workload", "list"] and delete[:3] == ["xpk", "workload", "delete"]
  assert _flag(delete, "workload") == "r2"


@pytest.mark.parametrize("args, message", [
    (["--workload=Run_1", "--image=i", "--workdir=gs://b/r"], "lowercase letters"),
    (["--workload=r1", "--workdir=gs://b/r"], "exactly one of --image"),
    (["--workload=r1", "--image=i", "--base-image=j", "--workdir=gs://b/r"], "exactly one of"),
    (["--workload=r1", "--image=i", "--workdir=/local"], "is a local path"),
    (["--workload=r1", "--image=i", "--workdir=gs://b/r", "--copy-data=/data"], "gs://BUCKET"),
])
def test_xpk_bad_arguments_are_named(args, message):
  proc = _launch(XPK, "create", *XPK_WHERE, "--tpu-type=v5p-8", *args, "--dry-run", check=False)
  assert proc.returncode != 0 and message in proc.stderr and not proc.stdout
