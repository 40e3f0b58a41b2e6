"""Pipeline: deterministic, sharded, resumable; bad images skipped+counted."""

import dataclasses
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


# --- orientation canvases (data.canvases). ---------------------------------

CANVASES = ((64, 96), (96, 64))  # landscape, portrait
TCFGS = tuple(transforms.TransformConfig(
    canvas=c, max_instances=4, short_sizes=(48,), max_size=96,
    test_short_size=48, test_max_size=96) for c in CANVASES)


class _Oriented:
  """``shapes`` images of per-record sizes, known without generating them."""

  def __init__(self, sizes):
    self.sizes = list(sizes)

  def __len__(self):
    return len(self.sizes)

  def image_size(self, i):
    return self.sizes[i]

  def __getitem__(self, i):
    return shapes.generate(0, i, shapes.ShapesConfig(
        image_size=self.sizes[i], max_size=30.0))


def _mixed(num_landscape=6, num_portrait=4):
  # Square images count as landscape.
  return _Oriented([(48, 64)] * (num_landscape - 1) + [(48, 48)] +
                   [(64, 48)] * num_portrait)


def test_every_batch_has_one_canvas_of_its_images_orientation():
  src = _mixed()
  it = pipeline.TrainInput(src, TCFGS, batch_size=2, seed=0)
  seen = set()
  for b in _take(it, 8):
    canvas = b["image"].shape[1:3]
    assert canvas in CANVASES
    seen.add(canvas)
    for i in range(2):
      h, w = src.sizes[int(b["image_id"][i]) - 1]
      assert tuple(b["orig_size"][i]) == (h, w)
      assert canvas == CANVASES[0 if w >= h else 1]
      # Resized as with one canvas: the short side drawn (48), not shrunk.
      assert min(b["resized_size"][i]) == 48
  assert seen == set(CANVASES)


def test_canvas_sequence_is_a_function_of_seed_and_step_on_every_shard():
  src = _mixed()
  sequences = []
  for shard in range(2):
    it = pipeline.TrainInput(src, TCFGS, batch_size=1, seed=3,
                             shard_index=shard, shard_count=2)
    sequences.append([b["image"].shape[1:3] for b in _take(it, 12)])
  want = [CANVASES[pipeline.group_at_step(3, t, (6, 4))] for t in range(12)]
  assert sequences[0] == sequences[1] == want
  other = [pipeline.group_at_step(4, t, (6, 4)) for t in range(12)]
  assert other != [CANVASES.index(c) for c in want]


def test_group_shares_match_the_data():
  it = pipeline.TrainInput(_mixed(9, 3), TCFGS, batch_size=1, seed=0)
  assert it.group_counts == (9, 3)
  assert it.group_shares == (0.75, 0.25)
  draws = [pipeline.group_at_step(0, t, it.group_counts)
           for t in range(4000)]
  assert np.mean(draws) == pytest.approx(0.25, abs=0.02)
  # A group without records is never drawn.
  assert {pipeline.group_at_step(0, t, (0, 5)) for t in range(50)} == {1}


def test_two_canvas_resume_mid_epoch_is_exact():
  src = _mixed()
  it = pipeline.TrainInput(src, TCFGS, batch_size=2, seed=1)
  _take(it, 3)
  state = it.get_state()
  assert state["step"] == 3 and set(state["groups"]) == {"0", "1"}
  expected = _take(it, 6)  # crosses epochs of both groups (3 and 2 batches)
  assert {b["image"].shape[1:3] for b in expected} == set(CANVASES)
  it2 = pipeline.TrainInput(src, TCFGS, batch_size=2, seed=1)
  it2.set_state(json.loads(json.dumps(state)))
  assert all(_equal(x, y) for x, y in zip(expected, _take(it2, 6)))


def test_prefetch_does_not_leak_into_the_state():
  it = pipeline.TrainInput(_mixed(), TCFGS, batch_size=2, seed=1, prefetch=4)
  _take(it, 2)
  time.sleep(0.5)  # the background thread has fetched ahead by now
  ref = pipeline.TrainInput(_mixed(), TCFGS, batch_size=2, seed=1)
  _take(ref, 2)
  assert it.get_state() == ref.get_state()
  assert it.get_state()["step"] == 2


def test_resume_with_other_canvases_is_an_error():
  one = pipeline.TrainInput(_mixed(), TCFG, batch_size=2, seed=0)
  two = pipeline.TrainInput(_mixed(), TCFGS, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="resume with the data.canvases"):
    two.set_state(one.get_state())
  with pytest.raises(ValueError, match="set the same data.canvases"):
    pipeline.TrainInput(_mixed(), TCFG, batch_size=2, seed=0).set_state(
        two.get_state())


