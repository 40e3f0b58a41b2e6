r"""Train (and evaluate) a config: the product's main command.

  python -m boxseg_jax.main --config=configs/demo.py --workdir=/tmp/demo
  python -m boxseg_jax.main --config=configs/tiny.py --workdir=/tmp/w \
      --config.train.num_steps=10

Resumes automatically from ``--workdir``. Multi-host: pass
``--distributed`` (or set BOXSEG_DISTRIBUTED=1) on every process; the
coordinator comes from the environment (TPU pods, SLURM) or from
``--coordinator_address``/``--num_processes``/``--process_id``.

Errors of ours (a bad dataset, config field or checkpoint) print one line
and exit with status 2; ``--traceback`` shows the full traceback
(``boxseg_jax/cli.py``). The console shows one progress line per log period
and the evaluation tables; ``--verbosity=1`` adds every library's INFO
lines (``boxseg_jax/console.py``).
"""

import json
import logging
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from boxseg_jax import cli
from boxseg_jax import console

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("BOXSEG_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() (multi-host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (optional).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Optional.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Optional.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  console.install_filters()
  import jax  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  # TensorFlow is only used by CLU's writer and TFDS: keep it off devices,
  # and keep its import banners off the console.
  with console.quiet_stderr():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  from boxseg_jax.train import loop  # pylint: disable=g-import-not-at-top
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(),
               jax.process_index(), jax.process_count())
  summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  summary.pop("state", None)
  summary.pop("history", None)
  print(f"summary[process {jax.process_index()}]: " +
        json.dumps(summary, default=str), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main, "boxseg_jax.main")
