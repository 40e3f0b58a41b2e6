"""Full AdelaiDet CondInst/BoxInst and BoxTeacher checkpoints -> our tree.

The key layout (``condinst_key_shapes``) follows AdelaiDet's modules:
detectron2 ``backbone.bottom_up`` / ``fpn_lateral{k}`` / ``top_block``,
``FCOSHead`` towers as ``nn.Sequential([conv, GN, ReLU] * n)`` (conv j at
index 3j), ``controller`` on ``CondInst``, ``MaskBranch`` ``refine`` /
``tower`` of ``[conv, BN, ReLU]`` blocks, and the dynamic mask head's
buffers; BoxTeacher wraps two of them as ``teacher.*`` / ``student.*``.
"""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

import fake_torch
from boxseg_jax.convert import common
from boxseg_jax.convert import condinst as condinst_conv
from boxseg_jax.convert import weights

SMALL = dict(depth=50, resnet_num_blocks=(1, 1, 1, 1), resnet_width=8,
             num_classes=3, fpn_channels=32, head_num_convs=2,
             mask_branch_channels=16, mask_branch_out_channels=8,
             mask_branch_num_convs=2, mask_head_channels=8,
             mask_head_num_layers=3)


def _expected(arch):
  return common.model_shapes(condinst_conv.model_for(arch), train=False)


@pytest.mark.parametrize("depth", [50, 101])
def test_coco_layout_maps_onto_whole_tree(depth):
  arch = dict(condinst_conv.R50_COCO_ARCH, depth=depth)
  shapes = condinst_conv.condinst_key_shapes(arch)
  assert shapes["proposal_generator.fcos_head.cls_tower.9.weight"] == (
      256, 256, 3, 3)  # 4th conv of the tower
  assert shapes["proposal_generator.fcos_head.cls_logits.weight"] == (
      80, 256, 3, 3)
  assert shapes["controller.weight"] == (233, 256, 3, 3)
  assert shapes["mask_branch.tower.4.weight"] == (16, 128, 1, 1)
  conv = weights.convert_object({"model": fake_torch.zero_arrays(shapes),
                                 "iteration": 89999}, "adelaidet", "m.pth")
  assert {k: v.shape for k, v in conv.arrays.items()} == _expected(arch)
  assert conv.init_keys == ["backbone", "fcos_head", "fpn", "mask_branch"]
  assert sum(k.startswith("batch_stats/") for k in conv.arrays) == 14
  assert "mask_head._iter" in conv.report.ignored
  assert "mask_head.sizes_of_interest" in conv.report.ignored
  h = conv.hints
  assert (h["model.num_classes"], h["model.depth"], h["model.fpn_channels"],
          h["model.head_num_convs"], h["model.mask_branch_out_channels"],
          h["model.mask_head_channels"], h["model.mask_head_num_layers"]) == (
              80, depth, 256, 4, 16, 8, 3)
  assert h["model.input_format"] == "BGR" and h["model.stride_in_1x1"]
  assert conv.network is None


def _small_checkpoint(seed=0, prefix=""):
  sd = fake_torch.random_arrays(condinst_conv.condinst_key_shapes(SMALL),
                                seed)
  return {prefix + k: v for k, v in sd.items()}


def test_values_and_layouts(tmp_path):
  sd = _small_checkpoint()
  path = str(tmp_path / "BoxInst_small.pth")
  fake_torch.save(path, {"model": sd, "iteration": np.array(5, np.int64)})
  conv = weights.convert_file(path, "adelaidet")
  a = conv.arrays
  fh = "proposal_generator.fcos_head."

  def hwio(k):
    return sd[k].transpose(2, 3, 1, 0)

  # Towers: AdelaiDet conv j at index 3j, its GroupNorm at 3j + 1.
  np.testing.assert_array_equal(a["params/fcos_head/cls_tower_2/kernel"],
                                hwio(fh + "cls_tower.3.weight"))
  np.testing.assert_array_equal(a["params/fcos_head/bbox_tower_3/scale"],
                                sd[fh + "bbox_tower.4.weight"])
  np.testing.assert_array_equal(a["params/fcos_head/bbox_tower_3/bias"],
                                sd[fh + "bbox_tower.4.bias"])
  np.testing.assert_array_equal(
      a["params/fcos_head/scales"],
      [sd[f"{fh}scales.{i}.scale"][0] for i in range(5)])
  np.testing.assert_array_equal(a["params/fcos_head/controller/kernel"],
                                hwio("controller.weight"))
  np.testing.assert_array_equal(a["params/fcos_head/cls_logits/bias"],
                                sd[fh + "cls_logits.bias"])
  np.testing.assert_array_equal(a["params/fpn/top_block_p7/kernel"],
                                hwio("backbone.top_block.p7.weight"))
  np.testing.assert_array_equal(a["params/fpn/fpn_lateral4/bias"],
                                sd["backbone.fpn_lateral4.bias"])
  np.testing.assert_array_equal(a["params/backbone/res3_0/conv2/kernel"],
                                hwio("backbone.bottom_up.res3.0.conv2.weight"))
  np.testing.assert_array_equal(
      a["params/backbone/res5_0/shortcut/norm/var"],
      sd["backbone.bottom_up.res5.0.shortcut.norm.running_var"])
  # Mask branch: conv, BN affine in params, BN statistics in batch_stats.
  np.testing.assert_array_equal(a["params/mask_branch/refine_1/conv/kernel"],
                                hwio("mask_branch.refine.1.0.weight"))
  np.testing.assert_array_equal(a["params/mask_branch/tower_1/norm/scale"],
                                sd["mask_branch.tower.1.1.weight"])
  np.testing.assert_array_equal(
      a["batch_stats/mask_branch/tower_0/norm/var"],
      sd["mask_branch.tower.0.1.running_var"])
  np.testing.assert_array_equal(
      a["batch_stats/mask_branch/refine_2/norm/mean"],
      sd["mask_branch.refine.2.1.running_mean"])
  np.testing.assert_array_equal(a["params/mask_branch/tower_2/kernel"],
                                hwio("mask_branch.tower.2.weight"))
  assert conv.hints["model.num_classes"] == 3
  assert conv.hints["model.resnet_num_blocks"] == (1, 1, 1, 1)
  assert conv.hints["model.mask_branch_num_convs"] == 2


