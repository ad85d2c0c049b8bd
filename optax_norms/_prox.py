"""Proximal steps: exact zeros from L1, elastic-net and group-L2 penalties.

Place them **last**, after the learning-rate scaling. Each turns the optimizer's update
``u`` into ``u' = prox(w + u) − w``, so that ``optax.apply_updates`` lands on the proximal
point of the gradient step: proximal gradient descent (ISTA) when the optimizer is
``optax.sgd(lr)``. Pass them the same learning rate (number or schedule) as the optimizer.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from optax_norms._hyperparams import ScalarOrSchedule
from optax_norms._masks import Mask
from optax_norms._numerics import Axis, unit_norm
from optax_norms._transform import leafwise_transform

__all__ = ["prox_elastic", "prox_group_l2", "prox_l1", "soft_threshold"]


def soft_threshold(x, threshold):
  """``sign(x)·max(|x| − t, 0)``: the proximal operator of ``t·|x|``."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0)


def prox_l1(
    alpha: ScalarOrSchedule, learning_rate: ScalarOrSchedule, *, mask: Mask = None
) -> optax.GradientTransformation:
  r"""Proximal step of ``α·Σ|w|``: ``w + u' = soft(w + u, lr·α)``.

  Solves ``argmin_y ½‖y − (w+u)‖² + lr·α·‖y‖₁`` (jaxopt's ``prox_lasso`` with
  ``scaling=lr``). Weights whose step lands within ``lr·α`` of zero become exactly zero.

  Args:
    alpha: the L1 weight ``α ≥ 0``: a number or a schedule.
    learning_rate: the optimizer's learning rate: the same number or schedule. With a
      schedule, step ``k`` uses ``learning_rate(k)``, as ``optax.sgd`` does.
    mask: the leaves to threshold; ``None`` is every floating-point leaf.

  Example:
    >>> import optax, optax_norms
    >>> lr = 0.1
    >>> tx = optax.chain(optax.sgd(lr), optax_norms.prox_l1(1e-3, lr, mask="**/kernel"))
  """

  def rule(u, w, *, alpha, learning_rate):
    return soft_threshold(w + u, learning_rate * alpha) - w

  return leafwise_transform(
      "prox_l1", rule, {"alpha": alpha, "learning_rate": learning_rate}, mask=mask,
      needs_params=True,
  )


def prox_elastic(
    l1: ScalarOrSchedule,
    l2: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule,
    *,
    mask: Mask = None,
) -> optax.GradientTransformation:
  r"""Proximal step of ``l1·Σ|w| + l2·Σw²``: ``w + u' = soft(w + u, lr·l1) / (1 + 2·lr·l2)``.

  Solves ``argmin_y ½‖y − (w+u)‖² + lr·(l1·‖y‖₁ + l2·‖y‖²)``. scikit-learn's
  ``ElasticNet(alpha=a, l1_ratio=ρ)`` is ``prox_elastic(a·ρ, a·(1−ρ)/2, lr)`` after a
  gradient step on ``½·mean(r²)``.

  Args:
    l1: the L1 weight ``≥ 0``.
    l2: the L2 weight ``≥ 0`` (penalty ``l2·Σw²``, no ½).
    learning_rate: the optimizer's learning rate (number or the same schedule).
    mask: the leaves to threshold; ``None`` is every floating-point leaf.

  Example:
    >>> import optax, optax_norms
    >>> tx = optax.chain(optax.sgd(0.1), optax_norms.prox_elastic(1e-3, 1e-3, 0.1))
  """

  def rule(u, w, *, l1, l2, learning_rate):
    return soft_threshold(w + u, learning_rate * l1) / (1 + 2 * learning_rate * l2) - w

  return leafwise_transform(
      "prox_elastic", rule, {"l1": l1, "l2": l2, "learning_rate": learning_rate}, mask=mask,
      needs_params=True,
  )


def prox_group_l2(
    alpha: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule,
    *,
    axis: Axis = None,
    mask: Mask = None,
) -> optax.GradientTransformation:
  r"""Proximal step of the group lasso ``α·Σ_units ‖w_unit‖₂``, unit by unit.

  With ``v = w + u`` and ``t = lr·α``, each unit becomes ``v·max(0, 1 − t/‖v‖)``: a unit
  whose norm is at most ``t`` becomes exactly zero (a dead neuron or filter), the others
  shrink towards zero. Solves ``argmin_y ½‖y − v‖² + t‖y‖₂`` per unit.

  Args:
    alpha: the group weight ``α ≥ 0``.
    learning_rate: the optimizer's learning rate (number or the same schedule).
    axis: the reduced axes of a unit (default: all but the last for rank ≥ 2, so a unit is
      the incoming weights of one output; the whole leaf for rank ≤ 1), an int, a tuple or
      a callable ``(path, leaf) -> axes``.
    mask: the leaves to threshold; ``None`` is every floating-point leaf.

  Example:
    >>> import optax, optax_norms
    >>> tx = optax.chain(optax.sgd(0.1),
    ...                  optax_norms.prox_group_l2(1e-2, 0.1, mask="**/kernel"))
  """

  def rule(u, w, *, alpha, learning_rate, axes):
    v = w + u
    norm = unit_norm(v, axes)
    threshold = learning_rate * alpha
    # max(0, 1 − t/‖v‖) written as max(‖v‖ − t, 0)/‖v‖: one fused pass, 0 for a zero unit.
    shrink = jnp.maximum(norm - threshold, 0) / jnp.where(norm > 0, norm, 1)
    return v * shrink - w

  return leafwise_transform(
      "prox_group_l2", rule, {"alpha": alpha, "learning_rate": learning_rate}, mask=mask,
      needs_params=True, per_unit=True, axis=axis,
  )
