"""DINO ViT in Flax: bicubic pos-embed resize, key features, torch parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.convert import dino
from boxseg_jax.maskcut import vit


def _keys_cubic(t, a=-0.75):
  """Keys' cubic kernel written from its definition (independent of vit)."""
  t = abs(t)
  if t <= 1:
    return (a + 2) * t**3 - (a + 3) * t**2 + 1
  if t < 2:
    return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
  return 0.0


def _bicubic_1d_reference(src, out_size, scale_factor):
  """PyTorch align_corners=False bicubic with a given scale factor, 1-D."""
  n = len(src)
  out = np.zeros(out_size)
  for o in range(out_size):
    real = (o + 0.5) / scale_factor - 0.5
    base = math.floor(real)
    for k in range(-1, 3):
      idx = min(max(base + k, 0), n - 1)
      out[o] += src[idx] * _keys_cubic(real - (base + k))
  return out


@pytest.mark.parametrize("in_size,out_size", [(28, 60), (14, 30), (14, 4),
                                               (14, 14)])
def test_bicubic_matrix_matches_formula(in_size, out_size):
  rng = np.random.default_rng(0)
  src = rng.standard_normal(in_size)
  s = (out_size + 0.1) / in_size
  mat = vit.bicubic_matrix(in_size, out_size, s)
  np.testing.assert_allclose(mat @ src,
                             _bicubic_1d_reference(src, out_size, s),
                             rtol=1e-5, atol=1e-5)
  # Interpolation weights sum to one per output (clamped borders included).
  np.testing.assert_allclose(mat.sum(1), 1.0, atol=1e-6)


def test_bicubic_source_coordinate_uses_plus_point_one():
  # Output 0 of 28 -> 60: source (0.5) * 28 / 60.1 - 0.5 = -0.26705..., so
  # the weights are the cubic kernel at t = 0.73295 around floor = -1.
  mat = vit.bicubic_matrix(28, 60, 60.1 / 28)
  real = 0.5 * 28 / 60.1 - 0.5
  t = real - math.floor(real)
  w = [_keys_cubic(t + 1), _keys_cubic(t), _keys_cubic(1 - t),
       _keys_cubic(2 - t)]
  # indices -2, -1, 0, 1 clamp to 0, 0, 0, 1.
  np.testing.assert_allclose(mat[0, :2], [w[0] + w[1] + w[2], w[3]],
                             rtol=1e-5)


def test_bicubic_matrix_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  grid = rng.standard_normal((1, 5, 14, 14)).astype(np.float32)
  for out_h, out_w in [(30, 30), (4, 6), (60, 20)]:
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(grid),
        scale_factor=((out_h + 0.1) / 14, (out_w + 0.1) / 14),
        mode="bicubic").numpy()
    assert ref.shape[-2:] == (out_h, out_w)
    mh = vit.bicubic_matrix(14, out_h, (out_h + 0.1) / 14)
    mw = vit.bicubic_matrix(14, out_w, (out_w + 0.1) / 14)
    ours = np.einsum("oi,ncij,pj->ncop", mh, grid, mw)
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_pos_embed_shortcut_only_for_square_trained_grid():
  pos = jax.random.normal(jax.random.PRNGKey(0), (1, 1 + 14 * 14, 8))
  same = vit.interpolate_pos_embed(pos, (14, 14), (224, 224))
  np.testing.assert_array_equal(same, pos)
  # Same patch count but interpolated: the +0.1 scale moves the samples.
  resized = vit.interpolate_pos_embed(pos, (14, 14), (224, 230))
  assert resized.shape == pos.shape
  assert not np.allclose(resized, pos)
  np.testing.assert_array_equal(resized[:, 0], pos[:, 0])


@pytest.mark.parametrize("arch", sorted(vit.ARCHS))
def test_param_tree_matches_dino_layout(arch):
  dim, depth, heads, patch = vit.ARCHS[arch]
  model = vit.make_vit(arch, features_only=False)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  flat = {"/".join(k.key for k in path): v.shape
          for path, v in jax.tree_util.tree_leaves_with_path(shapes)}
  assert heads * 64 == dim
  expected = dino.dino_key_shapes(dim, depth, patch)
  assert len(flat) == len(expected)
  assert flat["pos_embed"] == expected["pos_embed"]
  assert flat["patch_embed/kernel"] == (patch, patch, 3, dim)
  assert flat["blocks_11/attn/qkv/kernel"] == expected[
      "blocks.11.attn.qkv.weight"][::-1]
  assert flat["blocks_0/mlp/fc1/kernel"] == (dim, 4 * dim)


def test_features_only_gives_same_keys_and_skips_tail():
  kw = dict(embed_dim=384, depth=3, num_heads=6, patch_size=16)
  model = vit.VisionTransformer(features_only=False, **kw)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 48, 64, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
  full = jax.jit(model.apply)({"params": params}, x)
  feat = jax.jit(vit.VisionTransformer(features_only=True, **kw).apply)(
      {"params": params}, x)
  assert full["k"].shape == (2, 3 * 4, 384)
  np.testing.assert_allclose(feat["k"], full["k"], atol=1e-6)
  assert "tokens" not in feat and "tokens" in full


