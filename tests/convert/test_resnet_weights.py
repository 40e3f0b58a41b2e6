"""ImageNet ResNet readers: torchvision .pth, MSRA .pkl, detectron2 .pkl.

Layout tests use the published R-50 / R-101 key names and shapes (derived
from torchvision's ResNet, detectron2's ``convert_basic_c2_names`` and
``convert-torchvision-to-d2.py``) as shape-only arrays; value tests use
small ResNets written to real files (torch zip written without torch,
numpy pickles of protocols 2 and 4).
"""

import io
import os
import pickle
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

import fake_torch
from boxseg_jax.convert import common
from boxseg_jax.convert import resnet as resnet_conv
from boxseg_jax.convert import safe_pickle
from boxseg_jax.convert import weights
from boxseg_jax.modeling import resnet as resnet_lib

SMALL = dict(num_blocks=(1, 2, 1, 1), width=8)


def _model_backbone_shapes(depth, **kw):
  model = resnet_lib.ResNet(depth=depth, norm="FrozenBN", **kw)
  shapes = common.model_shapes(model, train=False)
  return {"params/backbone/" + k.split("/", 1)[1]: v
          for k, v in shapes.items()}


@pytest.mark.parametrize("depth,num_keys", [(50, 320), (101, 626)])
def test_torchvision_layout_maps_onto_our_tree(depth, num_keys):
  sd = fake_torch.zero_arrays(resnet_conv.torchvision_key_shapes(depth))
  assert len(sd) == num_keys  # conv/bn/fc + num_batches_tracked
  assert sd["layer3.0.conv2.weight"].shape == (256, 256, 3, 3)
  assert sd["layer4.2.bn3.running_var"].shape == (2048,)
  conv = weights.convert_object(sd, "torchvision", "tv.pth")
  want = _model_backbone_shapes(depth)
  assert {k: v.shape for k, v in conv.arrays.items()} == want
  assert conv.init_keys == ["backbone"]
  assert sorted(conv.report.ignored)[:2] == ["bn1.num_batches_tracked",
                                             "fc.bias"]
  assert len(conv.report.ignored) == 2 + sum(
      k.endswith("num_batches_tracked") for k in sd)
  assert not conv.report.synthesized
  assert conv.hints["model.depth"] == depth
  assert conv.hints["model.stride_in_1x1"] is False
  assert conv.hints["model.input_format"] == "RGB"
  assert conv.hints["model.pixel_std"] == (58.395, 57.12, 57.375)


@pytest.mark.parametrize("depth,num_blobs", [(50, 161), (101, 314)])
def test_msra_layout_maps_onto_our_tree(depth, num_blobs):
  blobs = resnet_conv.msra_blob_shapes(depth)
  assert len(blobs) == num_blobs
  assert blobs["res_conv1_bn_s"] == (64,)
  assert blobs["res4_22_branch2b_w" if depth == 101 else
               "res4_5_branch2b_w"] == (256, 256, 3, 3)
  assert blobs["res2_0_branch1_w"] == (256, 64, 1, 1)
  sd = fake_torch.zero_arrays(blobs)
  sd["res2_0_branch2a_w_momentum"] = sd["res2_0_branch2a_w"]
  conv = weights.convert_object(sd, "msra", "R-50.pkl")
  want = _model_backbone_shapes(depth)
  assert {k: v.shape for k, v in conv.arrays.items()} == want
  assert sorted(conv.report.ignored) == ["pred_b", "pred_w",
                                         "res2_0_branch2a_w_momentum"]
  # No running statistics in the file: every FrozenBN gets mean 0, var 1.
  num_norms = sum(k.endswith("/norm/scale") for k in want)
  assert len(conv.report.synthesized) == 2 * num_norms
  assert conv.hints["model.input_format"] == "BGR"
  assert conv.hints["model.stride_in_1x1"] is True
  assert conv.hints["model.pixel_std"] == (1.0, 1.0, 1.0)


def _write_pkl(path, obj, protocol):
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=protocol)


def _check_frozen_bn(arrays, ours, scale, bias, mean, var):
  np.testing.assert_array_equal(arrays[ours + "/norm/scale"], scale)
  np.testing.assert_array_equal(arrays[ours + "/norm/bias"], bias)
  np.testing.assert_array_equal(arrays[ours + "/norm/mean"], mean)
  np.testing.assert_array_equal(arrays[ours + "/norm/var"], var)


