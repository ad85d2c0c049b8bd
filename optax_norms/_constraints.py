"""Weight constraints (max norm on weights): project ``w + u`` back inside the bound.

Place them **last** in the chain. The update becomes ``u' = proj(w + u) − w`` where the
bound is violated; elsewhere ``optax.apply_updates`` stores exactly the value it stores for
``u``: the update there is ``u`` in bfloat16/float16 leaves and ``(w + u) − w`` rounded in
float32/float64 leaves, which round-to-nearest adds back to the float ``w + u`` exactly (so
the constraint need not read ``u`` again, nor XLA keep adam's update as a buffer for it).

The bound is exact on the values ``optax.apply_updates`` stores, in the leaf's dtype:
``|w| ≤ c`` and ``‖w_unit‖ ≤ c`` hold when checked in float64. Three roundings could
break it and each is closed here: the bound itself is rounded towards zero to the leaf
dtype; the projected point is rounded towards zero to the leaf dtype; and the update
``u' = q − w`` is chosen so that ``w + u'`` rounds to ``q`` or towards zero from it (the
addition ``apply_updates`` performs is repeated here, and ``u'`` moved by one ulp where it
would round outwards). Per-unit projections aim at the radius ``c·(1 − δ)``,
``δ = (2·√n + 8)·2⁻²⁴`` for a unit of ``n`` entries (``δ ≈ 1.7e-6`` for 100 entries), about
ten times the typical rounding error of the float32 norm (``≈ 0.15·√n·2⁻²⁴``).

The update form has one limit: ``w + u'`` is rounded on the float grid near ``|w|``, not near
the target ``q``. Each stored element is within one ulp of ``|q − w|`` of ``q``, so a
projected unit's norm is within ``δ + 2ε·(‖w_unit‖/t + 2)`` of its target norm ``t``,
relative (``ε`` the unit roundoff of the leaf dtype: ``2⁻²⁴`` float32, ``2⁻⁸`` bfloat16,
``2⁻¹¹`` float16). Shrinking a unit ~100× costs ~100 ulps of the target: float32 weights
uniform in ±50, units of 16 entries (norm ≈ 115) projected to norm 1 land up to ≈ 1e-5 from
it (a direct float32 projection: ≈ 1e-7). The bound itself (``≤ c``) still holds exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_norms._clipping import unit_scale
from optax_norms._hyperparams import ScalarOrSchedule
from optax_norms._layout import Axis
from optax_norms._masks import Mask
from optax_norms._numerics import cast
from optax_norms._transform import leafwise_transform

__all__ = [
  "constrain_max_abs",
  "constrain_row_norm",
  "exact_update",
  "projected_update",
  "radius_factor",
  "round_to_leaf",
  "round_toward_zero",
  "stored_sum",
]


def radius_factor(units: int) -> float:
  """``1 − δ``, ``δ = (2·√n + 8)·2⁻²⁴``: room for the float32 rounding of a unit's norm."""
  return 1 - (2 * math.sqrt(units) + 8) * 2.0**-24


def round_to_leaf(x, leaf_dtype):
  """`x` rounded to the nearest value of `leaf_dtype` (ties to even), kept in ``x.dtype``.

  ``x.astype(leaf_dtype).astype(x.dtype)`` is not reliable inside ``jax.jit``: within a fusion
  XLA may drop that pair of converts and keep the float32 value (its excess-precision rewrite,
  ``xla_allow_excess_precision``). ``lax.reduce_precision`` is never dropped. It flushes the
  leaf's subnormals to zero, so those (float16 below ``2⁻¹⁴``) are rounded on their own grid.
  Traces no op when `x` already has the leaf dtype (float32 leaves).
  """
  if x.dtype == leaf_dtype:
    return x
  info = jnp.finfo(leaf_dtype)
  out = lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  if info.nexp < jnp.finfo(x.dtype).nexp:  # Leaf subnormals are normal numbers in x.dtype.
    tiny, step = float(info.smallest_normal), float(info.smallest_subnormal)
    sub = lax.round(x * (1 / step), lax.RoundingMethod.TO_NEAREST_EVEN) * step
    out = jnp.where(jnp.abs(x) < tiny, sub, out)
    # Exact round trip: where XLA keeps the result for several consumers, it keeps it in the
    # leaf dtype, not as a float32 copy of the leaf.
    out = out.astype(leaf_dtype).astype(x.dtype)
  return out


def round_toward_zero(x, leaf_dtype):
  """`x` (compute dtype) rounded to `leaf_dtype` towards zero, returned in the leaf dtype."""
  if x.dtype == leaf_dtype:  # Nothing to round (float32 leaves): no ops traced.
    return x
  nearest = round_to_leaf(x, leaf_dtype)
  outward = jnp.abs(nearest) > jnp.abs(x)
  nearest = nearest.astype(leaf_dtype)  # Exact: `nearest` is on the leaf's grid.
  return jnp.where(outward, _one_ulp(nearest, jnp.ones_like(outward)), nearest)


