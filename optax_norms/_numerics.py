"""Numerics shared by every transform: compute dtypes, unit axes, safe norms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optax_norms._paths import Path, format_path

__all__ = [
    "Axis",
    "abs_zero_subgradient",
    "check_axis_spec",
    "compute_dtype",
    "resolve_axes",
    "safe_unit_norm",
    "unit_sq_norm",
]

Axis = None | int | Sequence[int] | Callable[[Path, Any], Any]


def compute_dtype(dtype: Any) -> Any:
  """The dtype a leaf's arithmetic runs in: at least float32 (bf16/f16 are upcast in
  registers; XLA fuses the casts, so no float32 copy of the leaf is materialized)."""
  return jnp.promote_types(dtype, jnp.float32)


def _default_axes(ndim: int) -> tuple[int, ...]:
  return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))


def _is_int(value: Any) -> bool:
  return hasattr(value, "__index__") and not isinstance(value, bool)


def check_axis_spec(axis: Any) -> None:
  """Raises ValueError unless `axis` is None, an int, a sequence of ints or a callable.

  A traced axis (``optax.inject_hyperparams`` without ``static_args``) is reported when the
  axes are resolved, with the fix.
  """
  if axis is None or callable(axis) or _is_int(axis) or isinstance(axis, jax.core.Tracer):
    return
  if isinstance(axis, (tuple, list)) and all(_is_int(a) for a in axis):
    return
  raise ValueError(
      f"`axis` must be None, an int, a tuple of ints or a callable (path, leaf) -> axes, "
      f"got {axis!r}."
  )


def resolve_axes(axis: Axis, path: Path, leaf: Any) -> tuple[int, ...]:
  """The reduced axes of one leaf, as sorted non-negative ints.

  `axis` names the axes that are reduced (Keras/TF convention): ``None`` is all but the
  last for rank >= 2 and the whole leaf for rank <= 1; an int or tuple of ints (negative
  allowed); or a callable ``(path, leaf) -> axes`` (it may return ``None`` for the default).
  """
  ndim = jnp.ndim(leaf)
  if callable(axis) and not isinstance(axis, jax.Array):
    axis = axis(path, leaf)
  if axis is None:
    return _default_axes(ndim)
  if isinstance(axis, jax.core.Tracer):
    raise ValueError(
        "`axis` is traced. Under optax.inject_hyperparams pass "
        "static_args=('axis',) so the axis stays a Python int."
    )
  axes = (axis,) if not isinstance(axis, (tuple, list)) else tuple(axis)
  resolved = []
  for a in axes:
    if not _is_int(a):
      raise ValueError(f"`axis` must be ints, got {a!r} for {format_path(path)!r}.")
    a = int(a)
    if not -ndim <= a < ndim:
      raise ValueError(
          f"`axis` {a} is out of range for the parameter {format_path(path)!r} of shape "
          f"{jnp.shape(leaf)} (rank {ndim}). Pass a callable axis=(path, leaf) -> axes "
          "for trees whose leaves differ in layout."
      )
    resolved.append(a % ndim)
  if len(set(resolved)) != len(resolved):
    raise ValueError(f"`axis` {axes} repeats an axis for {format_path(path)!r}.")
  return tuple(sorted(resolved))


def unit_sq_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Squared l2 norm of each unit, accumulated in >= float32, with reduced dims kept."""
  wide = lax.convert_element_type(x, compute_dtype(x.dtype))
  return lax.expand_dims(lax.reduce_sum(lax.square(wide), axes), axes)


@jax.custom_jvp
def abs_zero_subgradient(x: jax.Array) -> jax.Array:
  """``|x|`` whose derivative is ``sign(x)``, with ``sign(0) = 0`` (JAX's own abs gives 1)."""
  return jnp.abs(x)


@abs_zero_subgradient.defjvp
def _abs_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return jnp.abs(x), jnp.sign(x) * t


def safe_unit_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """l2 norm of each unit (dims kept, >= float32) whose gradient at a zero unit is 0, not NaN.

  The double select keeps ``sqrt`` away from 0 on both passes. It is written with ``lax``
  primitives because ``jnp.where`` traces a nested ``jit`` per call, which on 1000-leaf trees
  shows up as compile time.
  """
  squared = unit_sq_norm(x, axes)
  positive = squared > 0
  one = lax.full(squared.shape, 1, squared.dtype)
  zero = lax.full(squared.shape, 0, squared.dtype)
  return lax.select(positive, lax.sqrt(lax.select(positive, squared, one)), zero)
