"""Host-side transforms: geometry moves image, boxes and masks together.

Conventions: boxes are absolute ``x0, y0, x1, y1`` with pixel-edge
coordinates (a box covering columns 0..9 is x0=0, x1=10), as in COCO and
detectron2. Every random choice comes from the ``np.random.Generator`` that
grain derives from (seed, record index), so a run is reproducible for any
number of workers.

The training transform (reference §4.1, §7) does, in order:
1. ResizeShortestEdge: short side drawn from ``short_sizes``, long side
   capped at ``max_size``, rounded with ``int(v + 0.5)``; PIL bilinear.
   If the result does not fit the fixed canvas it is scaled down to fit
   (counted by the caller through ``resized_size``).
2. Horizontal flip with probability ``hflip_prob``.
3. Instance clean-up: boxes clipped to the image, boxes with width or height
   <= 1e-5 dropped and counted, the first ``max_instances`` kept and the rest
   counted as truncated.
4. Two views of the same geometry: ``image_teacher`` (no colour change) and
   ``image`` (the student view: photometric augmentation); with
   ``teacher_canvas`` a third, ``teacher_view``: the same flip at the test
   scale on its own canvas (BoxTeacher's teacher input).
5. Padding to the canvas (zeros bottom/right) with ``image_valid``.
"""

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from boxseg_jax.data import features

# Degenerate-box threshold of BoxTeacher's mapper (w or h <= 1e-5 dropped).
MIN_BOX_SIDE = 1e-5


def shortest_edge_size(h: int, w: int, short: int,
                       max_size: int) -> Tuple[int, int]:
  """detectron2 ResizeShortestEdge.get_output_shape: (new_h, new_w)."""
  scale = short / min(h, w)
  if h < w:
    newh, neww = short, scale * w
  else:
    newh, neww = scale * h, short
  if max(newh, neww) > max_size:
    rescale = max_size / max(newh, neww)
    newh, neww = newh * rescale, neww * rescale
  return int(newh + 0.5), int(neww + 0.5)


def fit_size(h: int, w: int, canvas: Tuple[int, int]) -> Tuple[int, int]:
  """Shrinks (h, w) keeping the aspect ratio so that it fits ``canvas``."""
  ch, cw = canvas
  if h <= ch and w <= cw:
    return h, w
  s = min(ch / h, cw / w)
  return min(ch, int(h * s + 0.5)), min(cw, int(w * s + 0.5))


def resize(ex: features.Example, new_h: int, new_w: int) -> features.Example:
  """Resizes image (PIL bilinear), boxes and masks to (new_h, new_w)."""
  h, w = ex["image"].shape[:2]
  out = dict(ex)
  if (new_h, new_w) == (h, w):
    return out
  out["image"] = np.asarray(
      Image.fromarray(ex["image"]).resize((new_w, new_h), Image.BILINEAR))
  sx, sy = new_w / w, new_h / h
  out["boxes"] = (ex["boxes"] * np.array([sx, sy, sx, sy], np.float32)
                  ).astype(np.float32)
  if "masks" in ex:
    out["masks"] = resize_masks(ex["masks"], new_h, new_w)
  return out


def resize_masks(masks: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
  """Binary masks [n, h, w] -> [n, new_h, new_w] (bilinear, >= 0.5)."""
  if not len(masks):
    return np.zeros((0, new_h, new_w), np.uint8)
  out = np.empty((len(masks), new_h, new_w), np.uint8)
  for i, m in enumerate(masks):
    r = Image.fromarray(m * np.uint8(255)).resize((new_w, new_h),
                                                  Image.BILINEAR)
    out[i] = np.asarray(r) >= 128
  return out


def hflip(ex: features.Example) -> features.Example:
  """Mirrors image, boxes (x -> W - x) and masks."""
  w = ex["image"].shape[1]
  out = dict(ex)
  out["image"] = np.ascontiguousarray(ex["image"][:, ::-1])
  b = ex["boxes"]
  out["boxes"] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]],
                          axis=1).astype(np.float32).reshape(-1, 4)
  if "masks" in ex:
    out["masks"] = np.ascontiguousarray(ex["masks"][:, :, ::-1])
  return out