@jax.custom_jvp
def _one_ulp(x, toward_zero):
  """`x` moved one ulp: towards zero where `toward_zero`, away from it elsewhere; differentiated
  as the identity (a rounding correction).

  An integer step on the bit pattern (sign and magnitude: the magnitude's bits are ±1 away),
  a few integer operations where ``jnp.nextafter`` expands to a dozen on XLA:CPU. Callers use
  it on finite nonzero `x` only (a zero, an inf or a NaN is never selected afterwards).
  """
  bits = lax.bitcast_convert_type(x, _SAME_WIDTH_INT[jnp.dtype(x.dtype).itemsize])
  step = lax.select(toward_zero, lax.full_like(bits, -1), lax.full_like(bits, 1))
  return lax.bitcast_convert_type(lax.add(bits, step), x.dtype)


@_one_ulp.defjvp
def _one_ulp_jvp(primals, tangents):
  return _one_ulp(*primals), tangents[0]


_SAME_WIDTH_INT = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


def stored_sum(w, u, leaf_dtype):
  """What ``optax.apply_updates`` stores for ``w + u``, in the leaf dtype: the addition of
  ``w`` and ``u`` as the leaf dtype holds them, rounded to the leaf dtype (exactly).

  Rules return ``round_to_leaf(u, leaf_dtype)`` (not `u`) where they keep the update, so that the
  stored addition sees the same ``u`` as this one even where XLA keeps `u` in float32.
  """
  return cast(round_to_leaf(lax.add(w, round_to_leaf(u, leaf_dtype)), leaf_dtype), leaf_dtype)


def exact_update(w, target, leaf_dtype, limit=None):
  """``u'`` in the compute dtype such that ``w + u'`` stored in `leaf_dtype` is `target`
  (representable in the leaf dtype) or lies between 0 and `target`.

  ``u' = q − w`` rounded once; where the stored sum would land outside ``q`` (only when
  ``|w|`` is not small next to ``|q|``), ``u'`` moves one ulp towards the inside, which
  lands it on ``q`` or inside (the rounding error of ``q − w`` is at most half that ulp).
  Every rounding is a ``round_to_leaf``, so the sum compared is the one stored, also in a fused
  ``jax.jit`` step. A caller whose targets are either ``±limit`` or stored exactly (the
  element-wise box) passes `limit`: the stored sum is compared with it, not with ``|q|``.
  """
  # lax, not operators: each jnp operator is a jit call to trace, per leaf and step.
  first = round_to_leaf(lax.sub(target, w), leaf_dtype)
  stored = round_to_leaf(lax.add(w, first), leaf_dtype)
  outward = lax.gt(lax.abs(stored), lax.abs(target) if limit is None else limit)
  # One ulp towards −sign(target): a smaller magnitude where `first` has the sign of `target`.
  zero = lax.full_like(first, 0)
  toward_zero = lax.eq(lax.gt(first, zero), lax.gt(target, zero))
  moved = cast(_one_ulp(cast(first, leaf_dtype), toward_zero), w.dtype)
  return lax.select(outward, moved, first)


def projected_update(u, w, target, moved, leaf_dtype, limit=None):
  """The update that stores `target` where `moved` and exactly ``w + u`` elsewhere.

  Where `moved` is False the caller's `target` must be ``v``, the stored sum of ``w + u``
  (its scale there is exactly 1). In a leaf of the compute dtype (float32, float64) that
  needs no select and no read of `u`: ``exact_update(w, v)`` is ``(v − w)`` rounded, and in
  binary round-to-nearest arithmetic ``w + ((w + u) − w)`` rounds back to the float ``w + u``
  (``-0.0`` may come back ``+0.0``), so `u` need not be kept as a buffer for this select (after
  adam, XLA would otherwise materialize adam's update). A bfloat16 or float16 leaf rounds
  the sum twice (compute dtype, then leaf), where that identity fails: it keeps `u` there.
  `limit` is passed on to ``exact_update``.
  """
  update = exact_update(w, target, leaf_dtype, limit)
  if w.dtype == leaf_dtype:
    return update
  return jnp.where(moved, update, round_to_leaf(u, leaf_dtype))


