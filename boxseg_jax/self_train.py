r"""CutLER's rounds: MaskCut pseudo masks, round 0, self-training rounds.

  python -m boxseg_jax.self_train --config=configs/cutler_r50_selftrain.py \
      --workdir=DIR --rounds=R [--config.a.b=v ...]

``DIR/round_<t>/`` is round t: its annotations ``pseudo.json`` (COCO JSON,
written atomically) and an ordinary training workdir (checkpoints, eval,
``config.json``) of ``config`` with method ``cutler`` trained on them
through ``coco:ROOT:SPLIT`` (``data.train``, its images) and
``data.train_annotations``. Rounds 0..R run in order (reference §6.2):

* round 0 trains on ``data.train_annotations`` (MaskCut's JSON), or, when
  that is "" and ``self_train.maskcut`` names a ``configs/maskcut.py``
  variant, on MaskCut pseudo masks this command makes first of
  ``data.train``'s images (``DIR/maskcut.json``); DropLoss and copy-paste
  as ``config.cutler`` says;
* round t >= 1: round t-1's model predicts on round t-1's images
  (``self_train.max_detections`` per image, score threshold
  ``self_train.predict_score_thresh``), the predictions are merged with
  round t-1's annotations (``merge``: score >= ``score_thresh -
  score_thresh_step * t``; an old mask stays when its max mask IoU with the
  kept predictions is < ``iou_thresh``; images without a kept prediction
  keep their old annotations), and round t trains from round t-1's weights
  (``config.init``, every parameter subtree) with ``self_train``'s
  schedule, DropLoss and copy-paste ratios.

A finished round writes ``DIR/round_<t>/round.json`` (its evaluation and
merge counts). Killed and restarted with the same flags, the command skips
finished rounds, reuses a written ``pseudo.json`` and resumes an
interrupted round from its checkpoint like any run (``train.loop``).
"""

import copy
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np
from pycocotools import mask as mask_utils

ROUND_FILE = "round.json"
PSEUDO_FILE = "pseudo.json"
MASKCUT_FILE = "maskcut.json"


def round_dir(workdir: str, t: int) -> str:
  return os.path.join(workdir, f"round_{t}")


