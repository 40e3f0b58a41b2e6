"""ImageNet ResNet-50/101 weights -> our ``backbone`` subtree.

Three published layouts, all renamed to detectron2's backbone names first
(``stem.conv1.weight``, ``res2.0.conv1.norm.weight``, ...) and then mapped
one-to-one onto ``modeling/resnet.py`` (docs/model.md, docs/weights.md):

* torchvision ``resnet50`` / ``resnet101`` ``.pth`` (``conv1``, ``bn1``,
  ``layer{1..4}.{i}.conv{1,2,3}`` / ``bn{1,2,3}``, ``downsample.{0,1}``,
  ``fc``): RGB input, ImageNet mean/std, stride in the 3x3 conv
  (``stride_in_1x1=False``), BatchNorm statistics in the file;
* MSRA / detectron2 ``R-50.pkl`` / ``R-101.pkl`` (Caffe2 blob names
  ``conv1_w``, ``res_conv1_bn_{s,b}``, ``res{k}_{i}_branch{1,2a,2b,2c}_w``
  and ``..._bn_{s,b}``, ``pred_{w,b}``): BGR input, std 1, stride in the
  1x1 conv; BatchNorm is folded into ``s``/``b``, so the FrozenBN mean and
  variance are written as 0 and 1 (what detectron2 loads);
* detectron2-format ``.pkl`` (``{"model": {name: array}, "__author__":
  ...}``, e.g. ``convert-torchvision-to-d2.py`` output or CutLER's DINO
  ResNet-50): already detectron2 names, statistics in the file.

Layouts: conv ``OIHW -> HWIO``; FrozenBN ``weight, bias, running_mean,
running_var -> scale, bias, mean, var``; classifier and
``num_batches_tracked`` are ignored (listed in the report).
"""

import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from boxseg_jax.convert import common
from boxseg_jax.convert.common import ConversionError
from boxseg_jax.modeling import resnet as resnet_lib

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)
MSRA_MEAN_BGR = (103.530, 116.280, 123.675)
MSRA_STD_BGR = (1.0, 1.0, 1.0)

_NORM_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean",
                "running_var": "var"}
_BLOCK_CONVS = ("conv1", "conv2", "conv3", "shortcut")


def _stage_layout(depth: int, num_blocks: Optional[Sequence[int]] = None,
                  width: int = 64):
  """Yields (stage, block, in, bottleneck, out, has_shortcut)."""
  blocks = tuple(num_blocks) if num_blocks else resnet_lib.RESNET_BLOCKS[depth]
  cin, bott, cout = width, width, 4 * width
  for stage, num in enumerate(blocks, start=2):
    for i in range(num):
      yield stage, i, cin, bott, cout, cin != cout
      cin = cout
    bott, cout = bott * 2, cout * 2


def d2_key_shapes(depth: int = 50, *, num_blocks=None, width: int = 64,
                  stats: bool = True) -> Dict[str, Tuple[int, ...]]:
  """detectron2 backbone names -> shapes (``stats``: running mean/var)."""
  leaves = ("weight", "bias") + (("running_mean", "running_var") if stats
                                 else ())
  shapes = {"stem.conv1.weight": (width, 3, 7, 7)}
  shapes.update({f"stem.conv1.norm.{n}": (width,) for n in leaves})
  for stage, i, cin, bott, cout, short in _stage_layout(depth, num_blocks,
                                                        width):
    p = f"res{stage}.{i}."
    convs = {"conv1": (bott, cin, 1, 1), "conv2": (bott, bott, 3, 3),
             "conv3": (cout, bott, 1, 1)}
    if short:
      convs["shortcut"] = (cout, cin, 1, 1)
    for name, shape in convs.items():
      shapes[p + name + ".weight"] = shape
      shapes.update({p + f"{name}.norm.{n}": (shape[0],) for n in leaves})
  return shapes