def constrain_max_abs(
  max_abs: ScalarOrSchedule, *, mask: Mask = None
) -> optax.GradientTransformation:
  """Keeps every selected weight in ``[−c, c]``: a hard max-abs constraint.

  The new weights are the projection of ``v = w + u`` onto the box ``‖w‖_∞ ≤ c``:
  ``w + u' = clip(v, −c, c)``, so ``u' = clip(v, −c, c) − w`` where the bound is violated;
  elsewhere the stored value is exactly ``w + u``. The bound holds exactly on the values ``optax.apply_updates`` stores,
  in the leaf's dtype (see the notes of this module).

  Args:
    max_abs: the bound ``c ≥ 0``: a number or a schedule.
    mask: the leaves to constrain; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation`` to place last in the chain; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> params = {"w": jnp.array([0.25, 1.0, -2.0])}
    >>> tx = optax.chain(optax.sgd(1.0), optax_norms.constrain_max_abs(0.5))
    >>> updates, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [0.25, 0.5, -0.5]
  """

  def rule(u, w, *, max_abs, leaf_dtype):
    # lax, not operators: each jnp operator is a jit call to trace, per leaf and step.
    v = cast(stored_sum(w, u, leaf_dtype), w.dtype)
    bound = lax.full_like(v, cast(round_toward_zero(max_abs, leaf_dtype), w.dtype))
    clipped = lax.min(lax.max(v, lax.neg(bound)), bound)  # jnp.clip: NaN stays NaN.
    target = cast(round_toward_zero(clipped, leaf_dtype), w.dtype)
    # Only a bfloat16/float16 leaf reads where the bound moved v (see projected_update).
    moved = None if w.dtype == leaf_dtype else lax.bitwise_not(lax.le(lax.abs(v), bound))
    # Each target is ±bound or v itself (stored exactly): the stored sum is compared with bound.
    return projected_update(u, w, target, moved, leaf_dtype, limit=bound)

  return leafwise_transform(
    "constrain_max_abs",
    rule,
    {"max_abs": max_abs},
    mask=mask,
    needs_params=True,
    bounds=("max_abs",),
  )


def constrain_row_norm(
  max_norm: ScalarOrSchedule, *, axis: Axis = None, mask: Mask = None
) -> optax.GradientTransformation:
  """Keeps each unit's weight vector in the ball ``‖w_unit‖₂ ≤ c`` (Keras ``MaxNorm``).

  The new weights are the per-unit projection of ``v = w + u`` onto the ball:
  ``w + u' = v_unit·min(1, c/‖v_unit‖)``. Units inside the ball are left exactly as ``w + u``
  (no Keras-style ``n/(n + 1e-7)`` shrink); zero units stay zero; units outside land just
  inside the ball (``‖w_unit‖ ≤ c`` holds exactly on the stored values; a unit shrunk from
  ``‖w_unit‖`` lands within ``δ + 2ε·(‖w_unit‖/c + 2)`` of ``c``, relative, see the notes of
  this module). Keras
  ``MaxNorm(c, axis=0)`` on a Dense kernel and ``MaxNorm(c, axis=[0, 1, 2])`` on a Conv
  kernel are this transform with the default axis; PyTorch ``torch.renorm(W, 2, 0, c)`` on an
  ``(out, in)`` weight is ``axis=1``.

  Args:
    max_norm: the radius ``c ≥ 0``: a number or a schedule.
    axis: the reduced axes of a unit (default all but the last for rank ≥ 2, the whole
      leaf for rank ≤ 1), an int, a tuple, or a callable ``(path, leaf) -> axes``.
    mask: the leaves to constrain; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation`` to place last in the chain; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])}  # unit norms 5 and 1
    >>> tx = optax.chain(optax.sgd(1.0), optax_norms.constrain_row_norm(2.5))
    >>> updates, _ = tx.update({"kernel": jnp.zeros((2, 2))}, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)["kernel"]
    >>> round(float(jnp.linalg.norm(new[:, 0])), 4), new[:, 1].tolist()
    (2.5, [0.0, 1.0])

  References:
    Keras ``keras.constraints.MaxNorm``; PyTorch ``torch.renorm``; N. Srivastava et al.,
    "Dropout: a simple way to prevent neural networks from overfitting", JMLR 15, 2014.
  """

  def rule(u, w, *, max_norm, axes, leaf_dtype):
    units = math.prod(w.shape[a] for a in axes)
    radius = max_norm * radius_factor(units)
    # v: what apply_updates would store without the constraint (w + u in the leaf dtype).
    v = cast(stored_sum(w, u, leaf_dtype), w.dtype)
    scale = unit_scale((yield v), radius)  # The factory computes every leaf's norms at once.
    # Inside the ball the scale is exactly 1, so apply_updates stores exactly w + u there.
    target = cast(round_toward_zero(v * scale, leaf_dtype), w.dtype)
    return projected_update(u, w, target, lax.lt(scale, lax.full_like(scale, 1)), leaf_dtype)

  return leafwise_transform(
    "constrain_row_norm",
    rule,
    {"max_norm": max_norm},
    mask=mask,
    needs_params=True,
    per_unit=True,
    axis=axis,
    bounds=("max_norm",),
  )
