"""DINO checkpoint reader/converter: real key layout, no code execution."""

import collections
import io
import os
import pickle
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.convert import dino
from boxseg_jax.maskcut import vit


# --- a torch-free writer of the zip checkpoint format, used when testing the
# reader without torch. It pickles through stand-in modules named like
# torch's, so the stream has the same GLOBAL / persistent-id records.


def _fake_torch_modules():
  torch_mod = types.ModuleType("torch")
  utils_mod = types.ModuleType("torch._utils")

  class FloatStorage:
    pass

  FloatStorage.__module__ = "torch"
  FloatStorage.__qualname__ = "FloatStorage"
  torch_mod.FloatStorage = FloatStorage

  def _rebuild_tensor_v2(*args):
    del args

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch_mod._utils = utils_mod
  return torch_mod, utils_mod


class _FakeTensor:

  def __init__(self, key, arr, rebuild, storage_cls):
    self.key, self.arr = key, arr
    self._rebuild, self._storage_cls = rebuild, storage_cls

  def __reduce__(self):
    storage = ("storage", self._storage_cls, self.key, "cpu", self.arr.size)
    strides = tuple(s // 4 for s in self.arr.strides)
    return (self._rebuild, (_PersistentStorage(storage), 0, self.arr.shape,
                            strides, False, collections.OrderedDict()))


class _PersistentStorage:

  def __init__(self, pid):
    self.pid = pid


def write_fake_torch_zip(path, state_dict, monkeypatch):
  torch_mod, utils_mod = _fake_torch_modules()
  monkeypatch.setitem(sys.modules, "torch", torch_mod)
  monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
  tensors = collections.OrderedDict()
  for i, (k, v) in enumerate(state_dict.items()):
    arr = np.ascontiguousarray(v, np.float32)
    tensors[k] = _FakeTensor(str(i), arr, utils_mod._rebuild_tensor_v2,
                             torch_mod.FloatStorage)
  buf = io.BytesIO()
  pickler = pickle.Pickler(buf, protocol=2)
  pickler.persistent_id = lambda obj: (
      obj.pid if isinstance(obj, _PersistentStorage) else None)
  pickler.dump(tensors)
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    zf.writestr("archive/version", "3\n")
    for t in tensors.values():
      zf.writestr(f"archive/data/{t.key}", t.arr.tobytes())


def _random_state_dict(embed_dim, depth, patch, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32)
          for k, s in dino.dino_key_shapes(embed_dim, depth, patch).items()}


def test_published_layout_round_trip_without_torch(tmp_path, monkeypatch):
  # ViT-S/16 names and shapes with random values, in the zip format.
  sd = _random_state_dict(384, 12, 16)
  path = str(tmp_path / "dino_deitsmall16_pretrain.pth")
  write_fake_torch_zip(path, sd, monkeypatch)
  monkeypatch.undo()
  params, arch = dino.load_dino(path)
  assert arch == dict(embed_dim=384, depth=12, num_heads=6, patch_size=16)
  assert dino.arch_name(arch) == "vit_small16"
  np.testing.assert_array_equal(params["pos_embed"], sd["pos_embed"])
  np.testing.assert_array_equal(params["patch_embed"]["kernel"],
                                sd["patch_embed.proj.weight"].transpose(
                                    2, 3, 1, 0))
  np.testing.assert_array_equal(params["blocks_7"]["attn"]["qkv"]["kernel"],
                                sd["blocks.7.attn.qkv.weight"].T)
  np.testing.assert_array_equal(params["blocks_3"]["mlp"]["fc2"]["bias"],
                                sd["blocks.3.mlp.fc2.bias"])
  np.testing.assert_array_equal(params["norm"]["scale"], sd["norm.weight"])
  # The tree is exactly the Flax model's.
  model = vit.make_vit("vit_small16", features_only=False)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  assert (jax.tree_util.tree_structure(shapes) ==
          jax.tree_util.tree_structure(params))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_equal(a.shape,
                                                              b.shape),
                         shapes, params)


