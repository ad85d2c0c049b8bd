"""Units by role: which axes of a leaf are reduced, read from its path and shape.

A *unit* is the slice of a weight that feeds one output; per-unit transforms reduce the
other axes. The rank rule (all but the last axis) is right for Flax ``Dense`` and ``Conv``
kernels but not for attention kernels, embedding tables or stacked (scanned, vmapped)
layers. This module holds the role rules: ``unit_axes`` (an explicit ``axis=``) and
``default_axes`` (what ``axis=None`` means; it raises where a leaf's unit cannot be
known from its path and shape).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from optax_norms._masks import _as_globs, compile_glob
from optax_norms._paths import Path, format_path, shown_paths

__all__ = ["UnitAxes", "default_axes", "unit_axes"]

_ATTENTION_IN = frozenset({"query", "key", "value"})
_ATTENTION_OUT = "out"
_CONV = re.compile(r"conv", re.IGNORECASE)
_LINEN_DENSE = re.compile(r"^Dense(General)?_\d+$")
_LINEN_DENSE_2D = re.compile(r"^Dense_\d+$")
_WHOLE = frozenset({"bias", "scale"})
_LAYOUTS = ("flax", "torch")


def _names(path: Path) -> tuple[str | None, str | None]:
  """The leaf's name and its parent's name (``None`` where missing or an index)."""
  name = path[-1] if path and isinstance(path[-1], str) else None
  parent = path[-2] if len(path) >= 2 and isinstance(path[-2], str) else None
  return name, parent


def _rank_rule(ndim: int) -> tuple[int, ...]:
  return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))


def _all(ndim: int) -> tuple[int, ...]:
  return tuple(range(ndim))


def _ambiguous(
  path: Path,
  shape: tuple[int, ...],
  readings: list[tuple[str, tuple[int, ...]]],
  layout: str = "flax",
) -> ValueError:
  shown = "; ".join(f"{what}: axis={axes}" for what, axes in readings)
  glob = f"{path[0]}/**" if len(path) > 1 else format_path(path) or "**"
  first = "" if layout == "flax" else f"{layout!r}, "
  return ValueError(
    f"The unit of the parameter {format_path(path)!r} of shape {shape} is ambiguous with "
    f"the default axis=None: it could be {shown}. Pass axis=optax_norms.unit_axes("
    f"{first}stacked={glob!r}) if it is stacked, axis=optax_norms.unit_axes({first[:-2]}) "
    "if not (role rules by path; see its docstring), or an explicit axis (an int, a "
    "tuple, or a callable (path, leaf) -> axes)."
  )


def default_axes(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  """What ``axis=None`` reduces for a leaf of `shape` at `path`; raises where ambiguous.

  - An ``embedding`` table ``(vocab, dim)``: the last axis (one unit per token row).
  - A ``kernel`` of rank ≥ 3 under ``query``/``key``/``value`` (attention
    ``(in, heads, head_dim)``): axis 0; under ``out`` (``(heads, head_dim, out)``): ``(0, 1)``.
  - A ``kernel`` of rank ≥ 3 under a module whose name contains ``conv`` (any case), or of
    rank ≥ 4 under any other name but a Linen ``Dense_<n>``/``DenseGeneral_<n>``: a Conv
    kernel ``(…, in, out)``, all but the last axis.
  - Every other leaf of rank ≤ 2 and every leaf whose name is none of ``kernel``,
    ``embedding``, ``weight``: the rank rule (all but the last axis; rank ≤ 1: the whole leaf).
  - Raises ``ValueError`` for: a rank-3 ``kernel`` not under a ``conv`` name (a Conv1D
    ``(width, in, out)`` or a stacked Dense ``(layers, in, out)``), a stacked attention
    kernel (rank 4 under ``query``/``key``/``value``/``out``), a kernel of rank ≥ 3 under
    ``Dense_<n>`` (a Linen Dense kernel is 2-D, so it is stacked), an ``embedding`` of rank
    ≥ 3, and a ``weight`` of rank ≥ 3 (PyTorch/Equinox ``(out, in, …)``).
  """
  ndim = len(shape)
  name, parent = _names(path)
  if name == "embedding" and ndim >= 2:
    if ndim == 2:
      return (1,)
    raise _ambiguous(
      path,
      shape,
      [
        ("a stacked table (layers, vocab, dim)", tuple(range(2, ndim))),
        ("one unit per embedding dim across the vocabulary", _rank_rule(ndim)),
      ],
    )
  if name == "weight" and ndim >= 3:
    raise _ambiguous(
      path,
      shape,
      [
        ("a PyTorch/Equinox Conv weight (out, in, ...)", tuple(range(1, ndim))),
        ("a Flax-layout (..., in, out) weight", _rank_rule(ndim)),
        ("a stacked (layers, out, in, ...) weight", tuple(range(2, ndim))),
      ],
      layout="torch",
    )
  if name != "kernel" or ndim <= 2:
    return _rank_rule(ndim)
  if parent in _ATTENTION_IN or parent == _ATTENTION_OUT:
    role = (0,) if parent in _ATTENTION_IN else (0, 1)
    if ndim == 3:
      return role
    layout = "in, heads, head_dim" if parent in _ATTENTION_IN else "heads, head_dim, out"
    raise _ambiguous(
      path,
      shape,
      [
        (f"a stacked attention kernel (layers, {layout})", tuple(a + 1 for a in role)),
        ("a kernel with all but the last axis reduced", _rank_rule(ndim)),
      ],
    )
  if parent is not None and _CONV.search(parent):
    return _rank_rule(ndim)
  if ndim == 3:
    raise _ambiguous(
      path,
      shape,
      [
        ("a Conv1D kernel (width, in, out)", (0, 1)),
        ("a stacked Dense kernel (layers, in, out)", (1,)),
      ],
    )
  if parent is not None and _LINEN_DENSE.match(parent):
    raise _ambiguous(
      path,
      shape,
      [
        (
          "a stacked kernel (layers, ..., in, out), as a Linen Dense kernel is 2-D",
          tuple(range(1, ndim - 1)),
        ),
        ("a Conv kernel (..., in, out)", _rank_rule(ndim)),
      ],
    )
  return _rank_rule(ndim)


def _role_axes(layout: str, path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The role rules of `layout` for an unstacked leaf of `shape` at `path`."""
  ndim = len(shape)
  name, parent = _names(path)
  if name in _WHOLE:
    return _all(ndim)
  if name == "embedding":
    return (ndim - 1,) if ndim >= 1 else ()
  if layout == "torch":
    return tuple(range(1, ndim)) if ndim >= 2 else _all(ndim)
  if name == "kernel" and ndim == 3 and parent in _ATTENTION_IN:
    return (0,)
  if name == "kernel" and ndim >= 3 and parent is not None and _LINEN_DENSE_2D.match(parent):
    raise ValueError(
      f"The parameter {format_path(path)!r} of shape {shape} is a Linen Dense kernel of "
      f"rank {ndim}: a Dense kernel is 2-D, so this one is stacked (nn.scan, nn.vmap). "
      "Add a glob that matches it to unit_axes(stacked=...)."
    )
  return _rank_rule(ndim)


