"""Full AdelaiDet CondInst / BoxInst and BoxTeacher checkpoints -> our tree.

A detectron2 training checkpoint is ``{"model": state_dict, ...}`` (the
optimizer / scheduler / iteration entries are not read). Key layout of
AdelaiDet's ``CondInst`` (BoxInst is the same network), with
``k`` = 3, 4, 5 and ``C`` classes:

  backbone.bottom_up.<detectron2 ResNet names>   -> backbone/...
  backbone.fpn_lateral{k}.{weight,bias}          -> fpn/fpn_lateral{k}
  backbone.fpn_output{k}.{weight,bias}           -> fpn/fpn_output{k}
  backbone.top_block.p{6,7}.{weight,bias}        -> fpn/top_block_p{6,7}
  proposal_generator.fcos_head.{cls,bbox}_tower.{3j}.{weight,bias}  (conv)
                                                 -> fcos_head/{..}_tower_{2j}
  proposal_generator.fcos_head.{cls,bbox}_tower.{3j+1}.{weight,bias} (GN)
                                                 -> fcos_head/{..}_tower_{2j+1}
    (AdelaiDet's towers are nn.Sequential [conv, GN, ReLU] x num_convs, so
    conv j sits at index 3j; our towers have no ReLU entries.)
  proposal_generator.fcos_head.cls_logits.{weight [C,256,3,3], bias}
  proposal_generator.fcos_head.{bbox_pred,ctrness}.{weight,bias}
  proposal_generator.fcos_head.scales.{l}.scale [1] -> fcos_head/scales[l]
  controller.{weight [233,256,3,3], bias}        -> fcos_head/controller
  mask_branch.refine.{i}.0.weight (conv, no bias)-> mask_branch/refine_{i}/conv
  mask_branch.refine.{i}.1.{weight,bias}         -> .../refine_{i}/norm (params)
  mask_branch.refine.{i}.1.running_{mean,var}    -> batch_stats/.../norm
  mask_branch.tower.{i}.{0,1}.*  (i < n)         -> mask_branch/tower_{i}/...
  mask_branch.tower.{n}.{weight,bias} (1x1 conv) -> mask_branch/tower_{n}

Ignored (listed in the report): ``mask_head._iter`` and
``mask_head.sizes_of_interest`` (buffers of the dynamic mask head),
``num_batches_tracked``, and the training-only semantic head
``mask_branch.seg_head.*`` / ``mask_branch.logits.*``.

BoxTeacher's ``BoxTeacher`` module holds two CondInst networks,
``teacher.*`` and ``student.*``; BoxTeacher evaluates the teacher
(``USE_TEACHER_INFERENCE``), which is the default here. ``module.``
prefixes (DistributedDataParallel) are stripped.
"""

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from boxseg_jax.convert import common
from boxseg_jax.convert import resnet as resnet_conv
from boxseg_jax.convert.common import ConversionError
from boxseg_jax.modeling import condinst as condinst_lib

NETWORK_KEYS = ("teacher", "student")
_IGNORED = (r"mask_head\.(_iter|sizes_of_interest)$",
            r".*\.num_batches_tracked$", r"mask_branch\.seg_head\..*",
            r"mask_branch\.logits\..*", r"pixel_(mean|std)$")


def select_network(ckpt: Any, checkpoint_key: str, source: str
                   ) -> Tuple[Dict[str, np.ndarray], Optional[str], list]:
  """The CondInst state dict of a checkpoint (teacher/student aware).

  Returns:
    (state dict, the network prefix used or None, keys of the other one).
  """
  if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
    ckpt = ckpt["model"]
  if not isinstance(ckpt, dict):
    raise ConversionError(f"{source}: expected a state dict (or "
                          f"{{'model': state_dict}}), got {type(ckpt)}")
  sd = common.strip_prefixes(
      {k: v for k, v in ckpt.items() if isinstance(v, np.ndarray)},
      ("module.",))
  nets = sorted({k.split(".", 1)[0] for k in sd} & set(NETWORK_KEYS))
  if not nets:
    return sd, None, []
  if checkpoint_key not in nets:
    raise ConversionError(f"{source}: has networks {nets}, not "
                          f"{checkpoint_key!r} (--checkpoint_key)")
  prefix = checkpoint_key + "."
  mine = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  other = sorted(k for k in sd if not k.startswith(prefix))
  return mine, checkpoint_key, other


