"""tools/scalars reads back what the trainer's CLU writer logged."""

import pytest
from clu import metric_writers

from boxseg_jax.tools import scalars


def test_reads_logged_scalars_and_prints_a_table(tmp_path):
  writer = metric_writers.create_default_writer(str(tmp_path))
  for step in (10, 20, 30):
    writer.write_scalars(step, {"loss": 1.0 / step, "pseudo_iou": 0.1 * step})
  writer.flush()
  got = scalars.read_scalars(str(tmp_path))
  assert got["loss"] == pytest.approx({10: 0.1, 20: 0.05, 30: 1 / 30})
  text = scalars.table(got, ["pseudo_iou"], every=20)
  assert text.splitlines()[1].split() == ["20", "2.0000"]
  with pytest.raises(KeyError, match="no scalar"):
    scalars.table(got, ["nope"])
  with pytest.raises(FileNotFoundError, match="events"):
    scalars.read_scalars(str(tmp_path / "empty"))