def test_normalize_image():
  img = jnp.array([[[0, 128, 255]]], jnp.uint8)
  out = np.asarray(vit.normalize_image(img))
  expect = (np.array([0, 128, 255]) / 255.0 - np.array(vit.IMAGENET_MEAN)
            ) / np.array(vit.IMAGENET_STD)
  np.testing.assert_allclose(out[0, 0], expect, rtol=1e-6)


# --- parity against an independent PyTorch forward of the same architecture.


def _torch_vit(torch, dim, depth, heads, patch):
  """DINO ViT in torch, written from the architecture description."""
  nn = torch.nn

  class Attn(nn.Module):

    def __init__(self):
      super().__init__()
      self.qkv = nn.Linear(dim, 3 * dim)
      self.proj = nn.Linear(dim, dim)

    def forward(self, x):
      b, n, c = x.shape
      qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(
          2, 0, 3, 1, 4)
      q, k, v = qkv[0], qkv[1], qkv[2]
      a = ((q @ k.transpose(-2, -1)) * (c // heads)**-0.5).softmax(-1)
      return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))

  class Mlp(nn.Module):

    def __init__(self):
      super().__init__()
      self.fc1 = nn.Linear(dim, 4 * dim)
      self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
      return self.fc2(nn.functional.gelu(self.fc1(x)))

  class Blk(nn.Module):

    def __init__(self):
      super().__init__()
      self.norm1 = nn.LayerNorm(dim, eps=1e-6)
      self.attn = Attn()
      self.norm2 = nn.LayerNorm(dim, eps=1e-6)
      self.mlp = Mlp()

    def forward(self, x):
      x = x + self.attn(self.norm1(x))
      return x + self.mlp(self.norm2(x))

  class PatchEmbed(nn.Module):

    def __init__(self):
      super().__init__()
      self.proj = nn.Conv2d(3, dim, patch, patch)

  class ViT(nn.Module):

    def __init__(self):
      super().__init__()
      self.patch_embed = PatchEmbed()
      g0 = 224 // patch
      self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
      self.pos_embed = nn.Parameter(torch.zeros(1, 1 + g0 * g0, dim))
      self.blocks = nn.ModuleList([Blk() for _ in range(depth)])
      self.norm = nn.LayerNorm(dim, eps=1e-6)

    def pos(self, npatch, height, width):
      n0 = self.pos_embed.shape[1] - 1
      if npatch == n0 and height == width:
        return self.pos_embed
      g0 = int(math.sqrt(n0))
      h0, w0 = height // patch + 0.1, width // patch + 0.1
      grid = self.pos_embed[:, 1:].reshape(1, g0, g0, dim).permute(0, 3, 1, 2)
      grid = nn.functional.interpolate(
          grid, scale_factor=(h0 / g0, w0 / g0), mode="bicubic")
      grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
      return torch.cat([self.pos_embed[:, :1], grid], 1)

    def keys(self, img):
      b, _, height, width = img.shape
      x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
      x = x + self.pos(x.shape[1] - 1, height, width)
      for blk in self.blocks[:-1]:
        x = blk(x)
      last = self.blocks[-1]
      qkv = last.attn.qkv(last.norm1(x))
      n = qkv.shape[1]
      k = qkv.reshape(b, n, 3, heads, dim // heads)[:, :, 1]
      return k.reshape(b, n, dim)[:, 1:]  # channel = head * 64 + d

  return ViT()


@pytest.mark.parametrize("size_hw", [(64, 64), (48, 80), (224, 224)])
def test_key_features_match_torch_through_converter(tmp_path, size_hw):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  dim, depth, heads, patch = vit.ARCHS["vit_small16"]
  depth = 4  # same blocks, fewer of them: keeps the test fast
  ref = _torch_vit(torch, dim, depth, heads, patch).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight"):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  path = str(tmp_path / "vit.pth")
  torch.save(ref.state_dict(), path)
  params, arch = dino.load_dino(path)
  assert arch == dict(embed_dim=dim, depth=depth, num_heads=heads,
                      patch_size=patch)
  img = np.random.default_rng(0).standard_normal(
      (2, 3) + size_hw).astype(np.float32)
  with torch.no_grad():
    expect = ref.keys(torch.from_numpy(img)).numpy()
  model = vit.VisionTransformer(embed_dim=dim, depth=depth, num_heads=heads,
                                patch_size=patch, features_only=True)
  got = model.apply({"params": params},
                    jnp.asarray(img.transpose(0, 2, 3, 1)))["k"]
  assert got.shape == expect.shape
  scale = np.abs(expect).max()
  np.testing.assert_allclose(np.asarray(got) / scale, expect / scale,
                             atol=2e-5)
