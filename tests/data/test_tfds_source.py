"""`tfds:NAME:SPLIT` read through tfds.data_source, offline, on our builder."""

import numpy as np
import pytest

from boxseg_jax.data import pipeline
from boxseg_jax.data import shapes
from boxseg_jax.data import tfds_shapes
from boxseg_jax.data import transforms


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  tfds_shapes.build(d)
  return d


def test_tfds_source_matches_generator(data_dir):
  src = pipeline.make_source("tfds:boxseg_shapes:val", tfds_data_dir=data_dir,
                             with_masks=True)
  assert len(src) == tfds_shapes.BoxsegShapes.NUM_IMAGES["val"]
  assert tuple(src.class_names) == shapes.CLASS_NAMES
  cfg = shapes.ShapesConfig(image_size=tfds_shapes.BoxsegShapes.IMAGE_SIZE,
                            max_size=90.0)
  seen = set()
  for i in range(len(src)):
    ex = src[i]
    ref = shapes.generate(tfds_shapes.BoxsegShapes.SEED + 1_000_003,
                          ex["image_id"] - 1, cfg)
    np.testing.assert_array_equal(ex["image"], ref["image"])
    # Boxes go through normalised float32 coordinates: tiny rounding only.
    np.testing.assert_allclose(ex["boxes"], ref["boxes"], atol=1e-3)
    np.testing.assert_array_equal(ex["labels"], ref["labels"])
    np.testing.assert_array_equal(ex["masks"], ref["masks"])
    seen.add(ex["image_id"])
  assert len(seen) == len(src)


def test_tfds_source_feeds_the_pipeline(data_dir):
  src = pipeline.make_source("tfds:boxseg_shapes:train",
                             tfds_data_dir=data_dir)
  tcfg = transforms.TransformConfig(canvas=(128, 128), max_instances=8,
                                    short_sizes=(96, 128), max_size=128)
  it = pipeline.TrainInput(src, tcfg, batch_size=4, seed=0)
  b = next(it)
  assert b["image"].shape == (4, 128, 128, 3)
  assert b["instance_valid"].any()


def test_tfds_image_sizes_come_from_the_static_feature_shape(data_dir):
  src = pipeline.make_source("tfds:boxseg_shapes:train",
                             tfds_data_dir=data_dir)
  sizes = pipeline.image_sizes(src)
  assert sizes.shape == (len(src), 2)
  assert {tuple(s) for s in sizes} == {tfds_shapes.BoxsegShapes.IMAGE_SIZE}
  # Square images are landscape: everything in the first canvas' group.
  groups = pipeline.orientation_groups(src, 2)
  assert len(groups[0]) == len(src) and not len(groups[1])
  src._static_size = None  # what a dataset of varying image sizes has
  with pytest.raises(ValueError, match="no static shape.*single "
                     "data.canvas"):
    pipeline.image_sizes(src)


def test_unknown_tfds_dataset_is_named(tmp_path):
  with pytest.raises(ValueError, match="tfds:no_such_ds:train"):
    pipeline.make_source("tfds:no_such_ds:train", tfds_data_dir=str(tmp_path))


@pytest.mark.parametrize("spec", ["coco:onlyroot", "tfds:x", "nope", "shapes:test"])
def test_bad_dataset_names(spec):
  with pytest.raises(ValueError):
    pipeline.make_source(spec, shapes_cfg=None)
