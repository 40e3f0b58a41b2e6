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
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

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

# Orientation groups of ``data.canvases``, in canvas order.
_GROUP_NAMES = ("landscape (W >= H)", "portrait (H > W)")
# Mixed into the canvas schedule's seed: its draws are independent of the
# shuffles and augmentations seeded with the same run seed.
_SCHEDULE_KEY = 0x63616e76


def _as_configs(tcfg) -> Tuple[transforms.TransformConfig, ...]:
  """One ``TransformConfig`` per canvas (a single one: one canvas)."""
  if isinstance(tcfg, transforms.TransformConfig):
    return (tcfg,)
  tcfgs = tuple(tcfg)
  if len(tcfgs) not in (1, 2):
    raise ValueError(f"{len(tcfgs)} transform configs: expected 1 (one "
                     "canvas) or 2 (landscape, portrait canvases)")
  return tcfgs


def image_size(source, index: int) -> Tuple[int, int]:
  """(height, width) of record ``index``, read without decoding the image.

  Sources expose ``image_size(index)`` from their metadata (COCO's
  ``height``/``width``, the generator's or TFDS feature's static shape).

  Raises:
    ValueError: the source cannot tell an image's size without decoding it.
  """
  size_of = getattr(source, "image_size", None)
  if size_of is None:
    raise ValueError(
        f"{source}: orientation canvases (data.canvases) group records by "
        "image size, and this source cannot tell it without decoding the "
        "image (no image_size()); use a single data.canvas")
  h, w = size_of(index)
  return int(h), int(w)


def image_sizes(source) -> np.ndarray:
  """``[n, 2]`` (height, width) of every record (``image_size``).

  A record whose size cannot be read (``coco.BadImageError``: an
  unreadable file header) gets ``(0, 0)``, i.e. the landscape group: it
  fails to load there too and is skipped (training) or padded
  (evaluation) as with one canvas.
  """
  sizes = np.zeros((len(source), 2), np.int64)
  for i in range(len(source)):
    try:
      sizes[i] = image_size(source, i)
    except coco.BadImageError as e:
      logging.warning("%s", e)
  return sizes


def orientation_groups(source, num_canvases: int) -> List[np.ndarray]:
  """Record indices of each canvas group, over the whole source.

  One canvas: every record. Two: ``[landscape, portrait]``, where a record
  is landscape when its width >= its height (square images included).
  Computed from the source's metadata alone, so every process gets the
  same groups.
  """
  if num_canvases == 1:
    return [np.arange(len(source))]
  if num_canvases != 2:
    raise ValueError(f"{num_canvases} canvases: expected 1 or 2")
  sizes = image_sizes(source)
  portrait = sizes[:, 0] > sizes[:, 1]
  return [np.nonzero(~portrait)[0], np.nonzero(portrait)[0]]


def group_at_step(seed: int, step: int, counts: Sequence[int]) -> int:
  """The canvas group of global step ``step``, from ``(seed, step)`` only.

  Group ``g`` is drawn with probability ``counts[g] / sum(counts)`` (its
  share of the whole dataset), independently at every step; a group with no
  record is never drawn. Every process computes the same value.
  """
  if len(counts) == 1:
    return 0
  total = int(sum(counts))
  rng = np.random.default_rng([_SCHEDULE_KEY, int(seed) % (1 << 63),
                               int(step)])
  r = int(rng.integers(total))
  return int(np.searchsorted(np.cumsum(counts), r, side="right"))


def _group_seed(seed: int, group: int, num_groups: int) -> int:
  """The shuffle/augmentation seed of a group (the run seed for one)."""
  if num_groups == 1:
    return seed
  return int(np.random.SeedSequence(
      [int(seed) % (1 << 63), group]).generate_state(1)[0])