def test_boxteacher_teacher_or_student(tmp_path):
  teacher = _small_checkpoint(seed=1, prefix="teacher.")
  student = _small_checkpoint(seed=2, prefix="student.")
  path = str(tmp_path / "boxteacher_small.pth")
  fake_torch.save(path, {"model": {**teacher, **student}})
  key = "params/fcos_head/controller/bias"
  conv = weights.convert_file(path, "adelaidet")
  assert conv.network == "teacher"
  np.testing.assert_array_equal(conv.arrays[key],
                                teacher["teacher.controller.bias"])
  assert "student.controller.bias" in conv.report.ignored
  conv = weights.convert_file(path, "adelaidet", checkpoint_key="student")
  np.testing.assert_array_equal(conv.arrays[key],
                                student["student.controller.bias"])
  # DistributedDataParallel prefixes are stripped too.
  fake_torch.save(path, {"model": {"module." + k: v
                                   for k, v in teacher.items()}})
  conv = weights.convert_file(path, "adelaidet")
  np.testing.assert_array_equal(conv.arrays[key],
                                teacher["teacher.controller.bias"])
  with pytest.raises(common.ConversionError, match="not 'student'"):
    weights.convert_file(path, "adelaidet", checkpoint_key="student")


@pytest.mark.parametrize("key,ours", [
    ("proposal_generator.fcos_head.bbox_tower.1.bias",
     "params/fcos_head/bbox_tower_1/bias"),
    ("mask_branch.refine.0.1.running_var",
     "batch_stats/mask_branch/refine_0/norm/var"),
    ("backbone.fpn_output5.weight", "params/fpn/fpn_output5/kernel"),
    ("backbone.bottom_up.res2.0.conv3.norm.running_mean",
     "params/backbone/res2_0/conv3/norm/mean"),
])
def test_one_missing_key_fails_naming_it(key, ours):
  sd = dict(fake_torch.zero_arrays(condinst_conv.condinst_key_shapes(
      condinst_conv.R50_COCO_ARCH)))
  del sd[key]
  with pytest.raises(common.ConversionError) as err:
    weights.convert_object(sd, "adelaidet", "boxinst.pth")
  assert f"1 missing key(s) (our name <- file name): {ours} <- {key}" in str(
      err.value)


def test_mis_shaped_and_unexpected_are_named():
  sd = dict(fake_torch.zero_arrays(condinst_conv.condinst_key_shapes(SMALL)))
  sd["backbone.fpn_output4.weight"] = np.zeros((32, 32, 1, 1), np.float32)
  sd["proposal_generator.fcos_head.share_tower.0.weight"] = np.zeros(
      (32, 32, 3, 3), np.float32)
  with pytest.raises(common.ConversionError) as err:
    weights.convert_object(sd, "adelaidet", "f")
  msg = str(err.value)
  assert ("backbone.fpn_output4.weight -> params/fpn/fpn_output4/kernel has "
          "shape (1, 1, 32, 32), the model expects (3, 3, 32, 32)") in msg
  assert "proposal_generator.fcos_head.share_tower.0.weight" in msg


class _Evil:

  def __reduce__(self):
    return (os.system, ("touch PWNED",))


def test_malicious_payload_never_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  sd = _small_checkpoint()
  path = str(tmp_path / "evil.pth")
  fake_torch.save(path, {"model": sd})
  with zipfile.ZipFile(path) as zf:
    files = {n: zf.read(n) for n in zf.namelist()}
  buf = io.BytesIO()
  pickle.dump({"model": {"x": _Evil()}, "optimizer": _Evil()}, buf,
              protocol=2)
  files["archive/data.pkl"] = buf.getvalue()
  with zipfile.ZipFile(path, "w") as zf:
    for n, b in files.items():
      zf.writestr(n, b)
  with pytest.raises(common.ConversionError):
    weights.convert_file(path, "adelaidet")
  # The legacy stream format, payload in the header records.
  legacy = tmp_path / "evil_legacy.pth"
  with open(legacy, "wb") as f:
    pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
    pickle.dump(_Evil(), f, protocol=2)
  with pytest.raises(weights.safe_pickle.UnsafePickleError):
    weights.convert_file(str(legacy), "adelaidet")
  # And as a .pkl (numpy-only unpickler).
  pkl = tmp_path / "evil.pkl"
  with open(pkl, "wb") as f:
    pickle.dump({"model": {"controller.weight": _Evil()}}, f, protocol=4)
  with pytest.raises(weights.safe_pickle.UnsafePickleError):
    weights.convert_file(str(pkl), "adelaidet")
  assert not (tmp_path / "PWNED").exists()
