"""The console: one progress line per period, library banners dropped."""

import logging
import os
import subprocess
import sys

from boxseg_jax import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_progress_line():
  line = console.progress_line(100, 4000, {"loss": 2.40588, "lr": 4.96e-4},
                               2.6)
  assert line == ("step 100/4000  loss 2.4059  lr 4.96e-04  2.60 steps/s  "
                  "ETA 25m00s")
  line = console.progress_line(10, 100000, {"loss": 1.0, "lr": 0.01,
                                            "updates_skipped_total": 3.0},
                               5.0)
  assert "ETA 5h33m" in line and "skipped 3" in line


def test_only_our_info_passes():
  f = console.OnlyOurInfo()
  ours = logging.LogRecord("x", logging.INFO, os.path.join(
      REPO, "boxseg_jax", "train", "loop.py"), 1, "m", None, None)
  theirs = logging.LogRecord("clu", logging.INFO,
                             "/site-packages/clu/logging_writer.py", 1, "m",
                             None, None)
  warn = logging.LogRecord("clu", logging.WARNING,
                           "/site-packages/clu/logging_writer.py", 1, "m",
                           None, None)
  assert f.filter(ours) and not f.filter(theirs) and f.filter(warn)


def test_quiet_stderr_drops_banners_keeps_the_rest(capfd):
  with console.quiet_stderr():
    os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on.\n")
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() "
                b"is called are written to STDERR\n")
    os.write(2, b"a real warning\n")
  err = capfd.readouterr().err
  assert "a real warning" in err
  assert "oneDNN" not in err and "InitializeLog" not in err


def test_main_prints_one_line_per_period(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "boxseg_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", "--config.train.num_steps=2",
       "--config.train.log_every_steps=1", "--config.train.eval_at_end=False"],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("step ")]
  assert [l.split()[1] for l in lines] == ["1/2", "2/2"], proc.stdout
  assert "loss" in lines[0] and "steps/s" in lines[0] and "ETA" in lines[0]
  for banner in ("oneDNN", "InitializeLog", "Unable to initialize backend",
                 "logging_writer.py", "Setting work unit notes"):
    assert banner not in proc.stderr, banner
