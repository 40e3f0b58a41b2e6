"""Every config loads and validates; overrides type-check; tuple fields are
checked (length, types) naming the field; demo_masksup = demo_boxinst +
masks; demo (BoxSeg) = demo_boxteacher + QAM; every ladder variant loads."""

import glob
import importlib.util
import os

import ml_collections
import pytest

from boxseg_jax import config as config_lib
from boxseg_jax import config_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location(
      os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(
    REPO, "configs", "*.py"))))
def test_config_loads(path):
  c = load(path)
  assert isinstance(c, ml_collections.ConfigDict)
  if "data" in c:
    assert all(s % 32 == 0 for s in c.data.canvas)


def test_masksup_differs_from_demo_only_in_supervision():
  demo = load(os.path.join(REPO, "configs", "demo_boxinst.py")).to_dict()
  sup = load(os.path.join(REPO, "configs", "demo_masksup.py")).to_dict()
  assert sup.pop("method") == "mask" and demo.pop("method") == "boxinst"
  assert sup["data"].pop("with_masks") and not demo["data"].pop("with_masks")
  assert sup == demo


def test_demo_is_boxteacher_demo_plus_qam():
  demo = load(os.path.join(REPO, "configs", "demo.py")).to_dict()
  bt = load(os.path.join(REPO, "configs", "demo_boxteacher.py")).to_dict()
  assert demo.pop("method") == "boxseg" and bt.pop("method") == "boxteacher"
  assert demo["loss"].pop("cls_loss") == "varifocal"
  assert bt["loss"].pop("cls_loss") == "focal"
  # BoxSeg's second half: Peer-assisted Copy-paste, its 10k-step ramp
  # scaled to the run like the other warm-ups.
  demo_pc, bt_pc = demo.pop("pc"), bt.pop("pc")
  assert demo_pc.pop("enabled") and not bt_pc.pop("enabled")
  assert demo_pc.pop("ramp_steps") == 500
  assert demo_pc == {k: v for k, v in bt_pc.items() if k != "ramp_steps"}
  # Panels of the pasted batches (pictures only, training unchanged).
  assert demo["train"].pop("panel_every_steps") == 1000
  assert bt["train"].pop("panel_every_steps") == 0
  assert demo == bt


@pytest.mark.parametrize("name", ["demo.py", "coco_boxseg_r50_1x.py",
                                  "coco_boxseg_r50_3x.py", "voc_boxseg_r50.py"])
@pytest.mark.parametrize("variant", sorted(config_lib.BOXSEG_VARIANTS))
def test_every_ladder_variant_loads(name, variant):
  c = load(os.path.join(REPO, "configs", name), variant)
  config_lib.validate(c)
  full = load(os.path.join(REPO, "configs", name))
  want = {"no_pseudo": "boxinst", "bpma": "boxteacher"}.get(variant,
                                                           "boxseg")
  assert c.method == want
  # PC is on in the full method and the Table 5 rows with PC, off in the
  # Table 4 / 7 rows (QAM alone) and Table 5's "no PC".
  assert full.pc.enabled
  assert c.pc.enabled == (variant in ("full", "pc_random",
                                      "pc_hq_random_place",
                                      "pc_hq_overlap", "qam_code"))
  # Only the pseudo labels change along the ladder.
  assert c.loss.cls_loss == full.loss.cls_loss == "varifocal"
  assert c.eval.use_teacher and c.data == full.data


def test_code_config_switches_every_qam_option():
  c = load(os.path.join(REPO, "configs", "boxseg_code_r50_1x.py"))
  paper = load(os.path.join(REPO, "configs", "coco_boxseg_r50_1x.py"))
  diff = {k for k in c.qam if c.qam[k] != paper.qam[k]}
  assert diff == {"k_mode", "box_score", "fusion", "mqs", "class_filter"}
  assert (c.qam.class_filter, paper.qam.class_filter) == ("after_cut",
                                                          "before_cut")
  assert (c.qam.k, c.qam.tau, c.qam.min_iou) == (20, 0.1, 0.5)
  assert (c.data.photometric, paper.data.photometric) == ("strong",
                                                          "strongv2")
  with pytest.raises(ValueError, match="BoxSeg variant"):
    load(os.path.join(REPO, "configs", "demo.py"), "nms")


