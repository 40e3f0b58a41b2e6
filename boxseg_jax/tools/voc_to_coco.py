r"""Pascal VOC XML annotations -> a COCO layout that ``coco:ROOT:SPLIT`` reads.

  python -m boxseg_jax.tools.voc_to_coco --voc_root=VOCdevkit/VOC2012 \
      --split=train --output_root=data/voc2012
  # val with instance masks (SegmentationObject PNGs) for segm AP:
  python -m boxseg_jax.tools.voc_to_coco --voc_root=VOCdevkit/VOC2012 \
      --split=val --image_set=Segmentation --masks --output_root=data/voc2012

Reads ``VOC/ImageSets/<image_set>/<split>.txt`` and
``VOC/Annotations/<id>.xml``; writes
``OUTPUT_ROOT/annotations/instances_<split>.json`` and makes
``OUTPUT_ROOT/<split>`` a symlink to ``VOC/JPEGImages`` (``--nolink``:
JSON only), so ``--config.data.train=coco:OUTPUT_ROOT:train`` works.

Conventions (detectron2's ``pascal_voc`` loader): VOC boxes are 1-based
inclusive pixel indices, so ``xmin, ymin`` lose 1 and ``[xmin - 1,
ymin - 1, xmax, ymax]`` is the box in continuous 0-based coordinates (COCO
``bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``), clipped
to the image; degenerate boxes are dropped and counted. ``difficult``
objects are kept by default (as detectron2 trains on them); ``skip`` drops
them, ``crowd`` marks them ``iscrowd = 1`` (ignored by COCO evaluation).
``--masks``: ``SegmentationObject/<id>.png`` holds instance index ``j``
(1-based, the XML object order) per pixel, 0 background and 255 the void
border (never part of a mask); images without that PNG stay box-only.
Categories are the 20 VOC classes in their usual order (ids 1..20), or
``--classes=a,b,c`` (``--classes=auto``: the sorted names found) for
VOC-format custom data.
"""

import json
import os
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse",
               "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
DIFFICULT_MODES = ("include", "skip", "crowd")
VOID = 255


class VocError(ValueError):
  """A VOC annotation that cannot be converted (names the file)."""


def _text(node, tag: str, path: str, default: Optional[str] = None) -> str:
  child = node.find(tag)
  if child is None or child.text is None:
    if default is not None:
      return default
    raise VocError(f"{path}: missing <{tag}>")
  return child.text.strip()


def parse_xml(path: str) -> Dict[str, Any]:
  """One VOC annotation file -> {filename, width, height, objects}."""
  try:
    root = ET.parse(path).getroot()
  except ET.ParseError as e:
    raise VocError(f"{path}: not valid XML ({e})") from e
  size = root.find("size")
  width = height = None
  if size is not None:
    width = int(float(_text(size, "width", path, "0")))
    height = int(float(_text(size, "height", path, "0")))
  objects = []
  for obj in root.findall("object"):
    box = obj.find("bndbox")
    if box is None:
      raise VocError(f"{path}: <object> without <bndbox>")
    try:
      coords = [float(_text(box, t, path))
                for t in ("xmin", "ymin", "xmax", "ymax")]
    except ValueError as e:
      raise VocError(f"{path}: bad <bndbox> ({e})") from e
    objects.append({"name": _text(obj, "name", path),
                    "difficult": int(float(_text(obj, "difficult", path,
                                                 "0"))),
                    "box": coords})
  return {"filename": _text(root, "filename", path, ""),
          "width": width or None, "height": height or None,
          "objects": objects}


def read_ids(voc_root: str, split: str, image_set: str = "Main") -> List[str]:
  path = os.path.join(voc_root, "ImageSets", image_set, f"{split}.txt")
  if not os.path.exists(path):
    raise FileNotFoundError(f"image set {path} not found")
  with open(path) as f:
    # Class-specific lists have a second column (1 / -1 / 0): first token.
    return [line.split()[0] for line in f if line.strip()]


def _instance_masks(voc_root: str, image_id: str, num: int,
                    hw) -> Optional[List[np.ndarray]]:
  path = os.path.join(voc_root, "SegmentationObject", f"{image_id}.png")
  if not os.path.exists(path):
    return None
  with Image.open(path) as im:
    seg = np.asarray(im)
  if seg.ndim != 2:
    raise VocError(f"{path}: expected a palette (index) PNG, got shape "
                   f"{seg.shape}")
  if seg.shape != tuple(hw):
    raise VocError(f"{path}: size {seg.shape} differs from the image "
                   f"{tuple(hw)}")
  return [seg == j for j in range(1, num + 1)]


