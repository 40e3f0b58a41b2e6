"""`shapes`: a procedural instance-segmentation dataset, no download.

Every image is a pure function of ``(seed, index)``: the same seed gives the
same images in any order, on any host. It is built to be a fair test of box
supervision rather than a toy:

* 4 classes of shape (ellipse, rotated rectangle, triangle, star), 1-8 objects
  per image, random rotation and aspect ratio;
* object sizes drawn log-uniformly so that COCO small (< 32^2 px), medium and
  large (> 96^2 px) objects all occur;
* textured backgrounds (low-frequency colour noise + gradient + optional
  stripes/checkers) and textured, gradient or noisy object fills;
* some objects take a colour close to the background around them, so the
  colour-similarity prior of BoxInst is not trivially right;
* objects are placed to overlap others often; later objects occlude earlier
  ones and the ground truth is the *visible* part (as in COCO), with the box
  tight around the visible mask;
* global sensor noise.
"""

import dataclasses
from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from boxseg_jax.data import features

CLASS_NAMES = ("ellipse", "rectangle", "triangle", "star")
NUM_CLASSES = len(CLASS_NAMES)


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
  """Generation parameters (all sizes in pixels)."""
  image_size: Tuple[int, int] = (320, 320)  # (h, w)
  min_objects: int = 1
  max_objects: int = 8
  min_size: float = 12.0   # object extent (longest side) range, log-uniform
  max_size: float = 220.0
  min_visible_fraction: float = 0.25  # drop objects occluded more than this
  min_visible_pixels: int = 16
  overlap_prob: float = 0.5     # place next to an existing object
  camouflage_prob: float = 0.2  # fill colour close to the local background
  noise_sigma_max: float = 8.0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int,
                  channels: int) -> np.ndarray:
  """Low-frequency noise in [0, 1]: a random grid upsampled bicubically."""
  gh = max(2, int(cells * h / max(h, w)))
  gw = max(2, int(cells * w / max(h, w)))
  grid = rng.uniform(0, 255, size=(gh, gw, channels)).astype(np.uint8)
  img = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid)
  up = np.asarray(img.resize((w, h), Image.BICUBIC), np.float32) / 255.0
  return up.reshape(h, w, channels)


def _texture(rng: np.random.Generator, h: int, w: int,
             base: np.ndarray) -> np.ndarray:
  """A [h, w, 3] float texture around colour ``base`` (0..255)."""
  kind = rng.integers(4)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  amp = rng.uniform(15, 60)
  if kind == 0:  # colour noise blobs
    tex = (_smooth_noise(rng, h, w, int(rng.integers(3, 12)), 3) - 0.5) * amp
  elif kind == 1:  # linear gradient
    ang = rng.uniform(0, 2 * np.pi)
    g = (np.cos(ang) * xx + np.sin(ang) * yy) / max(h, w)
    direction = rng.uniform(-1, 1, size=3)
    tex = (g[..., None] - 0.5) * amp * direction
  elif kind == 2:  # stripes
    ang = rng.uniform(0, np.pi)
    period = rng.uniform(4, 24)
    s = np.sin((np.cos(ang) * xx + np.sin(ang) * yy) * 2 * np.pi / period)
    tex = s[..., None] * amp * 0.5 * rng.uniform(-1, 1, size=3)
  else:  # checkers
    period = rng.uniform(6, 30)
    c = ((xx // period + yy // period) % 2) * 2 - 1
    tex = c[..., None] * amp * 0.4 * rng.uniform(-1, 1, size=3)
  fine = rng.normal(0, rng.uniform(0, 10), size=(h, w, 1)).astype(np.float32)
  return base[None, None, :] + tex + fine


def _polygon(cls: int, rng: np.random.Generator, cx: float, cy: float,
             size: float) -> np.ndarray:
  """Vertices [k, 2] (x, y) of a shape of class ``cls`` with extent ~size."""
  aspect = rng.uniform(0.5, 1.0)
  rx, ry = size / 2, size / 2 * aspect
  if cls == 0:  # ellipse
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], -1)
  elif cls == 1:  # rectangle
    pts = np.array([[-rx, -ry], [rx, -ry], [rx, ry], [-rx, ry]])
  elif cls == 2:  # triangle (random apex offset)
    apex = rng.uniform(-0.6, 0.6) * rx
    pts = np.array([[-rx, ry], [rx, ry], [apex, -ry]])
  else:  # 5-pointed star
    t = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
    r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.35, 0.55))
    pts = np.stack([rx * r * np.cos(t), rx * r * np.sin(t)], -1)
  ang = rng.uniform(0, 2 * np.pi)
  rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
  return pts @ rot.T + np.array([cx, cy])


def _rasterize(poly: np.ndarray, h: int, w: int) -> np.ndarray:
  img = Image.new("L", (w, h), 0)
  ImageDraw.Draw(img).polygon([tuple(p) for p in poly.tolist()], fill=1)
  return np.asarray(img, np.uint8)


