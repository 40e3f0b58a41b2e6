"""MaskCut: N pseudo masks per image by iterated Normalized Cut (pure jnp).

Reference: CutLER `maskcut_forward` (reference-algorithms §5.5). For mask
i = 0 .. N-1 on one image:

1. (i >= 1) `painting |= previous_mask` (the previous mask may be the zero
   mask of a rejection) and painted patch features are set to zero (they stay
   in the graph, connected to everything with weight eps);
2. binary affinity graph and its Fiedler vector (`ncut`);
3. bipartition by the mean + foreground rule (corner test, seed);
4. the 4-connected component of the foreground containing the seed;
5. (i >= 1) rejected (zeroed) when `IoU(previous_mask, mask) > 0.5` or
   `area / (h * w) <= 0.01`; then `previous_mask <- mask`.

Outputs are made disjoint in order (each mask minus all earlier ones) and
nearest-upsampled to the image. The N-mask loop is unrolled (N is static) so
that the whole thing, eigen-solves and flood fills included, is one traced
function of one image; batch it with `jax.vmap` (see `maskcut_batch`). No jit
here: the caller jits.

Reference numerics kept on purpose: the first graph is thresholded on float32
similarities, later ones on `solve_dtype` similarities (torch promotes the
masked features to float64 because the painting is a float64 array).
"""

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from boxseg_jax.maskcut import ncut
from boxseg_jax.maskcut import vit


def max_rejected_area(grid_hw: Tuple[int, int], min_area_ratio: float) -> int:
  """Largest area with `area / h / w <= min_area_ratio` (torch float64 math)."""
  h, w = grid_hw
  return max(k for k in range(h * w + 1) if k / h / w <= min_area_ratio)


def maskcut_single(feats: jax.Array, grid_hw: Tuple[int, int], *,
                   tau: float = 0.15, num_masks: int = 3, eps: float = 1e-5,
                   solver: str = "eigh", solve_dtype: str = "float64",
                   lobpcg_iters: int = 100,
                   lobpcg_tol: Optional[float] = None,
                   lobpcg_deflate: bool = False,
                   lanczos_steps: int = 48,
                   lanczos_tol: Optional[float] = None,
                   min_area_ratio: float = 0.01,
                   iou_thresh: float = 0.5,
                   tie_rtol: float = 1e-5) -> Dict[str, jax.Array]:
  """MaskCut on the patch features of one image.

  With solve_dtype="float64" the caller must trace, lower and run this inside
  `ncut.precision_scope("float64")` (checked at trace time).

  Args:
    feats: [h * w, C] patch features (row-major grid).
    grid_hw: (h, w) static patch grid.
    tau: affinity threshold on cosine similarity.
    num_masks: N, masks per image.
    eps: edge weight below the threshold.
    solver: "eigh" (dense), "lobpcg" or "lanczos" (deflated Lanczos, the
      float32 / accelerator path).
    solve_dtype: "float64" (call inside `ncut.precision_scope("float64")`)
      or "float32".
    lobpcg_iters: LOBPCG iteration cap.
    lobpcg_tol: LOBPCG tolerance (None: its default, the dtype epsilon).
    lobpcg_deflate: LOBPCG on M with its known top eigenvector deflated
      (block size 1) instead of the top-2 of M.
    lanczos_steps: Lanczos step cap.
    lanczos_tol: Lanczos Ritz-residual tolerance (None: its default).
    min_area_ratio: masks i >= 1 with area / (h * w) <= this are rejected.
    iou_thresh: masks i >= 1 with IoU(previous, mask) > this are rejected.
    tie_rtol: seed candidates within `tie_rtol * max|x|` of the best tie and
      the first index wins (0 = plain argmax; see docs/maskcut.md).

  Returns:
    "masks" [N, h, w] bool: accepted masks (zeros where rejected), *before*
      the disjointness step; "seeds" [N] int32 flat seed index;
      "eigvecs" [N, h * w] float32 Fiedler vectors (raw sign);
      "eigvals" [N] float32 their generalised eigenvalues;
      "rejected" [N] bool; "solver_iters" [N] int32 LOBPCG iterations (0
      for eigh; Lanczos steps for lanczos; == the solver's cap means the
      cap was hit).
  """
  if solver not in ncut.SOLVERS:
    raise ValueError(f"solver must be one of {ncut.SOLVERS}, got {solver!r}")
  h, w = grid_hw
  n = h * w
  if feats.shape[0] != n:
    raise ValueError(f"feats has {feats.shape[0]} rows, grid is {grid_hw}")
  max_small = max_rejected_area(grid_hw, min_area_ratio)
  outs = {k: [] for k in ("masks", "seeds", "eigvecs", "eigvals", "rejected",
                         "solver_iters")}
  ncut.check_precision(solve_dtype)
  dtype = ncut.DTYPES[solve_dtype]
  painting = jnp.zeros((n,), bool)
  prev = jnp.zeros((n,), bool)
  # A painted (zeroed) patch has cosine similarity exactly 0 with every
  # patch and the others' similarities do not change, so each similarity
  # matrix is computed once per dtype and later graphs mask it (same values
  # as recomputing it from the zeroed features: one [n, C] x [C, n] product
  # per dtype instead of one per cut).
  sims = {}

  def sim(dt):
    if dt not in sims:
      sims[dt] = ncut.cosine_similarity(feats.astype(dt))
    return sims[dt]

  painted_value = 1.0 if 0.0 > tau else eps
  for i in range(num_masks):
    if i == 0:
      c = sim(jnp.float32)
    else:
      painting = painting | prev
      c = sim(dtype)
    a = jnp.where(c > tau, 1.0, eps)
    if i > 0:
      a = jnp.where(painting[:, None] | painting[None, :], painted_value, a)
    a = a.astype(dtype)
    if solver == "eigh":
      x, lam, iters = ncut.fiedler_eigh(a)
    elif solver == "lanczos":
      x, lam, iters = ncut.fiedler_lanczos(a, num_steps=lanczos_steps,
                                           tol=lanczos_tol)
    else:
      x, lam, iters = ncut.fiedler_lobpcg(a, num_iters=lobpcg_iters,
                                          tol=lobpcg_tol,
                                          deflate=lobpcg_deflate)
    bip, seed = ncut.select_foreground(x, grid_hw, tie_rtol)
    comp = ncut.connected_component(bip.reshape(h, w), seed).reshape(n)
    if i == 0:
      rejected = jnp.array(False)
    else:
      area = jnp.sum(comp.astype(jnp.int32))
      rejected = ncut.iou_above(prev, comp, iou_thresh) | (area <= max_small)
    mask = comp & ~rejected
    prev = mask
    outs["masks"].append(mask.reshape(h, w))
    outs["seeds"].append(seed.astype(jnp.int32))
    outs["eigvecs"].append(x.astype(jnp.float32))
    outs["eigvals"].append(lam.astype(jnp.float32))
    outs["rejected"].append(rejected)
    outs["solver_iters"].append(iters)
  return {k: jnp.stack(v) for k, v in outs.items()}


