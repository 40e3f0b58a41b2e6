"""Normalized Cut on a patch graph, for one image (pure jnp, vmap-able).

Reference: CutLER `maskcut.py` / TokenCut (reference-algorithms §5.3-§5.5).

Graph: `f_hat = f / max(|f|, 1e-12)` per patch, `C = f_hat f_hat^T`,
`A = 1 where C > tau else eps` (binary with an eps floor, diagonal included),
`d = A 1`. The reference solves the generalised problem
`(D - A) x = lambda D x` with SciPy and takes the second-smallest vector. Here
the same vector comes from the symmetric normalised form:

* "eigh": `L_sym = I - D^-1/2 A D^-1/2`, `(lambda, Y) = eigh(L_sym)`,
  `x = D^-1/2 Y[:, 1]` (D-normalised, x^T D x = 1, like SciPy's).
* "lobpcg": `jax.experimental.sparse.linalg.lobpcg_standard` on the top-2
  eigenvectors of `M = D^-1/2 A D^-1/2` (largest eigenvalue 1 with vector
  sqrt(d); the second one is Y[:, 1] above), started from
  `[sqrt(d), fixed random vector]`; optionally with that known top vector
  deflated (see `fiedler_lobpcg`).
* "lanczos": Lanczos with full reorthogonalisation on M restricted to the
  complement of that known top vector (`fiedler_lanczos`), stopped on the
  Ritz residual; the float32 (accelerator) path.

The sign of the vector is arbitrary and is *not* canonicalised (§5.4
[decision]); the foreground rule below is sign-invariant except when >= 3
grid corners fall on the foreground side.

Solves run in float64 by default. JAX decides dtypes when it traces *and*
lowers a jitted function, so a scope opened inside traced code is not enough
(lowering happens outside it); the caller opens `precision_scope("float64")`
(= `jax.enable_x64(True)`) around the jitted call, and `check_precision`
raises at trace time when it forgot. Everything returned to the caller is
float32, int32 or bool.
"""

import contextlib
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.sparse import linalg as sparse_linalg

SOLVERS = ("eigh", "lobpcg", "lanczos")
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}
_HIGHEST = jax.lax.Precision.HIGHEST


def precision_scope(solve_dtype: str):
  """Context that makes `solve_dtype` available (scoped x64 for float64)."""
  if solve_dtype not in DTYPES:
    raise ValueError(f"solve_dtype must be one of {sorted(DTYPES)}, got "
                     f"{solve_dtype!r}")
  if solve_dtype == "float64":
    return jax.enable_x64(True)
  return contextlib.nullcontext()


def check_precision(solve_dtype: str) -> None:
  """Raises unless `solve_dtype` is usable in the current (trace) context."""
  if solve_dtype not in DTYPES:
    raise ValueError(f"solve_dtype must be one of {sorted(DTYPES)}, got "
                     f"{solve_dtype!r}")
  if solve_dtype == "float64" and not jax.config.jax_enable_x64:
    raise ValueError(
        "solve_dtype='float64' needs 64-bit JAX: call the (jitted) function "
        "inside `with boxseg_jax.maskcut.ncut.precision_scope('float64'):` "
        "(jax.enable_x64(True)), or use solve_dtype='float32'.")


def cosine_similarity(feats: jax.Array) -> jax.Array:
  """[n, C] features -> [n, n] cosine similarities in the features' dtype.

  Zero rows stay zero (`F.normalize` clamps the norm at 1e-12), so a masked
  patch has similarity 0 with everything, itself included.
  """
  f = feats
  norm = jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True))
  f = f / jnp.maximum(norm, 1e-12)
  return jnp.matmul(f, f.T, precision=_HIGHEST)


def affinity(feats: jax.Array, tau: float, eps: float = 1e-5,
             dtype=jnp.float32) -> jax.Array:
  """Binary affinity `A = 1[C > tau] + eps 1[C <= tau]`, [n, n] `dtype`.

  The threshold is applied to similarities computed in `feats.dtype` (the
  reference thresholds a float32 product for the first mask and a float64
  one for later masks).
  """
  c = cosine_similarity(feats)
  return jnp.where(c > tau, 1.0, eps).astype(dtype)


