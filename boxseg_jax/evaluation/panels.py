"""Drawing boxes and masks on images (for PNGs and TensorBoard panels)."""

import colorsys
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_color(label: int) -> tuple:
  """A distinct saturated RGB colour per class (golden-ratio hues)."""
  r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
  return int(r * 255), int(g * 255), int(b * 255)


def render(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
           valid: np.ndarray, *, masks: Optional[np.ndarray] = None,
           image_valid: Optional[np.ndarray] = None,
           class_names: Sequence[str] = (),
           scores: Optional[np.ndarray] = None,
           font_size: Optional[int] = None) -> Image.Image:
  """Draws instances on one image.

  Args:
    image: uint8 [H, W, 3].
    boxes: [N, 4] x0, y0, x1, y1 pixels.
    labels: [N] int class index.
    valid: [N] bool.
    masks: optional bool [N, H, W], tinted with the class colour.
    image_valid: optional bool [H, W]; padding is drawn dark grey.
    class_names: names for the captions (else the index).
    scores: optional [N] scores appended to the captions.
    font_size: draw captions in this size on a filled box of the class
      colour (readable on photos); None: PIL's small default font.
  """
  img = image.astype(np.float32).copy()
  if image_valid is not None:
    img[~image_valid] = 40.0
  if masks is not None:
    for j in np.nonzero(valid)[0]:
      col = np.array(class_color(int(labels[j])), np.float32)
      m = masks[j].astype(bool)
      img[m] = 0.55 * img[m] + 0.45 * col
  pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  font = ImageFont.load_default(size=font_size) if font_size else None
  for j in np.nonzero(valid)[0]:
    col = class_color(int(labels[j]))
    x0, y0, x1, y1 = (float(v) for v in boxes[j])
    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=col,
                   width=2)
    name = (class_names[int(labels[j])] if len(class_names) else
            str(int(labels[j])))
    if scores is not None:
      name += f" {float(scores[j]):.2f}"
    if font is None:
      draw.text((x0 + 2, y0 + 1), name, fill=col)
    else:
      left, top, right, bottom = draw.textbbox((x0, y0), name, font=font)
      draw.rectangle([left - 1, top - 1, right + 2, bottom + 1], fill=col)
      draw.text((x0, y0), name, fill=(0, 0, 0), font=font)
  return pil


def grid_to_canvas(masks: np.ndarray, height: int, width: int) -> np.ndarray:
  """Masks on a stride-s grid ``[..., h, w]`` -> ``[..., height, width]``
  (each grid cell covers an s x s block of the canvas; nearest)."""
  s = max(1, height // masks.shape[-2])
  up = np.repeat(np.repeat(masks, s, axis=-2), s, axis=-1)
  up = up[..., :height, :width]
  pad = [(0, 0)] * (up.ndim - 2) + [(0, height - up.shape[-2]),
                                    (0, width - up.shape[-1])]
  return np.pad(up, pad)


PEER_COLOR = (255, 255, 255)


def student_batch_panels(batch: dict, num: int,
                         class_names: Sequence[str] = (),
                         num_gt: Optional[int] = None) -> np.ndarray:
  """Panels of what the student trains on: ``uint8 [k, H, 2W + 4, 3]``.

  Per example (the first ``num`` valid ones of ``train.step``'s
  ``make_preview_step`` output): left, the student view before any paste
  (``input_image``, ``input_boxes``, ``input_valid``; else
  ``image_teacher`` and the GT boxes it trains on); right, the
  student view it trains on (after Peer-assisted Copy-paste where it ran)
  with its boxes and its pseudo masks (flag > 0) tinted. Instances at
  index ``num_gt`` and above are pasted peers: outlined white and captioned
  ``peer``.
  """
  out = []
  for i in np.nonzero(batch["example_valid"])[0][:num]:
    image = batch["image"][i]
    h, w = image.shape[:2]
    valid = batch["instance_valid"][i].astype(bool)
    masks = None
    if "pseudo_masks" in batch:
      masks = grid_to_canvas(batch["pseudo_masks"][i] > 0.5, h, w)
      masks &= (batch["pseudo_flags"][i] > 0)[:, None, None]
    n_gt = valid.shape[0] if num_gt is None else num_gt
    before = batch.get("input_image", batch["image_teacher"])[i]
    gt_boxes = batch.get("input_boxes", batch["boxes"])[i][:n_gt]
    gt_valid = (batch["input_valid"][i] if "input_valid" in batch
                else valid)[:n_gt].astype(bool)
    left = render(before, gt_boxes, batch["labels"][i][:n_gt], gt_valid,
                  image_valid=batch["image_valid"][i],
                  class_names=class_names)
    student = render(image, batch["boxes"][i], batch["labels"][i], valid,
                     masks=masks, image_valid=batch["image_valid"][i],
                     class_names=class_names)
    draw = ImageDraw.Draw(student)
    for j in np.nonzero(valid[n_gt:])[0] + n_gt:
      x0, y0, x1, y1 = (float(v) for v in batch["boxes"][i][j])
      draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=PEER_COLOR, width=1)
      draw.text((x0 + 2, max(0.0, y1 - 11)), "peer", fill=PEER_COLOR)
    panel = np.full((h, 2 * w + 4, 3), 255, np.uint8)
    panel[:, :w] = np.asarray(left)
    panel[:, w + 4:] = np.asarray(student)
    out.append(panel)
  if not out:
    return np.zeros((0, 1, 1, 3), np.uint8)
  return np.stack(out)
