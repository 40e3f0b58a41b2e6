"""Panels of what the student trains on: grid masks, peers outlined."""

import numpy as np

from boxseg_jax.evaluation import panels


def test_grid_to_canvas_covers_each_cell_with_a_block():
  grid = np.zeros((1, 3, 3), bool)
  grid[0, 1, 2] = True
  up = panels.grid_to_canvas(grid, 10, 12)
  assert up.shape == (1, 10, 12)
  ys, xs = np.nonzero(up[0])
  assert (ys.min(), ys.max(), xs.min(), xs.max()) == (3, 5, 6, 8)


def _batch():
  h = w = 32
  image = np.full((1, h, w, 3), 100, np.uint8)
  image[0, 20:28, 20:28] = 10                 # the pasted peer's pixels
  masks = np.zeros((1, 3, 8, 8), np.float32)
  masks[0, 0, 1:3, 1:3] = 1.0                 # GT 0: flag 1
  masks[0, 1, 5:7, 1:3] = 1.0                 # GT 1: flag 0 (not tinted)
  masks[0, 2, 5:7, 5:7] = 1.0                 # the peer
  return {
      "image": image, "image_teacher": np.full_like(image, 100),
      "image_valid": np.ones((1, h, w), bool),
      "boxes": np.array([[[2, 2, 14, 14], [2, 18, 14, 30],
                          [20, 20, 28, 28]]], np.float32),
      "labels": np.array([[0, 1, 2]]),
      "instance_valid": np.array([[True, True, True]]),
      "pseudo_masks": masks, "pseudo_flags": np.array([[1.0, 0.0, 1.0]]),
      "pseudo_scores": np.ones((1, 3), np.float32),
      "example_valid": np.array([True])}


def test_student_panel_tints_flagged_masks_and_outlines_peers_white():
  out = panels.student_batch_panels(_batch(), 4, ("a", "b", "c"), num_gt=2)
  assert out.shape == (1, 32, 2 * 32 + 4, 3) and out.dtype == np.uint8
  teacher, student = out[0, :, :32], out[0, :, 36:]
  # Tinted exactly where a flagged pseudo mask is (GT 0 and the peer, not
  # the flag-0 GT 1): compare with the same panel without masks.
  b = _batch()
  b["pseudo_flags"][:] = 0.0
  bare = panels.student_batch_panels(b, 4, ("a", "b", "c"), num_gt=2)
  diff = np.any(bare[0, :, 36:] != student, -1)
  flagged = panels.grid_to_canvas(b["pseudo_masks"][0, [0, 2]] > 0.5,
                                  32, 32).any(0)
  assert not (diff & ~flagged).any()
  assert diff[flagged].mean() > 0.5
  # The peer (index >= num_gt): white outline on the student view only.
  assert tuple(student[24, 19]) == panels.PEER_COLOR
  assert not (teacher == 255).all(-1).any()
  # Without num_gt nothing is a peer.
  plain = panels.student_batch_panels(_batch(), 4, ("a", "b", "c"))
  assert not (plain[0, :, 36:] == 255).all(-1).any()


def test_no_valid_example_gives_no_panel():
  b = _batch()
  b["example_valid"][:] = False
  assert panels.student_batch_panels(b, 4).shape[0] == 0