def _is_step_count(args: tuple[Any, ...]) -> bool:
  if len(args) != 1:
    return False
  value = args[0]
  dtype = getattr(value, "dtype", None)
  return isinstance(value, (int, np.integer)) or (
    dtype is not None and np.ndim(value) == 0 and np.issubdtype(dtype, np.integer)
  )


class UnitAxes:
  """An ``axis=`` callable ``(path, leaf) -> reduced axes`` built by ``unit_axes``.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> axes = optax_norms.unit_axes(stacked="blocks/**")
    >>> axes(("blocks", "mlp", "kernel"), jnp.ones((3, 4, 8)))
    (1,)
  """

  def __init__(self, layout: str, stacked: tuple[str, ...]):
    self.layout = layout
    self.stacked = stacked
    self._stacked = [compile_glob(g) for g in stacked]

  def __repr__(self) -> str:
    return f"unit_axes({self.layout!r}, stacked={list(self.stacked)!r})"

  def is_stacked(self, path: Path) -> bool:
    """Whether the leaf at `path` carries a leading layer axis (matches a `stacked` glob)."""
    text = format_path(path)
    return any(g.fullmatch(text) for g in self._stacked)

  def check(self, paths: Iterable[Path]) -> None:
    """Raises ValueError if a `stacked` glob matches none of `paths`."""
    texts = [format_path(p) for p in paths]
    for glob, regex in zip(self.stacked, self._stacked):
      if not any(regex.fullmatch(t) for t in texts):
        raise ValueError(
          f"The stacked glob {glob!r} of {self!r} matches no parameter. The parameter "
          f"paths are: {shown_paths(texts)}."
        )

  def __call__(self, *args: Any) -> tuple[int, ...]:
    if _is_step_count(args):
      raise ValueError(
        "optax_norms.unit_axes(...) was called with a step count, as a schedule: inside "
        "optax.inject_hyperparams pass static_args=('axis',) (and 'mask' for a callable "
        "mask)."
      )
    if len(args) != 2:
      raise TypeError(f"{self!r} takes (path, leaf), got {len(args)} arguments.")
    path, leaf = args
    path = tuple(path)
    shape = tuple(np.shape(leaf))
    if self.is_stacked(path):
      if not shape:
        raise ValueError(
          f"The parameter {format_path(path)!r} matches a stacked glob of {self!r} but is a "
          "scalar: it has no leading layer axis."
        )
      return tuple(a + 1 for a in _role_axes(self.layout, path, shape[1:]))
    return _role_axes(self.layout, path, shape)


