"""Tests for ops.locations."""

import numpy as np
import pytest

from boxseg_jax.ops.locations import (compute_locations, fcos_locations,
                                      fpn_level_shapes)


def test_compute_locations_hand():
  got = compute_locations(2, 3, 8)
  want = [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.float32
  # Odd stride: floor(s / 2).
  np.testing.assert_array_equal(compute_locations(1, 2, 5), [[2, 2], [7, 2]])


def test_level_shapes_hand():
  assert fpn_level_shapes(64, 96) == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
  assert fpn_level_shapes(800, 1344) == [
      (100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
  assert fpn_level_shapes(1344, 1344, strides=(8, 32)) == [(168, 168),
                                                           (42, 42)]


def test_level_shapes_reject_unpadded():
  with pytest.raises(ValueError):
    fpn_level_shapes(800, 1333)
  with pytest.raises(ValueError):
    fpn_level_shapes(64, 64, strides=(8, 48))


def test_fcos_locations_concatenation():
  locs = fcos_locations(64, 96)
  sizes = [8 * 12, 4 * 6, 2 * 3, 1 * 2, 1 * 1]
  assert locs.points.shape == (sum(sizes), 2)
  assert locs.levels.dtype == np.int32 and locs.points.dtype == np.float32
  np.testing.assert_array_equal(np.bincount(locs.levels), sizes)
  # Level 0 starts at (4, 4), row-major; level 1 starts right after it.
  np.testing.assert_array_equal(locs.points[:2], [[4, 4], [12, 4]])
  np.testing.assert_array_equal(locs.points[12], [4, 12])
  np.testing.assert_array_equal(locs.points[96], [8, 8])
  # P6 (stride 64) on a 1x2 grid, P7 (stride 128) 1x1.
  np.testing.assert_array_equal(locs.points[-3:], [[32, 32], [96, 32],
                                                   [64, 64]])
  np.testing.assert_array_equal(
      np.unique(locs.strides), [8, 16, 32, 64, 128])
  np.testing.assert_array_equal(locs.strides, 8.0 * 2.0**locs.levels)