def torchvision_key_shapes(depth: int = 50, *, num_blocks=None,
                           width: int = 64, num_classes: int = 1000
                           ) -> Dict[str, Tuple[int, ...]]:
  """The torchvision ``resnet{50,101}`` state-dict layout (key -> shape)."""
  bn = ("weight", "bias", "running_mean", "running_var",
        "num_batches_tracked")

  def norm(prefix, c):
    return {f"{prefix}.{n}": (() if n == "num_batches_tracked" else (c,))
            for n in bn}

  shapes = {"conv1.weight": (width, 3, 7, 7), **norm("bn1", width)}
  for stage, i, cin, bott, cout, short in _stage_layout(depth, num_blocks,
                                                        width):
    p = f"layer{stage - 1}.{i}."
    shapes[p + "conv1.weight"] = (bott, cin, 1, 1)
    shapes.update(norm(p + "bn1", bott))
    shapes[p + "conv2.weight"] = (bott, bott, 3, 3)
    shapes.update(norm(p + "bn2", bott))
    shapes[p + "conv3.weight"] = (cout, bott, 1, 1)
    shapes.update(norm(p + "bn3", cout))
    if short:
      shapes[p + "downsample.0.weight"] = (cout, cin, 1, 1)
      shapes.update(norm(p + "downsample.1", cout))
    final = cout
  shapes["fc.weight"] = (num_classes, final)
  shapes["fc.bias"] = (num_classes,)
  return shapes


def msra_blob_shapes(depth: int = 50, *, num_blocks=None, width: int = 64,
                     num_classes: int = 1000) -> Dict[str, Tuple[int, ...]]:
  """The MSRA ``R-50.pkl`` / ``R-101.pkl`` Caffe2 blob layout."""
  shapes = {"conv1_w": (width, 3, 7, 7), "res_conv1_bn_s": (width,),
            "res_conv1_bn_b": (width,)}
  branches = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c",
              "shortcut": "branch1"}
  for name, shape in d2_key_shapes(depth, num_blocks=num_blocks, width=width,
                                   stats=False).items():
    m = re.match(r"res(\d)\.(\d+)\.(\w+?)(\.norm)?\.(weight|bias)$", name)
    if not m:
      continue
    stage, i, conv, norm, leaf = m.groups()
    blob = f"res{stage}_{i}_{branches[conv]}"
    if norm:
      blob += "_bn_s" if leaf == "weight" else "_bn_b"
    else:
      blob += "_w"
    shapes[blob] = shape
  final = 32 * width
  shapes["pred_w"] = (num_classes, final)
  shapes["pred_b"] = (num_classes,)
  return shapes


# --- renaming to detectron2 names. --------------------------------------


def torchvision_to_d2(sd: Mapping[str, Any]) -> Tuple[Dict[str, Any], list]:
  """torchvision names -> detectron2 names; returns (renamed, ignored)."""
  out, ignored = {}, []
  for key, value in common.strip_prefixes(sd, ("module.",)).items():
    if key.endswith("num_batches_tracked") or key.startswith("fc."):
      ignored.append(key)
      continue
    new = key
    if new.startswith("conv1."):
      new = "stem." + new
    elif new.startswith("bn1."):
      new = "stem.conv1.norm." + new[len("bn1."):]
    else:
      m = re.match(r"layer(\d)\.(\d+)\.(.*)$", new)
      if m:
        stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
        rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
        rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
        rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
        new = f"res{stage}.{block}.{rest}"
    out[new] = value
  return out, ignored


_C2_LEAF = {"w": "weight", "b": "bias", "bn_s": "norm.weight",
            "bn_b": "norm.bias", "bn_rm": "norm.running_mean",
            "bn_riv": "norm.running_var"}
_C2_BRANCH = {"branch1": "shortcut", "branch2a": "conv1",
              "branch2b": "conv2", "branch2c": "conv3"}


