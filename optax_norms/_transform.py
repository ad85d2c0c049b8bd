"""The one factory behind every transform: masks, hyperparameters, dtypes, axes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_norms._hyperparams import Hyperparams, ScalarOrSchedule
from optax_norms._numerics import Axis, check_axis_spec, compute_dtype, resolve_axes
from optax_norms._paths import Mask, Path, _flatten, format_path, select_leaves

__all__ = ["LeafFn", "leafwise_transform", "selected_leaves"]

# (update, param or None, hyperparameters in the compute dtype, reduced axes) -> new update,
# all in the compute dtype (>= float32).
LeafFn = Callable[[jax.Array, Any, Mapping[str, jax.Array], tuple[int, ...]], jax.Array]

_NO_AXIS = object()


def _leaf_kind(path: Path, leaf: Any) -> str:
  """'float' (transformed), 'skip' (integer/bool: passed through) or raises."""
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
    mask: Mask, tree: Any, check: bool
) -> tuple[list[Path], list[Any], Any, list[bool]]:
  """Flattens `tree`; returns paths, leaves, treedef and which leaves are transformed.

  Integer and bool leaves are never transformed; non-array and complex selected leaves
  raise an error naming their path.
  """
  paths, leaves, treedef = _flatten(tree)
  selection = select_leaves(mask, tree, paths, leaves, check)
  active = [
      keep and _leaf_kind(path, leaf) == "float"
      for keep, path, leaf in zip(selection, paths, leaves)
  ]
  if check and mask is not None and not any(selection):
    raise ValueError(
        "`mask` selects no parameter, so the transform would do nothing. The parameter "
        f"paths are: {', '.join(repr(format_path(p)) for p in paths[:8])}."
    )
  if check and mask is not None and not any(active):
    chosen = [format_path(p) for p, keep in zip(paths, selection) if keep]
    raise ValueError(
        f"`mask` selects only integer or bool leaves ({', '.join(map(repr, chosen[:8]))}), "
        "which are never transformed: it would do nothing. Select floating-point leaves."
    )
  return paths, leaves, treedef, active


def _cast(x: Any, dtype: Any) -> jax.Array:
  """``x`` in `dtype`; no op traced when it already is (this runs once per leaf per trace)."""
  return x if getattr(x, "dtype", None) == dtype else lax.convert_element_type(x, dtype)


def _aligned_params(u_paths: list[Path], params: Any) -> list[Any]:
  p_paths, p_leaves, _ = _flatten(params)
  if p_paths != u_paths:
    padded = max(len(u_paths), len(p_paths))
    u_padded = u_paths + [None] * (padded - len(u_paths))
    p_padded = p_paths + [None] * (padded - len(p_paths))
    i = next(k for k in range(padded) if u_padded[k] != p_padded[k])
    where_u = "(end)" if u_padded[i] is None else repr(format_path(u_padded[i]))
    where_p = "(end)" if p_padded[i] is None else repr(format_path(p_padded[i]))
    raise ValueError(
        "`params` must have the structure of `updates`; they first differ at leaf "
        f"{i}: updates {where_u}, params {where_p}."
    )
  return p_leaves


def leafwise_transform(
    name: str,
    hyperparams: Mapping[str, ScalarOrSchedule],
    leaf_fn: LeafFn,
    *,
    mask: Mask,
    needs_params: bool,
    axis: Axis | object = _NO_AXIS,
) -> optax.GradientTransformation:
  """Builds a stateless (or count-only) transform applying `leaf_fn` to selected leaves.

  Args:
    name: the public factory's name, for error messages.
    hyperparams: the scalar hyperparameters, validated here.
    leaf_fn: the per-leaf update rule, computed in the leaf's compute dtype.
    mask: which leaves to transform (see :func:`optax_norms.path_mask`).
    needs_params: whether the rule reads the parameters.
    axis: the reduced axes of per-unit rules; omitted for element-wise ones.
  """
  hparams = Hyperparams(hyperparams)
  per_unit = axis is not _NO_AXIS
  if per_unit:
    check_axis_spec(axis)

  def leaf_axes(path: Path, leaf: Any) -> tuple[int, ...]:
    return resolve_axes(axis, path, leaf) if per_unit else ()

  def init_fn(params: Any) -> optax.OptState:
    state = hparams.init_state()
    if needs_params or params is not None:
      paths, leaves, _, active = selected_leaves(mask, params, check=True)
      for path, leaf, on in zip(paths, leaves, active):
        if on:
          leaf_axes(path, leaf)
    return state

  def update_fn(updates: Any, state: optax.OptState, params: Any = None):
    if needs_params and params is None:
      raise ValueError(
          f"`{name}` reads the current parameters, but `params` was not passed: call "
          "`tx.update(updates, state, params)`."
      )
    values = hparams.at(state)
    reference = updates if params is None else params
    _, _, _, active = selected_leaves(mask, reference, check=False)
    u_paths, u_leaves, treedef = _flatten(updates)
    p_leaves = _aligned_params(u_paths, params) if params is not None else [None] * len(u_leaves)
    cast_cache: dict[Any, dict[str, jax.Array]] = {}
    new_leaves = []
    for path, u, w, on in zip(u_paths, u_leaves, p_leaves, active):
      if not on or u is None:
        new_leaves.append(u)
        continue
      if w is not None and jnp.shape(w) != jnp.shape(u):
        raise ValueError(
            f"The update and the parameter {format_path(path)!r} differ in shape: "
            f"{jnp.shape(u)} vs {jnp.shape(w)}."
        )
      dtype = compute_dtype(u.dtype if w is None else jnp.promote_types(u.dtype, w.dtype))
      if dtype not in cast_cache:
        cast_cache[dtype] = {k: jnp.asarray(v).astype(dtype) for k, v in values.items()}
      w_c = None if w is None else _cast(w, dtype)
      new = leaf_fn(_cast(u, dtype), w_c, cast_cache[dtype], leaf_axes(path, u))
      new_leaves.append(_cast(new, u.dtype))
    return jax.tree_util.tree_unflatten(treedef, new_leaves), hparams.next_state(state)

  return optax.GradientTransformation(init_fn, update_fn)
