"""Launch scripts: --dry-run prints the exact commands, bad usage fails."""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _run(script, *args):
  return subprocess.run(["bash", os.path.join(REPO, "launch", script),
                         *args], capture_output=True, text=True, cwd=REPO)


def test_tpu_pod_dry_run():
  out = _run("tpu_pod.sh", "--tpu=pod1", "--zone=us-central2-b",
             "--project=p", "--dry-run", "--", "--config=configs/demo.py",
             "--workdir=gs://b/run 1")
  assert out.returncode == 0, out.stderr
  scp, ssh = [shlex.split(l) for l in out.stdout.strip().splitlines()]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "--worker=all" in scp and "--worker=all" in ssh
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"]
  remote = [a for a in ssh if a.startswith("--command=")][0]
  remote = remote[len("--command="):]
  assert "bash launch/bootstrap.sh tpu" in remote
  assert "BOXSEG_DISTRIBUTED=1" in remote
  # The workdir with a space survives quoting through ssh.
  assert shlex.split(remote.split("&&")[-1])[-1] == "--workdir=gs://b/run 1"


def test_slurm_dry_run():
  out = _run("slurm_gpu.sh", "--nodes=2", "--gpus_per_node=4",
             "--partition=gpu", "--dry-run", "--", "--config=configs/demo.py",
             "--workdir=/shared/r")
  assert out.returncode == 0, out.stderr
  cmd = shlex.split(out.stdout)
  assert cmd[0] == "sbatch" and "--nodes=2" in cmd
  assert "--ntasks-per-node=4" in cmd and "--gpus-per-task=1" in cmd
  wrap = [a for a in cmd if a.startswith("--wrap=")][0]
  assert "launch/bootstrap.sh cuda" in wrap
  assert "BOXSEG_DISTRIBUTED=1" in wrap and "boxseg_jax.main" in wrap


def test_local_multiprocess_dry_run():
  out = _run("local.sh", "--processes=2", "--port=2222", "--cpu_devices=2",
             "--dry-run", "--", "--config=configs/tiny.py", "--workdir=/w")
  assert out.returncode == 0, out.stderr
  lines = [shlex.split(l) for l in out.stdout.strip().splitlines()]
  assert len(lines) == 2
  for i, cmd in enumerate(lines):
    assert "--distributed" in cmd and f"--process_id={i}" in cmd
    assert "--coordinator_address=localhost:2222" in cmd
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in cmd


@pytest.mark.parametrize("script,args", [
    ("tpu_pod.sh", ["--zone=z", "--", "--config=c"]),
    ("tpu_pod.sh", ["--tpu=t", "--zone=z"]),
    ("slurm_gpu.sh", ["--bogus"]),
    ("local.sh", []),
])
def test_bad_usage_fails(script, args):
  out = _run(script, *args)
  assert out.returncode == 2 and out.stderr
