"""Independent float64 numpy reference layers for the modeling tests.

Written from the PyTorch definitions (NCHW there, NHWC here), not from the
Flax code: naive tap-by-tap convolution, GroupNorm / BatchNorm formulas,
nearest and `aligned_bilinear` upsampling.
"""

import numpy as np


def conv2d(x, kernel, bias=None, stride=1, pad=None):
  """x [B, H, W, Ci], kernel [kh, kw, Ci, Co]; symmetric zero padding."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  if pad is None:
    pad = kh // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (x.shape[1] + 2 * pad - kh) // stride + 1
  out_w = (x.shape[2] + 2 * pad - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + stride * (out_h - 1) + 1:stride,
                 j:j + stride * (out_w - 1) + 1:stride, :]
      out += patch @ kernel[i, j]
  if bias is not None:
    out += np.asarray(bias, np.float64)
  return out


def group_norm(x, groups, scale, bias, eps=1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
  return y * scale + bias


def batch_norm_train(x, scale, bias, eps=1e-5):
  """Returns (y, batch mean, biased batch var) over B, H, W."""
  mean = x.mean(axis=(0, 1, 2))
  var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
  return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


def relu(x):
  return np.maximum(x, 0.0)


def upsample_nearest2x(x):
  return x.repeat(2, axis=1).repeat(2, axis=2)


def aligned_bilinear(x, f):
  """Closed form of reference §2.2, written with loops. x [B, h, w, C]."""
  if f == 1:
    return x

  def axis_weights(n):
    m = np.zeros((f * n, n))
    for o in range(f * n):
      u = max(o - f // 2, 0) / f
      lo = int(np.floor(u))
      t = u - lo
      m[o, lo] += 1 - t
      m[o, min(lo + 1, n - 1)] += t
    return m

  my, mx = axis_weights(x.shape[1]), axis_weights(x.shape[2])
  return np.einsum("yi,xj,bijc->byxc", my, mx, x)
