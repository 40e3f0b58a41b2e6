"""Host-side NumPy/SciPy MaskCut, written from the reference's formulas.

This is the CutLER/TokenCut computation as the reference runs it (SciPy
`eigh(D - A, D, subset_by_index=[1, 2])` on the generalised problem,
`scipy.ndimage.label` for the seed's component, the IoU/area rejection), used
as the baseline of `benchmarks/maskcut.py` and as an independent oracle in the
tests. It is not used by the pseudo-mask pipeline.
"""

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
from scipy import ndimage


def affinity_np(feats: np.ndarray, tau: float, eps: float = 1e-5
                ) -> Tuple[np.ndarray, np.ndarray]:
  """`get_affinity_matrix`: feats [C, n] (reference layout) -> (A, d)."""
  norm = np.maximum(np.linalg.norm(feats, axis=0, keepdims=True), 1e-12)
  f = feats / norm
  c = f.T @ f
  a = np.where(c > tau, 1.0, eps)
  return a, a.sum(axis=1)


def fiedler_scipy_dense(a: np.ndarray, d: np.ndarray) -> np.ndarray:
  """Reference solver: dense generalised eigh, second-smallest vector."""
  _, vecs = scipy.linalg.eigh(np.diag(d) - a, np.diag(d),
                              subset_by_index=[1, 2])
  return vecs[:, 0]


def fiedler_scipy_eigsh(a: np.ndarray, d: np.ndarray) -> np.ndarray:
  """ARPACK (Lanczos) top-2 of D^-1/2 A D^-1/2; x = D^-1/2 y_2."""
  dm = 1.0 / np.sqrt(d)
  m = a * dm[:, None] * dm[None, :]
  rng = np.random.default_rng(0)
  vals, vecs = scipy.sparse.linalg.eigsh(m, k=2, which="LA",
                                         v0=rng.standard_normal(len(d)))
  order = np.argsort(vals)[::-1]
  return dm * vecs[:, order[1]]


def iou_torch(m1: np.ndarray, m2: np.ndarray) -> float:
  """TokenCut `metric.IoU` (NaN for two empty masks)."""
  a, b = m1 > 0.5, m2 > 0.5
  union = np.sum(a | b)
  with np.errstate(invalid="ignore", divide="ignore"):
    return float(np.float32(np.sum(a & b)) / np.float32(union))


def _argmax(v: np.ndarray, tie_rtol: float) -> int:
  if tie_rtol == 0:
    return int(np.argmax(v))
  return int(np.flatnonzero(v >= v.max() - tie_rtol * np.abs(v).max())[0])


def bipartition_np(x: np.ndarray, dims: Tuple[int, int],
                   tie_rtol: float = 0.0) -> Tuple[np.ndarray, int]:
  """`get_salient_areas` + `check_num_fg_corners` + reverse + seed.

  tie_rtol = 0 is the reference's `np.argmax`; > 0 resolves near-ties to the
  first index (our [decision], docs/maskcut.md).
  """
  bip = x > np.sum(x) / len(x)
  seed = _argmax(np.abs(x), tie_rtol)
  b2 = bip.reshape(dims)
  nc = int(b2[0, 0]) + int(b2[0, -1]) + int(b2[-1, 0]) + int(b2[-1, -1])
  reverse = True if nc >= 3 else bool(bip[seed] != 1)
  if reverse:
    bip = np.logical_not(bip)
    seed = _argmax(-x, tie_rtol)
  else:
    seed = _argmax(x, tie_rtol)
  return bip, seed


def seed_component(bip: np.ndarray, seed: int, dims: Tuple[int, int]
                   ) -> np.ndarray:
  """`detect_box`'s component: labels == labels[seed] (4-connectivity)."""
  objects, _ = ndimage.label(bip.reshape(dims).astype(float))
  cc = objects[np.unravel_index(seed, dims)]
  return objects == cc


def maskcut_np(feats: np.ndarray, dims: Tuple[int, int], tau: float,
               num_masks: int = 3,
               solver: Optional[Callable[[np.ndarray, np.ndarray],
                                         np.ndarray]] = None,
               tie_rtol: float = 0.0) -> Dict[str, List[np.ndarray]]:
  """`maskcut_forward` on the patch grid.

  Args:
    feats: [n, C] features (our layout; transposed internally).
    dims: (h, w).
    tau: threshold.
    num_masks: N.
    solver: (A, d) -> x; default the reference's dense generalised eigh.
    tie_rtol: see `bipartition_np` (0 = the reference).

  Returns:
    dict with "masks" (N [h, w] bool, after rejection, before
    disjointness), "eigvecs" (N [n]), "seeds" (N ints).
  """
  solver = solver or fiedler_scipy_dense
  f = feats.T.astype(np.float32)
  h, w = dims
  painting = np.zeros(dims, np.float64)
  current = None
  out = {"masks": [], "eigvecs": [], "seeds": []}
  for i in range(num_masks):
    if i > 0:
      painting = ((painting + current) > 0).astype(np.float64)
      # torch promotes to float64 here (float64 painting * float32 feats).
      f = ((1 - painting).reshape(1, h * w) * f.astype(np.float64))
    a, d = affinity_np(f, tau)
    x = solver(a, d)
    bip, seed = bipartition_np(x, dims, tie_rtol)
    pseudo = seed_component(bip, seed, dims).astype(np.float64)
    if i >= 1:
      ratio = np.sum(pseudo) / h / w
      if iou_torch(current, pseudo) > 0.5 or ratio <= 0.01:
        pseudo = np.zeros(dims)
    current = pseudo
    out["masks"].append(pseudo > 0)
    out["eigvecs"].append(x)
    out["seeds"].append(seed)
  return out


def synthetic_features(seed: int, dims: Tuple[int, int] = (60, 60),
                       dim: int = 768, num_objects: int = 3,
                       noise: float = 1.5, shared: float = 0.3
                       ) -> Tuple[np.ndarray, np.ndarray]:
  """Random patch features with planted objects (tests and benchmarks).

  A background and `num_objects` random ellipses, each with its own random
  prototype, plus a component shared by all patches and i.i.d. noise, so the
  thresholded graph is dense, noisy and has a meaningful cut (unlike i.i.d.
  features, whose graph is nearly the identity and has a degenerate
  spectrum).

  Args:
    seed: numpy seed.
    dims: (h, w) grid.
    dim: feature width.
    num_objects: planted ellipses (they may overlap; later ones win).
    noise: per-dimension noise std relative to unit prototypes.
    shared: weight of the component common to every patch.

  Returns:
    (feats [h * w, dim] float32, labels [h, w] int32, 0 = background).
  """
  rng = np.random.default_rng(seed)
  h, w = dims
  yy, xx = np.mgrid[:h, :w]
  labels = np.zeros(dims, np.int32)
  for k in range(1, num_objects + 1):
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ry, rx = rng.uniform(0.08, 0.25) * h, rng.uniform(0.08, 0.25) * w
    labels[((yy - cy) / ry)**2 + ((xx - cx) / rx)**2 < 1] = k
  protos = rng.standard_normal((num_objects + 1, dim))
  common = rng.standard_normal(dim)
  f = (protos[labels.ravel()] + shared * common +
       noise * rng.standard_normal((h * w, dim)))
  return f.astype(np.float32), labels