@pytest.mark.parametrize("arch", sorted(vit.ARCHS))
def test_every_dino_arch_converts_to_model_tree(arch):
  dim, depth, heads, patch = vit.ARCHS[arch]
  zero = np.zeros((1,), np.float32)
  sd = {k: np.lib.stride_tricks.as_strided(zero, s, (0,) * len(s))
        for k, s in dino.dino_key_shapes(dim, depth, patch).items()}
  params = dino.convert_state_dict(sd)
  assert dino.arch_name(dino.infer_arch(sd)) == arch
  shapes = jax.eval_shape(vit.make_vit(arch, features_only=False).init,
                          jax.random.PRNGKey(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  flat_model = {jax.tree_util.keystr(p): v.shape for p, v in
                jax.tree_util.tree_leaves_with_path(shapes)}
  flat_ours = {jax.tree_util.keystr(p): v.shape for p, v in
               jax.tree_util.tree_leaves_with_path(params)}
  assert flat_model == flat_ours
  del heads


def test_torch_saved_files_zip_and_legacy(tmp_path):
  torch = pytest.importorskip("torch")
  sd = {k: torch.from_numpy(v)
        for k, v in _random_state_dict(384, 2, 8, seed=3).items()}
  # A non-contiguous tensor and a bfloat16 one exercise strides and dtypes.
  sd["blocks.0.attn.proj.weight"] = torch.randn(384, 384).t()
  for legacy in (False, True):
    path = str(tmp_path / f"ckpt_{legacy}.pth")
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    got = dino.read_torch_checkpoint(path)
    assert set(got) == set(sd)
    for k, v in sd.items():
      np.testing.assert_array_equal(got[k], v.numpy())
  extra = {"x": torch.randn(3).bfloat16(), "y": torch.arange(5),
           "z": torch.randn(2, 3).half()}
  path = str(tmp_path / "dtypes.pth")
  torch.save(extra, path)
  got = dino.read_torch_checkpoint(path)
  np.testing.assert_array_equal(got["x"], extra["x"].float().numpy())
  np.testing.assert_array_equal(got["y"], extra["y"].numpy())
  assert got["z"].dtype == np.float16


def test_full_training_checkpoint_takes_teacher(tmp_path):
  torch = pytest.importorskip("torch")
  import argparse  # pylint: disable=g-import-not-at-top
  student = _random_state_dict(384, 2, 16, seed=1)
  teacher = _random_state_dict(384, 2, 16, seed=2)

  def prefixed(sd, with_module):
    out = {("module." if with_module else "") + "backbone." + k:
           torch.from_numpy(v) for k, v in sd.items()}
    out[("module." if with_module else "") + "head.last_layer.weight"] = (
        torch.zeros(4, 3))
    return out

  ckpt = {"student": prefixed(student, True),
          "teacher": prefixed(teacher, False),
          "args": argparse.Namespace(arch="vit_small"), "epoch": 100}
  path = str(tmp_path / "full.pth")
  torch.save(ckpt, path)
  params, _ = dino.load_dino(path)
  np.testing.assert_array_equal(params["cls_token"], teacher["cls_token"])
  params, _ = dino.load_dino(path, checkpoint_key="student")
  np.testing.assert_array_equal(params["cls_token"], student["cls_token"])


class _Evil:

  def __reduce__(self):
    return (os.system, ("touch SHOULD_NOT_EXIST",))


def test_pickled_code_is_never_executed(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  buf = io.BytesIO()
  pickle.dump({"payload": _Evil(), "n": 3}, buf, protocol=2)
  path = str(tmp_path / "evil.pth")
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
  got = dino.read_torch_checkpoint(path)
  assert not (tmp_path / "SHOULD_NOT_EXIST").exists()
  assert isinstance(got["payload"], dino._Opaque)  # pylint: disable=W0212
  assert got["n"] == 3
  # The same in a legacy-format stream.
  legacy = io.BytesIO()
  for obj in (0x1950a86a20f9469cfc6c, 1001, {"little_endian": True}):
    pickle.dump(obj, legacy, protocol=2)
  pickle.dump({"payload": _Evil()}, legacy, protocol=2)
  pickle.dump([], legacy, protocol=2)
  path = str(tmp_path / "evil_legacy.pth")
  with open(path, "wb") as f:
    f.write(legacy.getvalue())
  got = dino.read_torch_checkpoint(path)
  assert not (tmp_path / "SHOULD_NOT_EXIST").exists()
  assert isinstance(got["payload"], dino._Opaque)  # pylint: disable=W0212


def test_layout_errors_name_the_problem(tmp_path, monkeypatch):
  sd = _random_state_dict(384, 2, 16)
  bad = dict(sd)
  bad["blocks.1.mlp.fc1.weight"] = np.zeros((10, 384), np.float32)
  with pytest.raises(dino.CheckpointError, match="blocks.1.mlp.fc1.weight"):
    dino.convert_state_dict(bad)
  missing = dict(sd)
  del missing["blocks.0.norm2.bias"]
  with pytest.raises(dino.CheckpointError, match="blocks.0.norm2.bias"):
    dino.convert_state_dict(missing)
  extra = dict(sd, **{"head.weight": np.zeros((3, 384), np.float32)})
  with pytest.raises(dino.CheckpointError, match="unexpected keys"):
    dino.convert_state_dict(extra)
  with pytest.raises(dino.CheckpointError, match="patch_embed"):
    dino.convert_state_dict({"fc.weight": np.zeros((2, 2))})
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint at all")
  with pytest.raises(dino.CheckpointError):
    dino.read_torch_checkpoint(str(junk))
  with pytest.raises(FileNotFoundError):
    dino.read_torch_checkpoint(str(tmp_path / "absent.pth"))
  del monkeypatch
