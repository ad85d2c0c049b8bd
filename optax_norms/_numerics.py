"""Numerics shared by every transform: compute dtypes, unit axes, safe norms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_norms._paths import Path, format_path

__all__ = [
    "Axis",
    "abs_zero_subgradient",
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
    if isinstance(a, bool) or not hasattr(a, "__index__"):
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
  acc = compute_dtype(x.dtype)
  return jnp.sum(jnp.square(x.astype(acc)), axis=axes, keepdims=True)


@jax.custom_jvp
def abs_zero_subgradient(x: jax.Array) -> jax.Array:
  """``|x|`` whose derivative is ``sign(x)``, with ``sign(0) = 0`` (JAX's own abs gives 1)."""
  return jnp.abs(x)


@abs_zero_subgradient.defjvp
def _abs_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return jnp.abs(x), jnp.sign(x) * t


@jax.custom_jvp
def _sqrt_zero_safe(sq: jax.Array) -> jax.Array:
  return jnp.sqrt(sq)


@_sqrt_zero_safe.defjvp
def _sqrt_jvp(primals, tangents):
  (sq,), (t,) = primals, tangents
  root = jnp.sqrt(sq)
  positive = sq > 0
  return root, jnp.where(positive, t / (2 * jnp.where(positive, root, 1)), 0)


def safe_unit_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """l2 norm of each unit (dims kept) whose gradient at a zero unit is 0, not NaN."""
  return _sqrt_zero_safe(unit_sq_norm(x, axes))
