"""The one factory behind every transform: masks, hyperparameters, dtypes, axes, state.

A transform is a *rule* for one leaf, written in the compute dtype (>= float32)::

  def rule(u, w, *, alpha):                   # element-wise, stateless
    return u + 2 * alpha * w

  def rule(u, w, *, max_norm, axes):          # per unit: `axes` are the reduced axes
    ...

  def rule(u, w, *, max_norm, axes, state):   # with per-leaf state: returns (u', state')
    ...

``leafwise_transform`` checks the rule's keyword-only parameters against the
hyperparameters at construction, compiles the mask once, and does the rest: selection by
path, ``None``/integer leaves passed through, casts to the compute dtype and back,
schedules, run-time validity of hyperparameters, and per-leaf state (``init_leaf``), which
masked-out leaves do not hold (``optax.MaskedNode``, as ``optax.masked``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_norms._hyperparams import Hyperparams, ScalarOrSchedule
from optax_norms._masks import Mask, Selector, compile_mask
from optax_norms._numerics import Axis, check_axis_spec, compute_dtype, resolve_axes
from optax_norms._paths import Path, flatten, format_path, shown_paths

__all__ = ["LeafwiseState", "leafwise_transform", "selected_leaves"]

_STATIC_ARGS_HINT = (
  " If this transform is inside optax.inject_hyperparams, a callable `mask` was called "
  "as a schedule: pass static_args=('mask',)."
)


class LeafwiseState(NamedTuple):
  """State of a transform with per-leaf state.

  Attributes:
    count: int32, the number of updates applied so far (schedules read it).
    leaves: per-leaf state with the structure of the parameters; masked-out leaves hold
      ``optax.MaskedNode()``.
  """

  count: jax.Array  # type: ignore[assignment]
  leaves: Any


def _leaf_kind(path: Path, leaf: Any) -> str:
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
    keep and _leaf_kind(path, leaf) == "float" for keep, path, leaf in zip(selection, paths, leaves)
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


def _cast(x: Any, dtype: Any) -> jax.Array:
  """``x`` in `dtype`; no op traced when it already is (this runs once per leaf per trace)."""
  return x if getattr(x, "dtype", None) == dtype else lax.convert_element_type(x, dtype)


def _aligned_params(u_paths: list[Path], params: Any) -> list[Any]:
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


def _rule_arguments(name: str, rule: Callable, expected: set[str]) -> bool:
  """The rule's keyword-only parameters must be exactly the hyperparameters (+ `axes`,
  `state`); a rule may also ask for ``leaf_dtype`` (the stored dtype). Returns whether it
  does."""
  params = inspect.signature(rule).parameters.values()
  keyword_only = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
  wants_dtype = "leaf_dtype" in keyword_only
  if keyword_only - {"leaf_dtype"} != expected:
    raise TypeError(
      f"The rule of `{name}` takes keyword-only arguments {sorted(keyword_only)}, but "
      f"the transform provides {sorted(expected)}."
    )
  return wants_dtype


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
  init_leaf: Callable[[Path, jax.Array, tuple[int, ...]], Any] | None = None,
) -> optax.GradientTransformation:
  """Builds a transform applying `rule` to every selected floating-point leaf.

  Args:
    name: the public factory's name, for error messages.
    rule: ``rule(u, w, *, <hyperparameters>[, axes][, state])`` in the compute dtype;
      returns the new update, or ``(new update, new leaf state)`` when `init_leaf` is given.
    hyperparams: the scalar hyperparameters (numbers or schedules), validated here.
    mask: which leaves to transform (see ``path_mask``).
    needs_params: whether the rule reads the parameters (`w` is ``None`` otherwise).
    per_unit: whether the rule reduces over units; it then receives ``axes``.
    axis: the reduced axes of per-unit rules (see ``clip_by_row_norm``).
    bounds: hyperparameters that bound stored values; cast rounding towards zero.
    init_leaf: ``(path, leaf, axes) -> leaf state`` for rules with per-leaf state.
  """
  expected = (
    set(hyperparams) | ({"axes"} if per_unit else set()) | ({"state"} if init_leaf else set())
  )
  wants_dtype = _rule_arguments(name, rule, expected)
  hparams = Hyperparams(hyperparams, bounds)
  selector = compile_mask(mask)
  if per_unit:
    check_axis_spec(axis)

  def leaf_axes(path: Path, leaf: Any) -> tuple[int, ...]:
    return resolve_axes(axis, path, leaf) if per_unit else ()

  def init_fn(params: Any) -> optax.OptState:
    schedule_state = hparams.init_state()
    if not (needs_params or params is not None or init_leaf):
      return schedule_state
    paths, leaves, treedef, active = selected_leaves(selector, params, check=True)
    leaf_states = []
    for path, leaf, selected in zip(paths, leaves, active):
      axes = leaf_axes(path, leaf) if selected else ()
      if init_leaf is not None:
        leaf_states.append(init_leaf(path, leaf, axes) if selected else optax.MaskedNode())
    if init_leaf is None:
      return schedule_state
    return LeafwiseState(
      count=jnp.zeros([], jnp.int32),
      leaves=jax.tree_util.tree_unflatten(treedef, leaf_states),
    )

  def update_fn(updates: Any, state: optax.OptState, params: Any = None):
    if needs_params and params is None:
      raise ValueError(
        f"`{name}` reads the current parameters, but `params` was not passed: call "
        "`tx.update(updates, state, params)`."
      )
    values = hparams.at(state)
    valid = hparams.valid(values)
    u_paths, u_leaves, treedef = flatten(updates)
    p_leaves = _aligned_params(u_paths, params) if params is not None else [None] * len(u_leaves)
    reference = updates if params is None else params
    _, _, _, active = selected_leaves(selector, reference, check=False)
    if init_leaf is not None:
      s_leaves = treedef.flatten_up_to(state.leaves)
    cast_cache: dict[Any, dict[str, jax.Array]] = {}
    new_leaves, new_states = [], []
    for i, (path, u, w, selected) in enumerate(zip(u_paths, u_leaves, p_leaves, active)):
      leaf_state = s_leaves[i] if init_leaf is not None else None
      if not selected or u is None or (needs_params and w is None):
        new_leaves.append(u)
        new_states.append(leaf_state)
        continue
      if w is not None and jnp.shape(w) != jnp.shape(u):
        raise ValueError(
          f"The update and the parameter {format_path(path)!r} differ in shape: "
          f"{jnp.shape(u)} vs {jnp.shape(w)}."
        )
      dtype = compute_dtype(u.dtype if w is None else max(u.dtype, w.dtype, key=_width))
      if dtype not in cast_cache:
        cast_cache[dtype] = hparams.in_dtype(values, dtype)
      extra: dict[str, Any] = {}
      if per_unit:
        extra["axes"] = leaf_axes(path, u)
      if init_leaf is not None:
        extra["state"] = leaf_state
      if wants_dtype:
        extra["leaf_dtype"] = u.dtype
      out = rule(
        _cast(u, dtype), None if w is None else _cast(w, dtype), **cast_cache[dtype], **extra
      )
      new, leaf_state = out if init_leaf is not None else (out, None)
      if valid is not None:
        new = jnp.where(valid, new, jnp.full((), jnp.nan, new.dtype))
      new_leaves.append(_cast(new, u.dtype))
      new_states.append(leaf_state)
    new_updates = jax.tree_util.tree_unflatten(treedef, new_leaves)
    if init_leaf is None:
      return new_updates, hparams.next_state(state)
    return new_updates, LeafwiseState(
      count=optax.safe_increment(state.count),
      leaves=jax.tree_util.tree_unflatten(treedef, new_states),
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _width(dtype: Any) -> int:
  return jnp.dtype(dtype).itemsize