class TrainInput:
  """Endless, sharded, shuffled training batches with a resumable position.

  Each process gets the records ``shard_index::shard_count`` of the source
  (its own disjoint slice), shuffled with ``seed`` and reshuffled every
  epoch. ``get_state``/``set_state`` capture the exact position *after the
  last batch returned* (batches fetched ahead are not counted).

  With two transform configs (``data.canvases``: a landscape and a portrait
  canvas) the records are split into orientation groups from their image
  sizes (``orientation_groups``), each group has its own sharded (records
  ``shard_index::shard_count`` of the group), shuffled and repeated
  pipeline on its own canvas, and global step ``t`` takes its whole batch
  from group ``group_at_step(seed, t, group_counts)``: every batch has one
  canvas and every process uses the same canvas at the same step. The
  state then holds the step counter and every group's position.

  Batches are fetched by a background thread so that the trainer can wait
  for one while still reacting to SIGTERM (``next_or_stop``); an error in
  the pipeline is re-raised in the caller.
  """

  def __init__(self, source, tcfg, *, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1,
               num_threads: int = 2, prefetch: int = 4,
               max_consecutive_skips: int = 1000,
               name: Optional[str] = None):
    """See the class docstring.

    Args:
      source: a random-access source (``make_source``).
      tcfg: a ``TransformConfig`` (one canvas) or a sequence of two
        (landscape canvas, portrait canvas).
      batch_size: examples per batch of this process.
      seed: shuffle, augmentation and canvas-schedule seed.
      shard_index: this process.
      shard_count: number of processes.
      num_threads: decode/transform threads (per group).
      prefetch: batches prefetched (per group).
      max_consecutive_skips: undecodable records in a row before
        ``InputError`` (<= 0: one pass over the group's shard).
      name: how errors name the dataset.
    """
    if len(source) < shard_count:
      raise ValueError(f"{source}: {len(source)} records for {shard_count} "
                       "processes")
    tcfgs = _as_configs(tcfg)
    self.source = source
    self.skips = SkipCounter()
    self.name = name or str(source)
    self.canvases = tuple(tuple(t.canvas) for t in tcfgs)
    groups = orientation_groups(source, len(tcfgs))
    self.group_counts = tuple(len(g) for g in groups)
    self.group_shares = tuple(n / len(source) for n in self.group_counts)
    self._seed = seed
    self._single = len(tcfgs) == 1
    self._iters: Dict[int, Any] = {}
    for g, (members, cfg) in enumerate(zip(groups, tcfgs)):
      if not len(members):
        logging.info("%s: no %s image, canvas %s unused", self.name,
                     _GROUP_NAMES[g], cfg.canvas)
        continue
      records = (range(len(source)) if self._single
                 else members[shard_index::shard_count].tolist())
      shard_len = len(range(shard_index, len(records), shard_count)
                      ) if self._single else len(records)
      if not shard_len:
        raise ValueError(
            f"{self.name}: the {_GROUP_NAMES[g]} group (canvas "
            f"{tuple(cfg.canvas)}) has {len(members)} record(s), none on "
            f"process {shard_index} of {shard_count} (records "
            f"{shard_index}::{shard_count} of each group). Use fewer "
            "processes, more data, or a single data.canvas.")
      limit = shard_len if max_consecutive_skips <= 0 else min(
          shard_len, max_consecutive_skips)
      self._iters[g] = self._group_iter(
          source, records, cfg, batch_size=batch_size,
          seed=_group_seed(seed, g, len(tcfgs)), shard_index=shard_index,
          shard_count=shard_count, sliced=not self._single,
          num_threads=num_threads, prefetch=prefetch, limit=limit)
    self._step = 0          # global step of the next batch
    self._state = None      # position after the last returned batch
    self._queue: Optional[queue.Queue] = None

  def _group_iter(self, source, records, tcfg, *, batch_size, seed,
                  shard_index, shard_count, sliced, num_threads, prefetch,
                  limit):
    """The batched grain iterator of one group's records."""
    transform = transforms.make_train_transform(tcfg)

    def random_transform(ex, rng):
      return None if ex is None else transform(ex, rng)

    if sliced:  # already this shard's records of the group
      ds = grain.MapDataset.source(records)
    else:
      ds = grain.MapDataset.range(len(records))
      ds = ds.slice(slice(shard_index, None, shard_count))
    ds = ds.seed(seed).shuffle().repeat(None)
    ds = ds.map(_SafeLoad(source, self.skips, max_consecutive=limit,
                          name=self.name))
    ds = ds.random_map(random_transform)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=max(prefetch, 1) *
        batch_size))
    it_ds = it_ds.batch(batch_size, drop_remainder=True, batch_fn=_stack)
    return iter(it_ds)

  def group_at(self, step: int) -> int:
    """The canvas group (index into ``canvases``) of global step ``step``."""
    return group_at_step(self._seed, step, self.group_counts)

  def canvas_at(self, step: int) -> Tuple[int, int]:
    """The canvas of the batch of global step ``step``."""
    return self.canvases[self.group_at(step)]

  def _snapshot(self, step: int) -> Dict[str, Any]:
    """The position before global step ``step`` (JSON-serialisable)."""
    if self._single:
      return self._iters[0].get_state()
    return {"step": step, "canvases": [list(c) for c in self.canvases],
            "groups": {str(g): it.get_state()
                       for g, it in self._iters.items()}}

  def _fetch(self):
    """Background thread: (batch, state after it) or the exception."""
    step = self._step
    while True:
      try:
        batch = next(self._iters[self.group_at(step)])
        step += 1
        item = (batch, self._snapshot(step))
      except BaseException as e:  # pylint: disable=broad-except
        self._queue.put(e)
        return
      self._queue.put(item)

  def next_or_stop(self, stop: Optional[threading.Event] = None,
                   poll_seconds: float = 0.5):
    """The next batch, or ``STOPPED`` as soon as ``stop`` is set."""
    if self._queue is None:
      if self._state is None:
        self._state = self._snapshot(self._step)
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
      self._state = self._snapshot(self._step)
    return self._state

  def set_state(self, state: Dict[str, Any]) -> None:
    if self._queue is not None:
      raise RuntimeError("TrainInput.set_state must precede the first batch")
    grouped = isinstance(state, dict) and "groups" in state
    if self._single:
      if grouped:
        raise ValueError(
            f"{self.name}: the input position was saved with canvases "
            f"{state.get('canvases')} (data.canvases), this run has one "
            f"canvas {self.canvases[0]}: set the same data.canvases")
      self._iters[0].set_state(state)
    else:
      saved = [tuple(c) for c in state.get("canvases", ())] if grouped else []
      if saved != list(self.canvases) or set(state["groups"]) != {
          str(g) for g in self._iters}:
        raise ValueError(
            f"{self.name}: the input position was saved with canvases "
            f"{saved or 'one canvas (data.canvases=())'}, this run has "
            f"{list(self.canvases)}: resume with the data.canvases it was "
            "saved with")
      for g, it in self._iters.items():
        it.set_state(state["groups"][str(g)])
      self._step = int(state["step"])
    self._state = state


