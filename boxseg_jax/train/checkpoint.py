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
"""

import json
import logging
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from boxseg_jax.convert import safe_pickle


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
    """Restores (state, input position, step); latest step by default."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    path = self._input_path(step)
    if not path.exists():
      raise FileNotFoundError(
          f"{path}: input position of process {self.process} for checkpoint "
          f"step {step} is missing; cannot resume exactly")
    input_state = json.loads(path.read_text())
    return restored["state"], input_state, step

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
  a mismatch raises naming the parameter path.
  """
  params = dict(params)
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
      if tuple(have[k].shape) != tuple(v.shape):
        raise ValueError(f"{source}: {name} has shape {have[k].shape}, the "
                         f"model expects {v.shape}")
      out[k] = np.asarray(have[k]).astype(v.dtype)
    params[key] = traverse_util.unflatten_dict(out)
  return params