def test_locked_config_rejects_unknown_keys():
  c = load(os.path.join(REPO, "configs", "tiny.py"))
  c.lock()
  with pytest.raises(AttributeError):
    c.data.batch_sise = 3
  with pytest.raises(TypeError):
    c.data.batch_size = "four"


def _tuple_fields(node, prefix=""):
  out = set()
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      out |= _tuple_fields(value, f"{prefix}{key}.")
    elif isinstance(value, tuple):
      out.add(prefix + key)
  return out


def test_every_tuple_field_has_a_rule():
  assert _tuple_fields(config_lib.base_config()) == set(
      config_lib.TUPLE_FIELDS)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(
    REPO, "configs", "*.py"))))
def test_validate_accepts_every_config(path):
  config_lib.validate(load(path))


@pytest.mark.parametrize("field,value,expect", [
    # An override given twice: ml_collections concatenates the tuples.
    ("data.canvas", (96, 96, 96, 96), "given twice"),
    ("data.canvas", (96,), "2 ints"),
    ("data.canvas", (100, 96), "multiples of 32"),
    ("data.canvas", (96.5, 96), "2 ints"),
    ("data.train_short_sizes", (64, 72, 64, 72), "given twice"),
    ("data.shapes.image_size", (64, 64, 3), "2 positive ints"),
    ("model.pixel_mean", (1.0, 2.0), "3 numbers"),
    ("model.pixel_std", (1.0, 0.0, 1.0), "3 positive numbers"),
    ("model.resnet_num_blocks", (1, 2, 3), "4 positive ints"),
    ("loss.sizes_of_interest", (64, 128, 256, 512) * 2, "given twice"),
    ("optim.lr_boundaries", ("",), "increasing"),
    ("optim.lr_boundaries", (800, 600), "increasing"),
    ("init_keys", ("backbone,fpn",), "subtree names"),
])
def test_validate_names_the_field_and_what_it_expects(field, value, expect):
  c = load(os.path.join(REPO, "configs", "tiny.py"))
  node = c
  *parents, last = field.split(".")
  for p in parents:
    node = node[p]
  node[last] = value
  with pytest.raises(ValueError, match=f"config.{field}=") as err:
    config_lib.validate(c)
  assert expect in str(err.value)


class _Source:
  category_ids = (1, 2, 3, 4, 5)


def test_num_classes_smaller_than_the_dataset_is_an_error(caplog):
  c = load(os.path.join(REPO, "configs", "tiny.py"))  # num_classes 4
  with pytest.raises(ValueError, match=r"model\.num_classes=4 .*data\.train="
                     r"coco:X:s has 5 categories"):
    config_lib.check_num_classes(c, _Source(), "data.train=coco:X:s")
  c.model.num_classes = 7
  config_lib.check_num_classes(c, _Source(), "data.val=coco:X:s")
  assert "only 5 categories" in caplog.text


def test_scaled_ema_momentum_keeps_the_relative_horizon():
  assert config_lib.scaled_ema_momentum(90000) == pytest.approx(0.999)
  # 1000-step horizon of 90k -> 44.4 steps of 4000.
  assert config_lib.scaled_ema_momentum(4000) == pytest.approx(1 - 1 / 44.444,
                                                               rel=1e-4)
  assert config_lib.scaled_ema_momentum(50) == 0.0  # horizon below 1 step


# --- orientation canvases (data.canvases, teacher.canvases). ---------------

COCO_CANVASES = ((800, 1344), (1344, 800))


@pytest.mark.parametrize("name", [
    "coco_boxinst_r50_1x.py", "coco_boxinst_pc_r50_1x.py",
    "coco_boxteacher_r50_1x.py", "coco_boxteacher_r50_3x.py",
    "coco_boxteacher_r101_3x.py", "coco_boxseg_r50_1x.py",
    "coco_boxseg_r50_3x.py", "coco_boxseg_r101_3x.py", "voc_boxseg_r50.py",
    "boxseg_code_r50_1x.py"])
def test_coco_recipes_use_orientation_canvases(name):
  c = load(os.path.join(REPO, "configs", name))
  config_lib.validate(c)
  assert config_lib.canvases(c) == COCO_CANVASES
  assert config_lib.teacher_canvases(c) == COCO_CANVASES
  tcfgs = config_lib.transform_configs(c, teacher_view=True)
  assert [t.canvas for t in tcfgs] == list(COCO_CANVASES)
  assert [t.teacher_canvas for t in tcfgs] == list(COCO_CANVASES)


