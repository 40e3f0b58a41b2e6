"""Parameter counting helpers (work on arrays or `jax.eval_shape` structs)."""

from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import traverse_util


def count_params(tree: Any) -> int:
  """Total number of scalars in a pytree of arrays / ShapeDtypeStructs."""
  return int(sum(np.prod(x.shape, dtype=np.int64)
                 for x in jax.tree.leaves(tree)))


def count_by_module(tree: Mapping[str, Any], depth: int = 1,
                    mask: Optional[Mapping[str, Any]] = None) -> dict[str, int]:
  """Scalar counts grouped by the first `depth` path components.

  Args:
    tree: nested dict of arrays (e.g. `variables["params"]`).
    depth: how many path components name a group ("backbone" for 1,
      "backbone/res2_0" for 2).
    mask: optional tree of bools with the same structure; only leaves whose
      mask is True are counted (e.g. `condinst.trainable_mask(params)`).

  Returns:
    `{group: count}` in first-seen order.
  """
  flat = traverse_util.flatten_dict(tree)
  flat_mask = traverse_util.flatten_dict(mask) if mask is not None else None
  counts: dict[str, int] = {}
  for path, leaf in flat.items():
    if flat_mask is not None and not flat_mask[path]:
      continue
    key = "/".join(path[:depth])
    counts[key] = counts.get(key, 0) + int(np.prod(leaf.shape, dtype=np.int64))
  return counts


def format_table(rows: Mapping[str, Mapping[str, int]]) -> str:
  """Markdown table: one row per module, one column per count kind."""
  columns = list(next(iter(rows.values())).keys()) if rows else []
  lines = ["| module | " + " | ".join(columns) + " |",
           "| --- |" + " ---: |" * len(columns)]
  for name, row in rows.items():
    lines.append(f"| {name} | "
                 + " | ".join(f"{row.get(c, 0):,}" for c in columns) + " |")
  return "\n".join(lines)