def convert(voc_root: str, split: str, *, image_set: str = "Main",
            classes: Sequence[str] = VOC_CLASSES, difficult: str = "include",
            masks: bool = False) -> Dict[str, Any]:
  """The COCO dataset dict (plus ``stats``) of one VOC split."""
  if difficult not in DIFFICULT_MODES:
    raise ValueError(f"difficult must be one of {DIFFICULT_MODES}, got "
                     f"{difficult!r}")
  ids = read_ids(voc_root, split, image_set)
  parsed = {i: parse_xml(os.path.join(voc_root, "Annotations", f"{i}.xml"))
            for i in ids}
  if classes == "auto":
    classes = sorted({o["name"] for p in parsed.values()
                      for o in p["objects"]})
  cat_id = {name: k + 1 for k, name in enumerate(classes)}
  images, anns = [], []
  stats = {"images": 0, "instances": 0, "difficult": 0, "skipped_difficult": 0,
           "degenerate": 0, "with_masks": 0}
  for n, image_id in enumerate(ids, start=1):
    xml_path = os.path.join(voc_root, "Annotations", f"{image_id}.xml")
    info = parsed[image_id]
    file_name = info["filename"] or f"{image_id}.jpg"
    w, h = info["width"], info["height"]
    if not w or not h:
      with Image.open(os.path.join(voc_root, "JPEGImages", file_name)) as im:
        w, h = im.size
    images.append({"id": n, "file_name": file_name, "height": h, "width": w})
    inst = (_instance_masks(voc_root, image_id, len(info["objects"]), (h, w))
            if masks else None)
    if inst is not None:
      stats["with_masks"] += 1
    for j, obj in enumerate(info["objects"]):
      if obj["name"] not in cat_id:
        raise VocError(f"{xml_path}: class {obj['name']!r} is not one of "
                       f"--classes ({', '.join(classes)})")
      crowd = 0
      if obj["difficult"]:
        stats["difficult"] += 1
        if difficult == "skip":
          stats["skipped_difficult"] += 1
          continue
        crowd = int(difficult == "crowd")
      x0, y0, x1, y1 = obj["box"]
      x0, y0 = max(x0 - 1.0, 0.0), max(y0 - 1.0, 0.0)
      x1, y1 = min(x1, float(w)), min(y1, float(h))
      if not (x1 > x0 and y1 > y0):
        stats["degenerate"] += 1
        continue
      ann = {"id": len(anns) + 1, "image_id": n,
             "category_id": cat_id[obj["name"]], "iscrowd": crowd,
             "bbox": [x0, y0, x1 - x0, y1 - y0],
             "area": (x1 - x0) * (y1 - y0)}
      if inst is not None:
        rle = mask_utils.encode(np.asfortranarray(inst[j].astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        ann["segmentation"] = rle
        ann["area"] = float(mask_utils.area(rle))
      elif crowd:
        ann["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
      anns.append(ann)
  stats["images"] = len(images)
  stats["instances"] = len(anns)
  return {"info": {"description": f"VOC {voc_root} {split} "
                   f"({image_set})"},
          "images": images, "annotations": anns,
          "categories": [{"id": cat_id[c], "name": c} for c in classes],
          "stats": stats}


def write(dataset: Dict[str, Any], voc_root: str, output_root: str,
          split: str, link: bool = True) -> str:
  """Writes the JSON (and the image symlink); returns the JSON path."""
  ann_dir = os.path.join(output_root, "annotations")
  os.makedirs(ann_dir, exist_ok=True)
  path = os.path.join(ann_dir, f"instances_{split}.json")
  payload = {k: v for k, v in dataset.items() if k != "stats"}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f)
  os.replace(tmp, path)
  if link:
    target = os.path.abspath(os.path.join(voc_root, "JPEGImages"))
    dst = os.path.join(output_root, split)
    if os.path.islink(dst):
      if os.path.realpath(dst) != os.path.realpath(target):
        raise FileExistsError(f"{dst} links to {os.readlink(dst)}, not "
                              f"{target}")
    elif os.path.exists(dst):
      raise FileExistsError(f"{dst} exists and is not a link to {target}")
    else:
      os.symlink(target, dst)
  return path


def main(argv, f):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  classes = (VOC_CLASSES if not f["classes"].value else
             "auto" if f["classes"].value == "auto" else
             tuple(c.strip() for c in f["classes"].value.split(",")))
  dataset = convert(f["voc_root"].value, f["split"].value,
                    image_set=f["image_set"].value, classes=classes,
                    difficult=f["difficult"].value, masks=f["masks"].value)
  split = f["output_split"].value or f["split"].value
  path = write(dataset, f["voc_root"].value, f["output_root"].value, split,
               link=f["link"].value)
  print(json.dumps({"json": path, "dataset": f"coco:"
                    f"{f['output_root'].value}:{split}",
                    **dataset["stats"]}))


if __name__ == "__main__":
  import functools  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  _FLAGS = {
      "voc_root": flags.DEFINE_string("voc_root", None, "e.g. "
                                      "VOCdevkit/VOC2012"),
      "split": flags.DEFINE_string("split", None, "train / val / trainval "
                                   "(ImageSets/<image_set>/<split>.txt)"),
      "image_set": flags.DEFINE_string("image_set", "Main", "Main or "
                                       "Segmentation"),
      "output_root": flags.DEFINE_string("output_root", None, "COCO root."),
      "output_split": flags.DEFINE_string("output_split", None, "Split name "
                                          "to write (default: --split)."),
      "classes": flags.DEFINE_string("classes", None, "Comma-separated "
                                     "class names, or 'auto' (default: the "
                                     "20 VOC classes)."),
      "difficult": flags.DEFINE_enum("difficult", "include",
                                     list(DIFFICULT_MODES),
                                     "What to do with difficult objects."),
      "masks": flags.DEFINE_bool("masks", False, "Instance masks from "
                                 "SegmentationObject PNGs."),
      "link": flags.DEFINE_bool("link", True, "Symlink OUTPUT_ROOT/<split> "
                                "to VOC/JPEGImages."),
  }
  flags.mark_flags_as_required(["voc_root", "split", "output_root"])
  app.run(functools.partial(main, f=_FLAGS))
