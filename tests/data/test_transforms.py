"""Transforms move image, boxes and masks together (hand-computed cases)."""

import numpy as np
import pytest

from boxseg_jax.data import transforms


def _example(h=4, w=6):
  image = np.zeros((h, w, 3), np.uint8)
  image[1:3, 0:2] = 255  # a 2x2 white square at rows 1-2, cols 0-1
  masks = np.zeros((1, h, w), np.uint8)
  masks[0, 1:3, 0:2] = 1
  return {"image": image, "boxes": np.array([[0, 1, 2, 3]], np.float32),
          "labels": np.array([3], np.int32), "masks": masks, "image_id": 7}


def test_hflip_hand_computed():
  out = transforms.hflip(_example())
  # x -> W - x with W = 6: [0, 2] -> [4, 6].
  np.testing.assert_array_equal(out["boxes"], [[4, 1, 6, 3]])
  expected = np.zeros((4, 6), np.uint8)
  expected[1:3, 4:6] = 1
  np.testing.assert_array_equal(out["masks"][0], expected)
  np.testing.assert_array_equal(out["image"][..., 0] > 0, expected > 0)
  # Flipping twice is the identity.
  back = transforms.hflip(out)
  np.testing.assert_array_equal(back["boxes"], [[0, 1, 2, 3]])
  np.testing.assert_array_equal(back["masks"], _example()["masks"])


def test_resize_doubles_boxes_and_masks():
  out = transforms.resize(_example(), 8, 12)
  # Scale 2 in x and y: box [0,1,2,3] -> [0,2,4,6].
  np.testing.assert_allclose(out["boxes"], [[0, 2, 4, 6]])
  assert out["image"].shape == (8, 12, 3)
  ys, xs = np.nonzero(out["masks"][0])
  # The mask's tight box (pixel-edge convention) equals the scaled box.
  assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 2, 4, 6)


def test_resize_anisotropic():
  out = transforms.resize(_example(), 4, 3)  # x halves, y stays
  np.testing.assert_allclose(out["boxes"], [[0, 1, 1, 3]])


@pytest.mark.parametrize("h,w,short,max_size,expected", [
    (480, 640, 800, 1333, (800, 1067)),   # 640 * 800/480 = 1066.67 -> 1067
    (640, 480, 800, 1333, (1067, 800)),
    (100, 1000, 800, 1333, (133, 1333)),  # long side capped: 8000 -> 1333
    (427, 640, 640, 1333, (640, 959)),    # 640*640/427 = 959.25 -> 959
])
def test_shortest_edge_size(h, w, short, max_size, expected):
  assert transforms.shortest_edge_size(h, w, short, max_size) == expected


def test_fit_size_keeps_aspect():
  assert transforms.fit_size(1067, 800, (800, 1344)) == (800, 600)
  assert transforms.fit_size(100, 200, (800, 1344)) == (100, 200)


def test_clean_instances_counts_drops_and_truncation():
  ex = {"image": np.zeros((10, 10, 3), np.uint8),
        "boxes": np.array([[1, 1, 5, 5], [3, 3, 3, 8], [np.nan, 0, 1, 1],
                           [-5, 2, 4, 20], [0, 0, 2, 2], [6, 6, 9, 9]],
                          np.float32),
        "labels": np.arange(6, dtype=np.int32)}
  out, dropped, truncated = transforms.clean_instances(ex, max_instances=2)
  # Box 1 has zero width, box 2 is NaN -> dropped. Box 3 is clipped to
  # [0, 2, 4, 10]. Valid: 0, 3, 4, 5 -> the first 2 kept, 2 truncated.
  assert (dropped, truncated) == (2, 2)
  np.testing.assert_array_equal(out["labels"], [0, 3])
  np.testing.assert_allclose(out["boxes"], [[1, 1, 5, 5], [0, 2, 4, 10]])


def test_train_transform_static_shapes_and_two_views():
  cfg = transforms.TransformConfig(canvas=(64, 96), max_instances=4,
                                   short_sizes=(8,), max_size=12,
                                   photometric="strong", masks="full")
  fn = transforms.make_train_transform(cfg)
  rng = np.random.default_rng(0)
  out = fn(_example(), rng)
  assert out["image"].shape == out["image_teacher"].shape == (64, 96, 3)
  assert out["boxes"].shape == (4, 4) and out["labels"].tolist()[1:] == [-1] * 3
  assert out["instance_valid"].tolist() == [True, False, False, False]
  # 4x6 -> short side 8 -> 8x12; image_valid covers exactly that.
  assert out["image_valid"].sum() == 8 * 12
  assert tuple(out["resized_size"]) == (8, 12)
  # Geometry is shared: the box matches the mask in the canvas.
  ys, xs = np.nonzero(out["masks"][0])
  np.testing.assert_allclose(out["boxes"][0],
                             [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_s4_masks_are_point_sampled():
  cfg = transforms.TransformConfig(canvas=(32, 32), max_instances=2,
                                   short_sizes=(16,), max_size=32,
                                   hflip_prob=0.0, photometric="none",
                                   masks="s4")
  ex = {"image": np.zeros((16, 16, 3), np.uint8),
        "boxes": np.array([[2, 2, 3, 3]], np.float32),
        "labels": np.array([0], np.int32),
        "masks": np.zeros((1, 16, 16), np.uint8)}
  ex["masks"][0, 2, 2] = 1  # only pixel (2, 2): sampled by [2::4, 2::4]
  ex["masks"][0, 3, 3] = 1  # not on the sampling grid
  out = transforms.make_train_transform(cfg)(ex, np.random.default_rng(0))
  assert out["masks"].shape == (2, 8, 8)
  assert out["masks"][0].sum() == 1 and out["masks"][0, 0, 0]


def test_photometric_changes_student_only():
  cfg = transforms.TransformConfig(canvas=(32, 32), max_instances=2,
                                   short_sizes=(32,), max_size=32,
                                   hflip_prob=0.0)
  img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), np.uint8)
  ex = {"image": img, "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int32)}
  fn = transforms.make_train_transform(cfg)
  changed = 0
  for seed in range(10):
    out = fn(ex, np.random.default_rng(seed))
    np.testing.assert_array_equal(out["image_teacher"], img)
    changed += not np.array_equal(out["image"], img)
  assert changed >= 7  # jitter p=0.8 (+ grayscale p=0.2)


def test_adjust_hue_full_turn_is_identity():
  from PIL import Image
  img = Image.fromarray(np.random.default_rng(0).integers(
      0, 255, (8, 8, 3), np.uint8))
  a = np.asarray(transforms.adjust_hue(img, 0.0)).astype(int)
  b = np.asarray(img.convert("HSV").convert("RGB")).astype(int)
  np.testing.assert_array_equal(a, b)


def test_canvas_must_be_multiple_of_32():
  with pytest.raises(ValueError, match="data.canvas"):
    transforms.TransformConfig(canvas=(100, 96), max_instances=1)


def test_unknown_photometric_is_named():
  with pytest.raises(ValueError, match="data.photometric"):
    transforms.Photometric.named("strongest")
