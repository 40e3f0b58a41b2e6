"""Host side of the MaskCut CLI: image lists, resizing, COCO JSON (no jax).

Image sources:
* a glob (`/data/imagenet/train/**/*.JPEG`, recursive `**` allowed): sorted
  paths, each file once (a pattern like `**/**` makes `glob` return a file
  several times); `file_name` is the path relative to the glob's directory
  prefix (the part before the first wildcard), image ids 1..n;
* `coco:ROOT:SPLIT`: the images of `ROOT/annotations/instances_SPLIT.json`
  (ids and file names kept; duplicate ids are an error naming the file and
  the id), files under `ROOT/SPLIT/`.

Image ids are unique in every file written (`check_unique_ids`).

Output: a standard COCO instances file with one class-agnostic category
`{"id": 1, "name": "fg"}`; each annotation has `bbox` (x, y, w, h, the tight
box of the mask), `area` (mask pixels), `iscrowd` 0 and an RLE `segmentation`
with `counts` as str.
"""

import dataclasses
import datetime
import glob
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 1, "name": "fg", "supercategory": "fg"}]


@dataclasses.dataclass
class ImageEntry:
  path: str
  file_name: str
  image_id: int


def _natural_key(text: str):
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)",
                                                                text)]


def list_images(spec: str) -> List[ImageEntry]:
  """Resolves `--images` (a glob or `coco:ROOT:SPLIT`) to entries."""
  if spec.startswith("coco:"):
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
      raise ValueError(f"expected coco:ROOT:SPLIT, got {spec!r}")
    root, split = parts[1], parts[2]
    ann = os.path.join(root, "annotations", f"instances_{split}.json")
    if not os.path.isfile(ann):
      raise FileNotFoundError(f"{spec}: annotation file not found: {ann}")
    with open(ann) as f:
      data = json.load(f)
    if "images" not in data:
      raise ValueError(f"{ann}: no 'images' field")
    out = []
    for im in sorted(data["images"], key=lambda im: im["id"]):
      out.append(ImageEntry(os.path.join(root, split, im["file_name"]),
                            im["file_name"], int(im["id"])))
    check_unique_ids(out, ann)
    return out
  unique = {os.path.normpath(p): p for p in glob.glob(spec, recursive=True)
            if os.path.isfile(p)}
  paths = sorted(unique.values(), key=_natural_key)
  if not paths:
    raise FileNotFoundError(f"no files match --images={spec!r}")
  wild = re.search(r"[*?\[]", spec)
  prefix = spec[:wild.start()] if wild else spec
  base = os.path.dirname(prefix) if not prefix.endswith(os.sep) else prefix
  return [ImageEntry(p, os.path.relpath(p, base or "."), i + 1)
          for i, p in enumerate(paths)]


def check_unique_ids(entries: List[ImageEntry], source: str) -> None:
  """ValueError naming ``source`` and the id when two entries share an id.

  A COCO file with one image id twice trains the second image with the
  first one's boxes and merges them in evaluation.
  """
  seen: Dict[int, str] = {}
  for e in entries:
    if e.image_id in seen:
      raise ValueError(
          f"{source}: image id {e.image_id} is used by {seen[e.image_id]} "
          f"and {e.file_name}; the output would have duplicate image ids. "
          "Give every image its own id.")
    seen[e.image_id] = e.file_name


def load_resized(path: str, fixed_size: int, patch_size: int
                 ) -> Tuple[Tuple[int, int], np.ndarray, np.ndarray]:
  """Reads an image as the reference does.

  RGB (`convert('RGB')`), LANCZOS to `fixed_size` x `fixed_size` (aspect
  ratio not kept), then each side rounded to a multiple of the patch size
  with LANCZOS again (a no-op copy when it divides, as for 480 / 8 or 16).

  Args:
    path: image file.
    fixed_size: S.
    patch_size: p.

  Returns:
    ((W, H) original size, [S, S, 3] uint8 image for the CRF,
     [S', S', 3] uint8 image for the ViT, S' = round(S / p) * p).

  Raises:
    OSError/ValueError naming the file when it cannot be decoded.
  """
  try:
    with Image.open(path) as img:
      img.load()
      rgb = img.convert("RGB")
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot read image {path}: {e}") from e
  size_wh = rgb.size
  resized = rgb.resize((fixed_size, fixed_size), Image.LANCZOS)
  side = int(round(fixed_size / patch_size)) * patch_size
  feat_img = resized
  if side != fixed_size:
    feat_img = resized.resize((side, side), resample=Image.LANCZOS)
  return size_wh, np.asarray(resized), np.asarray(feat_img)


def mask_annotation(mask: np.ndarray, ann_id: int, image_id: int
                    ) -> Optional[Dict[str, Any]]:
  """COCO annotation for one [H, W] bool mask; None when it is empty."""
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  area = int(mask_utils.area(rle))
  if area < 1:
    return None
  bbox = [float(v) for v in mask_utils.toBbox(rle)]
  rle["counts"] = rle["counts"].decode("ascii")
  return {
      "id": int(ann_id),
      "image_id": int(image_id),
      "category_id": 1,
      "bbox": bbox,
      "area": area,
      "iscrowd": 0,
      "segmentation": {"size": [int(s) for s in rle["size"]],
                       "counts": rle["counts"]},
  }


def image_info(entry: ImageEntry, size_wh: Tuple[int, int]
               ) -> Dict[str, Any]:
  return {"id": int(entry.image_id), "file_name": entry.file_name,
          "width": int(size_wh[0]), "height": int(size_wh[1])}


def coco_document(images: List[Dict[str, Any]],
                  annotations: List[Dict[str, Any]],
                  description: str) -> Dict[str, Any]:
  return {
      "info": {"description": description,
               "date_created": datetime.datetime.now(
                   datetime.timezone.utc).isoformat(" ")},
      "licenses": [],
      "categories": CATEGORIES,
      "images": images,
      "annotations": annotations,
  }


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` atomically (temporary file + rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)
