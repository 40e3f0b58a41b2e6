"""Shared test fixtures."""

import os
import pathlib

import pytest

# Persistent XLA compilation cache shared by the test process and the
# trainer subprocesses it starts: each distinct program compiles once per
# machine instead of once per test. Set before jax is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join("/tmp", f"boxseg_jax_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI = pathlib.Path(
    os.environ.get("BOXSEG_COCO_MINI", REPO.parent / "shared" / "data" / "coco-mini"))


@pytest.fixture
def coco_mini():
  """Path of ../shared/data/coco-mini; skips the test when it is absent."""
  if not (COCO_MINI / "annotations" / "instances_val2017.json").exists():
    pytest.skip(f"coco-mini not found at {COCO_MINI}")
  return COCO_MINI