def _tiny(**overrides):
  c = load(os.path.join(REPO, "configs", "tiny.py"))
  c.data.train_short_sizes = (48, 64)   # short side <= 64, long <= 96
  c.data.test_short_size = 64
  return config_helpers.apply_overrides(c, overrides)


def test_one_canvas_is_the_default_and_unchanged():
  c = _tiny()
  assert c.data.canvases == () and config_lib.canvases(c) == ((96, 96),)
  assert config_lib.teacher_canvases(c) == ((96, 96),)
  c.teacher.canvas = (128, 128)
  assert config_lib.teacher_canvases(c) == ((128, 128),)
  (tcfg,) = config_lib.transform_configs(c, teacher_view=True)
  assert tcfg == config_lib.transform_config(c, teacher_view=True)
  assert tcfg.canvas == (96, 96) and tcfg.teacher_canvas == (128, 128)


def test_teacher_canvases_follow_the_student_orientation():
  c = _tiny(**{"data.canvases": ((64, 96), (96, 64))})
  config_lib.validate(c)
  assert config_lib.teacher_canvases(c) == ((64, 96), (96, 64))
  c.teacher.canvas = (128, 128)  # one teacher canvas for both
  assert config_lib.teacher_canvases(c) == ((128, 128), (128, 128))
  c.teacher.canvases = ((96, 128), (128, 96))
  config_lib.validate(c)
  tcfgs = config_lib.transform_configs(c, teacher_view=True)
  assert [(t.canvas, t.teacher_canvas) for t in tcfgs] == [
      ((64, 96), (96, 128)), ((96, 64), (128, 96))]
  # A caller that takes one canvas must say which.
  with pytest.raises(ValueError, match=r"data\.canvases=.*canvases='\(\)'"):
    config_lib.transform_config(c)
  assert config_lib.transform_config(c, canvas_index=1).canvas == (96, 64)


@pytest.mark.parametrize("overrides,expect", [
    ({"data.canvases": ((96, 64), (96, 64))},
     r"config\.data\.canvases=.*landscape with W >= H"),
    ({"data.canvases": ((64, 96), (96, 64), (64, 96))},
     r"config\.data\.canvases=.*2 canvases"),
    ({"data.canvases": ((64, 100), (96, 64))}, "multiples of 32"),
    ({"data.canvases": ((64, 96),)}, r"config\.data\.canvases=.*2 canvases"),
    # Short side up to 64 (data.train_short_sizes) fits, 80 does not.
    ({"data.canvases": ((64, 96), (96, 64)),
      "data.train_short_sizes": (64, 80)},
     r"config\.data\.canvases\[0\]=\(64, 96\): the landscape canvas .* "
     r"short side up to 80, long side up to 96.*at least \(96, 96\)"),
    ({"data.canvases": ((64, 96), (96, 64)), "data.test_max_size": 128},
     r"config\.data\.canvases\[0\]=\(64, 96\).*long side up to 128.*at "
     r"least \(64, 128\)"),
    ({"data.canvases": ((64, 128), (96, 64)), "data.test_max_size": 128},
     r"config\.data\.canvases\[1\]=\(96, 64\): the portrait canvas.*at "
     r"least \(128, 64\)"),
    ({"teacher.canvases": ((64, 96), (96, 64))},
     r"config\.teacher\.canvases=.*needs data\.canvases"),
    # The teacher's view is at the test scale (short 80 here).
    ({"data.canvases": ((64, 96), (96, 64)), "data.test_short_size": 48,
      "teacher.canvases": ((64, 96), (96, 64)),
      "data.test_max_size": 96, "data.train_short_sizes": (48,)}, None),
    ({"data.canvases": ((96, 96), (96, 96)), "data.test_short_size": 80,
      "teacher.canvases": ((64, 96), (96, 64))},
     r"config\.teacher\.canvases\[0\]=\(64, 96\).*test-scale view.*short "
     r"side up to 80.*at least \(96, 96\)"),
])
def test_orientation_canvases_are_checked_naming_the_field(overrides, expect):
  c = _tiny(**overrides)
  if expect is None:
    config_lib.validate(c)
    return
  with pytest.raises(ValueError, match=expect):
    config_lib.validate(c)
