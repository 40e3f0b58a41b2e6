"""Checkpoints: Orbax ``CheckpointManager`` plus the input position.

Layout under ``workdir``::

  checkpoints/<step>/state/...        Orbax (async, atomic: a step directory
                                      appears only when complete)
  checkpoints/input/<step>.p<i>.json  grain iterator position of process i

Orbax writes the train state (a pytree of global arrays) with all processes
cooperating. Every process has its own input iterator, so each writes its
own small JSON (atomic rename) next to it; files of steps Orbax no longer
keeps are deleted.

Resume order (``restore_or_init`` in the loop): the latest complete
checkpoint in ``workdir`` -> ``config.init`` (partial: the listed top-level
parameter subtrees, e.g. the backbone) -> scratch.

A step that does not restore (truncated or deleted files, a missing input
position) is skipped with a warning naming it and why, and moved aside to
``checkpoints/<step>.corrupt`` once an older step restored (Orbax would
otherwise refuse to save any step up to it again); when no step restores,
``CheckpointError`` names the directory and each step's reason. A
checkpoint of another model shape (e.g. ``model.fpn_channels`` changed)
raises ``CheckpointError`` naming the first differing parameter.
"""

import json
import logging
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from boxseg_jax.convert import safe_pickle
from boxseg_jax.train import init_params


class CheckpointError(RuntimeError):
  """A workdir checkpoint that cannot be resumed (the message says why)."""


class Checkpointer:
  """Saves/restores (TrainState, input position) under ``workdir``."""

  def __init__(self, workdir: str, *, every_steps: int, max_to_keep: int,
               async_save: bool = True):
    self.directory = _abs(epath.Path(workdir) / "checkpoints")
    self.input_dir = self.directory / "input"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=every_steps,
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state",))
    self.process = jax.process_index()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self.manager.all_steps()

  def _input_path(self, step: int) -> epath.Path:
    return self.input_dir / f"{int(step)}.p{self.process}.json"

  def due(self, step: int) -> bool:
    """Whether the save interval asks for a checkpoint at ``step``."""
    return bool(self.manager.should_save(step))

  def save(self, step: int, state: Any, input_state: Dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves if ``step`` is due (or ``force``); returns whether it saved."""
    if not (force or self.manager.should_save(step)):
      return False
    if step in self.manager.all_steps():
      return False  # already saved (e.g. the interval hit the last step)
    self.input_dir.mkdir(parents=True, exist_ok=True)
    path = self._input_path(step)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(input_state))
    tmp.replace(path)
    saved = self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
        force=force)
    self._prune_input_files()
    return saved

  def _prune_input_files(self) -> None:
    keep = set(self.manager.all_steps())
    newest = max(keep | {-1})
    for path in self.input_dir.glob(f"*.p{self.process}.json"):
      m = re.match(r"(\d+)\.p\d+\.json$", path.name)
      # Steps newer than the newest listed may still be saving (async).
      if m and int(m.group(1)) not in keep and int(m.group(1)) < newest:
        path.unlink()

  def restore(self, abstract_state: Any, step: Optional[int] = None
              ) -> Tuple[Any, Dict[str, Any], int]:
    """Restores (state, input position, step) of the newest intact step.

    Args:
      abstract_state: the state's shapes/dtypes (and shardings).
      step: restore exactly this step (no fallback); default: the newest
        step that restores, skipping (and setting aside) broken ones.

    Raises:
      CheckpointError: the checkpoint holds another model (first differing
        parameter named), or no step restores (each step's reason named).
    """
    steps = ([step] if step is not None else
             sorted(self.manager.all_steps(), reverse=True))
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    broken = []
    for s in steps:
      try:
        self._check_model_shapes(s, abstract_state)
        input_state = self._read_input_position(s)
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = _first_line(e)
        logging.warning("Checkpoint step %d (%s) does not restore, trying "
                        "an older one: %s", s, self.directory / str(s),
                        reason)
        broken.append((s, reason))
        continue
      if broken:
        self._set_aside([b for b, _ in broken])
        logging.warning(
            "Resumed from step %d, the newest intact checkpoint; skipped "
            "%s.", s, "; ".join(f"step {b} ({r})" for b, r in broken))
      return restored["state"], input_state, s
    raise CheckpointError(
        f"{self.directory}: no checkpoint step restores ("
        + "; ".join(f"step {b}: {r}" for b, r in broken) +
        "). Move this directory away to train from scratch, or pass "
        "another --workdir.")

  def _read_input_position(self, step: int) -> Dict[str, Any]:
    """This process' input position; every process' file must be there."""
    for p in range(jax.process_count()):
      path = self.input_dir / f"{int(step)}.p{p}.json"
      if not path.exists():
        raise FileNotFoundError(
            f"input position {path} is missing (cannot resume exactly)")
    path = self._input_path(step)
    try:
      return json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"input position {path} is not valid JSON ({e})"
                       ) from e

  def _check_model_shapes(self, step: int, abstract_state: Any) -> None:
    """CheckpointError naming the first parameter that differs in shape."""
    path = self.directory / str(int(step)) / "state"
    metadata = ocp.StandardCheckpointHandler().metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    stored = _shapes(tree["params"])
    wanted = _shapes(abstract_state.params)
    if stored == wanted:
      return
    for name in sorted(set(stored) | set(wanted)):
      have, want = stored.get(name), wanted.get(name)
      if have == want:
        continue
      if have is None:
        what = "is not in the checkpoint"
      elif want is None:
        what = "is in the checkpoint but not in the model of this config"
      else:
        what = (f"has shape {have} in the checkpoint, the model of this "
                f"config has {want}")
      raise CheckpointError(
          f"{path}: written by another model: params/{name} {what}. The "
          "workdir was trained with another model config (e.g. "
          "model.fpn_channels, depth or num_classes). Resume with that "
          "config, or start a new --workdir; to reuse the parameters that "
          f"still fit, pass --config.init={path.parent.parent.parent} with "
          "--config.init_keys naming them (e.g. backbone).")

  def _set_aside(self, steps: Sequence[int]) -> None:
    """Renames broken step directories to ``<step>.corrupt``."""
    if self.process == 0:
      for s in steps:
        src = self.directory / str(int(s))
        dst = self.directory / f"{int(s)}.corrupt"
        n = 1
        while dst.exists():
          n += 1
          dst = self.directory / f"{int(s)}.corrupt{n}"
        src.rename(dst)
        logging.warning("Moved the broken checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint_set_aside")
    self.manager.reload()

  def reached_preemption(self, step: int) -> bool:
    try:
      return bool(self.manager.reached_preemption(step))
    except Exception:  # pylint: disable=broad-except
      return False  # no distributed preemption service (single process)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(e: BaseException, limit: int = 240) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit] + "..."


def _shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
  """``{"a/b/kernel": shape}`` of a parameter tree (arrays or metadata)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(
        k, "idx", k)))) for k in path)
    out[name] = tuple(int(d) for d in leaf.shape)
  return out