def make_disjoint(masks: jax.Array) -> jax.Array:
  """[N, ...] bool -> each mask minus the union of the earlier ones."""
  earlier = jnp.cumsum(masks.astype(jnp.int32), axis=0) - masks.astype(
      jnp.int32)
  return masks & (earlier == 0)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch `interpolate(mode='nearest')` source index per output index."""
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale)
  return np.minimum(idx.astype(np.int64), in_size - 1)


def upsample_nearest(masks: jax.Array, out_hw: Tuple[int, int]) -> jax.Array:
  """[..., h, w] -> [..., H, W] by PyTorch nearest interpolation."""
  h, w = masks.shape[-2:]
  iy = nearest_indices(h, out_hw[0])
  ix = nearest_indices(w, out_hw[1])
  return jnp.take(jnp.take(masks, iy, axis=-2), ix, axis=-1)


def maskcut_batch(feats: jax.Array, grid_hw: Tuple[int, int],
                  image_hw: Tuple[int, int], **kwargs) -> Dict[str, jax.Array]:
  """`maskcut_single` vmapped over images, then disjoint + upsampled.

  Args:
    feats: [B, h * w, C] patch features.
    grid_hw: (h, w).
    image_hw: (H, W) output mask size (the resized MaskCut input).
    **kwargs: forwarded to `maskcut_single`.

  Returns:
    `maskcut_single`'s outputs with a leading B, plus "image_masks"
    [B, N, H, W] bool: disjoint, upsampled masks (the reference's
    `bipartitions`).
  """
  out = jax.vmap(lambda f: maskcut_single(f, grid_hw, **kwargs))(feats)
  out["image_masks"] = upsample_nearest(
      jax.vmap(make_disjoint)(out["masks"]), image_hw)
  return out


def pseudo_masks(model: nn.Module, params: Any, images: jax.Array,
                 out_hw: Optional[Tuple[int, int]] = None,
                 **kwargs) -> Dict[str, jax.Array]:
  """ViT key features + MaskCut for a batch of resized images.

  Args:
    model: a `vit.VisionTransformer` (features_only is fine).
    params: its `params` collection.
    images: [B, S, S, 3] uint8-valued RGB, already resized to the MaskCut
      input size rounded to a multiple of the patch size.
    out_hw: (H, W) of the output masks (the reference's fixed size S before
      rounding); default the input size.
    **kwargs: forwarded to `maskcut_single` (tau, num_masks, solver, ...).

  Returns:
    `maskcut_batch` outputs for the batch.
  """
  _, height, width, _ = images.shape
  p = model.patch_size
  grid_hw = (height // p, width // p)
  feats = model.apply({"params": params}, vit.normalize_image(images))["k"]
  return maskcut_batch(feats, grid_hw, out_hw or (height, width), **kwargs)
