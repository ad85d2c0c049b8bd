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
from optax_norms._layout import Axis
from optax_norms._masks import Mask
from optax_norms._numerics import unit_norm
from optax_norms._transform import leafwise_transform

__all__ = ["prox_elastic", "prox_group_l2", "prox_l1", "soft_threshold"]


def soft_threshold(x, threshold):
  """``sign(x)·max(|x| − t, 0)``: the proximal operator of ``t·|x|``."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0)


def prox_l1(
  alpha: ScalarOrSchedule, learning_rate: ScalarOrSchedule, *, mask: Mask = None
) -> optax.GradientTransformation:
  """Proximal step of the L1 penalty ``α·Σ|w|``: exact zeros.

  With ``v = w + u`` (the optimizer's step) and ``t = lr·α``, the new weights are
  ``soft(v, t) = sign(v)·max(|v| − t, 0)``, the solution of ``argmin_y ½‖y − v‖² + t·‖y‖₁``;
  the update becomes ``u' = soft(v, t) − w``. Weights whose step lands within ``t`` of zero
  become exactly zero. After ``optax.sgd(lr)`` this is proximal gradient descent (ISTA).

  Args:
    alpha: the L1 weight ``α ≥ 0``: a number or a schedule.
    learning_rate: the optimizer's learning rate: the same number or schedule. With a
      schedule, step ``k`` uses ``learning_rate(k)``, as ``optax.sgd`` does.
    mask: the leaves to threshold; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation`` to place last in the chain; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> params = {"w": jnp.array([1.0, 0.25, -2.0])}
    >>> tx = optax.chain(optax.sgd(0.5), optax_norms.prox_l1(1.0, 0.5))
    >>> grads = {"w": jnp.array([1.0, 0.0, -1.0])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [0.0, 0.0, -1.0]

  References:
    jaxopt ``prox_lasso(x, l1reg=α, scaling=lr)``; scikit-learn ``Lasso``; A. Beck and
    M. Teboulle, "A fast iterative shrinkage-thresholding algorithm for linear inverse
    problems", SIAM J. Imaging Sci. 2(1), 2009.
  """

  def rule(u, w, *, alpha, learning_rate):
    return soft_threshold(w + u, learning_rate * alpha) - w

  return leafwise_transform(
    "prox_l1",
    rule,
    {"alpha": alpha, "learning_rate": learning_rate},
    mask=mask,
    needs_params=True,
  )


def prox_elastic(
  l1: ScalarOrSchedule,
  l2: ScalarOrSchedule,
  learning_rate: ScalarOrSchedule,
  *,
  mask: Mask = None,
) -> optax.GradientTransformation:
  """Proximal step of the elastic-net penalty ``l1·Σ|w| + l2·Σw²``: exact zeros.

  With ``v = w + u`` (the optimizer's step), the new weights are
  ``soft(v, lr·l1) / (1 + 2·lr·l2)``, the solution of
  ``argmin_y ½‖y − v‖² + lr·(l1·‖y‖₁ + l2·‖y‖²)``; the update becomes ``u' = that − w``.
  scikit-learn's ``ElasticNet(alpha=a, l1_ratio=ρ)`` is ``prox_elastic(a·ρ, a·(1−ρ)/2, lr)``
  after a gradient step on ``½·mean(r²)``.

  Args:
    l1: the L1 weight ``≥ 0``: a number or a schedule.
    l2: the L2 weight ``≥ 0`` (penalty ``l2·Σw²``, no ½): a number or a schedule.
    learning_rate: the optimizer's learning rate (number or the same schedule).
    mask: the leaves to threshold; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation`` to place last in the chain; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> params = {"w": jnp.array([1.0, 0.25, -2.0])}
    >>> tx = optax.chain(optax.sgd(0.5), optax_norms.prox_elastic(1.0, 1.0, 0.5))
    >>> grads = {"w": jnp.array([1.0, 0.0, -1.0])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [0.0, 0.0, -0.5]

  References:
    jaxopt ``prox_elastic_net(x, (l1, 2·l2/l1), scaling=lr)``; scikit-learn ``ElasticNet``;
    H. Zou and T. Hastie, "Regularization and variable selection via the elastic net",
    J. R. Stat. Soc. B 67(2), 2005.
  """

  def rule(u, w, *, l1, l2, learning_rate):
    return soft_threshold(w + u, learning_rate * l1) / (1 + 2 * learning_rate * l2) - w

  return leafwise_transform(
    "prox_elastic",
    rule,
    {"l1": l1, "l2": l2, "learning_rate": learning_rate},
    mask=mask,
    needs_params=True,
  )


def prox_group_l2(
  alpha: ScalarOrSchedule,
  learning_rate: ScalarOrSchedule,
  *,
  axis: Axis = None,
  mask: Mask = None,
) -> optax.GradientTransformation:
  """Proximal step of the group lasso ``α·Σ_units ‖w_unit‖₂``: whole units become zero.

  With ``v = w + u`` (the optimizer's step) and ``t = lr·α``, each unit becomes
  ``v_unit·max(0, 1 − t/‖v_unit‖)``, the solution of ``argmin_y ½‖y − v_unit‖² + t·‖y‖₂``:
  a unit whose norm is at most ``t`` becomes exactly zero (a dead neuron or filter), the
  others shrink towards zero. The update becomes ``u' = that − w``.

  Args:
    alpha: the group weight ``α ≥ 0``: a number or a schedule.
    learning_rate: the optimizer's learning rate (number or the same schedule).
    axis: the reduced axes of a unit (default: all but the last for rank ≥ 2, so a unit is
      the incoming weights of one output; the whole leaf for rank ≤ 1), an int, a tuple or
      a callable ``(path, leaf) -> axes``.
    mask: the leaves to threshold; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation`` to place last in the chain; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> params = {"kernel": jnp.array([[3.0, 0.5], [4.0, 0.5]])}  # unit norms 5 and 0.71
    >>> tx = optax.chain(optax.sgd(1.0), optax_norms.prox_group_l2(2.5, 1.0))
    >>> updates, _ = tx.update({"kernel": jnp.zeros((2, 2))}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["kernel"].tolist()
    [[1.5, 0.0], [2.0, 0.0]]

  References:
    jaxopt ``prox_group_lasso(x, l2reg=α, scaling=lr)`` applied per unit; M. Yuan and Y. Lin,
    "Model selection and estimation in regression with grouped variables", J. R. Stat. Soc.
    B 68(1), 2006.
  """

  def rule(u, w, *, alpha, learning_rate, axes):
    v = w + u
    norm = unit_norm(v, axes)
    threshold = learning_rate * alpha
    # max(0, 1 − t/‖v‖) written as max(‖v‖ − t, 0)/‖v‖: one fused pass, 0 for a zero unit.
    shrink = jnp.maximum(norm - threshold, 0) / jnp.where(norm > 0, norm, 1)
    return v * shrink - w

  return leafwise_transform(
    "prox_group_l2",
    rule,
    {"alpha": alpha, "learning_rate": learning_rate},
    mask=mask,
    needs_params=True,
    per_unit=True,
    axis=axis,
  )
