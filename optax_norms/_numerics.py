"""Numerics shared by every transform: compute dtypes and safe norms (pure math)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
  "ONE_PASS_MIN_SIZE",
  "abs_zero_subgradient",
  "compute_dtype",
  "is_int",
  "safe_unit_norm",
  "unit_norm",
]


def compute_dtype(dtype: Any) -> Any:
  """The dtype a leaf's arithmetic runs in: at least float32 (bf16/f16 are upcast in
  registers; XLA fuses the casts, so no float32 copy of the leaf is materialized). Written
  without type promotion so it holds under ``jax_numpy_dtype_promotion='strict'``."""
  dtype = jnp.dtype(dtype)
  return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def is_int(value: Any) -> bool:
  """A Python or NumPy integer, or a 0-d integer array (never a float that has
  ``__index__``, never a bool)."""
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, (int, np.integer)):
    return True
  dtype = getattr(value, "dtype", None)
  return (
    dtype is not None
    and np.ndim(value) == 0
    and jnp.issubdtype(dtype, jnp.integer)
    and not isinstance(value, jax.core.Tracer)
  )


@jax.custom_jvp
def abs_zero_subgradient(x: jax.Array) -> jax.Array:
  """``|x|`` whose derivative is ``sign(x)``, with ``sign(0) = 0`` (JAX's own abs gives 1)."""
  return jnp.abs(x)


@abs_zero_subgradient.defjvp
def _abs_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return jnp.abs(x), jnp.sign(x) * t


def _norm_scales(dtype: Any) -> tuple[float, float, float]:
  """(up scale, down scale, overflow threshold) for `dtype`: powers of two.

  float32 (emax 128): up 2^31, down 2^-64, threshold 2^126.
  """
  emax = int(jnp.finfo(dtype).maxexp)  # 128 for float32, 1024 for float64.
  return 2.0 ** (emax // 4 - 1), 2.0 ** -(emax // 2), 2.0 ** (emax - 2)


# Leaves of at least this many entries take one pass on XLA:CPU (see _unit_norm_value); below
# it a conditional costs more than the second pass over a small leaf.
ONE_PASS_MIN_SIZE = 1 << 16


def _sum_sq(wide: jax.Array, scale: float, axes: tuple[int, ...]) -> jax.Array:
  scaled = wide * lax.full((), scale, wide.dtype)
  return lax.expand_dims(lax.reduce_sum(lax.square(scaled), axes), axes)


def _unit_norm_value(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Per-unit l2 norm, dims kept, in the compute dtype, without overflow or underflow.

  Two sums of squares of ``x`` scaled by powers of two (exact): scaled up (by 2^31 for
  float32), used unless it overflows, and scaled down (by 2^-64), used for units with values
  beyond ~1e7. Scaling by a power of two commutes with rounding, so on ordinary values the
  result is bit for bit ``sqrt(Σx²)``; units of ~1e19 (whose squares overflow float32) and of
  ~1e-20 (whose squares underflow) get their true norm.

  The two sums read the same input: XLA:GPU fuses them into one pass, XLA:CPU runs two. So on
  the CPU a leaf of ``ONE_PASS_MIN_SIZE`` entries or more computes the scaled-up sum alone, and
  the scaled-down one under a ``lax.cond`` only when some unit's scaled-up sum overflows (a
  norm beyond ~4e9 in float32): the same values, bit for bit, in one pass in every ordinary
  step.
  """
  wide = lax.convert_element_type(x, compute_dtype(x.dtype))
  dtype = wide.dtype
  up, down, high = _norm_scales(dtype)

  def select(small: jax.Array, large: jax.Array) -> jax.Array:
    use_large = ~(small < lax.full_like(small, high))  # also when the sum is inf or NaN.
    small_norm = lax.sqrt(small) * lax.full_like(small, 1 / up)
    large_norm = lax.sqrt(large) * lax.full_like(large, 1 / down)
    return lax.select(use_large, large_norm, small_norm)

  def two_passes() -> jax.Array:
    return select(_sum_sq(wide, up, axes), _sum_sq(wide, down, axes))

  if x.size < ONE_PASS_MIN_SIZE:
    return two_passes()

  def one_pass() -> jax.Array:
    small = _sum_sq(wide, up, axes)
    overflow = ~(small < lax.full_like(small, high)) & ~lax.ne(small, small)  # not NaN
    return lax.cond(
      jnp.any(overflow),
      lambda: select(small, _sum_sq(wide, down, axes)),
      lambda: select(small, small),
    )

  return lax.platform_dependent(cpu=one_pass, default=two_passes)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def unit_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """l2 norm of each unit (reduced dims kept, >= float32), exact for huge and tiny values.

  Its derivative is ``x/‖x‖`` per unit and 0 at a zero unit (not NaN).
  """
  return _unit_norm_value(x, axes)


@unit_norm.defjvp
def _unit_norm_jvp(axes, primals, tangents):
  (x,), (t,) = primals, tangents
  norm = _unit_norm_value(x, axes)
  positive = norm > 0
  one = lax.full_like(norm, 1)
  inverse = lax.select(positive, one / lax.select(positive, norm, one), lax.full_like(norm, 0))
  wide = lax.convert_element_type(x, norm.dtype)
  direction = wide * inverse
  tangent = lax.convert_element_type(t, norm.dtype)
  return norm, lax.expand_dims(lax.reduce_sum(direction * tangent, axes), axes)


safe_unit_norm = unit_norm