def score_threshold(config: ml_collections.ConfigDict, t: int) -> float:
  """``score_thresh - score_thresh_step * t`` (0.7 in round 1, 0.65 in 2)."""
  st = config.self_train
  return float(st.score_thresh - st.score_thresh_step * t)


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` atomically (temporary file + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)


# --- the merge rule (host, pycocotools). ---------------------------------------


def _rle(segm: Any, height: int, width: int) -> Dict[str, Any]:
  """Polygons / uncompressed RLE / RLE -> RLE (pycocotools)."""
  if isinstance(segm, list):
    return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
  if isinstance(segm.get("counts"), list):
    return mask_utils.frPyObjects(segm, height, width)
  return segm


def merge(previous: Dict[str, Any], predictions: Sequence[Dict[str, Any]],
          *, score_thresh: float, iou_thresh: float = 0.5,
          area_quirk: bool = False, swap_wh_quirk: bool = False
          ) -> Tuple[Dict[str, Any], Dict[str, int]]:
  """CutLER's ``get_self_training_ann.py`` rule (reference §6.2).

  Per image of ``previous`` (its ``images`` list is the new one):
  predictions with ``score >= score_thresh`` are kept; a previous
  annotation stays iff its max mask IoU (``pycocotools.mask.iou``, no
  crowd) with the image's kept predictions is ``< iou_thresh``; an image
  without a kept prediction keeps all its previous annotations; an image
  without previous annotations takes its kept predictions. Order: per image
  with previous annotations (in their order) the kept predictions, then the
  surviving old ones; then the images that only have predictions. Ids are
  renumbered from 1, ``iscrowd`` 0, ``area`` the mask area (``area_quirk``:
  the box's w * h, as the reference), and with ``swap_wh_quirk`` every
  annotation gets the reference's ``width`` / ``height`` fields read from
  its RLE ``size`` ([h, w]), i.e. swapped.

  Args:
    previous: round t-1's COCO document (one category).
    predictions: COCO results of round t-1's model on those images
      (``image_id``, ``bbox``, ``score``, ``segmentation`` RLE).
    score_thresh: round t's score threshold.
    iou_thresh: an old mask overlapping a kept prediction this much goes.
    area_quirk: the reference's ``area``.
    swap_wh_quirk: the reference's per-annotation ``width`` / ``height``.

  Returns:
    ``(document, stats)``; stats count ``predictions_kept``,
    ``predictions_empty`` (above the threshold but with an empty mask:
    dropped, a decision of ours), ``old_kept``, ``old_replaced``, ``images_carried_over`` (previous
    annotations, no kept prediction), ``images_new`` (predictions only).
  """
  images = {int(img["id"]): img for img in previous["images"]}
  category = int(previous["categories"][0]["id"])
  kept: Dict[int, List[Dict[str, Any]]] = {}
  num_empty = 0
  for p in predictions:
    if p["score"] >= score_thresh and int(p["image_id"]) in images:
      img = images[int(p["image_id"])]
      if not mask_utils.area(_rle(p["segmentation"], int(img["height"]),
                                  int(img["width"]))):
        num_empty += 1   # no pixel to learn from (not in the reference)
        continue
      ann = {k: v for k, v in p.items() if k in (
          "image_id", "bbox", "score", "segmentation")}
      ann["category_id"] = category
      kept.setdefault(int(p["image_id"]), []).append(ann)
  old: Dict[int, List[Dict[str, Any]]] = {}
  for a in previous["annotations"]:
    old.setdefault(int(a["image_id"]), []).append(a)

  stats = dict(predictions_kept=0, predictions_empty=num_empty, old_kept=0,
               old_replaced=0, images_carried_over=0, images_new=0)
  merged: List[Dict[str, Any]] = []
  for image_id, anns in old.items():
    preds = kept.get(image_id)
    if not preds:
      merged += [dict(a) for a in anns]
      stats["old_kept"] += len(anns)
      stats["images_carried_over"] += 1
      continue
    h, w = int(images[image_id]["height"]), int(images[image_id]["width"])
    old_rles = [_rle(a["segmentation"], h, w) for a in anns]
    new_rles = [_rle(p["segmentation"], h, w) for p in preds]
    ious = np.asarray(mask_utils.iou(old_rles, new_rles, [0] * len(preds)))
    ious = ious.reshape(len(anns), len(preds))
    survive = [a for a, m in zip(anns, ious.max(axis=1)) if m < iou_thresh]
    merged += preds + [dict(a) for a in survive]
    stats["predictions_kept"] += len(preds)
    stats["old_kept"] += len(survive)
    stats["old_replaced"] += len(anns) - len(survive)
  for image_id, preds in kept.items():
    if image_id not in old:
      merged += preds
      stats["predictions_kept"] += len(preds)
      stats["images_new"] += 1

  for i, ann in enumerate(merged):
    ann["id"] = i + 1
    ann["iscrowd"] = 0
    img = images[int(ann["image_id"])]
    rle = _rle(ann["segmentation"], int(img["height"]), int(img["width"]))
    if area_quirk:
      ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    else:
      ann["area"] = float(mask_utils.area(rle))
    if swap_wh_quirk:
      ann["width"], ann["height"] = (int(v) for v in rle["size"])
  doc = {k: v for k, v in previous.items()
         if k not in ("annotations", "info")}
  doc["images"] = list(previous["images"])
  doc["annotations"] = merged
  return doc, stats


# --- rounds. -------------------------------------------------------------------


def _coco_spec(config) -> Tuple[str, str]:
  kind, _, rest = config.data.train.partition(":")
  root, sep, split = rest.rpartition(":")
  if kind != "coco" or not sep:
    raise ValueError(f"data.train={config.data.train!r}: self-training reads "
                     "its images from coco:ROOT:SPLIT (the annotations come "
                     "from each round's pseudo.json)")
  return root, split


def round_config(config: ml_collections.ConfigDict, workdir: str, t: int
                 ) -> ml_collections.ConfigDict:
  """Round t's training config: its annotations, and for t >= 1 the
  self-training schedule, DropLoss and copy-paste ratios and round t-1's
  weights."""
  c = copy.deepcopy(config)
  c.data.train_annotations = os.path.join(round_dir(workdir, t), PSEUDO_FILE)
  if t >= 1:
    st = config.self_train
    c.cutler.droploss = st.droploss
    c.cutler.copy_paste_min_ratio = st.copy_paste_min_ratio
    c.cutler.copy_paste_max_ratio = st.copy_paste_max_ratio
    c.optim.base_lr = st.base_lr
    c.optim.lr_boundaries = tuple(st.lr_boundaries)
    c.optim.gamma = st.gamma
    c.train.num_steps = st.num_steps
    c.init = os.path.abspath(round_dir(workdir, t - 1))
    c.init_keys = ("backbone", "fpn", "fcos_head", "mask_branch")
  return c


def run_maskcut(config: ml_collections.ConfigDict, output: str
                ) -> Dict[str, Any]:
  """MaskCut pseudo masks of ``data.train``'s images (``self_train.maskcut``)."""
  from boxseg_jax import config_helpers  # pylint: disable=g-import-not-at-top
  from boxseg_jax.maskcut import dataset_io  # pylint: disable=g-import-not-at-top
  from boxseg_jax.maskcut import generate  # pylint: disable=g-import-not-at-top
  st = config.self_train
  mc = config_helpers.load_config_file("maskcut", st.maskcut)
  mc.fixed_size = st.maskcut_fixed_size
  mc.seed = config.seed
  root, split = _coco_spec(config)
  entries = dataset_io.list_images(f"coco:{root}:{split}")
  if config.data.num_train_images > 0:
    entries = entries[:config.data.num_train_images]
  params = generate.load_params(mc, st.maskcut_weights or None,
                                st.maskcut_random_init)
  return generate.run(mc, entries, params, output, progress=False)


def predict_round(config_prev: ml_collections.ConfigDict, workdir_prev: str,
                  annotations: str) -> List[Dict[str, Any]]:
  """COCO results of round t-1's final model on round t-1's images."""
  from boxseg_jax import predict  # pylint: disable=g-import-not-at-top
  from boxseg_jax.data import coco  # pylint: disable=g-import-not-at-top
  from boxseg_jax.train import inference_ckpt  # pylint: disable=g-import-not-at-top
  st = config_prev.self_train
  c = copy.deepcopy(config_prev)
  c.eval.max_detections = st.max_detections
  c.eval.score_thresh = st.predict_score_thresh
  model = inference_ckpt.load_workdir(workdir_prev, config=c, teacher=False)
  root, split = _coco_spec(c)
  source = coco.CocoSource(root, split, annotation_file=annotations)
  preds = predict.predict(model, source, score_thresh=-1.0, progress=False)
  return [r for p in preds for r in p.results]


def _read(path: str) -> Dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def prepare_annotations(config: ml_collections.ConfigDict, workdir: str,
                        t: int) -> Dict[str, Any]:
  """Writes round t's ``pseudo.json`` unless it exists; returns its info."""
  path = os.path.join(round_dir(workdir, t), PSEUDO_FILE)
  if os.path.exists(path):
    logging.info("round %d: reusing %s", t, path)
    return _read(path).get("info", {})
  if t == 0:
    source = config.data.train_annotations
    if not source:
      if not config.self_train.maskcut:
        raise ValueError("round 0 needs pseudo masks: set "
                         "data.train_annotations (MaskCut's JSON) or "
                         "self_train.maskcut (a configs/maskcut.py variant)")
      source = os.path.join(workdir, MASKCUT_FILE)
      if not os.path.exists(source):
        stats = run_maskcut(config, source)
        logging.info("MaskCut: %s", {k: v for k, v in stats.items()
                                     if k != "skipped"})
    doc = _read(source)
    info = dict(doc.get("info") or {}, round=0, source=os.path.abspath(
        source))
  else:
    prev_cfg = round_config(config, workdir, t - 1)
    prev_ann = prev_cfg.data.train_annotations
    predictions = predict_round(prev_cfg, round_dir(workdir, t - 1),
                                prev_ann)
    thresh = score_threshold(config, t)
    st = config.self_train
    doc, stats = merge(_read(prev_ann), predictions, score_thresh=thresh,
                       iou_thresh=st.iou_thresh, area_quirk=st.area_quirk,
                       swap_wh_quirk=st.swap_wh_quirk)
    info = dict(description=f"CutLER self-training round {t}", round=t,
                score_thresh=thresh, predictions=len(predictions), **stats)
  doc = dict(doc, info=info)
  write_json(path, doc)
  return info


def run(config: ml_collections.ConfigDict, workdir: str, rounds: int
        ) -> Dict[str, Any]:
  """Rounds 0..``rounds`` (see the module docstring); returns their
  summaries (``status``: "done" or "preempted" at a round)."""
  from boxseg_jax.train import loop  # pylint: disable=g-import-not-at-top
  if config.method != "cutler":
    raise ValueError(f"method={config.method!r}: self-training trains the "
                     "'cutler' method")
  _coco_spec(config)
  out: Dict[str, Any] = {"rounds": []}
  for t in range(rounds + 1):
    rdir = round_dir(workdir, t)
    done = os.path.join(rdir, ROUND_FILE)
    if os.path.exists(done):
      logging.info("round %d: done (%s), skipped", t, done)
      out["rounds"].append(_read(done))
      continue
    info = prepare_annotations(config, workdir, t)
    summary = loop.train_and_evaluate(round_config(config, workdir, t), rdir)
    if "preempted_at" in summary:
      out["status"] = "preempted"
      out["preempted_round"] = t
      return out
    record = {"round": t, "final_step": summary["final_step"],
              "resumed_from": summary["resumed_from"],
              "compilations": summary["compilations"],
              "annotations": info, "eval": summary.get("eval", {})}
    write_json(done, record)
    out["rounds"].append(record)
  out["status"] = "done"
  return out


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  from boxseg_jax import console  # pylint: disable=g-import-not-at-top
  console.install_filters()
  with console.quiet_stderr():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  result = run(_CONFIG.value, _WORKDIR.value, _ROUNDS.value)
  print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from boxseg_jax import cli  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Work directory.")
  _ROUNDS = flags.DEFINE_integer(
      "rounds", 1, "Self-training rounds after round 0 (0: round 0 only).")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main, "boxseg_jax.self_train")
