"""MaskCut CLI: weights policy, one compile, COCO output on real photos."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from boxseg_jax.maskcut import dataset_io
from boxseg_jax.maskcut import generate

REPO = pathlib.Path(__file__).resolve().parents[2]


def _load_config_module():
  spec = importlib.util.spec_from_file_location(
      "maskcut_config", REPO / "configs" / "maskcut.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


maskcut_config = _load_config_module()


def _small_config(**overrides):
  cfg = maskcut_config.get_config("vit_small16,nocrf")
  cfg.fixed_size = 64
  cfg.batch_size = 2
  for k, v in overrides.items():
    node = cfg
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return cfg


def test_config_defaults_and_variants():
  cfg = maskcut_config.get_config()
  assert (cfg.model.arch, cfg.fixed_size, cfg.maskcut.tau,
          cfg.maskcut.num_masks, cfg.maskcut.solver) == (
              "vit_base8", 480, 0.15, 3, "eigh")
  assert cfg.post.crf
  cfg = maskcut_config.get_config("script,lobpcg,nocrf")
  assert (cfg.model.arch, cfg.maskcut.tau, cfg.maskcut.solver,
          cfg.post.crf) == ("vit_small16", 0.2, "lobpcg", False)
  with pytest.raises(ValueError):
    maskcut_config.get_config("vit_huge14")


def test_refuses_to_run_without_weights():
  with pytest.raises(generate.ConfigError, match="--random-init"):
    generate.load_params(_small_config(), None, random_init=False)


def test_weights_must_match_the_configured_arch(tmp_path):
  torch = pytest.importorskip("torch")
  from boxseg_jax.convert import dino  # pylint: disable=g-import-not-at-top
  sd = {k: torch.zeros(s) for k, s in dino.dino_key_shapes(384, 2, 16).items()}
  path = str(tmp_path / "small2.pth")
  torch.save(sd, path)
  with pytest.raises(generate.ConfigError, match="vit_small16"):
    generate.load_params(_small_config(), path, random_init=False)


def test_crf_required_but_missing_is_a_clear_error(tmp_path):
  from boxseg_jax.maskcut import crf  # pylint: disable=g-import-not-at-top
  if crf.crf_available():
    pytest.skip("pydensecrf is installed")
  cfg = _small_config(**{"post.crf": True, "post.crf_required": True})
  with pytest.raises(generate.ConfigError, match="pydensecrf2"):
    generate.run(cfg, [], None, str(tmp_path / "x.json"), progress=False)


def test_crf_default_is_used_when_importable_else_skipped_once(
    tmp_path, monkeypatch, caplog):
  from boxseg_jax.maskcut import crf  # pylint: disable=g-import-not-at-top
  cfg = maskcut_config.get_config()
  assert cfg.post.crf and not cfg.post.crf_required
  monkeypatch.setattr(crf, "crf_available", lambda: False)
  with caplog.at_level("WARNING"):
    assert generate.crf_choice(cfg) == (
        False, "skipped (pydensecrf not installed)")
  assert sum("SKIPPED" in r.getMessage() for r in caplog.records) == 1
  monkeypatch.setattr(crf, "crf_available", lambda: True)
  assert generate.crf_choice(cfg) == (True, "on (pydensecrf)")
  off = maskcut_config.get_config("nocrf")
  assert generate.crf_choice(off) == (False, "off (post.crf=False)")
  # The choice is recorded in the output JSON's info.
  monkeypatch.setattr(crf, "crf_available", lambda: False)
  out = tmp_path / "x.json"
  small = _small_config(**{"post.crf": True})
  stats = generate.run(small, [], None, str(out), progress=False)
  info = json.loads(out.read_text())["info"]
  assert info["crf"] is False and info["crf_note"].startswith("skipped")
  assert stats["crf"] == info["crf_note"]


def test_run_on_glob_skips_bad_images_and_compiles_once(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(3):
    img = rng.integers(0, 255, (40 + 8 * i, 50, 3), np.uint8)
    img[10:30, 10:30] = [250, 20, 20]
    Image.fromarray(img).save(tmp_path / f"im{i}.png")
  (tmp_path / "im9.png").write_bytes(b"broken")
  cfg = _small_config()
  params = generate.load_params(cfg, None, random_init=True)
  entries = dataset_io.list_images(str(tmp_path / "*.png"))
  out = str(tmp_path / "pseudo.json")
  fn = generate.make_batch_fn(cfg)
  generate_make = generate.make_batch_fn
  generate.make_batch_fn = lambda c: fn
  try:
    stats = generate.run(cfg, entries, params, out, progress=False)
  finally:
    generate.make_batch_fn = generate_make
  assert fn._cache_size() == 1  # pylint: disable=protected-access
  assert stats["images"] == 3
  assert [os.path.basename(p) for p, _ in stats["skipped"]] == ["im9.png"]
  coco = COCO(out)
  assert sorted(coco.imgs) == [1, 2, 3]
  assert coco.imgs[2]["height"] == 48 and coco.imgs[2]["width"] == 50
  assert len(coco.anns) == stats["annotations"]
  for ann in coco.anns.values():
    m = coco.annToMask(ann)
    assert m.shape == (coco.imgs[ann["image_id"]]["height"],
                       coco.imgs[ann["image_id"]]["width"])
    assert m.sum() == ann["area"] > 0
    assert ann["category_id"] == 1 and ann["iscrowd"] == 0


@pytest.mark.coco_mini
def test_cli_on_coco_mini_writes_loadable_json(coco_mini, tmp_path):
  out = tmp_path / "maskcut_val.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "boxseg_jax.maskcut",
          f"--images=coco:{coco_mini}:val2017", f"--output={out}",
          f"--config={REPO / 'configs' / 'maskcut.py'}:vit_small16,nocrf",
          "--config.fixed_size=128", "--config.batch_size=5", "--limit=5",
          "--no-progress"]
  refused = subprocess.run(base, capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=300, check=False)
  assert refused.returncode != 0
  assert "--random-init" in refused.stderr
  assert not out.exists()
  done = subprocess.run(base + ["--random-init"], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads(done.stdout.strip().splitlines()[0])
  assert summary["images"] == 5 and summary["skipped"] == 0
  coco = COCO(str(out))
  gt = COCO(str(coco_mini / "annotations" / "instances_val2017.json"))
  first5 = sorted(gt.imgs)[:5]
  assert sorted(coco.imgs) == first5
  for i in first5:
    assert coco.imgs[i]["file_name"] == gt.imgs[i]["file_name"]
    assert (coco.imgs[i]["width"], coco.imgs[i]["height"]) == (
        gt.imgs[i]["width"], gt.imgs[i]["height"])
  assert coco.loadCats(coco.getCatIds()) == [
      {"id": 1, "name": "fg", "supercategory": "fg"}]
  assert len(coco.anns) == summary["annotations"]
