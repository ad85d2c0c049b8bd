"""Small leaves of one kind computed together: one call of a rule for a stack of leaves.

On small leaves a transform costs per leaf, not per entry: the kernels it launches, and the
trace and compile time of its few dozen operations. Leaves of at most ``STACK_MAX_SIZE // 2``
entries that share shape, dtypes, layout, sharding and state structure are stacked along a new
leading layer axis and handed to the rule as one leaf whose layout has that axis in front. A
rule that reads a layout computes each layer of a stack on its own (never reduced, never
mixed), so each leaf gets the result it gets alone.

Only where JAX sees one device: on several, XLA chooses the shardings after tracing, and a stack
of leaves sharded differently would come out with one sharding for all of them.

A stack holds at most ``STACK_MAX_SIZE`` entries and ``STACK_MAX_LEAVES`` leaves: XLA's compile
time grows with the square of the number of slices taken from one array, and XLA:CPU hands
larger reductions to a library call that costs more than the fused loop at these sizes.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
from jax import lax

from optax_norms._layout import Layout

__all__ = [
  "STACK_MAX_LEAVES",
  "STACK_MAX_SIZE",
  "leaf_batches",
  "stacked",
  "stacked_layout",
  "unstacked",
]

STACK_MAX_SIZE = 1 << 10
STACK_MAX_LEAVES = 16


def _batch_key(u: jax.Array, w: Any, layout: Layout | None, state: Any) -> Hashable | None:
  """What the leaves of one stack share; ``None`` for a leaf computed alone."""
  if layout is None or 2 * u.size > STACK_MAX_SIZE:
    return None
  state_leaves, state_def = jax.tree.flatten(state)
  arrays = (u,) if w is None else (u, w)
  return layout, state_def, tuple((x.shape, x.dtype) for x in (*arrays, *state_leaves))


def leaf_batches(
  indices: list[int],
  us: list[Any],
  ws: list[Any],
  layouts: list[Any],
  states: list[Any] | None,
  *,
  stackable: bool,
) -> list[list[int]]:
  """`indices` (the leaves a rule transforms) split into the stacks computed together, in
  order of first appearance; a leaf computed alone is a stack of one. Only a rule that reads
  the layout (`stackable`) computes each layer on its own, so only its leaves are stacked."""
  if not stackable or jax.device_count() > 1:
    return [[i] for i in indices]
  groups: dict[Hashable, list[int]] = {}
  for i in indices:
    key = _batch_key(us[i], ws[i], layouts[i], None if states is None else states[i])
    groups.setdefault(("alone", i) if key is None else key, []).append(i)
  batches: list[list[int]] = []
  for members in groups.values():
    size = max(1, us[members[0]].size)
    n = max(1, min(STACK_MAX_LEAVES, STACK_MAX_SIZE // size))
    batches.extend(members[start : start + n] for start in range(0, len(members), n))
  return batches


def stacked(xs: list[Any]) -> Any:
  """The arrays (or same-structured trees) stacked along a new leading axis; one unchanged."""
  if len(xs) == 1:
    return xs[0]
  return jax.tree.map(lambda *ys: lax.concatenate([lax.expand_dims(y, (0,)) for y in ys], 0), *xs)


def stacked_layout(layout: Layout | None, n: int) -> Layout | None:
  """`layout` of a stack of `n` leaves: a new leading layer axis, the others shifted."""
  if layout is None or n == 1:
    return layout
  shift = lambda axes: tuple(a + 1 for a in axes)  # noqa: E731
  block = None if layout.block_axis is None else layout.block_axis + 1
  return Layout((0, *shift(layout.stack)), shift(layout.reduce), block)


def unstacked(x: Any, n: int) -> list[Any]:
  """The `n` leaves (or trees) of a stack; one unchanged."""
  if n == 1:
    return [x]
  return [jax.tree.map(lambda y, k=k: lax.index_in_dim(y, k, keepdims=False), x) for k in range(n)]
