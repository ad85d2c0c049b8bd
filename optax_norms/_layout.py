"""One layout per leaf: how every transform, report and ``describe_rules`` reads a leaf's axes.

A :class:`Layout` names the **stack** axes (the leading layer axes of a scanned or vmapped
stack: never reduced, never mixed, each index its own set of units, its own matrix, its own
budget, its own blocks) and the **reduce** axes (the axes one unit spans, the Keras/TF
convention of ``axis``). Everything else is derived from those two and the shape:

- the units per layer: the product of the other (*kept*) axes;
- the spectral matrix of a layer: ``rows = reduce``, ``cols = kept``;
- the N:M block axis: ``block_axis`` (by default the input-feature axis by role, the one a
  GEMM contracts: the last reduced axis of a Flax ``(…, in, out)`` kernel, the first reduced
  axis of a torch ``(out, in, …)`` weight).

The one resolver that turns an ``axis=`` argument and a leaf into its layout is
``optax_norms._units.resolve_layout`` (it needs the role rules); this module holds the layout
itself and its checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from optax_norms._numerics import is_int
from optax_norms._paths import Path, format_path

__all__ = ["Axis", "Layout", "check_axis_spec", "checked_layout", "role_block_axis"]

Axis = None | int | Sequence[int] | Callable[[Path, Any], Any]


class Layout(NamedTuple):
  """How a leaf's axes are read: its stack axes, its reduced axes and its N:M block axis.

  ``unit_axes(...)`` returns layouts, and an ``axis=`` callable may return one (or a bare tuple
  of reduced axes). Axes are non-negative ints indexing the leaf's full shape.

  Attributes:
    stack: the leading layer axes of a stacked (scanned, vmapped) leaf; ``()`` if unstacked.
    reduce: the axes one unit spans (never a stack axis).
    block_axis: the axis N:M blocks run along (``None``: the input-feature axis by role,
      see ``resolve_layout``).

  Examples:
    >>> import optax_norms as on
    >>> layout = on.Layout(stack=(0,), reduce=(1,))
    >>> layout.units((4, 16, 64)), layout.matrix((4, 16, 64))
    (64, (16, 64))
  """

  stack: tuple[int, ...] = ()
  reduce: tuple[int, ...] = ()
  block_axis: int | None = None

  def kept(self, ndim: int) -> tuple[int, ...]:
    """The axes that are neither stacked nor reduced (a unit's index within a layer)."""
    return tuple(a for a in range(ndim) if a not in self.stack and a not in self.reduce)

  def layers(self, shape: Sequence[int]) -> int:
    """The number of layers (1 for an unstacked leaf)."""
    return math.prod(shape[a] for a in self.stack)

  def units(self, shape: Sequence[int]) -> int:
    """The number of units per layer."""
    return math.prod(shape[a] for a in self.kept(len(shape)))

  def matrix(self, shape: Sequence[int]) -> tuple[int, int]:
    """The ``(rows, cols)`` of one layer's spectral matrix: reduced axes by kept axes."""
    return math.prod(shape[a] for a in self.reduce), self.units(shape)


def check_axis_spec(axis: Any) -> None:
  """Raises unless `axis` is None, an int, a sequence of ints, a ``Layout`` or a callable.

  A traced axis (``optax.inject_hyperparams`` without ``static_args``) is reported when the
  layouts are resolved, with the fix.
  """
  if axis is None or callable(axis) or is_int(axis) or isinstance(axis, jax.core.Tracer):
    return
  if isinstance(axis, Layout):
    return
  if isinstance(axis, (tuple, list)) and all(is_int(a) for a in axis):
    return
  raise ValueError(
    "`axis` must be None, an int, a tuple of ints, an optax_norms.Layout or a callable "
    f"(path, leaf) -> axes, got {axis!r}"
    f"{' (an array: pass a tuple of ints)' if hasattr(axis, 'shape') else ''}."
  )


def _normalized(what: str, axes: Any, path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  ndim = len(shape)
  axes = (axes,) if not isinstance(axes, (tuple, list)) else tuple(axes)
  resolved = []
  for a in axes:
    if not is_int(a):
      raise ValueError(f"`{what}` must be ints, got {a!r} for {format_path(path)!r}.")
    a = int(a)
    if not -ndim <= a < ndim:
      raise ValueError(
        f"`{what}` {a} is out of range for the parameter {format_path(path)!r} of shape "
        f"{shape} (rank {ndim}). Pass a callable axis=(path, leaf) -> axes "
        "for trees whose leaves differ in layout."
      )
    resolved.append(a % ndim)
  if len(set(resolved)) != len(resolved):
    raise ValueError(f"`{what}` {axes} repeats an axis for {format_path(path)!r}.")
  return tuple(sorted(resolved))


def role_block_axis(shape: tuple[int, ...], layout: Layout, torch: bool) -> int | None:
  """The default N:M block axis: the input-feature axis by role (the one a GEMM contracts).

  The last reduced axis of a Flax ``(…, in, out)`` kernel (the input axis of Dense, Conv and
  attention ``(in, heads, dim)`` kernels, ``head_dim`` of an attention ``out`` kernel), the
  first reduced axis of a torch ``(out, in, …)`` weight; with nothing reduced, the last axis
  that is not stacked.
  """
  if layout.reduce:
    return layout.reduce[0] if torch else layout.reduce[-1]
  rest = [a for a in range(len(shape)) if a not in layout.stack]
  return rest[-1] if rest else None


def checked_layout(layout: Layout, path: Path, shape: tuple[int, ...], torch: bool) -> Layout:
  """`layout` with sorted non-negative axes and its block axis filled in; raises where its
  axes are out of range, repeated, or a stack axis is reduced or blocked."""
  stack = _normalized("stacked axes", layout.stack, path, shape)
  reduce = _normalized("axis", layout.reduce, path, shape)
  if set(stack) & set(reduce):
    raise ValueError(
      f"The layout of the parameter {format_path(path)!r} of shape {shape} reduces a stack "
      f"axis: stack {stack}, reduce {reduce}. A layer axis is never reduced."
    )
  block = layout.block_axis
  if block is not None:
    (block,) = _normalized("block_axis", block, path, shape)
    if block in stack:
      raise ValueError(
        f"`block_axis` {block} of the parameter {format_path(path)!r} of shape {shape} is a "
        "stack axis: N:M blocks run inside a layer."
      )
  checked = Layout(stack, reduce, None)
  if block is None:
    block = role_block_axis(shape, checked, torch)
  return checked._replace(block_axis=block)
