"""Input pipeline on grain: sharded, shuffled by seed, prefetched, resumable.

Why grain and not tf.data (see docs/data.md): our sources are random-access
Python objects (COCO JSON + JPEG files, the procedural ``shapes``, TFDS
``data_source``), grain's ``MapDataset`` gives a deterministic global shuffle
from a seed with per-record random generators (so augmentation does not
depend on the number of worker threads), and its iterators have a small
``get_state()``/``set_state()`` that the trainer checkpoints with Orbax for
exact resume. All host work is numpy/PIL, which releases the GIL, so a
thread pool is enough on the 2-core machines we test on.

Datasets are named by one string (design.md): ``shapes``, ``shapes:val``,
``coco:ROOT:SPLIT``, ``tfds:NAME:SPLIT``.
"""

import logging
import queue
import threading
from typing import Any, Dict, Iterator, Optional

import grain
import numpy as np

from boxseg_jax.data import coco
from boxseg_jax.data import features
from boxseg_jax.data import shapes
from boxseg_jax.data import transforms


def make_source(spec: str, *, shapes_cfg: Optional[Any] = None,
                tfds_data_dir: Optional[str] = None, with_masks: bool = False,
                role: str = "train", require_masks: bool = False,
                annotation_file: Optional[str] = None):
  """Builds the random-access source named by ``spec``.

  Args:
    spec: ``shapes[:train|val]``, ``coco:ROOT:SPLIT`` or ``tfds:NAME:SPLIT``.
    shapes_cfg: ``config.data.shapes`` (num_train, num_val, seed,
      image_size, ...) for ``shapes``.
    tfds_data_dir: TFDS data_dir for ``tfds:``.
    with_masks: decode GT masks (evaluation, mask-supervised training).
    role: "train" or "val"; the default split of a bare ``shapes``.
    require_masks: every instance must have a GT mask (mask supervision);
      a dataset without them is an error naming it (``shapes`` always has
      masks).
    annotation_file: ``coco:`` only: this COCO JSON instead of
      ``ROOT/annotations/instances_SPLIT.json`` (images from ``ROOT/SPLIT``),
      e.g. pseudo masks (``data.train_annotations``).
  """
  kind, _, rest = spec.partition(":")
  if kind == "shapes":
    split = rest or role
    if split not in ("train", "val"):
      raise ValueError(f"dataset {spec!r}: shapes split must be train or val")
    sc = shapes_cfg
    gen = shapes.ShapesConfig(
        image_size=tuple(sc.image_size), min_objects=sc.min_objects,
        max_objects=sc.max_objects, min_size=sc.min_size,
        max_size=sc.max_size)
    # Train and val never share images: different seeds.
    num = sc.num_train if split == "train" else sc.num_val
    seed = sc.seed if split == "train" else sc.seed + 1_000_003
    return shapes.ShapesSource(num, seed, gen)
  if kind == "coco":
    root, sep, split = rest.rpartition(":")
    if not sep or not root or not split:
      raise ValueError(f"dataset {spec!r}: expected coco:ROOT:SPLIT")
    return coco.CocoSource(root, split, with_masks=with_masks,
                           require_masks=require_masks,
                           annotation_file=annotation_file or None)
  if annotation_file:
    raise ValueError(f"dataset {spec!r}: an annotation file "
                     f"({annotation_file}) only applies to coco:ROOT:SPLIT")
  if kind == "tfds":
    name, sep, split = rest.rpartition(":")
    if not sep or not name:
      raise ValueError(f"dataset {spec!r}: expected tfds:NAME:SPLIT")
    from boxseg_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.TfdsSource(name, split, data_dir=tfds_data_dir,
                                  with_masks=with_masks,
                                  require_masks=require_masks)
  raise ValueError(f"unknown dataset {spec!r}: expected shapes, "
                   "coco:ROOT:SPLIT or tfds:NAME:SPLIT")


