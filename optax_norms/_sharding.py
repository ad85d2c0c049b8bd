"""Explicit mesh axes (``jax.sharding.AxisType.Explicit``): what a traced value's type says
about its sharding, and resharding to it.

On explicit axes the sharding is part of the type and JAX refuses an operation whose output
sharding it cannot infer (a reshape splitting a sharded axis across devices, a cumulative
sum along a sharded axis, a loop carry whose sharding changes). These helpers are no-ops on
auto axes, without a mesh, and on a JAX without explicit sharding (the oldest supported,
0.5.1): there the type carries no sharding and nothing is resharded.
"""

from __future__ import annotations

import math
from typing import Any

import jax

__all__ = ["explicit_spec", "reshard", "reshard_to", "shard_count"]


def _sharding(x: Any) -> Any:
  typeof = getattr(jax, "typeof", None)
  if typeof is None:  # pragma: no cover - JAX before explicit sharding
    return None
  try:
    return getattr(typeof(x), "sharding", None)
  except Exception:  # pragma: no cover - an aval without a sharding on old JAX
    return None


def explicit_spec(x: Any) -> tuple[Any, ...] | None:
  """The partition spec of `x` (one entry per axis) when its type shards some axis over
  explicit mesh axes; ``None`` otherwise."""
  sharding = _sharding(x)
  spec = getattr(sharding, "spec", None)
  if spec is None or getattr(sharding, "mesh", None) is None:
    return None
  entries = tuple(spec) + (None,) * (len(x.shape) - len(tuple(spec)))
  return entries if any(e is not None for e in entries) else None


def shard_count(x: Any, entry: Any) -> int:
  """How many pieces the mesh axes of a spec `entry` of `x` cut an axis into."""
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  shape = _sharding(x).mesh.shape
  return math.prod(int(shape[name]) for name in names)


def reshard(x: Any, spec: tuple[Any, ...], mesh_of: Any = None) -> Any:
  """`x` resharded to the partition spec `spec` on the (explicit) mesh of `mesh_of`, by
  default its own."""
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = _sharding(x if mesh_of is None else mesh_of).mesh
  return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(*spec)))


def reshard_to(x: Any, like: Any) -> Any:
  """`x` resharded like `like` when `like` or `x` is sharded over explicit mesh axes."""
  target = explicit_spec(like)
  if target is None:
    return x if explicit_spec(x) is None else reshard(x, (None,) * len(x.shape))
  return reshard(x, target, mesh_of=like)
