"""Layouts by role: a leaf's stack, reduced and block axes, read from its path and shape.

A *unit* is the slice of a weight that feeds one output; per-unit transforms reduce the
other axes. The rank rule (all but the last axis) is right for Flax ``Dense`` and ``Conv``
kernels but not for attention kernels, embedding tables, torch ``(out, in)`` weights or
stacked (scanned, vmapped) layers. This module holds the role rules and the one resolver:
``unit_axes`` (an explicit ``axis=``), ``default_layout`` (what ``axis=None`` means; it
raises where a leaf's layout cannot be known from its path and shape) and
``resolve_layout``, which every transform, report and ``describe_rules`` reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from optax_norms._layout import Axis, Layout, check_axis_spec, checked_layout, role_block_axis
from optax_norms._masks import as_globs, compile_glob
from optax_norms._messages import static_args_hint
from optax_norms._paths import Path, format_path, shown_paths

__all__ = [
  "AmbiguousLayoutError",
  "UnitAxes",
  "default_axes",
  "default_layout",
  "is_torch_name",
  "resolve_axes",
  "resolve_layout",
  "unit_axes",
]

_ATTENTION_IN = frozenset({"query", "key", "value"})
_ATTENTION_OUT = "out"
_CONV = re.compile(r"conv", re.IGNORECASE)
_LINEN_DENSE = re.compile(r"^Dense(General)?_\d+$")
_LINEN_DENSE_2D = re.compile(r"^Dense_\d+$")
_WHOLE = frozenset({"bias", "scale"})
_LORA = frozenset({"lora_a", "lora_b"})
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


class AmbiguousLayoutError(ValueError):
  """A leaf whose layout the role rules cannot read: the message lists each reading with the
  ``axis=`` that selects it.

  Attributes:
    readings: ``[(description, fix, layout)]``: what the leaf could be, the ``axis=`` (as
      source text) that reads it so, and the layout that gives.

  Examples:
    >>> import jax.numpy as jnp, optax_norms as on
    >>> try:
    ...   on.constrain_row_norm(1.0).init({"blocks": {"kernel": jnp.ones((3, 4, 8))}})
    ... except on.AmbiguousLayoutError as error:
    ...   print([fix for _, fix, _ in error.readings])
    ['(0, 1)', "optax_norms.unit_axes(stacked='blocks/**')", '(0,)']
  """

  def __init__(self, message: str, readings: list[tuple[str, str, Layout]]):
    super().__init__(message)
    self.readings = readings


def _stacked_glob(path: Path) -> str:
  return f"{path[0]}/**" if len(path) > 1 else format_path(path) or "**"


def _ambiguous(
  path: Path,
  shape: tuple[int, ...],
  readings: list[tuple[str, str, Layout]],
  why: str = "",
) -> AmbiguousLayoutError:
  shown = "; ".join(
    f"{what} (stack {layout.stack}, reduce {layout.reduce}): axis={fix}"
    for what, fix, layout in readings
  )
  return AmbiguousLayoutError(
    f"The layout of the parameter {format_path(path)!r} of shape {shape} is ambiguous"
    f"{why}: it could be {shown}. Pass the axis= of the right reading (in a regularize "
    "table, as the rule's 'axis'; for one leaf among others, a rule of its own or a "
    "callable (path, leaf) -> axes), or an explicit axis (an int, a tuple, or a callable).",
    readings,
  )


def _stacked(what: str, path: Path, shape: tuple[int, ...], rest: tuple[int, ...], torch=False):
  """The reading "a stacked `what`": layer axis 0, the role's axes `rest` shifted by one."""
  layout = "'torch', " if torch else ""
  fix = f"optax_norms.unit_axes({layout}stacked={_stacked_glob(path)!r})"
  return (f"a stacked {what}", fix, Layout((0,), tuple(a + 1 for a in rest)))


def _plain(what: str, axes: tuple[int, ...]) -> tuple[str, str, Layout]:
  return (what, repr(axes), Layout((), axes))