def _shape(sd, key, source):
  if key not in sd:
    raise ConversionError(f"{source}: missing key {key!r} (needed to infer "
                          "the architecture)")
  return tuple(np.asarray(sd[key]).shape)


def infer_arch(sd: Mapping[str, Any], source: str) -> Dict[str, Any]:
  """Architecture of a CondInst state dict, as ``config.model`` values."""
  backbone = {k[len("backbone.bottom_up."):]: v for k, v in sd.items()
              if k.startswith("backbone.bottom_up.")}
  arch = resnet_conv.arch_from_d2(backbone, source)
  fh = "proposal_generator.fcos_head."
  head_convs = sum(1 for k in sd if re.match(
      re.escape(fh) + r"cls_tower\.\d+\.weight$", k) and np.asarray(
          sd[k]).ndim == 4)
  num_convs = sum(1 for k in sd if re.match(
      r"mask_branch\.tower\.\d+\.0\.weight$", k))
  out_ch = _shape(sd, f"mask_branch.tower.{num_convs}.weight", source)[0]
  num_gen = _shape(sd, "controller.weight", source)[0]
  head_ch, head_layers = _mask_head(out_ch, num_gen)
  if head_ch is None:
    raise ConversionError(
        f"{source}: controller has {num_gen} outputs, which no dynamic mask "
        f"head (channels 1..64, layers 1..6) on {out_ch} mask-branch "
        "channels needs")
  return {
      "depth": arch["depth"], "resnet_num_blocks": arch["num_blocks"],
      "resnet_width": arch["width"],
      "num_classes": _shape(sd, fh + "cls_logits.weight", source)[0],
      "fpn_channels": _shape(sd, "backbone.fpn_lateral3.weight", source)[0],
      "head_num_convs": head_convs,
      "mask_branch_channels": _shape(sd, "mask_branch.refine.0.0.weight",
                                     source)[0],
      "mask_branch_out_channels": out_ch,
      "mask_branch_num_convs": num_convs,
      "mask_head_channels": head_ch,
      "mask_head_num_layers": head_layers,
  }


def _mask_head(in_channels: int, num_gen: int):
  """(channels, layers) of the dynamic head with ``num_gen`` parameters."""
  if condinst_lib.num_dynamic_params(in_channels, 8, 3) == num_gen:
    return 8, 3  # the default of every published config
  for layers in range(1, 7):
    for ch in range(1, 65):
      if condinst_lib.num_dynamic_params(in_channels, ch, layers) == num_gen:
        return ch, layers
  return None, None


def model_for(arch: Mapping[str, Any]) -> condinst_lib.CondInst:
  return condinst_lib.CondInst(
      num_classes=arch["num_classes"], depth=arch["depth"],
      resnet_num_blocks=arch["resnet_num_blocks"],
      resnet_width=arch["resnet_width"], backbone_norm="FrozenBN",
      fpn_channels=arch["fpn_channels"],
      head_num_convs=arch["head_num_convs"],
      mask_branch_channels=arch["mask_branch_channels"],
      mask_branch_out_channels=arch["mask_branch_out_channels"],
      mask_branch_num_convs=arch["mask_branch_num_convs"],
      mask_head_channels=arch["mask_head_channels"],
      mask_head_num_layers=arch["mask_head_num_layers"])


def _conv(out, prefix, leaf, value, src):
  if leaf == "weight":
    out.put(f"{prefix}/kernel", common.conv_kernel(value, src), src)
  else:
    out.put(f"{prefix}/bias", np.asarray(value).reshape(-1), src)