def generate(seed: int, index: int, cfg: ShapesConfig = ShapesConfig()
             ) -> features.Example:
  """Generates image ``index`` of the dataset with seed ``seed``."""
  rng = np.random.default_rng([seed, index])
  h, w = cfg.image_size
  bg_base = rng.uniform(30, 225, size=3).astype(np.float32)
  canvas = _texture(rng, h, w, bg_base)

  num = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
  full_masks, classes = [], []
  placed = []  # (cx, cy, size) of objects so far
  log_lo, log_hi = np.log(cfg.min_size), np.log(cfg.max_size)
  for _ in range(num):
    cls = int(rng.integers(NUM_CLASSES))
    size = float(np.exp(rng.uniform(log_lo, log_hi)))
    size = min(size, 0.9 * min(h, w))
    if placed and rng.uniform() < cfg.overlap_prob:
      ox, oy, osz = placed[int(rng.integers(len(placed)))]
      ang = rng.uniform(0, 2 * np.pi)
      dist = (osz + size) / 2 * rng.uniform(0.3, 0.9)
      cx, cy = ox + dist * np.cos(ang), oy + dist * np.sin(ang)
    else:
      cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    cx = float(np.clip(cx, size * 0.2, w - size * 0.2))
    cy = float(np.clip(cy, size * 0.2, h - size * 0.2))
    mask = _rasterize(_polygon(cls, rng, cx, cy, size), h, w)
    if mask.sum() < cfg.min_visible_pixels:
      continue
    ys, xs = np.nonzero(mask)
    if rng.uniform() < cfg.camouflage_prob:
      local = canvas[ys, xs].mean(0)
      base = np.clip(local + rng.normal(0, 12, size=3), 0, 255)
    else:
      base = rng.uniform(0, 255, size=3)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    tex = _texture(rng, y1 - y0, x1 - x0, base.astype(np.float32))
    sub = mask[y0:y1, x0:x1].astype(bool)
    canvas[y0:y1, x0:x1][sub] = tex[sub]
    full_masks.append(mask)
    classes.append(cls)
    placed.append((cx, cy, size))

  # Visible parts: later objects occlude earlier ones.
  visible, keep_cls = [], []
  covered = np.zeros((h, w), bool)
  for mask, cls in zip(reversed(full_masks), reversed(classes)):
    vis = mask.astype(bool) & ~covered
    covered |= mask.astype(bool)
    area = int(vis.sum())
    if (area >= cfg.min_visible_pixels and
        area >= cfg.min_visible_fraction * mask.sum()):
      visible.append(vis)
      keep_cls.append(cls)
  visible, keep_cls = visible[::-1], keep_cls[::-1]

  sigma = rng.uniform(0, cfg.noise_sigma_max)
  canvas = canvas + rng.normal(0, sigma, size=canvas.shape)
  image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)

  if visible:
    masks = np.stack(visible).astype(np.uint8)
    boxes = np.stack([_mask_box(m) for m in visible]).astype(np.float32)
  else:
    masks = np.zeros((0, h, w), np.uint8)
    boxes = np.zeros((0, 4), np.float32)
  return {
      "image": image,
      "boxes": boxes,
      "labels": np.asarray(keep_cls, np.int32),
      "masks": masks,
      "image_id": int(index) + 1,
      "file_name": f"shapes/{seed}/{index}",
      "num_crowd": 0,
      "num_bad_boxes": 0,
  }


def _mask_box(mask: np.ndarray) -> np.ndarray:
  """Tight x0, y0, x1, y1 box of a mask (pixel-edge convention, like COCO)."""
  ys, xs = np.nonzero(mask)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


class ShapesSource:
  """Random-access source of ``num_images`` shapes images (grain-compatible)."""

  def __init__(self, num_images: int, seed: int,
               cfg: ShapesConfig = ShapesConfig()):
    self.num_images = int(num_images)
    self.seed = int(seed)
    self.cfg = cfg
    self.class_names: Sequence[str] = CLASS_NAMES
    self.category_ids: Sequence[int] = tuple(range(1, NUM_CLASSES + 1))
    self.name = f"shapes(seed={seed}, n={num_images})"

  def __len__(self) -> int:
    return self.num_images

  def image_size(self, index: int) -> Tuple[int, int]:
    """(height, width) of image ``index`` (all share ``cfg.image_size``)."""
    if not 0 <= index < self.num_images:
      raise IndexError(f"{self.name}: index {index} out of range")
    h, w = self.cfg.image_size
    return int(h), int(w)

  def __getitem__(self, index: int) -> features.Example:
    if not 0 <= index < self.num_images:
      raise IndexError(f"{self.name}: index {index} out of range")
    return generate(self.seed, int(index), self.cfg)

  def __repr__(self) -> str:
    return self.name
