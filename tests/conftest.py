"""Shared test fixtures."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI = pathlib.Path(
    os.environ.get("BOXSEG_COCO_MINI", REPO.parent / "shared" / "data" / "coco-mini"))


@pytest.fixture
def coco_mini():
  """Path of ../shared/data/coco-mini; skips the test when it is absent."""
  if not (COCO_MINI / "annotations" / "instances_val2017.json").exists():
    pytest.skip(f"coco-mini not found at {COCO_MINI}")
  return COCO_MINI
