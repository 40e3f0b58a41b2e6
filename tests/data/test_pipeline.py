"""Pipeline: deterministic, sharded, resumable; bad images skipped+counted."""

import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from boxseg_jax.data import coco
from boxseg_jax.data import pipeline
from boxseg_jax.data import shapes
from boxseg_jax.data import transforms

TCFG = transforms.TransformConfig(canvas=(96, 96), max_instances=4,
                                  short_sizes=(48, 64), max_size=96)


def _source(n=12):
  return shapes.ShapesSource(
      n, seed=0, cfg=shapes.ShapesConfig(image_size=(64, 64), max_size=40.0))


def _take(it, k):
  return [next(it) for _ in range(k)]


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_batches_other_seed_differs():
  a = _take(pipeline.TrainInput(_source(), TCFG, batch_size=3, seed=5), 3)
  b = _take(pipeline.TrainInput(_source(), TCFG, batch_size=3, seed=5), 3)
  c = _take(pipeline.TrainInput(_source(), TCFG, batch_size=3, seed=6), 3)
  assert all(_equal(x, y) for x, y in zip(a, b))
  assert not all(_equal(x, y) for x, y in zip(a, c))


def test_resume_from_state_is_exact():
  it = pipeline.TrainInput(_source(), TCFG, batch_size=3, seed=1)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 5)  # crosses an epoch boundary (12 / 3 = 4 batches)
  it2 = pipeline.TrainInput(_source(), TCFG, batch_size=3, seed=1)
  it2.set_state(json.loads(json.dumps(state)))  # state is JSON-serialisable
  got = _take(it2, 5)
  assert all(_equal(x, y) for x, y in zip(expected, got))


def test_epochs_cover_all_and_reshuffle():
  it = pipeline.TrainInput(_source(), TCFG, batch_size=4, seed=0)
  ids = [b["image_id"].tolist() for b in _take(it, 6)]
  epoch1 = sum(ids[:3], [])
  epoch2 = sum(ids[3:], [])
  assert sorted(epoch1) == sorted(epoch2) == list(range(1, 13))
  assert epoch1 != epoch2


def test_shards_are_disjoint():
  seen = []
  for shard in range(2):
    it = pipeline.TrainInput(_source(), TCFG, batch_size=2, seed=0,
                             shard_index=shard, shard_count=2)
    seen.append(set(sum((b["image_id"].tolist() for b in _take(it, 3)), [])))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(1, 13))


def test_eval_batches_pad_equal_counts():
  src = _source(5)
  counts, ids = [], []
  for shard in range(2):
    bs = list(pipeline.eval_batches(src, TCFG, batch_size=2,
                                    shard_index=shard, shard_count=2))
    counts.append(len(bs))
    for b in bs:
      ids += b["image_id"][b["example_valid"]].tolist()
      assert not b["image_valid"][~b["example_valid"]].any()
  assert counts == [2, 2]  # ceil(ceil(5/2)/2) on both processes
  assert sorted(ids) == [1, 2, 3, 4, 5]


def test_corrupt_image_skipped_and_counted(tmp_path):
  root = str(tmp_path)
  os.makedirs(os.path.join(root, "annotations"))
  os.makedirs(os.path.join(root, "s"))
  images = []
  for i in range(4):
    name = f"{i}.png"
    images.append({"id": i + 1, "file_name": name, "height": 16,
                   "width": 16})
    path = os.path.join(root, "s", name)
    if i == 2:
      open(path, "wb").write(b"garbage")
    else:
      Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(path)
  anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1,
           "bbox": [1, 1, 5, 5], "iscrowd": 0} for i in range(4)]
  with open(os.path.join(root, "annotations", "instances_s.json"), "w") as f:
    json.dump({"images": images, "annotations": anns,
               "categories": [{"id": 1, "name": "x"}]}, f)
  src = coco.CocoSource(root, "s")
  tcfg = transforms.TransformConfig(canvas=(32, 32), max_instances=2,
                                    short_sizes=(16,), max_size=32)
  it = pipeline.TrainInput(src, tcfg, batch_size=3, seed=0)
  ids = sum((b["image_id"].tolist() for b in _take(it, 2)), [])
  assert 3 not in ids and set(ids) <= {1, 2, 4}
  assert it.skips.counts["bad_image"] >= 1
  assert "2.png" in it.skips.examples["bad_image"]


