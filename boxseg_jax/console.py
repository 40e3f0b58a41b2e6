"""A console a person can read: one line per log period, no library banners.

By default (absl ``--verbosity=0``) a training run prints

* one progress line per ``train.log_every_steps`` (step, loss, lr,
  steps/s, ETA) on stdout, from process 0 only;
* the evaluation table at each evaluation;
* warnings and errors of every library, INFO lines of this package only.

Dropped by default: the banners TensorFlow and XLA print when TF is
imported (oneDNN, CPU feature guard, "All log messages before
absl::InitializeLog()"), INFO lines of other libraries (jax's backend probe,
CLU's per-step scalar dumps and progress notes, Orbax's internals). All
scalars still go to TensorBoard. ``--verbosity=1`` (or ``-v 1``) shows
everything.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
from typing import Dict, Iterator

from absl import flags

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Lines TensorFlow/XLA write to fd 2 while TF is imported.
_BANNERS = re.compile(
    r"oneDNN custom operations are on|cpu_feature_guard|"
    r"All log messages before absl::InitializeLog\(\)|"
    r"This TensorFlow binary is optimized|"
    r"rebuild TensorFlow with the appropriate compiler flags|"
    r"Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|TF-TRT Warning")


def verbose() -> bool:
  """True when absl's ``--verbosity`` asks for more than the default."""
  try:
    return flags.FLAGS["verbosity"].value >= 1
  except (KeyError, flags.UnparsedFlagAccessError):
    return False


class OnlyOurInfo(logging.Filter):
  """Keeps warnings and errors of everyone, INFO of this package only."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    path = os.path.abspath(record.pathname or "")
    return path.startswith(_PACKAGE_DIR + os.sep)


def install_filters() -> None:
  """Filters the root handlers (absl's among them) unless verbose."""
  if verbose():
    return
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, OnlyOurInfo) for f in handler.filters):
      handler.addFilter(OnlyOurInfo())


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
  """Drops the known banner lines C++ code writes to fd 2 meanwhile.

  Every other line written in the block is re-emitted on stderr when the
  block ends, so real warnings and errors are never lost.
  """
  if verbose():
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      for line in tmp.read().decode("utf-8", "replace").splitlines():
        if line.strip() and not _BANNERS.search(line):
          print(line, file=sys.stderr)
      sys.stderr.flush()


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, values: Dict[str, float],
                  steps_per_sec: float) -> str:
  """``step 100/4000  loss 2.406  lr 4.96e-04  2.6 steps/s  ETA 22m10s``."""
  eta = (total - step) / steps_per_sec if steps_per_sec > 0 else 0.0
  nan = float("nan")
  parts = [f"step {step}/{total}", f"loss {values.get('loss', nan):.4f}",
           f"lr {values.get('lr', nan):.2e}",
           f"{steps_per_sec:.2f} steps/s", f"ETA {_duration(eta)}"]
  for key, label in (("updates_skipped_total", "skipped"),
                     ("input_skipped", "bad records")):
    if values.get(key):
      parts.append(f"{label} {int(values[key])}")
  return "  ".join(parts)