def test_group_with_no_record_on_a_shard_is_an_error():
  with pytest.raises(ValueError, match=r"portrait \(H > W\) group \(canvas "
                     r"\(96, 64\)\) has 1 record\(s\), none on process 1 of "
                     "2"):
    pipeline.TrainInput(_mixed(6, 1), TCFGS, batch_size=1, seed=0,
                        shard_index=1, shard_count=2)
  # No portrait image at all: that canvas is never used, no error.
  it = pipeline.TrainInput(_mixed(6, 0), TCFGS, batch_size=2, seed=0,
                           shard_index=1, shard_count=2)
  assert {b["image"].shape[1:3] for b in _take(it, 4)} == {CANVASES[0]}


class _NoSize:
  """A source without ``image_size`` (its images' sizes are unknown)."""

  def __len__(self):
    return 2

  def __getitem__(self, i):
    raise AssertionError("grouping must not decode")


def test_source_without_sizes_is_an_error_with_two_canvases():
  with pytest.raises(ValueError, match="cannot tell it without decoding.*"
                     "use a single data.canvas"):
    pipeline.TrainInput(_NoSize(), TCFGS, batch_size=1, seed=0)
  assert len(pipeline.orientation_groups(_NoSize(), 1)[0]) == 2


def test_undecodable_images_are_skipped_per_group(tmp_path,
                                                  write_oriented_coco):
  root = str(tmp_path)
  write_oriented_coco(root, [(48, 64)] * 3 + [(64, 48)] * 3)
  with open(os.path.join(root, "s", "4.png"), "wb") as f:  # portrait id 5
    f.write(b"garbage")
  it = pipeline.TrainInput(coco.CocoSource(root, "s"), TCFGS, batch_size=2,
                           seed=0)
  ids = sum((b["image_id"].tolist() for b in _take(it, 6)), [])
  assert 5 not in ids and {4, 6} <= set(ids)
  assert it.skips.counts["bad_image"] >= 1


def test_two_canvas_eval_batches_match_the_single_canvas_path():
  src = _mixed(5, 3)
  single = dataclasses.replace(TCFGS[0], canvas=(96, 96))
  ref = {}
  for b in pipeline.eval_batches(src, single, batch_size=2):
    for i in np.nonzero(b["example_valid"])[0]:
      ref[int(b["image_id"][i])] = {k: v[i] for k, v in b.items()}
  got, per_group = {}, []
  for shard in range(2):
    counts = {}
    for b in pipeline.eval_batches(src, TCFGS, batch_size=2,
                                   shard_index=shard, shard_count=2):
      canvas = b["image"].shape[1:3]
      counts[canvas] = counts.get(canvas, 0) + 1
      assert not b["image_valid"][~b["example_valid"]].any()
      for i in np.nonzero(b["example_valid"])[0]:
        ex = {k: v[i] for k, v in b.items()}
        h, w = src.sizes[int(ex["image_id"]) - 1]
        assert canvas == CANVASES[0 if w >= h else 1]
        got[int(ex["image_id"])] = ex
    per_group.append(counts)
  # ceil(ceil(5 / 2) / 2) landscape, ceil(ceil(3 / 2) / 2) portrait batches
  # on both processes.
  assert per_group == [{CANVASES[0]: 2, CANVASES[1]: 1}] * 2
  assert pipeline.eval_batch_count(src, 2, batch_size=2, shard_count=2) == 3
  assert sorted(got) == sorted(ref) == list(range(1, 9))
  for image_id, ex in got.items():
    r = ref[image_id]
    h, w = ex["resized_size"]
    np.testing.assert_array_equal(ex["image"][:h, :w], r["image"][:h, :w])
    np.testing.assert_array_equal(ex["image_valid"][:h, :w], True)
    assert ex["image_valid"].sum() == r["image_valid"].sum() == h * w
    for k in ("boxes", "labels", "instance_valid", "orig_size",
              "resized_size", "scale"):
      np.testing.assert_array_equal(ex[k], r[k])


def test_sources_tell_image_sizes_without_decoding(tmp_path,
                                                   write_oriented_coco):
  root = str(tmp_path)
  write_oriented_coco(root, [(48, 64), (64, 48)])
  for name in os.listdir(os.path.join(root, "s")):
    os.remove(os.path.join(root, "s", name))
    open(os.path.join(root, "s", name), "wb").close()  # not decodable
  np.testing.assert_array_equal(
      pipeline.image_sizes(coco.CocoSource(root, "s")), [[48, 64], [64, 48]])
  src = shapes.ShapesSource(3, 0, shapes.ShapesConfig(image_size=(40, 72)))
  assert pipeline.image_size(src, 2) == (40, 72)