def eval_batch_count(source, num_canvases: int, *, batch_size: int,
                     shard_count: int = 1) -> int:
  """How many batches ``eval_batches`` yields (the same on every process)."""
  return sum(-(-(-(-len(g) // shard_count)) // batch_size)
             for g in orientation_groups(source, num_canvases))


def eval_batches(source, tcfg, *, batch_size: int, shard_index: int = 0,
                 shard_count: int = 1, num_threads: int = 2
                 ) -> Iterator[features.Batch]:
  """One pass over this process' slice, padded to equal batch counts.

  ``tcfg``: a ``TransformConfig`` or two (landscape, portrait canvases):
  then the landscape group's batches come first, on its canvas, then the
  portrait group's (``orientation_groups``); every batch has one canvas.
  Per group, every process yields ``ceil(len(group) / shard_count /
  batch_size)`` batches of the group's records ``shard_index::shard_count``
  (the same number on all hosts, as a global jitted eval step needs);
  missing slots are filled with ``example_valid=False`` padding.
  Undecodable images become padding too (and are logged).
  """
  tcfgs = _as_configs(tcfg)
  skips = SkipCounter()
  for members, cfg in zip(orientation_groups(source, len(tcfgs)), tcfgs):
    yield from _eval_group(source, members, cfg, skips,
                           batch_size=batch_size, shard_index=shard_index,
                           shard_count=shard_count, num_threads=num_threads)


def _eval_group(source, members: np.ndarray,
                tcfg: transforms.TransformConfig, skips: SkipCounter, *,
                batch_size: int, shard_index: int, shard_count: int,
                num_threads: int) -> Iterator[features.Batch]:
  """``eval_batches`` of one group's records on its canvas."""
  transform = transforms.make_eval_transform(tcfg)
  per_shard = -(-len(members) // shard_count)
  num_batches = -(-per_shard // batch_size)
  if not num_batches:
    return
  indices = [int(i) for i in members[shard_index::shard_count]]
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