def _stack_evidence(path: Path, shapes: Mapping[Path, tuple[int, ...]] | None) -> bool:
  """Whether a sibling ``bias`` carries a layer axis (rank >= 2): the module is stacked."""
  if shapes is None or not path:
    return False
  bias = shapes.get((*path[:-1], "bias"))
  return bias is not None and len(bias) >= 2


def is_torch_name(path: Path) -> bool:
  """A leaf named by the torch/Equinox convention (``weight``: ``(out, in, …)``)."""
  return _names(path)[0] == "weight"


def _with_block(layout: Layout, shape: tuple[int, ...], torch: bool) -> Layout:
  return layout._replace(block_axis=role_block_axis(shape, layout, torch))


def default_layout(
  path: Path, shape: tuple[int, ...], shapes: Mapping[Path, tuple[int, ...]] | None = None
) -> Layout:
  """What ``axis=None`` reads for a leaf of `shape` at `path`; raises where ambiguous.

  No stack axes; the reduced axes by role:

  - an ``embedding`` table ``(vocab, dim)``: the last axis (one unit per token row);
  - a ``weight`` (torch/Equinox ``(out, in)``): axis 1 (one unit per output row; rank 1:
    the whole leaf);
  - a ``bias`` or ``scale``: the whole leaf (rank ≤ 1, or an attention ``(heads, dim)``
    bias);
  - a ``kernel`` of rank ≥ 3 under ``query``/``key``/``value`` (attention
    ``(in, heads, head_dim)``): axis 0; under ``out`` (``(heads, head_dim, out)``): ``(0, 1)``;
  - a ``kernel`` of rank 3 under a module whose name contains ``conv`` (any case), or of
    rank ≥ 4 under any name but a Linen ``Dense_<n>``/``DenseGeneral_<n>``: a Conv kernel
    ``(…, in, out)``, all but the last axis;
  - every other leaf of rank ≤ 2, and leaves of other names: all but the last axis (rank ≤ 1:
    the whole leaf).

  Raises ``AmbiguousLayoutError`` (a ``ValueError`` listing each reading and its fix) for a
  rank-3 ``kernel`` not under a ``conv`` name (a Conv1D ``(width, in, out)``, a stacked Dense
  ``(layers, in, out)`` or a ``DenseGeneral`` with two output axes ``(in, heads, dim)``), a
  stacked attention kernel, a kernel of rank ≥ 3 under ``Dense_<n>``/``DenseGeneral_<n>``, a
  Conv kernel of rank ≥ 4 whose sibling ``bias`` has a layer axis (a stacked Conv), an
  ``embedding`` of rank ≥ 3, a ``weight`` of rank ≥ 3, a ``bias``/``scale`` of rank ≥ 2
  outside attention (a stacked bias), and a LoRA factor (``lora_a``/``lora_b``) of rank ≥ 3.
  """
  ndim = len(shape)
  name, parent = _names(path)
  if name == "embedding" and ndim >= 2:
    if ndim == 2:
      return _with_block(Layout((), (1,)), shape, torch=False)
    raise _ambiguous(
      path,
      shape,
      [
        _stacked("table (layers, vocab, dim)", path, shape, tuple(range(1, ndim - 1))),
        _plain("one unit per embedding dim across the vocabulary", _rank_rule(ndim)),
      ],
    )
  if name == "weight" and ndim >= 2:
    if ndim == 2:
      return _with_block(Layout((), (1,)), shape, torch=True)
    raise _ambiguous(
      path,
      shape,
      [
        (
          "a PyTorch/Equinox Conv weight (out, in, ...)",
          "optax_norms.unit_axes('torch')",
          Layout((), tuple(range(1, ndim))),
        ),
        _plain("a Flax-layout (..., in, out) weight", _rank_rule(ndim)),
        _stacked("(layers, out, in, ...) weight", path, shape, tuple(range(1, ndim - 1)), True),
      ],
    )
  if name in _WHOLE and ndim >= 2:
    if parent in _ATTENTION_IN and ndim == 2:
      return _with_block(Layout((), _all(ndim)), shape, torch=False)
    raise _ambiguous(
      path,
      shape,
      [
        _stacked(f"{name} (layers, ...)", path, shape, tuple(range(ndim - 1))),
        _plain(f"one {name} of shape {shape} (one unit)", _all(ndim)),
      ],
    )
  if name in _LORA and ndim >= 3:
    raise _ambiguous(
      path,
      shape,
      [
        _stacked("LoRA factor (layers, ...)", path, shape, tuple(range(ndim - 2))),
        _plain("a factor with all but the last axis reduced", _rank_rule(ndim)),
      ],
    )
  if name != "kernel" or ndim <= 2:
    return _with_block(Layout((), _rank_rule(ndim)), shape, torch=False)
  if parent in _ATTENTION_IN or parent == _ATTENTION_OUT:
    role = (0,) if parent in _ATTENTION_IN else (0, 1)
    if ndim == 3:
      return _with_block(Layout((), role), shape, torch=False)
    layout = "in, heads, head_dim" if parent in _ATTENTION_IN else "heads, head_dim, out"
    raise _ambiguous(
      path,
      shape,
      [
        _stacked(f"attention kernel (layers, {layout})", path, shape, role),
        _plain("a kernel with all but the last axis reduced", _rank_rule(ndim)),
      ],
    )
  is_conv = parent is not None and _CONV.search(parent) is not None
  if ndim >= 4 and not (parent is not None and _LINEN_DENSE.match(parent)):
    if _stack_evidence(path, shapes):
      raise _ambiguous(
        path,
        shape,
        [
          _stacked("Conv kernel (layers, ..., in, out)", path, shape, _rank_rule(ndim - 1)),
          _plain("a Conv kernel (..., in, out)", _rank_rule(ndim)),
        ],
        why=" (its bias has a layer axis, so the module looks stacked)",
      )
    return _with_block(Layout((), _rank_rule(ndim)), shape, torch=False)
  if ndim == 3 and is_conv:
    return _with_block(Layout((), _rank_rule(ndim)), shape, torch=False)
  if ndim == 3:
    raise _ambiguous(
      path,
      shape,
      [
        _plain("a Conv1D kernel (width, in, out)", (0, 1)),
        _stacked("Dense kernel (layers, in, out)", path, shape, (0,)),
        _plain("a DenseGeneral kernel with two output axes (in, heads, dim)", (0,)),
      ],
    )
  raise _ambiguous(
    path,
    shape,
    [
      _stacked(
        "kernel (layers, ..., in, out), as a Linen Dense kernel is 2-D",
        path,
        shape,
        tuple(range(ndim - 2)),
      ),
      _plain("a DenseGeneral kernel with several output axes (in, ...)", (0,)),
      _plain("a DenseGeneral kernel with several input axes (..., in, out)", _rank_rule(ndim)),
    ],
  )


