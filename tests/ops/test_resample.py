"""Teacher-grid -> student-grid mask resampling (reference §4.2, §4.5)."""

import jax
import jax.numpy as jnp
import numpy as np

from boxseg_jax.evaluation import postprocess
from boxseg_jax.ops import resample


def _student_grid(probs, teacher_size, student_size, student_canvas):
  """Host chain: paste to the student size, zero-pad, sample [2::4]."""
  pasted = postprocess.paste_masks(probs, resized_size=teacher_size,
                                   orig_size=student_size)
  full = np.zeros((len(probs),) + student_canvas, np.float32)
  full[:, :student_size[0], :student_size[1]] = pasted
  return full[:, 2::4, 2::4]


def _device(probs, teacher_size, student_size, student_canvas):
  ho, wo = student_canvas[0] // 4, student_canvas[1] // 4
  hi, wi = probs.shape[-2:]
  rows = resample.grid_resample_matrix(ho, hi, student_size[0],
                                       teacher_size[0])
  cols = resample.grid_resample_matrix(wo, wi, student_size[1],
                                       teacher_size[1])
  return np.asarray(resample.resample_masks(jnp.asarray(probs), rows, cols))


def test_matches_host_paste_chain():
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(3, 20, 24)).astype(np.float32)  # 80x96 canvas
  for teacher_size, student_size, canvas in [
      ((80, 90), (60, 68), (64, 96)),    # teacher larger (test scale)
      ((52, 77), (64, 95), (64, 96)),    # teacher smaller
      ((64, 96), (64, 96), (64, 96))]:   # same geometry
    got = _device(probs, teacher_size, student_size, canvas)
    want = _student_grid(probs, teacher_size, student_size, canvas)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_same_geometry_is_identity_on_the_image():
  rng = np.random.default_rng(1)
  probs = rng.uniform(size=(2, 16, 16)).astype(np.float32)
  got = _device(probs, (48, 56), (48, 56), (64, 64))
  np.testing.assert_allclose(got[:, :12, :14], probs[:, :12, :14],
                             rtol=1e-5, atol=1e-6)
  assert not got[:, 12:].any() and not got[:, :, 14:].any()


def test_scale_075_lands_on_the_right_student_pixels():
  # Teacher: 64x64 image on a 64x64 canvas; mask = grid rows 4..11 (pixels
  # 16..47 after paste-back: > 0.5 on rows 17..47), all columns. Student:
  # the same image at 0.75 (48x48 on a 64x64 canvas). Student sample row
  # y = 4i + 2 reads teacher row (y + 0.5) * 4/3 - 0.5: y = 14 -> 18.8 (in),
  # y = 10 -> 13.5 (out), y = 34 -> 45.8 (in), y = 38 -> 51.2 (out).
  probs = np.zeros((1, 16, 16), np.float32)
  probs[0, 4:12, :] = 1.0
  got = _device(probs, (64, 64), (48, 48), (64, 64))[0] > 0.5
  want = np.zeros((16, 16), bool)
  want[3:9, :12] = True  # rows i = 3..8; columns inside the 48-px image
  np.testing.assert_array_equal(got, want)


def test_traced_sizes_compile_once():
  count = [0]

  def fn(p, so, si):
    count[0] += 1
    r = resample.grid_resample_matrix(16, 16, so, si)
    return resample.resample_masks(p, r, r)

  jitted = jax.jit(fn)
  p = jnp.ones((1, 16, 16))
  for so, si in [(48, 64), (64, 64), (40, 50)]:
    jitted(p, jnp.int32(so), jnp.int32(si))
  assert count[0] == 1


def test_valid_extent():
  v = np.zeros((8, 10), bool)
  v[:5, :7] = True
  rows, cols = resample.valid_extent(jnp.asarray(v))
  assert int(rows) == 5 and int(cols) == 7