def clean_instances(ex: features.Example, max_instances: int
                    ) -> Tuple[features.Example, int, int]:
  """Clips boxes, drops degenerate ones, truncates to ``max_instances``.

  Returns:
    (example, num_dropped, num_truncated).
  """
  h, w = ex["image"].shape[:2]
  b = np.clip(ex["boxes"], 0, np.array([w, h, w, h], np.float32))
  finite = np.all(np.isfinite(ex["boxes"]), axis=1)
  keep = finite & (b[:, 2] - b[:, 0] > MIN_BOX_SIDE) & (
      b[:, 3] - b[:, 1] > MIN_BOX_SIDE)
  num_dropped = int((~keep).sum())
  idx = np.nonzero(keep)[0]
  num_truncated = max(0, len(idx) - max_instances)
  idx = idx[:max_instances]
  out = dict(ex)
  out["boxes"] = b[idx].astype(np.float32)
  out["labels"] = ex["labels"][idx]
  if "masks" in ex:
    out["masks"] = ex["masks"][idx]
  return out, num_dropped, num_truncated


@dataclasses.dataclass(frozen=True)
class Photometric:
  """Student-view colour augmentation (BoxTeacher ``strong``/``strongv2``).

  With probability ``jitter_prob``: torchvision ColorJitter(brightness,
  contrast, saturation, hue) with the four ops in random order; then
  grayscale with ``gray_prob``; then, if ``blur_prob`` > 0, a 3x3 Gaussian
  blur with sigma ~ U[blur_sigma] with probability ``blur_prob``.
  """
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.1
  gray_prob: float = 0.2
  blur_prob: float = 0.0
  blur_sigma: Tuple[float, float] = (0.1, 2.0)

  @classmethod
  def named(cls, name: str) -> Optional["Photometric"]:
    table = {
        "none": None,
        "strong": cls(),
        "strongv2": cls(blur_prob=0.5),
        "weak": cls(jitter_prob=0.2, brightness=0.2, contrast=0.2,
                    saturation=0.2, gray_prob=0.0),
    }
    if name not in table:
      raise ValueError(f"data.photometric: unknown value {name!r}; "
                       f"expected one of {sorted(table)}")
    return table[name]

  def __call__(self, image: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    img = Image.fromarray(image)
    if rng.uniform() < self.jitter_prob:
      ops = []
      if self.brightness:
        f = rng.uniform(1 - self.brightness, 1 + self.brightness)
        ops.append(lambda im, f=f: ImageEnhance.Brightness(im).enhance(f))
      if self.contrast:
        f = rng.uniform(1 - self.contrast, 1 + self.contrast)
        ops.append(lambda im, f=f: ImageEnhance.Contrast(im).enhance(f))
      if self.saturation:
        f = rng.uniform(1 - self.saturation, 1 + self.saturation)
        ops.append(lambda im, f=f: ImageEnhance.Color(im).enhance(f))
      if self.hue:
        f = rng.uniform(-self.hue, self.hue)
        ops.append(lambda im, f=f: adjust_hue(im, f))
      for i in rng.permutation(len(ops)):
        img = ops[i](img)
    if rng.uniform() < self.gray_prob:
      img = img.convert("L").convert("RGB")
    if self.blur_prob and rng.uniform() < self.blur_prob:
      img = img.filter(gaussian_kernel3(rng.uniform(*self.blur_sigma)))
    return np.asarray(img)


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
  """torchvision's PIL adjust_hue: shift H in HSV by factor * 255 (wraps)."""
  h, s, v = img.convert("HSV").split()
  hue = np.asarray(h, np.uint8)
  hue = (hue.astype(np.int16) + int(np.round(factor * 255))) % 256
  h = Image.fromarray(hue.astype(np.uint8), "L")
  return Image.merge("HSV", (h, s, v)).convert("RGB")


def gaussian_kernel3(sigma: float) -> ImageFilter.Kernel:
  """3x3 Gaussian kernel (torchvision GaussianBlur(kernel_size=3))."""
  x = np.array([-1.0, 0.0, 1.0])
  k1 = np.exp(-0.5 * (x / sigma) ** 2)
  k1 /= k1.sum()
  k2 = np.outer(k1, k1)
  return ImageFilter.Kernel((3, 3), k2.flatten().tolist(), scale=1.0)


def pad_to_canvas(image: np.ndarray, canvas: Tuple[int, int]) -> np.ndarray:
  """Zero-pads [h, w, ...] bottom/right to canvas (H, W)."""
  h, w = image.shape[:2]
  ch, cw = canvas
  if h > ch or w > cw:
    raise ValueError(f"image {h}x{w} larger than canvas {ch}x{cw}")
  out = np.zeros((ch, cw) + image.shape[2:], image.dtype)
  out[:h, :w] = image
  return out


@dataclasses.dataclass(frozen=True)
class TransformConfig:
  """Static parameters of the host transforms (from ``config.data``)."""
  canvas: Tuple[int, int]
  max_instances: int
  short_sizes: Sequence[int] = (640, 672, 704, 736, 768, 800)
  max_size: int = 1333
  test_short_size: int = 800
  test_max_size: int = 1333
  hflip_prob: float = 0.5
  photometric: str = "strong"
  masks: Optional[str] = None  # None | "s4" (mask-head grid) | "full"
  # Batch key of the GT masks: "masks" (mask supervision, visualisation) or
  # "monitor_masks" (read only by the pseudo-label monitor, never a loss).
  mask_key: str = "masks"
  # A third view for a teacher at the fixed test scale on its own canvas
  # (BoxTeacher §4.2): `teacher_view` / `teacher_view_valid`. None: no view.
  teacher_canvas: Optional[Tuple[int, int]] = None

  def __post_init__(self):
    for i, s in enumerate(self.canvas):
      if s % 32:
        raise ValueError(f"data.canvas[{i}] = {s} must be a multiple of 32 "
                         "(the stride of res5)")
    if self.masks not in (None, "s4", "full"):
      raise ValueError(f"masks: unknown mode {self.masks!r}")
    for i, s in enumerate(self.teacher_canvas or ()):
      if s % 32:
        raise ValueError(f"teacher.canvas[{i}] = {s} must be a multiple of "
                         "32 (the stride of res5)")


def teacher_view(image: np.ndarray, flipped: bool,
                 cfg: TransformConfig) -> np.ndarray:
  """The teacher's view: the original image at the test scale (§4.2).

  The reference re-resizes the student's (already resized) view to the test
  size; we resize the original once (one interpolation instead of two),
  then apply the student's flip so both views share the geometry.
  """
  h, w = image.shape[:2]
  th, tw = fit_size(*shortest_edge_size(h, w, cfg.test_short_size,
                                        cfg.test_max_size), cfg.teacher_canvas)
  out = image
  if (th, tw) != (h, w):
    out = np.asarray(Image.fromarray(image).resize((tw, th), Image.BILINEAR))
  return np.ascontiguousarray(out[:, ::-1]) if flipped else out


def _finish(ex: features.Example, student: np.ndarray, cfg: TransformConfig,
            orig_size: Tuple[int, int], num_dropped: int,
            num_truncated: int,
            teacher: Optional[np.ndarray] = None) -> features.Example:
  """Pads everything to the static canvas / max_instances shapes."""
  h, w = ex["image"].shape[:2]
  ch, cw = cfg.canvas
  n = len(ex["labels"])
  big_n = cfg.max_instances
  boxes = np.zeros((big_n, 4), np.float32)
  boxes[:n] = ex["boxes"]
  labels = np.full((big_n,), -1, np.int32)
  labels[:n] = ex["labels"]
  valid = np.zeros((big_n,), bool)
  valid[:n] = True
  image_valid = np.zeros((ch, cw), bool)
  image_valid[:h, :w] = True
  out = {
      "image": pad_to_canvas(student, cfg.canvas),
      "image_teacher": pad_to_canvas(ex["image"], cfg.canvas),
      "image_valid": image_valid,
      "boxes": boxes,
      "labels": labels,
      "instance_valid": valid,
      "example_valid": np.bool_(True),
      "image_id": np.int64(ex.get("image_id", -1)),
      "orig_size": np.array(orig_size, np.int32),
      "resized_size": np.array([h, w], np.int32),
      "scale": np.array([h / orig_size[0], w / orig_size[1]], np.float32),
      "num_truncated": np.int32(num_truncated),
      "num_dropped": np.int32(num_dropped + ex.get("num_bad_boxes", 0)),
  }
  if cfg.masks == "full":
    m = np.zeros((big_n, ch, cw), bool)
    m[:n, :h, :w] = ex["masks"].astype(bool)
    out[cfg.mask_key] = m
  elif cfg.masks == "s4":
    s, o = features.MASK_STRIDE, features.MASK_OFFSET
    m = np.zeros((big_n, ch // s, cw // s), bool)
    sub = ex["masks"][:, o::s, o::s].astype(bool)
    m[:n, :sub.shape[1], :sub.shape[2]] = sub
    out[cfg.mask_key] = m
  if cfg.teacher_canvas is not None:
    if teacher is None:  # padding examples: an empty teacher view
      teacher = np.zeros((0, 0, 3), np.uint8)
    tvalid = np.zeros(tuple(cfg.teacher_canvas), bool)
    tvalid[:teacher.shape[0], :teacher.shape[1]] = True
    out["teacher_view"] = pad_to_canvas(teacher, cfg.teacher_canvas)
    out["teacher_view_valid"] = tvalid
  return out


def make_train_transform(cfg: TransformConfig):
  """Returns ``fn(example, rng) -> padded example`` for training."""
  photometric = Photometric.named(cfg.photometric)

  def fn(ex: features.Example, rng: np.random.Generator) -> features.Example:
    features.check_example(ex)
    if cfg.masks is None:
      ex = {k: v for k, v in ex.items() if k != "masks"}
    elif "masks" not in ex:
      raise ValueError(f"{ex.get('file_name')}: config asks for masks "
                       "(data.with_masks) but the source provides none")
    orig = ex["image"].shape[:2]
    original = ex["image"]
    short = int(cfg.short_sizes[rng.integers(len(cfg.short_sizes))])
    nh, nw = fit_size(*shortest_edge_size(*orig, short, cfg.max_size),
                      cfg.canvas)
    ex = resize(ex, nh, nw)
    flipped = bool(rng.uniform() < cfg.hflip_prob)
    if flipped:
      ex = hflip(ex)
    ex, dropped, truncated = clean_instances(ex, cfg.max_instances)
    student = (photometric(ex["image"], rng) if photometric is not None
               else ex["image"])
    teacher = (teacher_view(original, flipped, cfg)
               if cfg.teacher_canvas is not None else None)
    return _finish(ex, student, cfg, orig, dropped, truncated, teacher)

  return fn


def make_eval_transform(cfg: TransformConfig):
  """Returns ``fn(example) -> padded example`` (test-size resize only)."""

  def fn(ex: features.Example) -> features.Example:
    features.check_example(ex)
    if cfg.masks is None:
      ex = {k: v for k, v in ex.items() if k != "masks"}
    orig = ex["image"].shape[:2]
    nh, nw = fit_size(*shortest_edge_size(*orig, cfg.test_short_size,
                                          cfg.test_max_size), cfg.canvas)
    ex = resize(ex, nh, nw)
    ex, dropped, truncated = clean_instances(ex, cfg.max_instances)
    return _finish(ex, ex["image"], cfg, orig, dropped, truncated)

  return fn


def padding_example(cfg: TransformConfig) -> features.Example:
  """An all-padding example (``example_valid=False``) for partial batches."""
  ch, cw = cfg.canvas
  empty = {
      "image": np.zeros((32, 32, 3), np.uint8),
      "boxes": np.zeros((0, 4), np.float32),
      "labels": np.zeros((0,), np.int32),
      "image_id": -1,
  }
  if cfg.masks is not None:
    empty["masks"] = np.zeros((0, 32, 32), np.uint8)
  out = _finish(empty, empty["image"], cfg, (32, 32), 0, 0)
  out["example_valid"] = np.bool_(False)
  out["image_valid"][:] = False
  out["resized_size"][:] = 0
  return out