def default_axes(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The reduced axes of ``default_layout`` (what ``axis=None`` reduces)."""
  return default_layout(path, shape).reduce


def _role_layout(
  layout: str,
  path: Path,
  shape: tuple[int, ...],
  stacked: bool,
  shapes: Mapping[Path, tuple[int, ...]] | None,
) -> Layout:
  """The role rules of ``unit_axes(layout)`` for a leaf of `shape` at `path` (with a leading
  layer axis when `stacked`)."""
  offset = 1 if stacked else 0
  rest = shape[offset:]
  ndim = len(rest)
  name, parent = _names(path)
  torch = layout == "torch" or name == "weight"

  def done(axes: tuple[int, ...]) -> Layout:
    out = Layout(tuple(range(offset)), tuple(a + offset for a in axes))
    return _with_block(out, shape, torch)

  if name in _WHOLE:
    return done(_all(ndim))
  if name == "embedding":
    return done((ndim - 1,) if ndim >= 1 else ())
  if torch:
    if name == "weight" and ndim >= 3 and layout != "torch":
      raise _ambiguous(
        path,
        shape,
        [
          (
            "a PyTorch/Equinox weight (out, in, ...)",
            "optax_norms.unit_axes('torch')",
            Layout(tuple(range(offset)), tuple(range(offset + 1, offset + ndim))),
          ),
          _plain(
            "a Flax-layout (..., in, out) weight", tuple(a + offset for a in _rank_rule(ndim))
          ),
        ],
        why=" under unit_axes('flax'): `weight` is the torch/Equinox name",
      )
    return done(tuple(range(1, ndim)) if ndim >= 2 else _all(ndim))
  if name == "kernel" and ndim == 3 and parent in _ATTENTION_IN:
    return done((0,))
  if name == "kernel" and ndim >= 3 and parent is not None and _LINEN_DENSE_2D.match(parent):
    raise ValueError(
      f"The parameter {format_path(path)!r} of shape {shape} is a Linen Dense kernel of "
      f"rank {ndim}: a Dense kernel is 2-D, so this one is stacked (nn.scan, nn.vmap). "
      "Add a glob that matches it to unit_axes(stacked=...)."
    )
  if name == "kernel" and ndim >= 3:
    is_conv = parent is not None and _CONV.search(parent) is not None
    general = parent is not None and _LINEN_DENSE.match(parent)
    if general or (ndim == 3 and not is_conv and parent != _ATTENTION_OUT):
      stacked_reading = (
        []
        if stacked
        else [_stacked("Dense kernel (layers, in, out)", path, shape, tuple(range(ndim - 2)))]
      )
      raise _ambiguous(
        path,
        shape,
        [
          _plain("a DenseGeneral kernel with several output axes (in, ...)", (offset,)),
          _plain(
            "a kernel with several input axes, or a Conv1D (..., in, out)",
            tuple(a + offset for a in _rank_rule(ndim)),
          ),
          *stacked_reading,
        ],
        why=" under unit_axes",
      )
    if not stacked and ndim >= 4 and _stack_evidence(path, shapes):
      raise ValueError(
        f"The parameter {format_path(path)!r} of shape {shape} is read as a Conv kernel by "
        "unit_axes, but the bias beside it has a layer axis: the module is stacked. Add a "
        "glob that matches it to unit_axes(stacked=...)."
      )
  if name in _LORA and ndim >= 3 and not stacked:
    raise _ambiguous(
      path,
      shape,
      [
        _stacked("LoRA factor (layers, ...)", path, shape, tuple(range(ndim - 2))),
        _plain("a factor with all but the last axis reduced", _rank_rule(ndim)),
      ],
      why=" under unit_axes",
    )
  return done(_rank_rule(ndim))


def _is_step_count(args: tuple[Any, ...]) -> bool:
  if len(args) != 1:
    return False
  value = args[0]
  dtype = getattr(value, "dtype", None)
  return isinstance(value, (int, np.integer)) or (
    dtype is not None and np.ndim(value) == 0 and np.issubdtype(dtype, np.integer)
  )


class UnitAxes:
  """An ``axis=`` callable ``(path, leaf) -> Layout`` built by ``unit_axes``.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> axes = optax_norms.unit_axes(stacked="blocks/**")
    >>> axes(("blocks", "mlp", "kernel"), jnp.ones((3, 4, 8)))
    Layout(stack=(0,), reduce=(1,), block_axis=1)
  """

  def __init__(self, layout: str, stacked: tuple[str, ...]):
    self.layout_name = layout
    self.stacked = stacked
    self._stacked = [compile_glob(g) for g in stacked]

  def __repr__(self) -> str:
    return f"unit_axes({self.layout_name!r}, stacked={list(self.stacked)!r})"

  def __eq__(self, other: object) -> bool:
    return isinstance(other, UnitAxes) and (self.layout_name, self.stacked) == (
      other.layout_name,
      other.stacked,
    )

  def __hash__(self) -> int:
    return hash((UnitAxes, self.layout_name, self.stacked))

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

  def layout(
    self,
    path: Path,
    shape: tuple[int, ...],
    shapes: Mapping[Path, tuple[int, ...]] | None = None,
  ) -> Layout:
    """The layout of a leaf of `shape` at `path` (`shapes`: every leaf's, for its siblings)."""
    path = tuple(path)
    stacked = self.is_stacked(path)
    if stacked and not shape:
      raise ValueError(
        f"The parameter {format_path(path)!r} matches a stacked glob of {self!r} but is a "
        "scalar: it has no leading layer axis."
      )
    return _role_layout(self.layout_name, path, shape, stacked, shapes)

  def __call__(self, *args: Any) -> Layout:
    if _is_step_count(args):
      raise ValueError(
        "optax_norms.unit_axes(...) was called with a step count, as a schedule. "
        + static_args_hint("axis")
      )
    if len(args) != 2:
      raise TypeError(f"{self!r} takes (path, leaf), got {len(args)} arguments.")
    path, leaf = args
    return self.layout(tuple(path), tuple(np.shape(leaf)))


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
    A ``UnitAxes``, a callable ``(path, leaf) -> Layout`` (stack axes, reduced axes, N:M
    block axis). Under
    ``optax.inject_hyperparams`` pass it as ``static_args=('axis',)``; called as a schedule
    (with a step count), it raises ``ValueError`` saying so.

  Examples:
    >>> import jax.numpy as jnp, optax_norms as on
    >>> axis = on.unit_axes(stacked="blocks/**")
    >>> axis(("blocks", "attn", "query", "kernel"), jnp.ones((4, 16, 2, 8)))
    Layout(stack=(0,), reduce=(1,), block_axis=1)
    >>> axis(("blocks", "mlp", "kernel"), jnp.ones((4, 16, 64))).reduce
    (1,)
    >>> axis(("embed", "embedding"), jnp.ones((100, 16))).reduce
    (1,)
    >>> on.unit_axes("torch")(("conv", "weight"), jnp.ones((8, 3, 5, 5)))
    Layout(stack=(), reduce=(1, 2, 3), block_axis=1)
  """
  if layout not in _LAYOUTS:
    raise ValueError(f"`layout` must be one of {list(_LAYOUTS)}, got {layout!r}.")
  return UnitAxes(layout, as_globs("stacked", () if stacked is None else stacked))


def resolve_layout(
  axis: Axis, path: Path, leaf: Any, *, shapes: Mapping[Path, tuple[int, ...]] | None = None
) -> Layout:
  """The layout of one leaf (the one resolver every transform, report and ``describe_rules``
  uses): stack axes, reduced axes and N:M block axis, as sorted non-negative ints.

  `axis` names the reduced axes (Keras/TF convention): ``None`` reads the leaf's role from
  its path and shape (``default_layout``; an ambiguous leaf raises, naming the readings and
  the fix of each); an int or a tuple of ints (negative allowed) is the reduced axes of an
  unstacked leaf; a ``Layout`` is taken as it is; a ``unit_axes(...)`` reads roles and
  stacks; any other callable ``(path, leaf)`` may return any of these. `shapes` (path ->
  shape of every leaf of the tree) lets the role rules read a leaf's siblings.
  """
  path = tuple(path)
  shape = tuple(np.shape(leaf))
  if isinstance(axis, UnitAxes):
    return axis.layout(path, shape, shapes)
  if callable(axis) and not isinstance(axis, jax.Array):
    axis = axis(path, leaf)
    check_axis_spec(axis)
    if isinstance(axis, UnitAxes):
      raise TypeError("An `axis` callable must return axes or a Layout, not a unit_axes.")
  if axis is None:
    return default_layout(path, shape, shapes)
  if isinstance(axis, jax.core.Tracer):
    raise ValueError("`axis` is traced. " + static_args_hint("axis"))
  layout = axis if isinstance(axis, Layout) else Layout((), axis)  # type: ignore[arg-type]
  return checked_layout(layout, path, shape, torch=is_torch_name(path))


def resolve_axes(axis: Axis, path: Path, leaf: Any) -> tuple[int, ...]:
  """The reduced axes of ``resolve_layout`` (what a per-unit rule reduces)."""
  return resolve_layout(axis, path, leaf).reduce
