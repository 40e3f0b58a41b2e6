"""MaskCut pseudo-mask generation: weights, one jitted batch function, COCO out.

The device part (ViT features + all N cuts of every image, eigen-solves and
flood fills included) is one `jax.jit` of `maskcut.pseudo_masks` over a fixed
batch shape, compiled once; the last batch is padded. Host work (decoding and
resizing the next batch, CRF and RLE of the previous one) overlaps with the
asynchronous device call. With `solve_dtype="float64"` everything runs inside
`ncut.precision_scope` (64-bit JAX for the eigen-solves; the ViT stays
float32 because its params and inputs are float32).
"""

import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from boxseg_jax.convert import dino
from boxseg_jax.maskcut import crf
from boxseg_jax.maskcut import maskcut
from boxseg_jax.maskcut import ncut
from boxseg_jax.maskcut import dataset_io
from boxseg_jax.maskcut import vit

try:
  import tqdm  # pylint: disable=g-import-not-at-top
except ImportError:  # progress then goes to the log only
  tqdm = None


class ConfigError(ValueError):
  """Weights / config / environment that cannot produce pseudo masks."""


def maskcut_kwargs(cfg: ml_collections.ConfigDict) -> Dict[str, Any]:
  """`maskcut_single` keyword arguments from `config.maskcut`."""
  m = cfg.maskcut
  return dict(tau=m.tau, num_masks=m.num_masks, eps=m.eps, solver=m.solver,
              solve_dtype=m.solve_dtype, lobpcg_iters=m.lobpcg_iters,
              lobpcg_tol=m.lobpcg_tol, lobpcg_deflate=m.lobpcg_deflate,
              lanczos_steps=m.lanczos_steps, lanczos_tol=m.lanczos_tol,
              min_area_ratio=m.min_area_ratio,
              iou_thresh=m.iou_thresh, tie_rtol=m.tie_rtol)


def load_params(cfg: ml_collections.ConfigDict, weights: Optional[str],
                random_init: bool) -> Any:
  """DINO weights from `weights`, or a random init when explicitly allowed."""
  model = vit.make_vit(cfg.model.arch, features_only=False)
  if weights:
    params, arch = dino.load_dino(weights)
    name = dino.arch_name(arch)
    if name != cfg.model.arch:
      raise ConfigError(
          f"{weights} holds a {name or arch} backbone but the config asks for "
          f"{cfg.model.arch}; pass --config=configs/maskcut.py:{name}")
    if arch["num_heads"] != model.num_heads:
      raise ConfigError(f"{weights}: head count mismatch")
    return jax.tree_util.tree_map(jnp.asarray, params)
  if not random_init:
    raise ConfigError(
        "no --weights given: MaskCut needs self-supervised DINO weights "
        "(e.g. dino_vitbase8_pretrain.pth). Pass --random-init to run with "
        "random weights (smoke tests only; the masks are meaningless).")
  logging.warning("MaskCut with RANDOM ViT weights (--random-init).")
  size = cfg.fixed_size
  return model.init(jax.random.PRNGKey(cfg.seed),
                    jnp.zeros((1, size, size, 3), jnp.float32))["params"]


def make_batch_fn(cfg: ml_collections.ConfigDict):
  """Jitted `(params, images uint8 [B, S', S', 3]) -> outputs`."""
  model = vit.make_vit(cfg.model.arch, features_only=True)
  out_hw = (cfg.fixed_size, cfg.fixed_size)

  def fn(params, images):
    out = maskcut.pseudo_masks(model, params, images, out_hw=out_hw,
                               **maskcut_kwargs(cfg))
    return {k: out[k] for k in ("image_masks", "rejected", "solver_iters")}

  return jax.jit(fn)


def crf_choice(cfg: ml_collections.ConfigDict) -> Tuple[bool, str]:
  """Whether DenseCRF runs, and why (recorded in the output's ``info``).

  ``post.crf=True`` (the default) uses it when ``pydensecrf`` imports and
  otherwise skips it with one warning (the ``crf`` extra builds from
  source, so a fresh install usually lacks it); ``post.crf_required=True``
  makes its absence an error; ``post.crf=False`` never runs it.
  """
  if not cfg.post.crf:
    return False, "off (post.crf=False)"
  if crf.crf_available():
    return True, "on (pydensecrf)"
  if cfg.post.crf_required:
    raise ConfigError(
        "config post.crf_required=True needs pydensecrf (pip install "
        "pydensecrf2==1.1, or pip install -e '.[crf]') or run with "
        "--config.post.crf_required=False to skip the CRF")
  logging.warning(
      "MaskCut: pydensecrf is not installed, so the DenseCRF "
      "post-processing step is SKIPPED (masks are the Normalized Cut "
      "patches with holes filled; docs/maskcut.md). Install the 'crf' "
      "extra (pip install pydensecrf2==1.1) for the reference's masks, or "
      "pass --config.post.crf=False to silence this warning.")
  return False, "skipped (pydensecrf not installed)"


