"""`shapes` is deterministic by seed and a fair box-supervision test."""

import numpy as np

from boxseg_jax.data import shapes


def test_same_seed_same_images_other_seed_differs():
  a = shapes.generate(3, 5)
  b = shapes.generate(3, 5)
  c = shapes.generate(4, 5)
  for k in ("image", "boxes", "labels", "masks"):
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])


def test_order_independent():
  src = shapes.ShapesSource(10, seed=1)
  forward = [src[i]["image"] for i in range(10)]
  backward = [src[i]["image"] for i in reversed(range(10))][::-1]
  for x, y in zip(forward, backward):
    np.testing.assert_array_equal(x, y)


def test_contract_and_visible_masks():
  src = shapes.ShapesSource(40, seed=0)
  kinds, areas, counts = set(), [], []
  for i in range(len(src)):
    ex = src[i]
    n = len(ex["labels"])
    counts.append(n)
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (320, 320, 3)
    assert ex["masks"].shape == (n, 320, 320)
    # Visible masks never overlap (occluded parts are removed).
    assert ex["masks"].sum(0).max() <= 1
    for j in range(n):
      ys, xs = np.nonzero(ex["masks"][j])
      # Box is the tight box of the visible mask.
      np.testing.assert_array_equal(
          ex["boxes"][j], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
      areas.append(len(xs))
    kinds.update(ex["labels"].tolist())
  areas = np.array(areas)
  assert kinds == set(range(shapes.NUM_CLASSES))
  assert 1 <= min(counts) and max(counts) <= 8
  # COCO small / medium / large all present.
  assert (areas < 32 ** 2).sum() > 0
  assert ((areas >= 32 ** 2) & (areas < 96 ** 2)).sum() > 0
  assert (areas >= 96 ** 2).sum() > 0


def test_some_objects_are_occluded():
  src = shapes.ShapesSource(30, seed=2)
  occluded = 0
  for i in range(len(src)):
    ex = src[i]
    for j in range(len(ex["labels"])):
      x0, y0, x1, y1 = ex["boxes"][j].astype(int)
      fill = ex["masks"][j, y0:y1, x0:x1].mean()
      others = ex["masks"][:, y0:y1, x0:x1].sum(0) - ex["masks"][j, y0:y1,
                                                                   x0:x1]
      occluded += bool(others.any()) and fill < 0.9
  assert occluded >= 5