def msra_to_d2(blobs: Mapping[str, Any]) -> Tuple[Dict[str, Any], list]:
  """Caffe2 blob names -> detectron2 names; returns (renamed, ignored).

  Unknown blobs keep their name (and then show up as unexpected).
  """
  out, ignored = {}, []
  for key, value in blobs.items():
    if (key.endswith("_momentum") or key in ("pred_w", "pred_b",
                                              "fc1000_w", "fc1000_b")):
      ignored.append(key)
      continue
    m = re.match(r"res(\d)_(\d+)_(branch1|branch2a|branch2b|branch2c)_"
                 r"(w|b|bn_s|bn_b|bn_rm|bn_riv)$", key)
    if m:
      stage, block, branch, leaf = m.groups()
      out[f"res{stage}.{block}.{_C2_BRANCH[branch]}.{_C2_LEAF[leaf]}"] = value
      continue
    m = re.match(r"conv1_(w|b)$", key) or re.match(
        r"res_conv1_(bn_s|bn_b|bn_rm|bn_riv)$", key)
    if m:
      out[f"stem.conv1.{_C2_LEAF[m.group(1)]}"] = value
      continue
    out[key] = value
  return out, ignored


# --- detectron2 names -> ours. -------------------------------------------


def blocks_per_stage(names) -> Tuple[int, ...]:
  """Blocks of res2..res5 found in detectron2 backbone names."""
  counts = {}
  for name in names:
    m = re.match(r"res(\d)\.(\d+)\.", name)
    if m:
      stage, block = int(m.group(1)), int(m.group(2))
      counts[stage] = max(counts.get(stage, 0), block + 1)
  return tuple(counts.get(s, 0) for s in (2, 3, 4, 5))


def arch_from_d2(sd: Mapping[str, Any], source: str) -> Dict[str, Any]:
  """depth / num_blocks / width of a detectron2-named backbone."""
  if "stem.conv1.weight" not in sd:
    raise ConversionError(
        f"{source}: no stem conv (stem.conv1.weight after renaming); is the "
        f"--format right? First keys: {sorted(sd)[:6]}")
  blocks = blocks_per_stage(sd)
  if min(blocks) == 0:
    raise ConversionError(f"{source}: blocks per stage res2..res5 = "
                          f"{blocks}; every stage needs at least one block")
  depth = {v: k for k, v in resnet_lib.RESNET_BLOCKS.items()}.get(blocks)
  width = int(np.asarray(sd["stem.conv1.weight"]).shape[0])
  return {"depth": depth or 50, "num_blocks": None if depth else blocks,
          "width": width}


def _our_module(d2_module: str) -> str:
  """``stem.conv1`` -> ``stem/conv1``; ``res2.0.conv1`` -> ``res2_0/conv1``."""
  if d2_module == "stem.conv1":
    return "stem/conv1"
  stage, block, conv = d2_module.split(".")
  return f"{stage}_{block}/{conv}"


def d2_to_torchvision_name(name: str) -> str:
  """Inverse of ``torchvision_to_d2`` for one backbone name."""
  if name.startswith("stem.conv1.norm."):
    return "bn1." + name[len("stem.conv1.norm."):]
  if name.startswith("stem."):
    return name[len("stem."):]
  m = re.match(r"res(\d)\.(\d+)\.(.*)$", name)
  if not m:
    return name
  stage, block, rest = m.groups()
  rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
  rest = re.sub(r"^shortcut\.", "downsample.0.", rest)
  rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
  return f"layer{int(stage) - 1}.{block}.{rest}"


def d2_to_msra_name(name: str) -> str:
  """Inverse of ``msra_to_d2`` for one backbone name."""
  leaf = {v: k for k, v in _C2_LEAF.items()}
  branch = {v: k for k, v in _C2_BRANCH.items()}
  if name.startswith("stem.conv1.norm."):
    return "res_conv1_" + leaf["norm." + name.rsplit(".", 1)[1]]
  if name.startswith("stem.conv1."):
    return "conv1_" + leaf[name.rsplit(".", 1)[1]]
  m = re.match(r"res(\d)\.(\d+)\.(conv[123]|shortcut)\.(.+)$", name)
  if not m or m.group(4) not in leaf:
    return name
  stage, block, conv, rest = m.groups()
  return f"res{stage}_{block}_{branch[conv]}_{leaf[rest]}"


