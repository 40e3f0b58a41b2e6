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