def test_torchvision_file_values(tmp_path):
  sd = fake_torch.random_arrays(resnet_conv.torchvision_key_shapes(
      50, **SMALL, num_classes=10))
  path = str(tmp_path / "resnet_small.pth")
  fake_torch.save(path, sd)
  conv = weights.convert_file(path, "torchvision")
  a = conv.arrays
  # OIHW -> HWIO.
  np.testing.assert_array_equal(a["params/backbone/res3_0/conv2/kernel"],
                                sd["layer2.0.conv2.weight"].transpose(
                                    2, 3, 1, 0))
  np.testing.assert_array_equal(a["params/backbone/stem/conv1/kernel"],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(a["params/backbone/res2_0/shortcut/kernel"],
                                sd["layer1.0.downsample.0.weight"].transpose(
                                    2, 3, 1, 0))
  # FrozenBN statistics: weight, bias, running_mean, running_var.
  for ours, theirs in (("stem/conv1", "bn1"), ("res3_1/conv3",
                                               "layer2.1.bn3"),
                       ("res2_0/shortcut", "layer1.0.downsample.1")):
    _check_frozen_bn(a, "params/backbone/" + ours, sd[theirs + ".weight"],
                     sd[theirs + ".bias"], sd[theirs + ".running_mean"],
                     sd[theirs + ".running_var"])
  assert conv.hints["model.resnet_num_blocks"] == (1, 2, 1, 1)
  assert conv.hints["model.resnet_width"] == 8


@pytest.mark.parametrize("protocol", [2, 4])
def test_msra_file_values(tmp_path, protocol):
  blobs = fake_torch.random_arrays(resnet_conv.msra_blob_shapes(
      50, **SMALL, num_classes=10))
  path = str(tmp_path / "R-small.pkl")
  _write_pkl(path, {"blobs": blobs} if protocol == 4 else blobs, protocol)
  conv = weights.convert_file(path, "msra")
  a = conv.arrays
  np.testing.assert_array_equal(a["params/backbone/res4_0/conv1/kernel"],
                                blobs["res4_0_branch2a_w"].transpose(
                                    2, 3, 1, 0))
  np.testing.assert_array_equal(a["params/backbone/res5_0/shortcut/kernel"],
                                blobs["res5_0_branch1_w"].transpose(
                                    2, 3, 1, 0))
  ones, zeros = np.ones((8,)), np.zeros((8,))
  _check_frozen_bn(a, "params/backbone/stem/conv1", blobs["res_conv1_bn_s"],
                   blobs["res_conv1_bn_b"], zeros, ones)
  n = blobs["res3_1_branch2c_bn_s"].shape[0]
  _check_frozen_bn(a, "params/backbone/res3_1/conv3",
                   blobs["res3_1_branch2c_bn_s"],
                   blobs["res3_1_branch2c_bn_b"], np.zeros(n), np.ones(n))


@pytest.mark.parametrize("author,native", [("torchvision", "RGB"),
                                           ("Caffe2", "BGR")])
def test_d2_file_values(tmp_path, author, native):
  # convert-torchvision-to-d2.py output: detectron2 names, stats, stem.fc.
  d2 = fake_torch.random_arrays(resnet_conv.d2_key_shapes(50, **SMALL))
  d2["stem.fc.weight"] = np.zeros((10, 256), np.float32)
  d2["stem.fc.bias"] = np.zeros((10,), np.float32)
  d2["res2.0.conv1.norm.num_batches_tracked"] = np.array(3, np.int64)
  path = str(tmp_path / "dino_resnet50_d2.pkl")
  _write_pkl(path, {"model": d2, "__author__": author,
                    "matching_heuristics": True}, 4)
  conv = weights.convert_file(path, "d2")
  a = conv.arrays
  np.testing.assert_array_equal(a["params/backbone/res3_1/conv2/kernel"],
                                d2["res3.1.conv2.weight"].transpose(
                                    2, 3, 1, 0))
  _check_frozen_bn(a, "params/backbone/res4_0/shortcut",
                   d2["res4.0.shortcut.norm.weight"],
                   d2["res4.0.shortcut.norm.bias"],
                   d2["res4.0.shortcut.norm.running_mean"],
                   d2["res4.0.shortcut.norm.running_var"])
  assert sorted(conv.report.ignored) == [
      "res2.0.conv1.norm.num_batches_tracked", "stem.fc.bias",
      "stem.fc.weight"]
  assert conv.hints["model.input_format"] == native
  assert conv.hints["model.stride_in_1x1"] is (native == "BGR")


def _assert_close(got, want, tol=1e-5):
  """Random weights make activations large: tolerance relative to scale."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  scale = max(1.0, float(np.abs(want).max()))
  assert float(np.abs(got - want).max()) <= tol * scale


def _forward(arrays, x, stride_in_1x1):
  params = common.split_collections(arrays)["params"]["backbone"]
  model = resnet_lib.ResNet(num_blocks=SMALL["num_blocks"],
                            width=SMALL["width"], norm="FrozenBN",
                            stride_in_1x1=stride_in_1x1, freeze_at=0,
                            out_features=("res2", "res3", "res4", "res5"))
  return model.apply({"params": params}, jnp.asarray(x))


def test_input_format_switch_flips_first_conv(tmp_path):
  sd = fake_torch.random_arrays(resnet_conv.torchvision_key_shapes(
      50, **SMALL, num_classes=10), seed=3)
  path = str(tmp_path / "tv.pth")
  fake_torch.save(path, sd)
  rgb = weights.convert_file(path, "torchvision")
  bgr = weights.convert_file(path, "torchvision", input_format="BGR")
  k_rgb = rgb.arrays["params/backbone/stem/conv1/kernel"]
  k_bgr = bgr.arrays["params/backbone/stem/conv1/kernel"]
  np.testing.assert_array_equal(k_bgr, k_rgb[:, :, ::-1, :])
  for k in rgb.arrays:  # nothing else changes
    if k != "params/backbone/stem/conv1/kernel":
      np.testing.assert_array_equal(rgb.arrays[k], bgr.arrays[k])
  assert bgr.hints["model.input_format"] == "BGR"
  assert bgr.hints["model.pixel_mean"] == rgb.hints["model.pixel_mean"][::-1]
  assert bgr.hints["model.pixel_std"] == rgb.hints["model.pixel_std"][::-1]
  # The BGR model on BGR pixels computes what the RGB model does on RGB.
  x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(
      np.float32)
  out_rgb = _forward(rgb.arrays, x, False)
  out_bgr = _forward(bgr.arrays, x[..., ::-1], False)
  for k in out_rgb:
    _assert_close(out_bgr[k], out_rgb[k])


@pytest.mark.parametrize("fmt,shapes_fn,key,ours", [
    ("torchvision", resnet_conv.torchvision_key_shapes,
     "layer3.0.bn2.running_var", "params/backbone/res4_0/conv2/norm/var"),
    ("msra", resnet_conv.msra_blob_shapes, "res4_0_branch2b_bn_s",
     "params/backbone/res4_0/conv2/norm/scale"),
    ("d2", resnet_conv.d2_key_shapes, "res4.0.conv2.norm.running_var",
     "params/backbone/res4_0/conv2/norm/var"),
])
def test_one_missing_key_fails_naming_it(fmt, shapes_fn, key, ours):
  sd = dict(fake_torch.zero_arrays(shapes_fn(50)))
  del sd[key]
  with pytest.raises(common.ConversionError) as err:
    weights.convert_object(sd, fmt, "f")
  assert f"{ours} <- {key}" in str(err.value)
  assert "1 missing key(s)" in str(err.value)


def test_mis_shaped_and_unexpected_keys_are_named():
  sd = dict(fake_torch.zero_arrays(resnet_conv.torchvision_key_shapes(50)))
  sd["layer2.1.conv2.weight"] = np.zeros((128, 128, 1, 1), np.float32)
  with pytest.raises(common.ConversionError,
                     match=r"layer2\.1\.conv2\.weight -> params/backbone/"
                     r"res3_1/conv2/kernel has shape \(1, 1, 128, 128\), "
                     r"the model expects \(3, 3, 128, 128\)"):
    weights.convert_object(sd, "torchvision", "f")
  sd = dict(fake_torch.zero_arrays(resnet_conv.torchvision_key_shapes(50)))
  sd["layer1.0.se.fc1.weight"] = np.zeros((4, 4), np.float32)
  with pytest.raises(common.ConversionError, match=(
      r"1 unexpected key\(s\): layer1\.0\.se\.fc1\.weight")):
    weights.convert_object(sd, "torchvision", "f")
  conv = weights.convert_object(sd, "torchvision", "f", allow_unexpected=True)
  assert conv.report.unexpected == ["layer1.0.se.fc1.weight"]
  with pytest.raises(common.ConversionError, match="stem.conv1.weight"):
    weights.convert_object({"foo": np.zeros(3)}, "msra", "f")


class _Evil:

  def __reduce__(self):
    return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("fmt", ["torchvision", "msra", "d2"])
def test_malicious_payload_never_runs(tmp_path, monkeypatch, fmt):
  monkeypatch.chdir(tmp_path)
  shapes = (resnet_conv.torchvision_key_shapes if fmt == "torchvision" else
            resnet_conv.msra_blob_shapes if fmt == "msra" else
            resnet_conv.d2_key_shapes)(50, **SMALL)
  sd = fake_torch.random_arrays(shapes)
  if fmt == "torchvision":
    path = str(tmp_path / "evil.pth")
    # A torch file with a payload next to the tensors: read as inert data.
    fake_torch.save(path, sd)
    with zipfile.ZipFile(path) as zf:
      names = {n: zf.read(n) for n in zf.namelist()}
    buf = io.BytesIO()
    pickle.dump({"payload": _Evil()}, buf, protocol=2)
    names["archive/data.pkl"] = buf.getvalue()
    with zipfile.ZipFile(path, "w") as zf:
      for n, b in names.items():
        zf.writestr(n, b)
    with pytest.raises(common.ConversionError, match="stem"):
      weights.convert_file(path, fmt)
  else:
    path = str(tmp_path / "evil.pkl")
    payload = {"model": dict(sd, evil=_Evil()), "__author__": "x"} if (
        fmt == "d2") else dict(sd, evil=_Evil())
    _write_pkl(path, payload, 2)
    with pytest.raises(safe_pickle.UnsafePickleError, match="os.system|posix"):
      weights.convert_file(path, fmt)
  assert not (tmp_path / "PWNED").exists()


def test_torch_forward_matches_converted_resnet(tmp_path):
  """torchvision-layout ResNet in plain torch.nn (torchvision itself is not
  installed here) vs our converted ResNet, same random weights and stats."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class Bottleneck(nn.Module):
    # torchvision ResNet v1.5: the stride sits in conv2 (3x3).

    def __init__(self, cin, width, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(4 * width)
      self.relu = nn.ReLU()
      self.downsample = None
      if stride != 1 or cin != 4 * width:
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, 4 * width, 1, stride, bias=False),
            nn.BatchNorm2d(4 * width))

    def forward(self, x):
      idt = x if self.downsample is None else self.downsample(x)
      y = self.relu(self.bn1(self.conv1(x)))
      y = self.relu(self.bn2(self.conv2(y)))
      return self.relu(self.bn3(self.conv3(y)) + idt)

  class TorchResNet(nn.Module):

    def __init__(self, blocks, width):
      super().__init__()
      self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.relu = nn.ReLU()
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      cin = width
      for s, n in enumerate(blocks):
        w = width * 2 ** s
        layers = []
        for i in range(n):
          layers.append(Bottleneck(cin, w, 2 if (i == 0 and s > 0) else 1))
          cin = 4 * w
        setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
      self.fc = nn.Linear(cin, 10)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      outs = {}
      for s in range(4):
        x = getattr(self, f"layer{s + 1}")(x)
        outs[f"res{s + 2}"] = x
      return outs

  torch.manual_seed(0)
  net = TorchResNet(SMALL["num_blocks"], SMALL["width"]).eval()
  with torch.no_grad():  # non-trivial BN statistics
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  assert set(net.state_dict()) == set(resnet_conv.torchvision_key_shapes(
      50, **SMALL, num_classes=10))
  path = str(tmp_path / "torch_resnet.pth")
  torch.save(net.state_dict(), path)
  conv = weights.convert_file(path, "torchvision")
  x = np.random.default_rng(1).standard_normal((2, 64, 96, 3)).astype(
      np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  got = _forward(conv.arrays, x, conv.hints["model.stride_in_1x1"])
  for k, v in want.items():
    _assert_close(got[k], v.numpy().transpose(0, 2, 3, 1))