def d2_to_ours(sd: Mapping[str, Any], out: common.Collector, *,
               src_prefix: str = "", dst_prefix: str = "params/backbone",
               fill_stats: bool = False, rename=None) -> None:
  """Puts a detectron2-named backbone into ``out`` (our paths).

  Args:
    sd: detectron2 backbone names (``stem.conv1.weight``, ...).
    out: the collector.
    src_prefix: prefix of the names in the original file (for messages).
    dst_prefix: our path prefix.
    fill_stats: write FrozenBN ``mean = 0``, ``var = 1`` for every norm
      without running statistics (MSRA files fold BN into s, b).
    rename: detectron2 name -> the file's own name (for the report).
  """
  norms_seen = set()
  stats_seen = set()
  for key, value in sd.items():
    src = rename(key) if rename else src_prefix + key
    if key.endswith("num_batches_tracked") or key in (
        "linear.weight", "linear.bias", "stem.fc.weight", "stem.fc.bias"):
      out.ignore(src)
      continue
    m = re.match(r"(stem\.conv1|res\d\.\d+\.(?:conv[123]|shortcut))\."
                 r"(?:(weight)|norm\.(weight|bias|running_mean|running_var))$",
                 key)
    if not m:
      out.unexpected(src)
      continue
    module = _our_module(m.group(1))
    base = f"{dst_prefix}/{module}"
    if m.group(2):
      out.put(f"{base}/kernel", common.conv_kernel(value, src), src)
    else:
      leaf = _NORM_LEAVES[m.group(3)]
      out.put(f"{base}/norm/{leaf}", np.asarray(value).reshape(-1), src)
      norms_seen.add(base)
      if leaf in ("mean", "var"):
        stats_seen.add(base)
  if fill_stats:
    for base in sorted(norms_seen - stats_seen):
      n = out.arrays[f"{base}/norm/scale"].shape[0] if (
          f"{base}/norm/scale" in out.arrays) else out.arrays[
              f"{base}/norm/bias"].shape[0]
      out.synthesize(f"{base}/norm/mean", np.zeros((n,), np.float32),
                     "folded BN: mean 0")
      out.synthesize(f"{base}/norm/var", np.ones((n,), np.float32),
                     "folded BN: var 1")


def backbone_shapes(arch: Mapping[str, Any], prefix: str = "params/backbone"
                    ) -> Dict[str, Tuple[int, ...]]:
  """Our FrozenBN ResNet's flat shapes for ``arch_from_d2`` output."""
  model = resnet_lib.ResNet(depth=arch["depth"], num_blocks=arch["num_blocks"],
                            width=arch["width"], norm="FrozenBN")
  shapes = common.model_shapes(model, train=False)
  return {prefix + "/" + k.split("/", 1)[1]: v for k, v in shapes.items()}


def d2_source_names(arch: Mapping[str, Any], src_prefix: str = "",
                    dst_prefix: str = "params/backbone") -> Dict[str, str]:
  """Our path -> detectron2 file key, to name missing keys."""
  names = {}
  for key in d2_key_shapes(arch["depth"], num_blocks=arch["num_blocks"],
                           width=arch["width"]):
    module, _, leaf = key.rpartition(".")
    norm = module.endswith(".norm")
    if norm:
      module = module[:-len(".norm")]
    if module == "stem.conv1":
      ours = "stem/conv1"
    else:
      stage_block, conv = module.rsplit(".", 1)
      ours = stage_block.replace(".", "_") + "/" + conv
    ours_leaf = f"norm/{_NORM_LEAVES[leaf]}" if norm else "kernel"
    names[f"{dst_prefix}/{ours}/{ours_leaf}"] = src_prefix + key
  return names


def finish_backbone(d2: Mapping[str, Any], out: common.Collector, *,
                    fill_stats: bool, allow_unexpected: bool,
                    rename=None
                    ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """Maps, checks and returns (arrays, arch) for a backbone-only file.

  ``rename`` maps a detectron2 name back to the file's own naming (for
  messages about missing keys).
  """
  arch = arch_from_d2(d2, out.report.source)
  d2_to_ours(d2, out, fill_stats=fill_stats, rename=rename)
  names = d2_source_names(arch)
  if rename is not None:
    names = {k: rename(v) for k, v in names.items()}
  arrays = out.finish(backbone_shapes(arch),
                      allow_unexpected=allow_unexpected, source_names=names)
  return arrays, arch