def load_report(source, max_instances: int) -> Dict[str, Any]:
  """What a source dropped or will truncate, counted once at load.

  For sources that read an annotation file (``coco``): images, instances,
  crowd regions (never instances), bad boxes dropped (with the first few
  files), missing image files, images without instances, annotations on
  unlisted images, and the images with more than ``max_instances``
  instances (the transforms keep the first ``max_instances``). Generated
  or streamed sources (``shapes``, ``tfds``) only report their length:
  their counts appear per step (``instances_dropped``,
  ``instances_truncated``, ``input_skipped``).
  """
  inner = getattr(source, "source", source)  # a Subset of a source
  report: Dict[str, Any] = {"images": len(source)}
  stats = getattr(inner, "stats", None)
  if stats is None:
    return report
  report.update(stats)
  report["images"] = len(source)
  report["bad_box_files"] = list(getattr(inner, "bad_box_files", []))
  records = getattr(inner, "records", [])[:len(source)]
  over = [len(r["labels"]) - max_instances for r in records
          if len(r["labels"]) > max_instances]
  report["images_over_max_instances"] = len(over)
  report["instances_over_max_instances"] = int(sum(over))
  return report


def format_load_report(name: str, report: Dict[str, Any],
                       max_instances: int) -> str:
  """One line for the log (see ``load_report``)."""
  if "instances" not in report:
    return (f"{name}: {report['images']} images (counts of dropped and "
            "truncated instances are logged per step)")
  r = report
  text = (f"{name}: {r['images']} images, {r['instances']} instances, "
          f"{r['crowd']} crowd regions (never instances), {r['bad_boxes']} "
          f"bad boxes dropped, {r['missing_files']} image files missing, "
          f"{r['empty_images']} images without instances, "
          f"{r['unlisted_annotations']} annotations on image ids not in "
          f"'images', {r['images_over_max_instances']} images with more "
          f"than data.max_instances={max_instances} instances "
          f"({r['instances_over_max_instances']} instances truncated per "
          "pass)")
  if r["bad_box_files"]:
    text += "; bad boxes in: " + ", ".join(r["bad_box_files"])
  return text