def _map_key(key: str, value, out: common.Collector, scales: dict,
             src: str) -> None:
  """One non-backbone CondInst key -> our path(s)."""
  if any(re.match(p, key) for p in _IGNORED):
    out.ignore(src)
    return
  m = re.match(r"backbone\.(fpn_lateral\d|fpn_output\d|top_block\.p[67])\."
               r"(weight|bias)$", key)
  if m:
    _conv(out, "params/fpn/" + m.group(1).replace(".", "_"), m.group(2),
          value, src)
    return
  m = re.match(r"proposal_generator\.fcos_head\.(cls|bbox)_tower\.(\d+)\."
               r"(weight|bias)$", key)
  if m:
    tower, idx, leaf = m.group(1), int(m.group(2)), m.group(3)
    base = f"params/fcos_head/{tower}_tower_"
    if idx % 3 == 0:
      _conv(out, base + str(2 * (idx // 3)), leaf, value, src)
    elif idx % 3 == 1:
      name = "scale" if leaf == "weight" else "bias"
      out.put(f"{base}{2 * (idx // 3) + 1}/{name}",
              np.asarray(value).reshape(-1), src)
    else:
      out.unexpected(src)
    return
  m = re.match(r"proposal_generator\.fcos_head\.(cls_logits|bbox_pred|"
               r"ctrness)\.(weight|bias)$", key)
  if m:
    _conv(out, "params/fcos_head/" + m.group(1), m.group(2), value, src)
    return
  m = re.match(r"proposal_generator\.fcos_head\.scales\.(\d+)\.scale$", key)
  if m:
    scales[int(m.group(1))] = (np.asarray(value).reshape(-1), src)
    return
  m = re.match(r"controller\.(weight|bias)$", key)
  if m:
    _conv(out, "params/fcos_head/controller", m.group(1), value, src)
    return
  m = re.match(r"mask_branch\.(refine|tower)\.(\d+)\.([01])\.(weight|bias|"
               r"running_mean|running_var)$", key)
  if m:
    part, i, sub, leaf = m.groups()
    base = f"mask_branch/{part}_{i}"
    if sub == "0" and leaf == "weight":
      out.put(f"params/{base}/conv/kernel", common.conv_kernel(value, src),
              src)
    elif sub == "1":
      col, name = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                   "running_mean": ("batch_stats", "mean"),
                   "running_var": ("batch_stats", "var")}[leaf]
      out.put(f"{col}/{base}/norm/{name}", np.asarray(value).reshape(-1),
              src)
    else:
      out.unexpected(src)
    return
  m = re.match(r"mask_branch\.tower\.(\d+)\.(weight|bias)$", key)
  if m:
    _conv(out, f"params/mask_branch/tower_{m.group(1)}", m.group(2), value,
          src)
    return
  out.unexpected(src)


def source_names(arch: Mapping[str, Any], prefix: str = ""
                 ) -> Dict[str, str]:
  """Our path -> AdelaiDet key (for naming missing keys)."""
  names = resnet_conv.d2_source_names(
      {"depth": arch["depth"], "num_blocks": arch["resnet_num_blocks"],
       "width": arch["resnet_width"]}, prefix + "backbone.bottom_up.")
  fh = prefix + "proposal_generator.fcos_head."
  for k in (3, 4, 5):
    for kind in ("lateral", "output"):
      for ours, theirs in (("kernel", "weight"), ("bias", "bias")):
        names[f"params/fpn/fpn_{kind}{k}/{ours}"] = (
            f"{prefix}backbone.fpn_{kind}{k}.{theirs}")
  for p in (6, 7):
    names[f"params/fpn/top_block_p{p}/kernel"] = (
        f"{prefix}backbone.top_block.p{p}.weight")
    names[f"params/fpn/top_block_p{p}/bias"] = (
        f"{prefix}backbone.top_block.p{p}.bias")
  for tower in ("cls", "bbox"):
    for j in range(arch["head_num_convs"]):
      t = f"params/fcos_head/{tower}_tower_"
      names[f"{t}{2 * j}/kernel"] = f"{fh}{tower}_tower.{3 * j}.weight"
      names[f"{t}{2 * j}/bias"] = f"{fh}{tower}_tower.{3 * j}.bias"
      names[f"{t}{2 * j + 1}/scale"] = f"{fh}{tower}_tower.{3 * j + 1}.weight"
      names[f"{t}{2 * j + 1}/bias"] = f"{fh}{tower}_tower.{3 * j + 1}.bias"
  for name in ("cls_logits", "bbox_pred", "ctrness"):
    names[f"params/fcos_head/{name}/kernel"] = f"{fh}{name}.weight"
    names[f"params/fcos_head/{name}/bias"] = f"{fh}{name}.bias"
  names["params/fcos_head/scales"] = f"{fh}scales.{{0..4}}.scale"
  names["params/fcos_head/controller/kernel"] = f"{prefix}controller.weight"
  names["params/fcos_head/controller/bias"] = f"{prefix}controller.bias"
  n = arch["mask_branch_num_convs"]
  blocks = [("refine", i) for i in range(3)] + [("tower", i)
                                                for i in range(n)]
  for part, i in blocks:
    src = f"{prefix}mask_branch.{part}.{i}"
    base = f"mask_branch/{part}_{i}"
    names[f"params/{base}/conv/kernel"] = f"{src}.0.weight"
    names[f"params/{base}/norm/scale"] = f"{src}.1.weight"
    names[f"params/{base}/norm/bias"] = f"{src}.1.bias"
    names[f"batch_stats/{base}/norm/mean"] = f"{src}.1.running_mean"
    names[f"batch_stats/{base}/norm/var"] = f"{src}.1.running_var"
  names[f"params/mask_branch/tower_{n}/kernel"] = (
      f"{prefix}mask_branch.tower.{n}.weight")
  names[f"params/mask_branch/tower_{n}/bias"] = (
      f"{prefix}mask_branch.tower.{n}.bias")
  return names


def convert_condinst(ckpt: Any, source: str, *,
                     checkpoint_key: str = "teacher",
                     allow_unexpected: bool = False
                     ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any],
                                common.Report, Optional[str]]:
  """Converts a full CondInst checkpoint.

  Returns:
    (flat arrays with ``params/`` and ``batch_stats/`` paths, the inferred
    ``config.model`` values, the report, the network taken or None).
  """
  sd, net, other = select_network(ckpt, checkpoint_key, source)
  prefix = f"{net}." if net else ""
  out = common.Collector(source)
  for k in other:
    out.ignore(k)
  arch = infer_arch(sd, source)
  backbone = {}
  scales: Dict[int, Tuple[np.ndarray, str]] = {}
  for key, value in sd.items():
    if key.startswith("backbone.bottom_up."):
      backbone[key[len("backbone.bottom_up."):]] = value
    else:
      _map_key(key, value, out, scales, prefix + key)
  resnet_conv.d2_to_ours(backbone, out,
                         src_prefix=prefix + "backbone.bottom_up.")
  if scales:
    if sorted(scales) != list(range(len(scales))) or any(
        v.shape != (1,) for v, _ in scales.values()):
      raise ConversionError(
          f"{source}: FCOS scales must be {prefix}proposal_generator."
          f"fcos_head.scales.{{0..L-1}}.scale of shape [1]; found "
          f"{ {scales[i][1]: scales[i][0].shape for i in sorted(scales)} }")
    out.put("params/fcos_head/scales",
            np.concatenate([scales[i][0] for i in sorted(scales)]),
            f"{prefix}proposal_generator.fcos_head.scales.*.scale")
  expected = common.model_shapes(model_for(arch), train=False)
  arrays = out.finish(expected, allow_unexpected=allow_unexpected,
                      source_names=source_names(arch, prefix))
  return arrays, arch, out.report, net


def condinst_key_shapes(arch: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
  """AdelaiDet CondInst state-dict layout (key -> shape) for ``arch``.

  The inverse of the table in the module docstring: used by the tests to
  build synthetic checkpoints with the real names and shapes.
  """
  shapes = {"backbone.bottom_up." + k: v for k, v in
            resnet_conv.d2_key_shapes(
                arch["depth"], num_blocks=arch["resnet_num_blocks"],
                width=arch["resnet_width"]).items()}
  fpn, w = arch["fpn_channels"], arch["resnet_width"]
  for k, cin in ((3, 8 * w), (4, 16 * w), (5, 32 * w)):
    shapes[f"backbone.fpn_lateral{k}.weight"] = (fpn, cin, 1, 1)
    shapes[f"backbone.fpn_lateral{k}.bias"] = (fpn,)
    shapes[f"backbone.fpn_output{k}.weight"] = (fpn, fpn, 3, 3)
    shapes[f"backbone.fpn_output{k}.bias"] = (fpn,)
  for p in (6, 7):
    shapes[f"backbone.top_block.p{p}.weight"] = (fpn, fpn, 3, 3)
    shapes[f"backbone.top_block.p{p}.bias"] = (fpn,)
  fh = "proposal_generator.fcos_head."
  for tower in ("cls", "bbox"):
    for j in range(arch["head_num_convs"]):
      shapes[f"{fh}{tower}_tower.{3 * j}.weight"] = (fpn, fpn, 3, 3)
      shapes[f"{fh}{tower}_tower.{3 * j}.bias"] = (fpn,)
      shapes[f"{fh}{tower}_tower.{3 * j + 1}.weight"] = (fpn,)
      shapes[f"{fh}{tower}_tower.{3 * j + 1}.bias"] = (fpn,)
  for name, c in (("cls_logits", arch["num_classes"]), ("bbox_pred", 4),
                  ("ctrness", 1)):
    shapes[f"{fh}{name}.weight"] = (c, fpn, 3, 3)
    shapes[f"{fh}{name}.bias"] = (c,)
  for level in range(5):
    shapes[f"{fh}scales.{level}.scale"] = (1,)
  gen = condinst_lib.num_dynamic_params(arch["mask_branch_out_channels"],
                                        arch["mask_head_channels"],
                                        arch["mask_head_num_layers"])
  shapes["controller.weight"] = (gen, fpn, 3, 3)
  shapes["controller.bias"] = (gen,)
  ch, n = arch["mask_branch_channels"], arch["mask_branch_num_convs"]
  bn = ("weight", "bias", "running_mean", "running_var")
  for part, count, cin in (("refine", 3, fpn), ("tower", n, ch)):
    for i in range(count):
      shapes[f"mask_branch.{part}.{i}.0.weight"] = (ch, cin, 3, 3)
      for leaf in bn:
        shapes[f"mask_branch.{part}.{i}.1.{leaf}"] = (ch,)
      shapes[f"mask_branch.{part}.{i}.1.num_batches_tracked"] = ()
  out = arch["mask_branch_out_channels"]
  shapes[f"mask_branch.tower.{n}.weight"] = (out, ch, 1, 1)
  shapes[f"mask_branch.tower.{n}.bias"] = (out,)
  shapes["mask_head._iter"] = (1,)
  shapes["mask_head.sizes_of_interest"] = (5,)
  return shapes


R50_COCO_ARCH = {
    "depth": 50, "resnet_num_blocks": None, "resnet_width": 64,
    "num_classes": 80, "fpn_channels": 256, "head_num_convs": 4,
    "mask_branch_channels": 128, "mask_branch_out_channels": 16,
    "mask_branch_num_convs": 4, "mask_head_channels": 8,
    "mask_head_num_layers": 3}
