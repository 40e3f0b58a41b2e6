"""Host-side post-processing of MaskCut masks (reference §5.6), NumPy only.

Per output mask, on the `S x S` resized RGB image:

1. DenseCRF (`pydensecrf`, provided by the maintained fork `pydensecrf2`):
   unary `-log softmax([1 - m, m])` (p_fg = 0.731 inside, 0.269 outside),
   Gaussian pairwise sxy 3 compat 7, bilateral sxy 50 srgb 5 compat 10,
   10 mean-field iterations, MAP label;
2. `binary_fill_holes(MAP >= 0.5)`;
3. discarded (zeros) when `IoU(mask, crf_mask) < 0.5`;
4. resized (0/255 uint8, PIL bicubic) to the original W x H and thresholded
   at half its maximum.

`pydensecrf` is optional: it is imported lazily, and `crf_available()` says
whether it is there. Without CRF (config `crf=False`) steps 1 and 3 are
skipped; step 2 still fills holes of the raw mask (docs/maskcut.md).
"""

from typing import Optional, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

MAX_ITER = 10
POS_W = 7
POS_XY_STD = 3
BI_W = 10
BI_XY_STD = 50
BI_RGB_STD = 5


def crf_available() -> bool:
  """True when `pydensecrf` (pip `pydensecrf2`) can be imported."""
  try:
    # pylint: disable-next=g-import-not-at-top,unused-import
    import pydensecrf.densecrf
  except ImportError:
    return False
  return True


def unary_from_mask(mask: np.ndarray) -> np.ndarray:
  """[H, W] 0/1 mask -> [2, H * W] float32 `-log softmax([1 - m, m])`.

  `pydensecrf.utils.unary_from_softmax` with its default clip 1e-5 (which
  never binds here: the probabilities are 0.269 / 0.731).
  """
  fg = mask.astype(np.float64)
  logits = np.stack([1.0 - fg, fg])
  logits = logits - logits.max(axis=0, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(axis=0, keepdims=True)
  probs = np.clip(probs, 1e-5, 1.0)
  return np.ascontiguousarray(
      -np.log(probs).reshape(2, -1).astype(np.float32))


def densecrf(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """CutLER `crf.densecrf`: MAP foreground of a 2-label dense CRF.

  Args:
    image: [H, W, 3] uint8 RGB (the S x S MaskCut input).
    mask: [H, W] binary mask at the same size.

  Returns:
    [H, W] float32 MAP label (1 = foreground).

  Raises:
    ImportError: when pydensecrf is not installed.
  """
  import pydensecrf.densecrf as dcrf  # pylint: disable=g-import-not-at-top
  h, w = mask.shape
  if image.shape[:2] != (h, w):
    raise ValueError(f"image {image.shape} and mask {mask.shape} differ")
  d = dcrf.DenseCRF2D(w, h, 2)
  d.setUnaryEnergy(unary_from_mask(mask))
  d.addPairwiseGaussian(sxy=POS_XY_STD, compat=POS_W)
  d.addPairwiseBilateral(sxy=BI_XY_STD, srgb=BI_RGB_STD,
                         # pydensecrf needs a writable C-contiguous buffer.
                         rgbim=np.array(image, dtype=np.uint8, order="C"),
                         compat=BI_W)
  q = np.array(d.inference(MAX_ITER)).reshape(2, h, w)
  return np.argmax(q, axis=0).astype(np.float32)


def iou_below(a: np.ndarray, b: np.ndarray, thresh: float = 0.5) -> bool:
  """TokenCut `IoU(a, b) < thresh` (0/0 = NaN -> False)."""
  a, b = a > 0.5, b > 0.5
  union = int(np.sum(a | b))
  return union > 0 and float(np.sum(a & b)) < thresh * union


def resize_mask(mask: np.ndarray, size_wh: Tuple[int, int]) -> np.ndarray:
  """0/1 mask -> 0/255 uint8, PIL bicubic to (W, H), `> max / 2`.

  The reference thresholds at half of the resized maximum and re-assigns
  min/max values; a plain boolean `> max / 2` is the same mask whenever the
  minimum is 0 (always, except for near-full masks, where the reference's
  uint8 re-assignment can produce a third value that breaks its RLE).
  """
  img = Image.fromarray((mask > 0).astype(np.uint8) * 255)
  if img.size != tuple(size_wh):
    img = img.resize(tuple(size_wh), resample=Image.BICUBIC)
  arr = np.asarray(img)
  upper = int(arr.max())
  if upper == 0:
    return np.zeros(arr.shape, bool)
  return arr > upper / 2.0


def postprocess_mask(image: np.ndarray, mask: np.ndarray,
                     size_wh: Tuple[int, int], use_crf: bool = True,
                     crf_iou_thresh: float = 0.5) -> Optional[np.ndarray]:
  """Steps 1-4 above for one mask.

  Args:
    image: [S, S, 3] uint8 resized RGB image.
    mask: [S, S] bool MaskCut mask (disjoint, upsampled).
    size_wh: original (W, H).
    use_crf: run DenseCRF + the IoU check.
    crf_iou_thresh: discard when IoU(mask, CRF mask) < this.

  Returns:
    [H, W] bool mask, or None when nothing is left (area < 1).
  """
  mask = mask.astype(bool)
  if use_crf:
    refined = ndimage.binary_fill_holes(densecrf(image, mask) >= 0.5)
    if iou_below(mask, refined, crf_iou_thresh):
      return None
  else:
    refined = ndimage.binary_fill_holes(mask)
  out = resize_mask(refined, size_wh)
  if not out.any():
    return None
  return out
