"""Runs a command's ``main`` so the project's own errors read as one line.

Every command (``boxseg_jax.main``, ``boxseg_jax.tools.visualize_data``,
``boxseg_jax.tools.mask_ceiling``, ``boxseg_jax.maskcut``) starts with
``cli.run(main, name)`` instead of ``absl.app.run(main)``. An error of ours,
that is an exception class defined in ``boxseg_jax`` (``InputError``,
``CheckpointError``, ``NonFiniteLossError``, ``BadImageError``, ...), or a
``ValueError``/``KeyError``/``FileNotFoundError`` raised by a line of
``boxseg_jax`` with our message, is printed on stderr as::

  boxseg_jax.main: error: <the message: file, field, what to do>
  (run with --traceback for the full traceback)

and the process exits with status 2. ``--traceback`` lets it propagate
(full traceback, status 1). Anything else (a bug, an error raised inside a
library) keeps its traceback: those need one to be fixed.
"""

import os
import sys
from typing import Callable, List

from absl import app
from absl import flags

EXIT_ERROR = 2

_TRACEBACK = flags.DEFINE_bool(
    "traceback", False,
    "Show the full traceback of errors (by default the project's own "
    "errors print one line and exit with status 2).")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_OUR_BUILTIN_ERRORS = (ValueError, KeyError, FileNotFoundError)


def _raised_in_package(e: BaseException) -> bool:
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  path = os.path.abspath(tb.tb_frame.f_code.co_filename)
  return path.startswith(_PACKAGE_DIR + os.sep)


def is_project_error(e: BaseException) -> bool:
  """Whether ``e`` is one of our errors with a message meant for users."""
  if not isinstance(e, Exception):
    return False  # KeyboardInterrupt, SystemExit
  module = type(e).__module__ or ""
  if module == "boxseg_jax" or module.startswith("boxseg_jax."):
    return True
  return isinstance(e, _OUR_BUILTIN_ERRORS) and _raised_in_package(e)


def message(e: BaseException) -> str:
  """The text of ``e`` (a KeyError's message without its quotes)."""
  if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(
      e.args[0], str):
    return e.args[0]
  return str(e) or type(e).__name__


def run(main: Callable[[List[str]], None], name: str) -> None:
  """``absl.app.run(main)`` with our errors as one line and exit status 2."""

  def wrapped(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if _TRACEBACK.value or not is_project_error(e):
        raise
      print(f"{name}: error: {message(e)}\n"
            "(run with --traceback for the full traceback)",
            file=sys.stderr, flush=True)
      sys.exit(EXIT_ERROR)

  app.run(wrapped)
