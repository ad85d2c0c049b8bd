"""Loss-space penalties: pure functions returning a float32 scalar.

Add them to a loss, or log them. For every penalty ``P`` and its gradient-space twin ``T``,
``T.update(g, s, w)[0] == g + jax.grad(P)(w)``, at ``w = 0`` too: ``|w|`` and unit norms
have a zero derivative at zero here (JAX's own ``abs`` has derivative 1 at 0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_norms._hyperparams import Scalar, check_value, is_schedule
from optax_norms._layout import Axis
from optax_norms._masks import Mask
from optax_norms._numerics import abs_zero_subgradient, compute_dtype, unit_norm
from optax_norms._transform import selected_leaves
from optax_norms._units import resolve_axes

__all__ = [
  "elastic_penalty",
  "group_l2_penalty",
  "l1_penalty",
  "l2_penalty",
  "max_norm_penalty",
]


def _hyper(name: str, value: Any) -> Any:
  if is_schedule(value):
    raise ValueError(f"`{name}` must be a number here, not a schedule: penalties have no step.")
  check_value(name, value)
  return value if isinstance(value, jax.core.Tracer) else float(value)


def _sum_over(params: Any, mask: Mask, leaf_term, axis: Axis = None) -> jax.Array:
  """Σ over selected floating-point leaves of ``leaf_term(leaf in >= f32, axes)``."""
  paths, leaves, _, active = selected_leaves(mask, params, check=True)
  total = jnp.zeros([], jnp.float32)
  for path, leaf, selected in zip(paths, leaves, active):
    if selected:
      term = leaf_term(leaf.astype(compute_dtype(leaf.dtype)), resolve_axes(axis, path, leaf))
      total = total + term.astype(jnp.float32)
  return total


def l2_penalty(params: Any, alpha: Scalar, *, mask: Mask = None) -> jax.Array:
  """The L2 penalty ``α·Σ w²`` over the selected leaves, as a float32 scalar.

  ``P(w) = α·Σ w²``, without a ½ (Keras ``L2(α)``); its gradient ``2α·w`` is what
  ``add_l2_decay(α)`` adds to the updates. Sums accumulate in ≥ float32.

  Args:
    params: the parameters (any pytree).
    alpha: the penalty weight ``α ≥ 0``: a number, not a schedule.
    mask: the leaves to include; ``None`` is every floating-point leaf.

  Returns:
    A float32 scalar ``jax.Array``; differentiable and jittable.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> float(optax_norms.l2_penalty({"kernel": jnp.array([1.0, 2.0])}, 0.5))
    2.5

  References:
    Keras ``keras.regularizers.L2(α)``.
  """
  alpha = _hyper("alpha", alpha)
  return jnp.asarray(alpha * _sum_over(params, mask, lambda w, _: jnp.sum(jnp.square(w))))


def l1_penalty(params: Any, alpha: Scalar, *, mask: Mask = None) -> jax.Array:
  """The L1 penalty ``α·Σ |w|`` over the selected leaves, as a float32 scalar.

  ``P(w) = α·Σ |w|`` (Keras ``L1(α)``). Its derivative at ``w = 0`` is 0 here (JAX's own
  ``abs`` has derivative 1 there), so ``jax.grad`` gives ``α·sign(w)``, what
  ``add_l1_decay(α)`` adds to the updates.

  Args:
    params: the parameters (any pytree).
    alpha: the penalty weight ``α ≥ 0``: a number, not a schedule.
    mask: the leaves to include; ``None`` is every floating-point leaf.

  Returns:
    A float32 scalar ``jax.Array``; differentiable and jittable.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> float(optax_norms.l1_penalty({"kernel": jnp.array([1.0, -2.0])}, 0.5))
    1.5

  References:
    Keras ``keras.regularizers.L1(α)``.
  """
  alpha = _hyper("alpha", alpha)
  return jnp.asarray(alpha * _sum_over(params, mask, lambda w, _: jnp.sum(abs_zero_subgradient(w))))


def elastic_penalty(params: Any, l1: Scalar, l2: Scalar, *, mask: Mask = None) -> jax.Array:
  """The elastic-net penalty ``l1·Σ|w| + l2·Σw²`` over the selected leaves, as a float32 scalar.

  ``P(w) = l1·Σ|w| + l2·Σw²`` (Keras ``L1L2(l1, l2)``, no ½); its gradient
  ``l1·sign(w) + 2·l2·w`` (0 for ``|w|`` at ``w = 0``) is what ``elastic(l1, l2)`` adds to
  the updates.

  Args:
    params: the parameters (any pytree).
    l1: the L1 weight ``≥ 0``: a number, not a schedule.
    l2: the L2 weight ``≥ 0``: a number, not a schedule.
    mask: the leaves to include; ``None`` is every floating-point leaf.

  Returns:
    A float32 scalar ``jax.Array``; differentiable and jittable.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> float(optax_norms.elastic_penalty({"w": jnp.array([1.0, -2.0])}, 1.0, 0.5))
    5.5

  References:
    Keras ``keras.regularizers.L1L2(l1, l2)``; scikit-learn ``ElasticNet``.
  """
  l1, l2 = _hyper("l1", l1), _hyper("l2", l2)
  return _sum_over(
    params,
    mask,
    lambda w, _: l1 * jnp.sum(abs_zero_subgradient(w)) + l2 * jnp.sum(jnp.square(w)),
  )


def group_l2_penalty(
  params: Any, alpha: Scalar, *, axis: Axis = None, mask: Mask = None
) -> jax.Array:
  """The group-lasso penalty ``α·Σ_units ‖w_unit‖₂`` over the selected leaves, as a float32 scalar.

  ``P(w) = α·Σ_units ‖w_unit‖₂``, with units as in ``prox_group_l2`` (``axis`` names the
  reduced axes). Its gradient at a zero unit is 0.

  Args:
    params: the parameters (any pytree).
    alpha: the group weight ``α ≥ 0``: a number, not a schedule.
    axis: the reduced axes of a unit (default all but the last for rank ≥ 2, the whole leaf
      for rank ≤ 1), an int, a tuple, or a callable ``(path, leaf) -> axes``.
    mask: the leaves to include; ``None`` is every floating-point leaf.

  Returns:
    A float32 scalar ``jax.Array``; differentiable and jittable.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> float(optax_norms.group_l2_penalty({"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])}, 1.0))
    6.0

  References:
    M. Yuan and Y. Lin, "Model selection and estimation in regression with grouped
    variables", J. R. Stat. Soc. B 68(1), 2006.
  """
  alpha = _hyper("alpha", alpha)
  return jnp.asarray(
    alpha * _sum_over(params, mask, lambda w, axes: jnp.sum(unit_norm(w, axes)), axis)
  )


def max_norm_penalty(
  params: Any, max_norm: Scalar, alpha: Scalar, *, axis: Axis = None, mask: Mask = None
) -> jax.Array:
  """The soft max-norm penalty ``α·Σ_units max(0, ‖w_unit‖ − c)²``, as a float32 scalar.

  ``P(w) = α·Σ_units max(0, ‖w_unit‖ − c)²`` is zero inside the ball of radius ``c``; its
  gradient is what ``add_max_norm_decay(c, α)`` adds to the updates.

  Args:
    params: the parameters (any pytree).
    max_norm: the radius ``c ≥ 0``: a number, not a schedule.
    alpha: the penalty weight ``α ≥ 0``: a number, not a schedule.
    axis: the reduced axes of a unit (default all but the last for rank ≥ 2, the whole leaf
      for rank ≤ 1), an int, a tuple, or a callable ``(path, leaf) -> axes``.
    mask: the leaves to include; ``None`` is every floating-point leaf.

  Returns:
    A float32 scalar ``jax.Array``; differentiable and jittable.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> float(optax_norms.max_norm_penalty({"kernel": jnp.array([[3.0], [4.0]])}, 2.0, 1.0))
    9.0

  References:
    N. Srivastava et al., "Dropout: a simple way to prevent neural networks from
    overfitting", JMLR 15, 2014 (the hard max-norm constraint that this penalty softens).
  """
  max_norm, alpha = _hyper("max_norm", max_norm), _hyper("alpha", alpha)

  def term(w, axes):
    return jnp.sum(jnp.square(jnp.maximum(unit_norm(w, axes) - max_norm, 0)))

  return jnp.asarray(alpha * _sum_over(params, mask, term, axis))