def unit_axes(layout: str = "flax", *, stacked: str | Iterable[str] | None = None) -> UnitAxes:
  """An ``axis=`` for per-unit transforms that knows units by the leaf's role.

  The callable receives ``(path, leaf)``: `path` is a tuple of ``str | int`` (dict keys,
  attribute names, list indices; NNX's trailing ``'value'`` is dropped, so the path is
  the same at ``init`` and ``update`` inside ``nnx.Optimizer``), and returns the reduced axes.

  ``"flax"`` (Linen and NNX):

  - ``kernel`` (Dense ``(in, out)``, Conv ``(…, in, out)``): all but the last axis;
  - attention ``query``/``key``/``value`` kernels ``(in, heads, head_dim)``: axis 0 (a unit
    is one ``(head, dim)`` output); the ``out`` kernel ``(heads, head_dim, out)``: ``(0, 1)``;
  - ``embedding`` ``(vocab, dim)``: the last axis (a unit is one token's row);
  - ``bias`` and ``scale``: the whole leaf; other names: all but the last axis (rank ≤ 1:
    the whole leaf).

  ``"torch"`` (Equinox, PyTorch-style trees): ``weight`` ``(out, in, …)``: all but axis 0
  (an embedding ``weight`` ``(vocab, dim)`` is then one unit per row, as it should be);
  ``bias``: the whole leaf; other leaves of rank ≥ 2: all but axis 0.

  Args:
    layout: ``"flax"`` or ``"torch"``.
    stacked: glob(s) over ``/``-joined paths of leaves that carry one leading layer axis
      (``nn.scan``, ``nnx.vmap``/``nnx.scan``, ``eqx.filter_vmap`` stacks). That axis is never
      reduced; the role rules apply to the rest of the shape, so each statistic or
      constraint is per layer.

  Returns:
    A ``UnitAxes``, a callable ``(path, leaf) -> axes``. Under
    ``optax.inject_hyperparams`` pass it as ``static_args=('axis',)``; called as a schedule
    (with a step count), it raises ``ValueError`` saying so.

  Examples:
    >>> import jax.numpy as jnp, optax_norms as on
    >>> axis = on.unit_axes(stacked="blocks/**")
    >>> axis(("blocks", "attn", "query", "kernel"), jnp.ones((4, 16, 2, 8)))
    (1,)
    >>> axis(("blocks", "mlp", "kernel"), jnp.ones((4, 16, 64)))
    (1,)
    >>> axis(("embed", "embedding"), jnp.ones((100, 16)))
    (1,)
    >>> on.unit_axes("torch")(("conv", "weight"), jnp.ones((8, 3, 5, 5)))
    (1, 2, 3)
  """
  if layout not in _LAYOUTS:
    raise ValueError(f"`layout` must be one of {list(_LAYOUTS)}, got {layout!r}.")
  return UnitAxes(layout, _as_globs("stacked", () if stacked is None else stacked))
