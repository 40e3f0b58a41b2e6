"""Inference weights from a workdir, an export or converted weights.

Three sources give the same thing, an ``InferenceModel`` (config, params,
batch statistics, step, class names):

* a training workdir: ``DIR/config.json`` (written by the trainer) and the
  Orbax step ``DIR/checkpoints/<N>``, of which only ``params`` /
  ``batch_stats`` (or the EMA teacher's) are read, never the optimizer
  state;
* an export (``python -m boxseg_jax.export``)::

    EXPORT/state/...      Orbax: {"params": ..., "batch_stats": ...}
    EXPORT/config.json    the config
    EXPORT/export.json    step, teacher or student, class names / ids,
                          where it came from

* a converted ``.npz`` (``python -m boxseg_jax.convert``) with a config;
  the hints JSON beside it is applied to the config.
"""

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from boxseg_jax import config as config_lib
from boxseg_jax.convert import safe_pickle
from boxseg_jax.convert import weights as weights_lib
from boxseg_jax.train import models

CONFIG_FILE = "config.json"
EXPORT_META = "export.json"
EXPORT_STATE = "state"
EXPORT_VERSION = 1


@dataclasses.dataclass
class InferenceModel:
  """What evaluation and prediction need, without optimizer state."""
  config: ml_collections.ConfigDict
  params: Any
  batch_stats: Any
  step: int
  teacher: bool
  origin: str                      # e.g. "workdir /w step 4 (student)"
  class_names: Optional[Tuple[str, ...]] = None
  category_ids: Optional[Tuple[int, ...]] = None

  def state(self):
    """A stand-in train state for ``train.evaluate.Evaluator.run``."""
    return _State(self.params, self.batch_stats)


@dataclasses.dataclass
class _State:
  params: Any
  batch_stats: Any

  @property
  def ema_params(self):
    return self.params

  @property
  def ema_batch_stats(self):
    return self.batch_stats


# --- config as JSON. -------------------------------------------------------


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def _merge(node: ml_collections.ConfigDict, data: Dict[str, Any],
           path: str = "") -> None:
  for key, value in data.items():
    if key in node and isinstance(node[key], ml_collections.ConfigDict):
      _merge(node[key], value, f"{path}{key}.")
      continue
    if key in node and isinstance(node[key], tuple):
      value = tuple(value)
    elif isinstance(value, dict):
      value = ml_collections.ConfigDict(value)
    elif isinstance(value, list):
      value = tuple(value)
    if key in node:
      node[key] = value
    else:  # a field this version's base_config() does not define
      with node.unlocked():
        node[key] = value


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """The config written by ``config_to_json`` (types from base_config)."""
  config = config_lib.base_config()
  _merge(config, json.loads(text))
  return config


