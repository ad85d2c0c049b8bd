"""The other Keras weight constraints: ``UnitNorm``, ``MinMaxNorm`` and ``NonNeg``.

Placed **last** in the chain, like ``constrain_row_norm``: each one maps ``v = w + u`` (the
values ``optax.apply_updates`` would store) to the constrained weights and returns
``u' = target − w``, so that what is stored is the target, rounded towards zero where a
bound is promised (see ``optax_norms._constraints``). Unlike Keras there is no ``1e-7``
epsilon: zero units stay exactly zero and units already satisfying the constraint are left
exactly as ``w + u``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_norms._constraints import (
  projected_update,
  radius_factor,
  round_to_leaf,
  round_toward_zero,
  stored_sum,
)
from optax_norms._hyperparams import ScalarOrSchedule, is_schedule
from optax_norms._layout import Axis
from optax_norms._masks import Mask
from optax_norms._transform import leafwise_transform

__all__ = ["constrain_min_max_norm", "constrain_non_negative", "constrain_unit_norm"]


def _concrete(value: Any) -> float | None:
  """The value as a float when it is known now (not a schedule, not traced)."""
  if is_schedule(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(np.asarray(value, np.float64))
  except (TypeError, ValueError):
    return None  # Not a scalar: the hyperparameter checks report it.


def constrain_unit_norm(*, axis: Axis = None, mask: Mask = None) -> optax.GradientTransformation:
  """Gives every selected unit ℓ2 norm 1 (Keras ``UnitNorm``).

  Per unit, ``w + u' = v_unit/‖v_unit‖`` with ``v = w + u``: every non-zero unit lands on the
  unit sphere from inside, ``1 − δ − 2ε·(‖w_unit‖ + 2) ≤ ‖w_unit‖_new ≤ 1`` on the stored
  values, in float64 (``δ = (2·√n + 8)·2⁻²⁴`` for ``n`` entries, as ``constrain_row_norm``;
  ``ε`` the unit roundoff of the leaf dtype, ``2⁻²⁴`` in float32). The ``2ε·‖w_unit‖`` term
  is the update form's: ``w + u'`` is rounded near ``|w|``, so float32 weights uniform in
  ±50 (units of 16, norm ≈ 115) land up to ≈ 1e-5 below 1, where Keras's own test wants 1e-6
  (a direct float32 projection is within ≈ 1e-7). A zero unit stays zero (no NaN); so does a
  float32 unit whose entries are all below ~5e-29 (its scaled squares are subnormal, which
  XLA:CPU flushes to zero); a NaN or inf stays inside its unit. Keras's ``w/(1e-7 + ‖w‖)`` differs by the epsilon only.

  Args:
    axis: the reduced axes of a unit (default all but the last for rank ≥ 2, the whole
      leaf for rank ≤ 1), an int, a tuple, or a callable ``(path, leaf) -> axes``.
    mask: the leaves to constrain; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation`` to place last in the chain; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 0.0]])}  # unit norms 5 and 0
    >>> tx = optax.chain(optax.sgd(1.0), optax_norms.constrain_unit_norm())
    >>> updates, _ = tx.update({"kernel": jnp.zeros((2, 2))}, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)["kernel"]
    >>> [round(float(n), 5) for n in jnp.linalg.norm(new, axis=0)], new[:, 1].tolist()
    ([1.0, 0.0], [0.0, 0.0])

  References:
    Keras ``keras.constraints.UnitNorm(axis=0)`` (Dense; ``axis=[0, 1, 2]`` for Conv).
  """

  def rule(u, w, *, axes, leaf_dtype):
    units = math.prod(w.shape[a] for a in axes)
    v = stored_sum(w, u, leaf_dtype).astype(w.dtype)
    norm = yield v  # The factory computes every leaf's unit norms at once.
    nonzero = norm > 0
    one = lax.full_like(norm, 1)
    radius = lax.full_like(norm, radius_factor(units))
    scale = lax.select(nonzero, radius, one) / lax.select(nonzero, norm, one)
    target = round_toward_zero(v * scale, leaf_dtype).astype(w.dtype)
    return projected_update(u, w, target, nonzero, leaf_dtype)

  return leafwise_transform(
    "constrain_unit_norm",
    rule,
    {},
    mask=mask,
    needs_params=True,
    per_unit=True,
    axis=axis,
  )


def constrain_min_max_norm(
  min_norm: ScalarOrSchedule,
  max_norm: ScalarOrSchedule,
  rate: ScalarOrSchedule = 1.0,
  *,
  axis: Axis = None,
  mask: Mask = None,
) -> optax.GradientTransformation:
  """Pulls each unit's norm into ``[min_norm, max_norm]`` at ``rate`` (Keras ``MinMaxNorm``).

  Per unit, with ``v = w + u`` and ``n = ‖v_unit‖₂``:
  ``w + u' = v·(rate·clip(n, min_norm, max_norm) + (1 − rate)·n)/n``. ``rate = 1`` is the
  strict constraint: units outside the band land on its edge, and ``‖w_unit‖ ≤ max_norm``
  then holds exactly on the stored values (the top edge is approached from inside, as in
  ``constrain_row_norm``); a unit moved from ``‖w_unit‖`` to the norm ``t`` lands within
  ``δ + 2ε·(‖w_unit‖/t + 2)`` of it, relative (the update form's rounding, see
  ``constrain_unit_norm``); ``rate < 1`` moves the norm part of the way. Units inside the band
  are left exactly as ``w + u`` (Keras shrinks them by ``n/(n + 1e-7)``); zero units stay
  zero (Keras's ``1e-7`` epsilon is not needed); a NaN or inf stays inside its unit.

  Args:
    min_norm: the lower edge ``≥ 0``: a number or a schedule.
    max_norm: the upper edge ``≥ min_norm``: a number or a schedule.
    rate: ``0 ≤ rate ≤ 1``, how far each step moves a norm towards the band: a number or
      a schedule.
    axis: the reduced axes of a unit (default all but the last for rank ≥ 2, the whole
      leaf for rank ≤ 1), an int, a tuple, or a callable ``(path, leaf) -> axes``.
    mask: the leaves to constrain; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation`` to place last in the chain; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> params = {"kernel": jnp.array([[3.0, 0.3], [4.0, 0.4]])}  # unit norms 5 and 0.5
    >>> tx = optax.chain(optax.sgd(1.0), optax_norms.constrain_min_max_norm(1.0, 2.0))
    >>> updates, _ = tx.update({"kernel": jnp.zeros((2, 2))}, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)["kernel"]
    >>> [round(float(n), 4) for n in jnp.linalg.norm(new, axis=0)]
    [2.0, 1.0]

  References:
    Keras ``keras.constraints.MinMaxNorm(min_value, max_value, rate, axis=0)``.
  """
  low, high, fraction = _concrete(min_norm), _concrete(max_norm), _concrete(rate)
  if fraction is not None and fraction > 1:
    raise ValueError(f"`rate` must be in [0, 1], got {fraction}.")
  if low is not None and high is not None and low > high:
    raise ValueError(f"`min_norm` ({low}) must not exceed `max_norm` ({high}).")

  def rule(u, w, *, min_norm, max_norm, rate, axes, leaf_dtype):
    units = math.prod(w.shape[a] for a in axes)
    v = stored_sum(w, u, leaf_dtype).astype(w.dtype)
    norm = yield v  # The factory computes every leaf's unit norms at once.
    radius = max_norm * radius_factor(units)
    clipped = jnp.minimum(jnp.maximum(norm, min_norm), radius)
    desired = rate * clipped + (1 - rate) * norm
    change = ((norm > max_norm) | (norm < min_norm)) & (norm > 0) & (rate > 0)
    one = lax.full_like(norm, 1)
    scale = lax.select(change, desired, one) / lax.select(change, norm, one)
    target = round_toward_zero(v * scale, leaf_dtype).astype(w.dtype)
    return projected_update(u, w, target, change, leaf_dtype)

  return leafwise_transform(
    "constrain_min_max_norm",
    rule,
    {"min_norm": min_norm, "max_norm": max_norm, "rate": rate},
    mask=mask,
    needs_params=True,
    per_unit=True,
    axis=axis,
    bounds=("max_norm",),
  )


def constrain_non_negative(*, mask: Mask = None) -> optax.GradientTransformation:
  """Keeps every selected weight ``≥ 0`` (Keras ``NonNeg``).

  ``w + u' = max(w + u, 0)``: ``u' = −w`` where ``w + u < 0`` (the stored weight is then
  exactly 0) and ``u' = u`` elsewhere, so the stored values are ``≥ 0`` exactly. NaN stays
  NaN (Keras's ``w·(w ≥ 0)`` keeps it too).

  Args:
    mask: the leaves to constrain; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation`` to place last in the chain; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> params = {"w": jnp.array([0.5, -1.0, 2.0])}
    >>> tx = optax.chain(optax.sgd(1.0), optax_norms.constrain_non_negative())
    >>> updates, _ = tx.update({"w": jnp.array([1.0, 0.0, -0.5])}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [0.0, 0.0, 2.5]

  References:
    Keras ``keras.constraints.NonNeg``.
  """

  def rule(u, w, *, leaf_dtype):
    negative = stored_sum(w, u, leaf_dtype) < 0
    return jnp.where(negative, -w, round_to_leaf(u, leaf_dtype))

  return leafwise_transform(
    "constrain_non_negative",
    rule,
    {},
    mask=mask,
    needs_params=True,
  )
