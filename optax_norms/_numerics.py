"""Numerics shared by every transform: compute dtypes and safe norms (pure math)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
  "ONE_PASS_MIN_SIZE",
  "abs_zero_subgradient",
  "cast",
  "compute_dtype",
  "is_int",
  "SHARED_COND_MIN_SIZE",
  "safe_unit_norm",
  "unit_norm",
  "unit_norms",
]


def compute_dtype(dtype: Any) -> Any:
  """The dtype a leaf's arithmetic runs in: at least float32 (bf16/f16 are upcast in
  registers; XLA fuses the casts, so no float32 copy of the leaf is materialized). Written
  without type promotion so it holds under ``jax_numpy_dtype_promotion='strict'``."""
  dtype = jnp.dtype(dtype)
  return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def cast(x: Any, dtype: Any) -> jax.Array:
  """``x`` in `dtype`; no op traced when it already is (this runs per leaf per trace)."""
  return x if getattr(x, "dtype", None) == dtype else lax.convert_element_type(x, dtype)


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


class _NormScales(NamedTuple):
  """Powers of two for the overflow- and underflow-free unit norm (float32 values)."""

  up: float  # 2^31: the ordinary sum, exact for norms ~2^-61 … 2^32.
  down: float  # 2^-64: units whose scaled-up sum overflows (norms beyond ~4e9).
  tiny: float  # 2^92: units whose scaled-up sum is below `low` (norms below ~4e-19).
  high: float  # 2^126: the scaled-up sum's overflow threshold.
  low: float  # 2^-60: below it, squares of the unit's entries may have been flushed.


def _norm_scales(dtype: Any) -> _NormScales:
  emax = int(jnp.finfo(dtype).maxexp)  # 128 for float32, 1024 for float64.
  up = 2.0 ** (emax // 4 - 1)
  return _NormScales(
    up=up,
    down=2.0 ** -(emax // 2),
    tiny=up * 2.0 ** (emax // 2 - 3),
    high=2.0 ** (emax - 2),
    low=2.0 ** -(emax // 2 - 4),
  )


# Leaves of at least this many entries take one pass on XLA:CPU (see _unit_norm_value); below
# it a conditional costs more than the second pass over a small leaf.
ONE_PASS_MIN_SIZE = 1 << 16


def _sum_sq(wide: jax.Array, scale: Any, axes: tuple[int, ...]) -> jax.Array:
  scaled = wide * jnp.asarray(scale, wide.dtype)  # `scale`: a float or a 0-d array.
  return lax.expand_dims(lax.reduce_sum(lax.square(scaled), axes), axes)


def _sums_sq(wide: jax.Array, scales: tuple[float, ...], axes: tuple[int, ...]) -> list[jax.Array]:
  """``_sum_sq`` for several scales, as one reduction over a stacked broadcast of `wide`.

  XLA:CPU runs sibling reductions as one kernel each; this is one kernel for all of them,
  with the same sums bit for bit (each is the same reduction of the same scaled squares).
  """
  shape = (len(scales), *wide.shape)
  stacked = lax.broadcast_in_dim(wide, shape, tuple(range(1, wide.ndim + 1)))
  factors = lax.broadcast_in_dim(jnp.asarray(scales, wide.dtype), shape, (0,))
  inner = tuple(a + 1 for a in axes)
  sums = lax.expand_dims(lax.reduce_sum(lax.square(lax.mul(stacked, factors)), inner), inner)
  return [sums[i] for i in range(len(scales))]


class _Scheme:
  """The three scaled sums of one array and the choice between them (see ``_unit_norm_value``)."""

  def __init__(self, x: jax.Array, axes: tuple[int, ...]):
    self.small = x.size < ONE_PASS_MIN_SIZE  # Extra passes over it cost less than a cond.
    self.x = x
    self.wide = lax.convert_element_type(x, compute_dtype(x.dtype))
    self.axes = axes
    self.scales = _norm_scales(self.wide.dtype)

  def select(self, small: jax.Array, large: jax.Array, tiny: jax.Array) -> jax.Array:
    """The norm from the sum each unit needs (`large` and `tiny` unread where no unit does)."""
    scales = self.scales
    # lax, not operators: each jnp operator is a jit call to trace, per leaf and step.
    use_large = lax.bitwise_not(lax.lt(small, lax.full_like(small, scales.high)))  # inf, NaN too
    use_tiny = self.needs_tiny(small)
    # The sum first, then one square root and one power-of-two unscaling: the value of each
    # branch's own `sqrt(sum) / scale`, bit for bit, with one sqrt per unit instead of three.
    total = lax.select(use_large, large, lax.select(use_tiny, tiny, small))
    inverse = lax.select(
      use_large,
      lax.full_like(small, 1 / scales.down),
      lax.select(
        use_tiny, lax.full_like(small, 1 / scales.tiny), lax.full_like(small, 1 / scales.up)
      ),
    )
    return lax.mul(lax.sqrt(total), inverse)

  def needs_tiny(self, small: jax.Array) -> jax.Array:
    zero = lax.full_like(small, 0)
    low = lax.full_like(small, self.scales.low)
    return lax.bitwise_and(lax.gt(small, zero), lax.lt(small, low))

  def plain_sum(self) -> jax.Array:
    """The scaled-up sum (XLA:CPU only), its scale behind an optimization barrier with the
    input: XLA:CPU hands this reduction to a YNNPACK fusion, and a constant scale broadcast
    there is one leaf-sized array shared by the leaves of one shape, read by each (one more
    read of the leaf per step); a barrier'd scale is broadcast inside each fusion."""
    # The input before its upcast: a bfloat16 leaf is not materialized in float32 for this.
    x, scale = lax.optimization_barrier((self.x, lax.full((), self.scales.up, self.wide.dtype)))
    return _sum_sq(lax.convert_element_type(x, self.wide.dtype), scale, self.axes)

  def any_rare(self, small: jax.Array) -> jax.Array:
    """Whether some unit needs a sum other than `small` (a NaN sum does not)."""
    high = lax.full_like(small, self.scales.high)
    overflow = lax.bitwise_and(lax.bitwise_not(lax.lt(small, high)), lax.eq(small, small))
    return jnp.any(lax.bitwise_or(overflow, self.needs_tiny(small)))

  def sibling_sums(self) -> jax.Array:  # Sibling reductions: one pass over a leaf on XLA:GPU.
    scales = self.scales
    return self.select(*(_sum_sq(self.wide, s, self.axes) for s in scales[:3]))

  def stacked_sums(self) -> jax.Array:  # One kernel, also on XLA:CPU.
    return self.select(*_sums_sq(self.wide, tuple(self.scales[:3]), self.axes))

  def without_cond(self) -> jax.Array:  # Off XLA:CPU, and for a small array everywhere.
    return self.stacked_sums() if self.small else self.sibling_sums()