def write_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes ``workdir/config.json`` atomically (the trainer calls this)."""
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / CONFIG_FILE
  tmp = directory / (CONFIG_FILE + ".tmp")
  tmp.write_text(config_to_json(config))
  tmp.replace(path)
  return str(path)


def read_config(directory: str) -> ml_collections.ConfigDict:
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: this workdir was written before the trainer "
        "recorded its config; pass the run's --config=configs/NAME.py")
  return config_from_json(path.read_text())


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> None:
  """``["eval.num_images=50", "data.val=coco:R:S"]`` onto ``config``.

  Values are Python literals (``50``, ``(96, 96)``, ``True``) or, failing
  that, strings; an unknown key raises naming it.
  """
  import ast  # pylint: disable=g-import-not-at-top
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set={item!r}: expected key=value")
    node = config
    *path, leaf = key.split(".")
    for p in path:
      if p not in node:
        raise KeyError(f"--set={item!r}: config has no {key!r}")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"--set={item!r}: config has no {key!r}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    node[leaf] = value


# --- class names. ------------------------------------------------------------


def class_info(config: ml_collections.ConfigDict
               ) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
  """(names, COCO category ids) of the model's labels 0..C-1.

  From ``data.val`` (same label order as training: categories sorted by
  id), falling back to ``data.train``, then to ``class_<i>`` / ``i + 1``;
  with ``eval.class_agnostic``, ``fg`` (one class) / ``class_<i>``.
  """
  from boxseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  num = config.model.num_classes
  if config.eval.class_agnostic:
    # Evaluated with every category merged (CutLER): MaskCut's one "fg".
    names = ("fg",) if num == 1 else tuple(f"class_{i}" for i in range(num))
    return names, tuple(range(1, num + 1))
  for spec in (config.data.val, config.data.train):
    try:
      src = pipeline.make_source(
          spec, shapes_cfg=config.data.shapes, role="val",
          tfds_data_dir=config.data.tfds_data_dir or None)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("class names: cannot open %s (%s)", spec, e)
      continue
    names, ids = tuple(src.class_names), tuple(int(i)
                                               for i in src.category_ids)
    if len(names) >= num:
      return names[:num], ids[:num]
  return (tuple(f"class_{i}" for i in range(num)),
          tuple(range(1, num + 1)))


# --- workdirs. ---------------------------------------------------------------


def _abs(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def _manager(checkpoints: epath.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      _abs(str(checkpoints)), item_names=("state",),
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()})


def _restore_subtrees(manager, step: int, keys: Sequence[str]
                      ) -> Dict[str, Any]:
  """Only ``keys`` of the saved state, on one device (partial restore)."""
  tree = manager.item_metadata(step)["state"]
  tree = tree.tree if hasattr(tree, "tree") else tree
  missing = [k for k in keys if k not in tree]
  if missing:
    raise KeyError(f"checkpoint step {step} has no {missing} (has "
                   f"{sorted(tree)})")
  sub = {k: tree[k] for k in keys}
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), sub)
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=dev),
                              sub)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                   partial_restore=True)))
  return restored["state"]


def load_workdir(workdir: str, *, config=None, step: Optional[int] = None,
                 teacher: Optional[bool] = None) -> InferenceModel:
  """Params of a training run's checkpoint (latest, or ``step``).

  Args:
    workdir: the run's ``--workdir``.
    config: the run's config; default ``workdir/config.json``.
    step: checkpoint step (default: the latest).
    teacher: EMA teacher instead of the student; default
      ``config.eval.use_teacher`` (what the run's own evaluation used).
  """
  config = read_config(workdir) if config is None else config
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no checkpoints in this workdir")
  manager = _manager(directory)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"{directory}: no complete checkpoint")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f"{directory}: no step {step} (have "
                            f"{sorted(steps)})")
  teacher = config.eval.use_teacher if teacher is None else teacher
  keys = ("ema_params", "ema_batch_stats") if teacher else ("params",
                                                            "batch_stats")
  state = _restore_subtrees(manager, step, keys)
  names, ids = class_info(config)
  who = "teacher" if teacher else "student"
  return InferenceModel(config, state[keys[0]], state[keys[1]], int(step),
                        teacher, f"workdir {workdir} step {step} ({who})",
                        names, ids)


# --- exports. ----------------------------------------------------------------


def save_export(model: InferenceModel, out_dir: str) -> str:
  """Writes an inference-only export (see module docstring)."""
  out = epath.Path(_abs(out_dir))
  if (out / EXPORT_STATE).exists():
    raise FileExistsError(f"{out / EXPORT_STATE} exists; choose a new "
                          "--output")
  out.mkdir(parents=True, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out / EXPORT_STATE, {"params": model.params,
                                   "batch_stats": model.batch_stats})
  ckptr.wait_until_finished()
  (out / CONFIG_FILE).write_text(config_to_json(model.config))
  meta = {"version": EXPORT_VERSION, "step": model.step,
          "teacher": model.teacher, "origin": model.origin,
          "class_names": list(model.class_names or ()),
          "category_ids": list(model.category_ids or ())}
  (out / EXPORT_META).write_text(json.dumps(meta, indent=2))
  return str(out)


def is_export(path: str) -> bool:
  return (epath.Path(path) / EXPORT_META).exists()


def load_export(export_dir: str) -> InferenceModel:
  directory = epath.Path(_abs(export_dir))
  if not is_export(export_dir):
    raise FileNotFoundError(f"{directory}: not an export (no {EXPORT_META})")
  meta = json.loads((directory / EXPORT_META).read_text())
  config = config_from_json((directory / CONFIG_FILE).read_text())
  ckptr = ocp.StandardCheckpointer()
  tree = ckptr.metadata(directory / EXPORT_STATE)
  tree = tree.item_metadata if hasattr(tree, "item_metadata") else tree
  tree = tree.tree if hasattr(tree, "tree") else tree
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
      dict(tree))
  state = ckptr.restore(directory / EXPORT_STATE, abstract)
  names = tuple(meta.get("class_names") or ()) or None
  ids = tuple(meta.get("category_ids") or ()) or None
  if names is None:
    names, ids = class_info(config)
  return InferenceModel(config, state["params"], state.get("batch_stats", {}),
                        int(meta["step"]), bool(meta["teacher"]),
                        f"export {export_dir} ({meta.get('origin')})",
                        names, ids)


# --- converted weights. --------------------------------------------------


def _model_variables(config) -> Dict[str, Any]:
  model = models.build_model(config)
  # Any canvas gives the same variables: the first one.
  h, w = config_lib.canvases(config)[0]
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3), jnp.float32),
      train=False))


def load_weights(path: str, config: ml_collections.ConfigDict, *,
                 step: int = 0) -> InferenceModel:
  """A converted full-model ``.npz`` under ``config`` (+ its hints).

  Every parameter and BatchNorm statistic of the model must be in the file
  with its shape; a missing or mis-shaped one raises naming it.
  """
  hints = weights_lib.read_hints(path)
  if hints is not None:
    for line in weights_lib.apply_hints(config, hints):
      logging.info("%s hints: %s", path, line)
  config_lib.validate(config)
  arrays = safe_pickle.load_npz(path, "--weights")
  variables = _model_variables(config)
  out: Dict[str, Any] = {}
  problems: List[str] = []
  for col, tree in variables.items():
    flat = traverse_util.flatten_dict(dict(tree))
    got = {}
    for k, leaf in flat.items():
      name = "/".join(k) if col == "params" else "/".join((col,) + k)
      if name not in arrays:
        problems.append(f"missing {name}")
        continue
      if tuple(arrays[name].shape) != tuple(leaf.shape):
        problems.append(f"{name} has shape {arrays[name].shape}, the model "
                        f"expects {leaf.shape}")
        continue
      got[k] = np.asarray(arrays[name], leaf.dtype)
    out[col] = traverse_util.unflatten_dict(got) if got else {}
  if problems:
    raise weights_lib.ConversionError(
        f"--weights={path} does not fit the config's model ("
        f"{len(problems)} problem(s)): " + "; ".join(problems[:20]) +
        (" ..." if len(problems) > 20 else "") +
        ". A backbone-only file can initialise training (config.init) but "
        "not be evaluated.")
  names, ids = class_info(config)
  return InferenceModel(config, out["params"], out.get("batch_stats", {}),
                        step, False, f"weights {path}", names, ids)


def load(*, workdir: Optional[str] = None, export: Optional[str] = None,
         weights: Optional[str] = None, config=None, step: Optional[int] = None,
         teacher: Optional[bool] = None) -> InferenceModel:
  """One of the three sources, as the command-line tools name them."""
  given = [n for n, v in (("--workdir", workdir), ("--export", export),
                          ("--weights", weights)) if v]
  if len(given) != 1:
    raise ValueError("give exactly one of --workdir, --export, --weights "
                     f"(got {given or 'none'})")
  if workdir:
    return load_workdir(workdir, config=config, step=step, teacher=teacher)
  if export:
    if config is not None:
      logging.warning("--config is ignored with --export (the export holds "
                      "its config)")
    return load_export(export)
  if config is None:
    raise ValueError("--weights needs --config (the network to load into)")
  return load_weights(weights, config, step=step or 0)


# --- command-line flags shared by evaluate / predict / export. -------------


def define_source_flags(flags_module, config_flags_module, *,
                        with_weights: bool = True) -> Dict[str, Any]:
  """Defines --config --workdir [--export --weights] --step --teacher --set.

  Call only when a tool runs as ``__main__`` (absl flags are global).
  """
  f = flags_module
  holders = {
      "config": config_flags_module.DEFINE_config_file(
          "config", None, "Config file (needed with --weights; optional "
          "with --workdir, whose config.json is used otherwise).",
          lock_config=True),
      "workdir": f.DEFINE_string("workdir", None, "Training workdir."),
      "step": f.DEFINE_integer("step", None, "Checkpoint step (default: the "
                               "latest)."),
      "teacher": f.DEFINE_bool("teacher", None, "The EMA teacher (default: "
                               "the run's eval.use_teacher)."),
      "set": f.DEFINE_multi_string("set", [], "key=value config override, "
                                   "e.g. --set=eval.score_thresh=0.3."),
  }
  if with_weights:
    holders["export"] = f.DEFINE_string("export", None, "Export directory "
                                        "(python -m boxseg_jax.export).")
    holders["weights"] = f.DEFINE_string(
        "weights", None, "Converted full-model .npz (python -m "
        "boxseg_jax.convert); needs --config.")
  return holders


def load_from_flags(holders: Dict[str, Any]) -> InferenceModel:
  """``load`` with the values of ``define_source_flags`` holders."""
  def value(name):
    return holders[name].value if name in holders else None

  config = value("config")
  overrides = value("set") or []
  if overrides and config is not None:
    apply_overrides(config, overrides)
  model = load(workdir=value("workdir"), export=value("export"),
               weights=value("weights"), config=config, step=value("step"),
               teacher=value("teacher"))
  if overrides and config is None:
    apply_overrides(model.config, overrides)
  return model


class QuietOrbax(logging.Filter):
  """Drops Orbax's INFO chatter and read-only notices (keeps errors)."""

  def filter(self, record):
    return "orbax" not in (record.pathname or "") or (
        record.levelno >= logging.ERROR)


def quiet_orbax() -> None:
  for handler in logging.getLogger().handlers:
    handler.addFilter(QuietOrbax())
