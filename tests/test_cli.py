"""Commands print the project's own errors as one line and exit with 2.

Each command is started as a user would (``python -m ...``) with a mistake
that fails before any work; ``--traceback`` brings the traceback back.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from boxseg_jax import cli
from boxseg_jax import config as config_lib
from boxseg_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("args,expect", [
    (("boxseg_jax.main", "--config=configs/tiny.py", "--workdir={tmp}/w",
      "--config.data.canvas=96,96", "--config.data.canvas=96,96"),
     "boxseg_jax.main: error: config.data.canvas=(96, 96, 96, 96): "
     "expected 2 ints"),
    (("boxseg_jax.tools.visualize_data", "--config=configs/tiny.py",
      "--output={tmp}/v", "--config.data.train=coco:{tmp}/none:s"),
     "boxseg_jax.tools.visualize_data: error: coco:{tmp}/none:s: annotation "
     "file {tmp}/none/annotations/instances_s.json not found"),
    (("boxseg_jax.tools.mask_ceiling", "--config=configs/tiny.py",
      "--config.data.val=coco:{tmp}/none:s"),
     "boxseg_jax.tools.mask_ceiling: error: coco:{tmp}/none:s: annotation "
     "file"),
    (("boxseg_jax.maskcut", "--images={tmp}/*.jpg", "--output={tmp}/m.json"),
     "boxseg_jax.maskcut: error: no --weights given"),
])
def test_project_errors_print_one_line_and_exit_2(tmp_path, args, expect):
  args = [a.format(tmp=tmp_path) for a in args]
  out = _run(*args)
  assert out.returncode == cli.EXIT_ERROR, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert lines[-2].startswith(expect.format(tmp=tmp_path)), lines[-2:]
  assert lines[-1] == "(run with --traceback for the full traceback)"


def test_traceback_flag_shows_the_traceback(tmp_path):
  out = _run("boxseg_jax.tools.visualize_data", "--config=configs/tiny.py",
             f"--output={tmp_path}/v", f"--config.data.train=coco:{tmp_path}"
             ":s", "--traceback")
  assert out.returncode == 1
  assert "Traceback (most recent call last)" in out.stderr
  assert "FileNotFoundError: coco:" in out.stderr


def _raised(fn):
  try:
    fn()
  except BaseException as e:  # pylint: disable=broad-except
    return e
  raise AssertionError("no exception")


def test_only_our_errors_are_shortened():
  c = config_lib.base_config()
  c.data.canvas = (1, 2, 3)
  ours = _raised(lambda: config_lib.validate(c))
  assert cli.is_project_error(ours)
  assert cli.is_project_error(pipeline.InputError("x"))  # our class
  # A ValueError raised inside a library keeps its traceback.
  assert not cli.is_project_error(_raised(lambda: np.zeros(-1)))
  assert not cli.is_project_error(_raised(lambda: {}["k"]))
  assert not cli.is_project_error(KeyboardInterrupt())
  assert cli.message(KeyError("config.init_keys: 'x' missing")) == \
      "config.init_keys: 'x' missing"