def _unit_norm_value(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Per-unit l2 norm, dims kept, in the compute dtype, without overflow or underflow.

  Sums of squares of ``x`` scaled by powers of two (exact): scaled up (by 2^31 for float32),
  used for ordinary units; scaled down (by 2^-64) for units whose scaled-up sum overflows
  (norms beyond ~4e9); scaled further up (by 2^92) for units whose scaled-up sum is below
  2^-60 but not zero (norms below ~4e-19, where the squares of the smallest entries may be
  subnormal, which XLA:CPU flushes to zero). Scaling by a power of two commutes with rounding,
  so on ordinary values the result is bit for bit ``sqrt(Σx²)``, and every unit of normal
  float32 entries gets its true norm within float32 rounding. A unit whose scaled-up squares
  are all flushed (entries all below ~5e-29 in float32) counts as a zero unit.

  The sums read the same input. A leaf of fewer than ``ONE_PASS_MIN_SIZE`` entries takes them
  as one reduction over a stacked broadcast of the input: one kernel on every backend (XLA:CPU
  runs sibling reductions as one kernel each), the same sums bit for bit, and one all-reduce of
  the three norm vectors where the unit axis is sharded. A larger leaf takes three sibling
  reductions on XLA:GPU/TPU, fused into one pass over the leaf; on XLA:CPU, which would read
  it three times, the scaled-up sum alone, and all three under a ``lax.cond`` only when some
  unit needs another: the same values, bit for bit, in one pass in every ordinary step.
  """
  scheme = _Scheme(x, axes)
  if scheme.small:
    return scheme.stacked_sums()

  def one_pass() -> jax.Array:
    small = scheme.plain_sum()
    fast = scheme.select(small, small, small)
    return lax.cond(scheme.any_rare(small), scheme.stacked_sums, lambda: fast)

  return lax.platform_dependent(cpu=one_pass, default=scheme.sibling_sums)


# On XLA:CPU, arrays of at least this many entries share one conditional in ``unit_norms``;
# below it the two extra products per entry cost less than being the conditional's operand.
SHARED_COND_MIN_SIZE = 1 << 12


def _unit_norms_value(
  xs: tuple[jax.Array, ...], axes: tuple[tuple[int, ...], ...]
) -> tuple[jax.Array, ...]:
  """``_unit_norm_value`` of each array, the same values bit for bit, with on XLA:CPU one
  ``lax.cond`` for all arrays of at least ``SHARED_COND_MIN_SIZE`` entries: their scaled-up
  sums alone, and the three sums of all of them only when some unit of one of them needs
  another. Elsewhere (XLA:GPU/TPU, or fewer than two such arrays) each takes its own scheme."""
  shared = [i for i, x in enumerate(xs) if x.size >= SHARED_COND_MIN_SIZE]
  if len(shared) < 2:
    return tuple(_unit_norm_value(x, a) for x, a in zip(xs, axes))
  schemes = [_Scheme(x, a) for x, a in zip(xs, axes)]

  def own_schemes() -> tuple[jax.Array, ...]:
    return tuple(s.without_cond() for s in schemes)

  def one_cond() -> tuple[jax.Array, ...]:
    in_cond = set(shared)
    norms = {i: s.stacked_sums() for i, s in enumerate(schemes) if i not in in_cond}
    smalls = [schemes[i].plain_sum() for i in shared]
    # One predicate over the concatenated sums of each compute dtype (its scales): one kernel.
    by_dtype: dict[Any, tuple[_Scheme, list[jax.Array]]] = {}
    for i, s in zip(shared, smalls):
      by_dtype.setdefault(s.dtype, (schemes[i], []))[1].append(lax.reshape(s, (s.size,)))
    rare = jnp.any(
      jnp.stack([scheme.any_rare(jnp.concatenate(flat)) for scheme, flat in by_dtype.values()])
    )
    # The fast norms pass through the false branch unchanged: computed there, they would be
    # kernels of their own and keep XLA from fusing them into their consumers.
    fast = tuple(schemes[i].select(s, s, s) for i, s in zip(shared, smalls))
    exact = lambda: tuple(schemes[i].stacked_sums() for i in shared)  # noqa: E731
    norms.update(zip(shared, lax.cond(rare, exact, lambda: fast)))
    return tuple(norms[i] for i in range(len(xs)))

  return lax.platform_dependent(cpu=one_cond, default=own_schemes)


def _norm_tangent(x: jax.Array, t: jax.Array, norm: jax.Array, axes: tuple[int, ...]):
  """The derivative of the unit norm along `t`: ``Σ (x/‖x‖)·t`` per unit, 0 at a zero unit."""
  positive = norm > 0
  one = lax.full_like(norm, 1)
  inverse = lax.select(positive, one / lax.select(positive, norm, one), lax.full_like(norm, 0))
  direction = lax.convert_element_type(x, norm.dtype) * inverse
  tangent = lax.convert_element_type(t, norm.dtype)
  return lax.expand_dims(lax.reduce_sum(direction * tangent, axes), axes)


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
  return norm, _norm_tangent(x, t, norm, axes)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def unit_norms(
  xs: tuple[jax.Array, ...], axes: tuple[tuple[int, ...], ...]
) -> tuple[jax.Array, ...]:
  """``unit_norm`` of several arrays (the leaves of one step), bit for bit, at less cost on
  XLA:CPU: one conditional serves all arrays of at least ``SHARED_COND_MIN_SIZE`` entries."""
  return _unit_norms_value(xs, axes)


@unit_norms.defjvp
def _unit_norms_jvp(axes, primals, tangents):
  (xs,), (ts,) = primals, tangents
  norms = _unit_norms_value(xs, axes)
  return norms, tuple(_norm_tangent(x, t, n, a) for x, t, n, a in zip(xs, ts, norms, axes))


safe_unit_norm = unit_norm
