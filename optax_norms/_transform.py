"""The one factory behind every transform: masks, hyperparameters, dtypes, axes, state.

A transform is a *rule* for one leaf, written in the compute dtype (>= float32)::

  def rule(u, w, *, alpha):                   # element-wise, stateless
    return u + 2 * alpha * w

  def rule(u, w, *, max_norm, axes):          # per unit: `axes` are the reduced axes
    ...

  def rule(u, w, *, max_norm, axes):          # per unit, with the unit norms of one array
    norm = yield u                             # ‖u_unit‖ over `axes`, dims kept (>= float32)
    return u * ...

  def rule(u, w, *, max_norm, axes, state):   # with per-leaf state: returns (u', state')
    ...

  def rule(u, w, *, n, layout):               # reads the whole layout (stack, block axis)
    ...

  def rule(u, w, *, kappa, state, count):     # per-leaf state and the step count
    ...

  def rule(u, w, *, n, state):                # a state refreshed at some steps only
    keep = yield Refresh(lambda u, w: choose(u, w, n), (u, w), state)
    return jnp.where(keep, u, -w), keep

``leafwise_transform`` checks the rule's keyword-only parameters against the
hyperparameters at construction, compiles the mask once, and does the rest: selection by
path, ``None``/integer leaves passed through, casts to the compute dtype and back,
schedules, run-time validity of hyperparameters, per-leaf state (``init_leaf``), which
masked-out leaves do not hold (``optax.MaskedNode``, as ``optax.masked``), and each leaf's
layout: one ``resolve_layout`` per leaf (``axes`` is its ``reduce``), checked at ``init``.

A per-unit rule that yields an array receives its unit norms (``unit_norm``, the same values
bit for bit): the factory computes those of every leaf together (``unit_norms``), so that on
XLA:CPU one conditional per step, not one per leaf, decides whether some unit of some leaf
overflows or nearly underflows and needs the extra sums.

A rule with per-leaf state that changes only at some steps (a periodic mask) yields a
``Refresh(compute, args, current)``: it receives ``compute(*args)`` at the steps the
transform's ``refresh_when(count)`` picks and ``current`` at the others. The factory decides
for many leaves at once: one ``lax.cond`` per step for leaves of up to 32 MiB together
(``REFRESH_SHARE_MAX_BYTES``), not one per leaf, since on XLA:CPU each conditional costs a
synchronization point and XLA materializes its operands.

A rule that reads a layout may receive several small leaves of one kind at once, stacked along
a new leading layer axis (``leaf_batches``): it must compute each layer of a stack on its own,
as the layout promises, and it then runs once per stack instead of once per leaf.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_norms._batching import leaf_batches, stacked, stacked_layout, unstacked
from optax_norms._hyperparams import Hyperparams, ScalarOrSchedule
from optax_norms._layout import Axis, Layout, check_axis_spec
from optax_norms._masks import Mask, Selector, compile_mask
from optax_norms._messages import missing_params, static_args_hint
from optax_norms._numerics import cast, compute_dtype, unit_norms
from optax_norms._paths import Path, flatten, format_path, shown_paths
from optax_norms._units import resolve_layout

__all__ = [
  "LeafwiseState",
  "Refresh",
  "aligned_params",
  "flatten_with_params",
  "leaf_kind",
  "leafwise_transform",
  "refreshed",
  "selected_leaves",
]

_STATIC_ARGS_HINT = " " + static_args_hint("mask")


class Refresh(NamedTuple):
  """What a rule yields for a state that changes only at some steps (see the module notes).

  Attributes:
    compute: ``compute(*args)``, the new leaf state (traced inside the conditional).
    args: its array arguments (the leaves it reads).
    current: the leaf state kept at the other steps.
  """

  compute: Callable[..., Any]
  args: tuple[Any, ...]
  current: Any


class LeafwiseState(NamedTuple):
  """State of a transform with per-leaf state.

  Attributes:
    count: int32, the number of updates applied so far (schedules read it).
    leaves: per-leaf state with the structure of the parameters; masked-out leaves hold
      ``optax.MaskedNode()``.
  """

  count: jax.Array  # type: ignore[assignment]
  leaves: Any


def leaf_kind(path: Path, leaf: Any) -> str:
  """'float' (transformed), 'skip' (None, integer, bool: passed through) or raises."""
  if leaf is None:
    return "skip"
  if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
    raise TypeError(
      f"The parameter {format_path(path)!r} is a {type(leaf).__name__}, not an array. "
      "Filter non-array leaves out first (Equinox: eqx.filter(model, eqx.is_array)), "
      "or leave them out of `mask`."
    )
  if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
    raise TypeError(
      f"The parameter {format_path(path)!r} has complex dtype {leaf.dtype}; norm "
      "penalties here are defined for real leaves. Leave it out of `mask`."
    )
  return "float" if jnp.issubdtype(leaf.dtype, jnp.floating) else "skip"


def selected_leaves(
  mask: Mask | Any, tree: Any, check: bool
) -> tuple[list[Path], list[Any], Any, list[bool]]:
  """Flattens `tree`; returns paths, leaves, treedef and which leaves are transformed.

  `mask` is a ``mask=`` argument or a compiled selector. ``None``, integer and bool
  leaves are never transformed; non-array and complex selected leaves raise an error
  naming their path. With `check`, a mask that selects nothing raises.
  """
  selector = mask if isinstance(mask, Selector) else compile_mask(mask)
  paths, leaves, treedef = flatten(tree)
  selection = selector.select(tree, paths, leaves, check)
  active = [
    keep and leaf_kind(path, leaf) == "float" for keep, path, leaf in zip(selection, paths, leaves)
  ]
  if (
    check
    and selector.mask is not None
    and not any(active)
    and any(leaf is not None for leaf in leaves)
  ):
    chosen = [p for p, keep, leaf in zip(paths, selection, leaves) if keep and leaf is not None]
    real = [p for p, leaf in zip(paths, leaves) if leaf is not None]
    if not chosen:
      hint = _STATIC_ARGS_HINT if isinstance(selector.mask, bool) or callable(selector.mask) else ""
      raise ValueError(
        "`mask` selects no parameter, so the transform would do nothing. The parameter "
        f"paths are: {shown_paths(real)}.{hint}"
      )
    raise ValueError(
      f"`mask` selects only integer or bool leaves ({shown_paths(chosen)}), "
      "which are never transformed: it would do nothing. Select floating-point leaves."
    )
  return paths, leaves, treedef, active


def aligned_params(u_paths: list[Path], params: Any) -> list[Any]:
  p_paths, p_leaves, _ = flatten(params)
  if p_paths != u_paths:
    padded = max(len(u_paths), len(p_paths))
    u_padded: list[Path | None] = [*u_paths, *[None] * (padded - len(u_paths))]
    p_padded: list[Path | None] = [*p_paths, *[None] * (padded - len(p_paths))]
    i = next(k for k in range(padded) if u_padded[k] != p_padded[k])
    u_at, p_at = u_padded[i], p_padded[i]
    where_u = "(end)" if u_at is None else repr(format_path(u_at))
    where_p = "(end)" if p_at is None else repr(format_path(p_at))
    raise ValueError(
      "`params` must have the structure of `updates`; they first differ at leaf "
      f"{i}: updates {where_u}, params {where_p}."
    )
  return p_leaves


def flatten_with_params(
  name: str, updates: Any, params: Any
) -> tuple[list[Path], list[Any], Any, list[Any]]:
  """The updates flattened (paths, leaves, treedef) and the parameters aligned with them, for
  transforms that read every leaf at once; raises when `params` is missing or differs."""
  if params is None:
    raise missing_params(name)
  u_paths, u_leaves, treedef = flatten(updates)
  return u_paths, u_leaves, treedef, aligned_params(u_paths, params)


_OPTIONAL_ARGUMENTS = frozenset({"count", "leaf_dtype", "layout"})


def _rule_arguments(name: str, rule: Callable, expected: set[str]) -> set[str]:
  """The rule's keyword-only parameters must be exactly the hyperparameters (+ `axes`,
  `state`); a rule may also ask for ``leaf_dtype`` (the stored dtype), ``layout`` (the
  leaf's ``Layout``) and, with per-leaf state, ``count`` (the updates applied so far).
  Returns the optional ones it asks for."""
  params = inspect.signature(rule).parameters.values()
  keyword_only = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
  if keyword_only - _OPTIONAL_ARGUMENTS != expected:
    raise TypeError(
      f"The rule of `{name}` takes keyword-only arguments {sorted(keyword_only)}, but "
      f"the transform provides {sorted(expected)}."
    )
  return keyword_only & _OPTIONAL_ARGUMENTS


def _shapes(paths: list[Path], leaves: list[Any]) -> dict[Path, tuple[int, ...]]:
  return {p: tuple(leaf.shape) for p, leaf in zip(paths, leaves) if hasattr(leaf, "shape")}


def leafwise_transform(
  name: str,
  rule: Callable[..., Any],
  hyperparams: Mapping[str, ScalarOrSchedule],
  *,
  mask: Mask,
  needs_params: bool,
  per_unit: bool = False,
  axis: Axis = None,
  bounds: tuple[str, ...] = (),
  init_leaf: Callable[[Path, jax.Array, Layout | None], Any] | None = None,
  check_leaf: Callable[[Path, jax.Array, Layout | None], None] | None = None,
  refresh_when: Callable[[jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformation:
  """Builds a transform applying `rule` to every selected floating-point leaf.

  Args:
    name: the public factory's name, for error messages.
    rule: ``rule(u, w, *, <hyperparameters>[, axes][, state][, count][, layout][, leaf_dtype])`` in
      the compute dtype; returns the new update, or ``(new update, new leaf state)`` when
      `init_leaf` is given.
    hyperparams: the scalar hyperparameters (numbers or schedules), validated here.
    mask: which leaves to transform (see ``path_mask``).
    needs_params: whether the rule reads the parameters (`w` is ``None`` otherwise).
    per_unit: whether the rule reduces over units; it then receives ``axes`` (the reduced
      axes of the leaf's layout).
    axis: the leaves' layouts, as ``axis=`` of the public factories (``resolve_layout``);
      read when the rule is per-unit or takes ``layout``.
    bounds: hyperparameters that bound stored values; cast rounding towards zero.
    init_leaf: ``(path, leaf, layout) -> leaf state`` for rules with per-leaf state.
    check_leaf: ``(path, leaf, layout) -> None``, run at ``init`` on every selected leaf;
      raises for a leaf the transform cannot take.
    refresh_when: ``count -> bool``, the steps at which the ``Refresh`` a rule yields is
      computed (one ``lax.cond`` for all leaves); needs `init_leaf`.
  """
  expected = (
    set(hyperparams) | ({"axes"} if per_unit else set()) | ({"state"} if init_leaf else set())
  )
  optional = _rule_arguments(name, rule, expected)
  if ("count" in optional or refresh_when is not None) and init_leaf is None:
    raise TypeError(f"The rule of `{name}` reads the step count, which needs per-leaf state.")
  reads_layout = per_unit or "layout" in optional
  hparams = Hyperparams(hyperparams, bounds)
  selector = compile_mask(mask)
  if reads_layout:
    check_axis_spec(axis)

  def layouts(paths: list[Path], leaves: list[Any], active: list[bool]) -> list[Layout | None]:
    if not reads_layout:
      return [None] * len(leaves)
    shapes = _shapes(paths, leaves)
    return [
      resolve_layout(axis, path, leaf, shapes=shapes) if selected else None
      for path, leaf, selected in zip(paths, leaves, active)
    ]

  def init_fn(params: Any) -> optax.OptState:
    schedule_state = hparams.init_state()
    if not (needs_params or params is not None or init_leaf):
      return schedule_state
    paths, leaves, treedef, active = selected_leaves(selector, params, check=True)
    leaf_layouts = layouts(paths, leaves, active)
    if check_leaf is not None:
      for path, leaf, selected, layout in zip(paths, leaves, active, leaf_layouts):
        if selected:
          check_leaf(path, leaf, layout)
    if init_leaf is None:
      return schedule_state
    leaf_states = [
      init_leaf(path, leaf, layout) if selected else optax.MaskedNode()
      for path, leaf, selected, layout in zip(paths, leaves, active, leaf_layouts)
    ]
    return LeafwiseState(
      count=jnp.zeros([], jnp.int32),
      leaves=jax.tree_util.tree_unflatten(treedef, leaf_states),
    )

  def update_fn(updates: Any, state: optax.OptState, params: Any = None):
    if updates is None:  # As optax's transforms: no updates, nothing to do.
      return None, state
    if needs_params and params is None:
      raise missing_params(name)
    values = hparams.at(state)
    valid = hparams.valid(values)
    u_paths, u_leaves, treedef = flatten(updates)
    p_leaves = aligned_params(u_paths, params) if params is not None else [None] * len(u_leaves)
    reference = updates if params is None else params
    _, ref_leaves, _, active = selected_leaves(selector, reference, check=False)
    leaf_layouts = layouts(u_paths, ref_leaves, active)
    s_leaves = treedef.flatten_up_to(state.leaves) if init_leaf is not None else None
    transformed = []
    for i, (path, u, w, selected) in enumerate(zip(u_paths, u_leaves, p_leaves, active)):
      if not selected or u is None or (needs_params and w is None):
        continue
      if w is not None and jnp.shape(w) != jnp.shape(u):
        raise ValueError(
          f"The update and the parameter {format_path(path)!r} differ in shape: "
          f"{jnp.shape(u)} vs {jnp.shape(w)}."
        )
      transformed.append(i)
    # Small leaves of one kind go to the rule as one stacked leaf (see `leaf_batches`).
    calls = leaf_batches(
      transformed, u_leaves, p_leaves, leaf_layouts, s_leaves, stackable=reads_layout
    )
    cast_cache: dict[Any, dict[str, jax.Array]] = {}
    outs: list[Any] = []  # Per call: the rule's result, or its generator.
    call_layouts: list[Layout | None] = []
    for members in calls:
      u, w = u_leaves[members[0]], p_leaves[members[0]]
      dtype = compute_dtype(u.dtype if w is None else max(u.dtype, w.dtype, key=_width))
      if dtype not in cast_cache:
        cast_cache[dtype] = hparams.in_dtype(values, dtype)
      layout = stacked_layout(leaf_layouts[members[0]], len(members))
      call_layouts.append(layout)
      extra: dict[str, Any] = {}
      if per_unit:
        extra["axes"] = layout.reduce  # type: ignore[union-attr]
      if "layout" in optional:
        extra["layout"] = layout
      if init_leaf is not None:
        extra["state"] = stacked([s_leaves[i] for i in members])  # type: ignore[index]
      if "leaf_dtype" in optional:
        extra["leaf_dtype"] = u.dtype
      if "count" in optional:
        extra["count"] = state.count
      u_in = stacked([cast(u_leaves[i], dtype) for i in members])
      w_in = None if w is None else stacked([cast(p_leaves[i], dtype) for i in members])
      outs.append(rule(u_in, w_in, **cast_cache[dtype], **extra))
    when = None if refresh_when is None else refresh_when(state.count)
    _run_yields(name, outs, call_layouts, when)
    new_leaves = list(u_leaves)
    new_states = list(s_leaves) if s_leaves is not None else [None] * len(u_leaves)
    for members, out in zip(calls, outs):
      new, leaf_state = out if init_leaf is not None else (out, None)
      if valid is not None:  # Once per call, not per leaf of a stack.
        new = jnp.where(valid, new, jnp.full((), jnp.nan, new.dtype))
      for i, new_u, new_state in zip(
        members, unstacked(new, len(members)), unstacked(leaf_state, len(members))
      ):
        new_leaves[i] = cast(new_u, u_leaves[i].dtype)
        new_states[i] = new_state
    new_updates = jax.tree_util.tree_unflatten(treedef, new_leaves)
    if init_leaf is None:
      return new_updates, hparams.next_state(state)
    return new_updates, LeafwiseState(
      count=optax.safe_increment(state.count),
      leaves=jax.tree_util.tree_unflatten(treedef, new_states),
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _run_yields(
  name: str, outs: list[Any], leaf_layouts: list[Layout | None], when: jax.Array | None
) -> None:
  """Runs the rules that yield to their end, in place in `outs`. A rule yields once: an array
  (``norm = yield x``: the unit norms of `x` over its leaf's reduced axes, computed together
  for every rule) or a ``Refresh`` (``state = yield Refresh(...)``: every rule's
  ``compute(*args)`` where `when`, else its ``current``, see ``refreshed``)."""
  waiting: list[tuple[int, Generator[Any, Any, Any], Any]] = []
  for i, out in enumerate(outs):
    if inspect.isgenerator(out):
      try:
        waiting.append((i, out, next(out)))
      except StopIteration as stop:  # The rule returned without asking for anything.
        outs[i] = stop.value
  if not waiting:
    return
  asks_norms = [(i, x) for i, _, x in waiting if not isinstance(x, Refresh)]
  refreshes = [(i, x) for i, _, x in waiting if isinstance(x, Refresh)]
  answers: dict[int, Any] = {}
  if asks_norms:
    if any(leaf_layouts[i] is None for i, _ in asks_norms):
      raise TypeError(f"The rule of `{name}` yields for unit norms but is not per-unit.")
    norms = unit_norms(
      tuple(x for _, x in asks_norms),
      tuple(leaf_layouts[i].reduce for i, _ in asks_norms),  # type: ignore[union-attr]
    )
    answers.update(zip((i for i, _ in asks_norms), norms))
  if refreshes:
    if when is None:
      raise TypeError(f"The rule of `{name}` yields a Refresh, but no `refresh_when` is set.")
    answers.update(zip((i for i, _ in refreshes), refreshed(when, [r for _, r in refreshes])))
  for i, generator, _ in waiting:
    try:
      generator.send(answers[i])
    except StopIteration as stop:
      outs[i] = stop.value
    else:
      raise TypeError(f"The rule of `{name}` yields more than once; it may yield once.")


# Leaves whose ``Refresh`` arguments total at most this many bytes share one conditional. Its
# operands are live together where the conditional starts: the leaves' updates, which
# per-leaf conditionals would hold one at a time. On a small model (XLA:CPU, an 8×256 MLP) a
# conditional per leaf cost 7–11% of the step; on a large one the bound keeps the extra
# temporary to 32 MiB plus one leaf.
REFRESH_SHARE_MAX_BYTES = 1 << 25


def refreshed(when: jax.Array, refreshes: list[Refresh]) -> list[Any]:
  """Each ``compute(*args)`` where `when`, else each ``current``: one ``lax.cond`` for each
  run of consecutive refreshes whose arguments total at most ``REFRESH_SHARE_MAX_BYTES``."""
  groups: list[list[Refresh]] = []
  total = 0
  for r in refreshes:
    size = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(r.args))
    if not groups or total + size > REFRESH_SHARE_MAX_BYTES:
      groups.append([])
      total = 0
    groups[-1].append(r)
    total += size
  return [state for group in groups for state in _refreshed_together(when, group)]


def _one_refresh(when: jax.Array, r: Refresh) -> Any:
  return lax.cond(when, r.compute, lambda *_: r.current, *r.args)


def _refreshed_together(when: jax.Array, group: list[Refresh]) -> tuple[Any, ...]:
  if len(group) == 1:
    return (_one_refresh(when, group[0]),)

  def compute_all() -> tuple[Any, ...]:
    # Each in a conditional of its own (on the same, here true, predicate): XLA then reuses
    # one leaf's temporaries for the next; in one computation all would be live at once.
    return tuple(_one_refresh(when, r) for r in group)

  return lax.cond(when, compute_all, lambda: tuple(r.current for r in group))


def _width(dtype: Any) -> int:
  return jnp.dtype(dtype).itemsize