def test_nothing_decodes_is_an_error_not_a_hang(tmp_path, write_lfs_pointer_coco):
  root = str(tmp_path)
  write_lfs_pointer_coco(root)
  tcfg = transforms.TransformConfig(canvas=(32, 32), max_instances=2,
                                    short_sizes=(16,), max_size=32)
  # Default limit: one whole pass (5 records) at most.
  it = pipeline.TrainInput(coco.CocoSource(root, "s"), tcfg, batch_size=2,
                           seed=0, name="data.train=coco:X:s")
  with pytest.raises(pipeline.InputError,
                     match=r"data.train=coco:X:s: \d+ training records in a "
                     r"row could not be loaded.*LFS"):
    next(it)
  with pytest.raises(pipeline.InputError):
    next(it)  # stays failed, does not hang
  # Bounded: about one pass (prefetching threads may overshoot a little).
  assert it.skips.counts["bad_image"] <= 4 * 5


def test_consecutive_skip_limit_is_configurable(tmp_path, write_lfs_pointer_coco):
  root = str(tmp_path)
  write_lfs_pointer_coco(root, num=40)
  tcfg = transforms.TransformConfig(canvas=(32, 32), max_instances=2,
                                    short_sizes=(16,), max_size=32)
  it = pipeline.TrainInput(coco.CocoSource(root, "s"), tcfg, batch_size=2,
                           seed=0, num_threads=1, max_consecutive_skips=3)
  with pytest.raises(pipeline.InputError, match="3 training records"):
    next(it)


def test_next_or_stop_returns_when_stopped():
  release = threading.Event()

  class Stalled:

    def __len__(self):
      return 4

    def __getitem__(self, i):
      release.wait(60)
      return _source()[i]

  it = pipeline.TrainInput(Stalled(), TCFG, batch_size=2, seed=0)
  stop = threading.Event()
  threading.Timer(0.5, stop.set).start()
  t0 = time.time()
  try:
    assert it.next_or_stop(stop, poll_seconds=0.1) is pipeline.STOPPED
    assert time.time() - t0 < 10
    assert it.get_state() == pipeline.TrainInput(
        Stalled(), TCFG, batch_size=2, seed=0).get_state()
  finally:
    release.set()


def test_load_report_counts_what_the_source_dropped(tmp_path):
  root = str(tmp_path)
  os.makedirs(os.path.join(root, "annotations"))
  os.makedirs(os.path.join(root, "s"))
  images = []
  for i, name in enumerate(["a.png", "b.png", "c.png", "gone.png"]):
    if name != "gone.png":
      Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(
          os.path.join(root, "s", name))
    images.append({"id": i + 1, "file_name": name, "height": 20,
                   "width": 20})

  def box(i, image_id, **kw):
    return dict({"id": i, "image_id": image_id, "category_id": 1,
                 "bbox": [1, 1, 4, 4], "iscrowd": 0}, **kw)

  anns = [box(i, 1) for i in range(1, 7)]          # 6 > max_instances 4
  anns += [box(7, 2, iscrowd=1), box(8, 2, bbox=[1, 1, 0, 2]), box(9, 2),
           box(10, 99)]                             # crowd, bad, ok, unlisted
  with open(os.path.join(root, "annotations", "instances_s.json"), "w") as f:
    json.dump({"images": images, "annotations": anns,
               "categories": [{"id": 1, "name": "x"}]}, f)
  src = coco.CocoSource(root, "s")
  report = pipeline.load_report(src, max_instances=4)
  assert report["images"] == 3 and report["instances"] == 7
  assert report["crowd"] == 1 and report["bad_boxes"] == 1
  assert report["missing_files"] == 1 and report["empty_images"] == 1
  assert report["unlisted_annotations"] == 1
  assert report["bad_box_files"] == ["b.png"]
  assert report["images_over_max_instances"] == 1
  assert report["instances_over_max_instances"] == 2
  text = pipeline.format_load_report("data.train=x", report, 4)
  for part in ("3 images", "7 instances", "1 crowd regions", "1 bad boxes",
               "1 image files missing", "1 images without instances",
               "max_instances=4", "bad boxes in: b.png"):
    assert part in text, part
  # Generated sources report their length only.
  assert pipeline.load_report(_source(5), 4) == {"images": 5}