def _abs(path: epath.Path) -> epath.Path:
  """Absolute local paths (Orbax requires them); URLs are kept as they are."""
  return path if "://" in str(path) else epath.Path(os.path.abspath(path))


def load_params_for_init(path: str) -> Dict[str, Any]:
  """Parameters of an init source: an Orbax checkpoint dir or an .npz.

  ``path`` may be a workdir, its ``checkpoints`` directory, or a converted
  ``.npz`` whose keys are ``/``-joined parameter paths (``convert/``).
  """
  if path.endswith(".npz"):
    arrays = safe_pickle.load_npz(path, "config.init")
    flat = {tuple(k.split("/")): v for k, v in arrays.items()}
    return traverse_util.unflatten_dict(flat)
  directory = epath.Path(path)
  if (directory / "checkpoints").is_dir():
    directory = directory / "checkpoints"
  manager = ocp.CheckpointManager(
      _abs(directory), item_names=("state",),
      options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"config.init: no checkpoint in {directory}")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  state = restored["state"]
  params = state["params"] if isinstance(state, dict) else state.params
  logging.info("config.init: read step %d of %s", step, directory)
  return params


def merge_init_params(params: Any, loaded: Dict[str, Any],
                      keys: Sequence[str], source: str) -> Any:
  """Replaces the ``keys`` subtrees of ``params`` by ``loaded``'s.

  Every leaf of those subtrees must exist in ``loaded`` with the same shape;
  a mismatch raises naming the parameter path, except for the
  class-dependent head leaves (``init_params.CLASS_DEPENDENT_LEAVES``), which
  keep their fresh initialisation (fine-tuning on another number of
  classes) and are logged by name.
  """
  params = dict(params)
  reinit = []
  for key in keys:
    if key not in params:
      raise KeyError(f"config.init_keys: {key!r} is not a parameter subtree "
                     f"(have {sorted(params)})")
    if key not in loaded:
      raise KeyError(f"{source}: has no {key!r} parameters")
    want = traverse_util.flatten_dict(params[key])
    have = traverse_util.flatten_dict(loaded[key])
    out = {}
    for k, v in want.items():
      name = "/".join((key,) + k)
      if k not in have:
        raise KeyError(f"{source}: missing parameter {name}")
      if (tuple(have[k].shape) != tuple(v.shape) and
          init_params.is_class_dependent(name)):
        reinit.append(f"{name} {tuple(have[k].shape)} -> {tuple(v.shape)}")
        out[k] = v
        continue
      if tuple(have[k].shape) != tuple(v.shape):
        raise ValueError(f"{source}: {name} has shape {have[k].shape}, the "
                         f"model expects {v.shape}")
      out[k] = np.asarray(have[k]).astype(v.dtype)
    params[key] = traverse_util.unflatten_dict(out)
  if reinit:
    logging.warning("config.init=%s: %d class-dependent parameter(s) have "
                    "another shape and keep their fresh initialisation: %s",
                    source, len(reinit), "; ".join(reinit))
  return params