class SkipCounter:
  """Counts records skipped by the pipeline (thread-safe)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.counts: Dict[str, int] = {}
    self.examples: Dict[str, str] = {}

  def add(self, reason: str, detail: str) -> None:
    with self._lock:
      self.counts[reason] = self.counts.get(reason, 0) + 1
      if reason not in self.examples:
        self.examples[reason] = detail
        logging.warning("input: skipping record (%s): %s", reason, detail)


class InputError(RuntimeError):
  """The training input cannot produce batches (e.g. nothing decodes)."""


class _SafeLoad(grain.transforms.Map):
  """source[i] with undecodable images skipped and counted.

  A run of ``max_consecutive`` skipped records in a row (at most one whole
  pass over the shard) raises ``InputError``: a source where nothing
  decodes (Git LFS pointer files, the wrong split folder) would otherwise
  be retried forever.
  """

  def __init__(self, source, skips: SkipCounter, *, max_consecutive: int,
               name: str):
    self._source = source
    self._skips = skips
    self._max = max_consecutive
    self._name = name
    self._lock = threading.Lock()
    self._run = 0

  def map(self, index):
    try:
      ex = self._source[int(index)]
    except coco.BadImageError as e:
      self._skips.add("bad_image", str(e))
      with self._lock:
        self._run += 1
        run = self._run
      if run >= self._max:
        raise InputError(
            f"{self._name}: {run} training records in a row could not be "
            f"loaded (skips so far: {self._skips.counts}; first: "
            f"{self._skips.examples.get('bad_image')}). Check the dataset "
            "path and split, and that the image files are real images (not "
            "Git LFS pointers). data.max_consecutive_skips sets the limit.")
      return None
    with self._lock:
      self._run = 0
    return ex


def _stack(examples):
  return {k: np.stack([np.asarray(e[k]) for e in examples])
          for k in examples[0]}


class _Stop:
  """Marker: the wait for a batch ended because ``stop`` was set."""


STOPPED = _Stop()


class TrainInput:
  """Endless, sharded, shuffled training batches with a resumable position.

  Each process gets the records ``shard_index::shard_count`` of the source
  (its own disjoint slice), shuffled with ``seed`` and reshuffled every
  epoch. ``get_state``/``set_state`` capture the exact position *after the
  last batch returned* (batches fetched ahead are not counted).

  Batches are fetched by a background thread so that the trainer can wait
  for one while still reacting to SIGTERM (``next_or_stop``); an error in
  the pipeline is re-raised in the caller.
  """

  def __init__(self, source, tcfg: transforms.TransformConfig, *,
               batch_size: int, seed: int, shard_index: int = 0,
               shard_count: int = 1, num_threads: int = 2,
               prefetch: int = 4, max_consecutive_skips: int = 1000,
               name: Optional[str] = None):
    if len(source) < shard_count:
      raise ValueError(f"{source}: {len(source)} records for {shard_count} "
                       "processes")
    self.source = source
    self.skips = SkipCounter()
    transform = transforms.make_train_transform(tcfg)

    def random_transform(ex, rng):
      return None if ex is None else transform(ex, rng)

    shard_len = len(range(shard_index, len(source), shard_count))
    limit = shard_len if max_consecutive_skips <= 0 else min(
        shard_len, max_consecutive_skips)
    ds = grain.MapDataset.range(len(source))
    ds = ds.slice(slice(shard_index, None, shard_count))
    ds = ds.seed(seed).shuffle().repeat(None)
    ds = ds.map(_SafeLoad(source, self.skips, max_consecutive=limit,
                          name=name or str(source)))
    ds = ds.random_map(random_transform)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=max(prefetch, 1) *
        batch_size))
    it_ds = it_ds.batch(batch_size, drop_remainder=True, batch_fn=_stack)
    self._iter = iter(it_ds)
    self._state = None      # position after the last returned batch
    self._queue: Optional[queue.Queue] = None

  def _fetch(self):
    """Background thread: (batch, state after it) or the exception."""
    while True:
      try:
        item = (next(self._iter), self._iter.get_state())
      except BaseException as e:  # pylint: disable=broad-except
        self._queue.put(e)
        return
      self._queue.put(item)

  def next_or_stop(self, stop: Optional[threading.Event] = None,
                   poll_seconds: float = 0.5):
    """The next batch, or ``STOPPED`` as soon as ``stop`` is set."""
    if self._queue is None:
      if self._state is None:
        self._state = self._iter.get_state()
      self._queue = queue.Queue(maxsize=1)
      threading.Thread(target=self._fetch, daemon=True,
                       name="train-input").start()
    while True:
      try:
        item = self._queue.get(timeout=poll_seconds)
        break
      except queue.Empty:
        if stop is not None and stop.is_set():
          return STOPPED
    if isinstance(item, BaseException):
      self._queue.put(item)  # every later call fails the same way
      raise item
    batch, self._state = item
    return batch

  def __iter__(self) -> Iterator[features.Batch]:
    return self

  def __next__(self) -> features.Batch:
    return self.next_or_stop()

  def get_state(self) -> Dict[str, Any]:
    if self._state is None:
      self._state = self._iter.get_state()
    return self._state

  def set_state(self, state: Dict[str, Any]) -> None:
    if self._queue is not None:
      raise RuntimeError("TrainInput.set_state must precede the first batch")
    self._iter.set_state(state)
    self._state = state


def eval_batches(source, tcfg: transforms.TransformConfig, *,
                 batch_size: int, shard_index: int = 0, shard_count: int = 1,
                 num_threads: int = 2) -> Iterator[features.Batch]:
  """One pass over this process' slice, padded to equal batch counts.

  Every process yields ``ceil(len(source) / shard_count / batch_size)``
  batches (the same number on all hosts, as a global jitted eval step
  needs); missing slots are filled with ``example_valid=False`` padding.
  Undecodable images become padding too (and are logged).
  """
  transform = transforms.make_eval_transform(tcfg)
  per_shard = -(-len(source) // shard_count)
  num_batches = -(-per_shard // batch_size)
  indices = list(range(shard_index, len(source), shard_count))
  skips = SkipCounter()
  pad = transforms.padding_example(tcfg)

  def load(i):
    try:
      return transform(source[i])
    except coco.BadImageError as e:
      skips.add("bad_image", str(e))
      return pad

  ds = grain.MapDataset.source(indices).map(load)
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=8)))
  for _ in range(num_batches):
    exs = []
    for _ in range(batch_size):
      exs.append(next(it, pad))
    yield _stack(exs)