def _batches(items: Sequence[Any], size: int):
  for i in range(0, len(items), size):
    yield items[i:i + size]


def run(cfg: ml_collections.ConfigDict,
        entries: Sequence[dataset_io.ImageEntry], params: Any, output: str,
        progress: bool = True) -> Dict[str, Any]:
  """Generates pseudo masks for `entries` and writes COCO JSON to `output`.

  Args:
    cfg: a `configs/maskcut.py` config.
    entries: images to process.
    params: ViT params (`load_params`).
    output: JSON path (written atomically at the end).
    progress: show a progress bar.

  Returns:
    Statistics: images, skipped (list of (path, error)), annotations,
    rejected_masks (MaskCut's IoU/area rule), dropped_masks (CRF IoU or
    empty), lobpcg_cap_hits, seconds, seconds_per_image.
  """
  dataset_io.check_unique_ids(list(entries), "maskcut images")
  use_crf, crf_note = crf_choice(cfg)
  patch = vit.ARCHS[cfg.model.arch][3]
  side = int(round(cfg.fixed_size / patch)) * patch
  bsz = cfg.batch_size
  batch_fn = make_batch_fn(cfg)
  stats = dict(images=0, skipped=[], annotations=0, rejected_masks=0,
               dropped_masks=0, lobpcg_cap_hits=0)
  images: List[Dict[str, Any]] = []
  annotations: List[Dict[str, Any]] = []
  bar = None
  if progress and tqdm is not None:
    bar = tqdm.tqdm(total=len(entries), unit="img", desc="maskcut")

  def load(batch):
    loaded = []
    for entry in batch:
      try:
        loaded.append((entry,) + dataset_io.load_resized(
            entry.path, cfg.fixed_size, patch))
      except (OSError, ValueError) as e:
        logging.warning("skipping %s: %s", entry.path, e)
        stats["skipped"].append((entry.path, str(e)))
    return loaded

  def finish(loaded, out):
    out = jax.device_get(out)
    for j, (entry, size_wh, img_s, _) in enumerate(loaded):
      images.append(dataset_io.image_info(entry, size_wh))
      stats["images"] += 1
      stats["rejected_masks"] += int(np.sum(out["rejected"][j]))
      if cfg.maskcut.solver in ("lobpcg", "lanczos"):
        cap = (cfg.maskcut.lobpcg_iters if cfg.maskcut.solver == "lobpcg"
               else cfg.maskcut.lanczos_steps)
        stats["lobpcg_cap_hits"] += int(np.sum(out["solver_iters"][j] >= cap))
      for mask in out["image_masks"][j]:
        if not mask.any():
          continue
        final = crf.postprocess_mask(img_s, mask, size_wh, use_crf,
                                     cfg.post.crf_iou_thresh)
        ann = None if final is None else dataset_io.mask_annotation(
            final, len(annotations) + 1, entry.image_id)
        if ann is None:
          stats["dropped_masks"] += 1
        else:
          annotations.append(ann)
    if bar is not None:
      bar.update(len(loaded))
    elif progress:
      logging.info("maskcut: %d / %d images", stats["images"], len(entries))

  start = time.time()
  pending = None
  with ncut.precision_scope(cfg.maskcut.solve_dtype):
    for batch in _batches(list(entries), bsz):
      loaded = load(batch)
      if not loaded:
        if bar is not None:
          bar.update(len(batch))
        continue
      stack = np.zeros((bsz, side, side, 3), np.uint8)
      for j, item in enumerate(loaded):
        stack[j] = item[3]
      out = batch_fn(params, stack)  # asynchronous
      if pending is not None:
        finish(*pending)
      pending = (loaded, out)
    if pending is not None:
      finish(*pending)
  if bar is not None:
    bar.close()
  stats["seconds"] = time.time() - start
  stats["seconds_per_image"] = stats["seconds"] / max(stats["images"], 1)
  stats["annotations"] = len(annotations)
  m = cfg.maskcut
  desc = (f"MaskCut pseudo masks ({cfg.model.arch}, {cfg.fixed_size}, "
          f"tau {m.tau}, N {m.num_masks}, {m.solver}/{m.solve_dtype}, "
          f"crf {use_crf})")
  stats["crf"] = crf_note
  doc = dataset_io.coco_document(images, annotations, desc)
  doc["info"]["crf"] = use_crf
  doc["info"]["crf_note"] = crf_note
  dataset_io.write_json(output, doc)
  return stats