def fiedler_eigh(a: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Second-smallest generalised eigenvector by dense `jnp.linalg.eigh`.

  Args:
    a: [n, n] symmetric affinity with positive row sums.

  Returns:
    (x [n], lambda, 0) with x, lambda in `a.dtype`: D-normalised vector and
    its eigenvalue of `(D - A) x = lambda D x`; 0 iterations (int32), for a
    signature shared with `fiedler_lobpcg`.
  """
  d = jnp.sum(a, axis=1)
  dm = jax.lax.rsqrt(d)
  n = a.shape[0]
  lap = jnp.eye(n, dtype=a.dtype) - a * dm[:, None] * dm[None, :]
  w, y = jnp.linalg.eigh(lap)
  return dm * y[:, 1], w[1], jnp.zeros((), jnp.int32)


def fiedler_lobpcg(a: jax.Array, *, num_iters: int = 100,
                   tol: Optional[float] = None, deflate: bool = False
                   ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Second-smallest generalised eigenvector by LOBPCG.

  `M = D^-1/2 A D^-1/2` has the top eigenpair (1, v0 = sqrt(d) / |sqrt(d)|)
  exactly, and its second eigenvector y gives `x = D^-1/2 y`.

  * deflate=False (default): the top-2 eigenvectors of M, started from
    [v0, r] (r a fixed random vector orthogonal to v0); the answer is
    column 1.
  * deflate=True: the top eigenvector of `M - 2 v0 v0^T` (v0 moved to
    eigenvalue -1, the bottom of M's spectrum, so it is never returned),
    block size 1, started from r. Same vector, a smaller block and no
    convergence test on an already known column (docs/maskcut.md has the
    measurements; a block of 2 after deflation was tried and rejected: it
    also waits for the third eigenvector, which can stall).

  Args:
    a: [n, n] symmetric affinity with positive row sums; n > 10.
    num_iters: LOBPCG iteration cap.
    tol: LOBPCG tolerance (None: the float epsilon of `a.dtype`).
    deflate: see above.

  Returns:
    (x [n], lambda, iterations) as `fiedler_eigh`; iterations == num_iters
    means LOBPCG stopped on the cap, not on `tol`.
  """
  n = a.shape[0]
  d = jnp.sum(a, axis=1)
  dm = jax.lax.rsqrt(d)
  m = a * dm[:, None] * dm[None, :]
  top = jnp.sqrt(d)
  top = top / jnp.linalg.norm(top)
  # A fixed start keeps the solver deterministic.
  rand = jax.random.normal(jax.random.PRNGKey(0), (n,), a.dtype)
  rand = rand - top * jnp.dot(top, rand)
  if deflate:

    def op(x):
      mx = jnp.matmul(m, x, precision=_HIGHEST)
      return mx - 2.0 * top[:, None] * jnp.matmul(top, x,
                                                   precision=_HIGHEST)

    theta, u, iters = sparse_linalg.lobpcg_standard(op, rand[:, None],
                                                     m=num_iters, tol=tol)
    col = 0
  else:
    theta, u, iters = sparse_linalg.lobpcg_standard(
        m, jnp.stack([top, rand], axis=1), m=num_iters, tol=tol)
    col = 1
  # theta is descending.
  return (dm * u[:, col], 1.0 - theta[col],
          jnp.asarray(iters, jnp.int32))


def fiedler_lanczos(a: jax.Array, *, num_steps: int = 48,
                    tol: Optional[float] = None
                    ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Second-smallest generalised eigenvector by deflated Lanczos.

  Lanczos on `M = D^-1/2 A D^-1/2` with every Krylov vector kept orthogonal
  to its known top eigenvector `v0 = sqrt(d) / |sqrt(d)|` (deflation by
  projection) and to all earlier Krylov vectors (full reorthogonalisation,
  classical Gram-Schmidt twice; the basis is a static [n, num_steps + 1]
  array, so the loop vmaps). The top Ritz pair of the projected tridiagonal
  is then M's second eigenpair. Stops when the Ritz residual estimate
  `beta_j |s_j|` (|M| <= 1, so absolute) is below `tol`, on breakdown
  (an invariant subspace: the estimate is 0), or after `num_steps` steps.
  Started from a fixed random vector (as `fiedler_lobpcg`).

  Args:
    a: [n, n] symmetric affinity with positive row sums.
    num_steps: Lanczos step (matrix-vector product) cap. Each step also
      runs a dense `eigh` of the [num_steps, num_steps] tridiagonal for the
      stopping test; on XLA:CPU that costs ~0.2 ms at 48 but ~7 ms at 64 and
      ~75 ms at 80 (measured), so keep the cap below 64 there.
    tol: Ritz residual tolerance (None: 100 * the dtype epsilon, 1.2e-5 in
      float32; 1e-3 was too loose on the 60 x 60 benchmark, docs/maskcut.md).

  Returns:
    (x [n], lambda, steps) as `fiedler_lobpcg`; steps == num_steps means
    the cap was hit.
  """
  n = a.shape[0]
  k = min(num_steps, n - 1)
  dt = a.dtype
  if tol is None:
    tol = float(100 * jnp.finfo(dt).eps)
  d = jnp.sum(a, axis=1)
  dm = jax.lax.rsqrt(d)
  m = a * dm[:, None] * dm[None, :]
  top = jnp.sqrt(d)
  top = top / jnp.linalg.norm(top)
  rand = jax.random.normal(jax.random.PRNGKey(0), (n,), dt)
  rand = rand - top * jnp.dot(top, rand)
  rand = rand / jnp.linalg.norm(rand)
  basis = jnp.zeros((n, k + 1), dt).at[:, 0].set(rand)
  alpha = jnp.zeros((k,), dt)
  beta = jnp.zeros((k,), dt)
  idx = jnp.arange(k)

  def ritz(alpha, beta, j):
    # Tridiagonal of steps 0..j; later rows are decoupled at -3 (below M's
    # spectrum, so they never give the top pair).
    live = idx <= j
    diag = jnp.where(live, alpha, -3.0)
    off = jnp.where(idx < j, beta, 0.0)[:-1]
    t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    w, s = jnp.linalg.eigh(t)
    return w[-1], s[:, -1]

  def proj(basis, w):
    c = jnp.matmul(basis.T, w, precision=_HIGHEST)
    return w - jnp.matmul(basis, c, precision=_HIGHEST)

  def body(state):
    j, basis, alpha, beta, _ = state
    v = basis[:, j]
    w = jnp.matmul(m, v, precision=_HIGHEST)
    alpha = alpha.at[j].set(jnp.dot(v, w, precision=_HIGHEST))
    w = w - top * jnp.dot(top, w)
    w = proj(basis, w)
    w = proj(basis, w)
    w = w - top * jnp.dot(top, w)
    b = jnp.linalg.norm(w)
    beta = beta.at[j].set(b)
    safe = jnp.where(b > 0, b, 1.0)
    basis = basis.at[:, j + 1].set(jnp.where(b > 0, w / safe, 0.0))
    _, s = ritz(alpha, beta, j)
    resid = b * jnp.abs(s[j])
    done = (resid <= tol) | (j + 1 >= k)
    return j + 1, basis, alpha, beta, done

  j, basis, alpha, beta, _ = jax.lax.while_loop(
      lambda st: ~st[4], body,
      (jnp.zeros((), jnp.int32), basis, alpha, beta, jnp.array(False)))
  theta, s = ritz(alpha, beta, j - 1)
  s = jnp.where(idx < j, s, 0.0)
  y = jnp.matmul(basis[:, :k], s, precision=_HIGHEST)
  y = y / jnp.linalg.norm(y)
  return dm * y, 1.0 - theta, j


def corner_indices(grid_hw: Tuple[int, int]) -> np.ndarray:
  """Flat indices of the top-left, top-right, bottom-left, bottom-right."""
  h, w = grid_hw
  return np.array([0, w - 1, (h - 1) * w, h * w - 1], np.int32)


def first_argmax(v: jax.Array, rtol: float = 0.0) -> jax.Array:
  """First index whose value is within `rtol * max|v|` of `max(v)`.

  With rtol = 0 this is `argmax`. A small rtol makes ties that are exact in
  exact arithmetic (e.g. the painted, exchangeable patches of MaskCut's later
  cuts, which all share one eigenvector value) resolve as NumPy's argmax
  would resolve them exactly, to the first index, instead of by round-off.
  """
  top = jnp.max(v)
  return jnp.argmax(v >= top - rtol * jnp.max(jnp.abs(v))).astype(jnp.int32)


def select_foreground(x: jax.Array, grid_hw: Tuple[int, int],
                      tie_rtol: float = 0.0) -> Tuple[jax.Array, jax.Array]:
  """Bipartition by the mean and the MaskCut foreground rule (§5.5 3-4).

  `bip = x > mean(x)`; `seed = argmax |x|`; reverse when >= 3 grid corners
  are in `bip` or `bip[seed]` is False. Reversed: `bip = ~bip`,
  `seed = argmax(-x)`; else `seed = argmax(x)`. Each argmax is
  `first_argmax(., tie_rtol)`.

  Args:
    x: [h * w] eigenvector (row-major grid).
    grid_hw: (h, w).
    tie_rtol: relative tolerance under which argmax candidates tie.

  Returns:
    (bip [h * w] bool, seed int32 flat index).
  """
  bip = x > jnp.mean(x)
  seed_abs = first_argmax(jnp.abs(x), tie_rtol)
  num_corners = jnp.sum(bip[corner_indices(grid_hw)].astype(jnp.int32))
  reverse = (num_corners >= 3) | ~bip[seed_abs]
  bip = jnp.where(reverse, ~bip, bip)
  seed = jnp.where(reverse, first_argmax(-x, tie_rtol),
                   first_argmax(x, tie_rtol))
  return bip, seed


def _dilate4(m: jax.Array) -> jax.Array:
  """4-neighbour (cross) binary dilation of [h, w] bool, zero border."""
  p = jnp.pad(m, 1)
  return (m | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:])


def connected_component(region: jax.Array, seed: jax.Array,
                        steps_per_iter: int = 8) -> jax.Array:
  """The 4-connected component of `region` containing `seed`.

  Same result as `scipy.ndimage.label` (default cross structure) followed by
  `labels == labels[seed]` when `region[seed]` is True (as MaskCut's rule
  guarantees); empty when it is False. Iterative geodesic dilation from the
  seed inside a `while_loop` that stops when nothing changes, with
  `steps_per_iter` unrolled dilations per test.

  Args:
    region: [h, w] bool.
    seed: flat int index into the grid.

  Returns:
    [h, w] bool component.
  """
  h, w = region.shape
  start = (jnp.arange(h * w) == seed).reshape(h, w) & region

  def body(state):
    comp, _ = state
    new = comp
    for _ in range(steps_per_iter):
      new = _dilate4(new) & region
    return new, jnp.any(new != comp)

  comp, _ = jax.lax.while_loop(lambda s: s[1], body, (start, jnp.array(True)))
  return comp


def iou_above(a: jax.Array, b: jax.Array, thresh: float = 0.5) -> jax.Array:
  """TokenCut `IoU(a, b) > thresh` on bool masks (0/0 = NaN -> False)."""
  inter = jnp.sum(a & b)
  union = jnp.sum(a | b)
  return (union > 0) & (inter.astype(jnp.float32) >
                        thresh * union.astype(jnp.float32))
