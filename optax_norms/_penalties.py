"""Gradient-space penalties: add the gradient of a norm penalty to the updates.

Place them **before** the optimizer (``optax.chain(add_l2_decay(a), optax.adam(lr))``) for
classic, coupled regularization: the optimizer then sees ``g + ∇P(w)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from optax_norms._hyperparams import ScalarOrSchedule
from optax_norms._layout import Axis
from optax_norms._masks import Mask
from optax_norms._transform import leafwise_transform

__all__ = ["add_l1_decay", "add_l2_decay", "add_max_norm_decay", "elastic"]


def add_l2_decay(alpha: ScalarOrSchedule, *, mask: Mask = None) -> optax.GradientTransformation:
  """Adds the gradient of the L2 penalty ``α·Σ w²`` to the updates.

  The penalty is ``P(w) = α·Σ w²``, written as in the textbook and in Keras ``L2(α)``, without
  a ½. Its gradient gives ``u ← u + 2α·w``, so ``add_l2_decay(α)`` equals
  ``optax.add_decayed_weights(2α)`` and PyTorch ``SGD(weight_decay=2α)``. Placed before the
  optimizer, it is classic (coupled) L2 regularization: the optimizer sees ``g + 2α·w``.

  Args:
    alpha: the penalty weight ``α ≥ 0``: a number or a schedule ``step -> α``.
    mask: the leaves to decay (globs, a ``path_mask``, a bool pytree or a callable);
      ``None`` decays every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> params = {"kernel": jnp.array([1.0, -2.0])}
    >>> tx = optax_norms.add_l2_decay(0.5)
    >>> updates, _ = tx.update({"kernel": jnp.zeros(2)}, tx.init(params), params)
    >>> updates["kernel"].tolist()
    [1.0, -2.0]

  References:
    Keras ``keras.regularizers.L2(α)``; optax ``add_decayed_weights(2α)``; PyTorch
    ``torch.optim.SGD(weight_decay=2α)``.
  """

  def rule(u, w, *, alpha):
    return u + (2 * alpha) * w

  return leafwise_transform("add_l2_decay", rule, {"alpha": alpha}, mask=mask, needs_params=True)


def add_l1_decay(alpha: ScalarOrSchedule, *, mask: Mask = None) -> optax.GradientTransformation:
  """Adds the subgradient of the L1 penalty ``α·Σ |w|`` to the updates.

  The penalty is ``P(w) = α·Σ |w|`` (Keras ``L1(α)``). Its subgradient of minimal norm gives
  ``u ← u + α·sign(w)`` with ``sign(0) = 0``, so a weight at exactly zero is not pushed. This
  subgradient form never produces exact zeros (weights oscillate around 0); for sparsity use
  ``prox_l1`` instead.

  Args:
    alpha: the penalty weight ``α ≥ 0``: a number or a schedule ``step -> α``.
    mask: the leaves to decay; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> params = {"kernel": jnp.array([1.0, 0.0, -2.0])}
    >>> tx = optax_norms.add_l1_decay(0.25)
    >>> updates, _ = tx.update({"kernel": jnp.zeros(3)}, tx.init(params), params)
    >>> updates["kernel"].tolist()
    [0.25, 0.0, -0.25]

  References:
    Keras ``keras.regularizers.L1(α)``.
  """

  def rule(u, w, *, alpha):
    return u + alpha * jnp.sign(w)

  return leafwise_transform("add_l1_decay", rule, {"alpha": alpha}, mask=mask, needs_params=True)


def elastic(
  l1: ScalarOrSchedule, l2: ScalarOrSchedule, *, mask: Mask = None
) -> optax.GradientTransformation:
  """Adds the gradient of the elastic-net penalty ``l1·Σ|w| + l2·Σw²`` to the updates.

  The penalty is ``P(w) = l1·Σ|w| + l2·Σw²`` (Keras ``L1L2(l1, l2)``, no ½). Its subgradient of
  minimal norm gives ``u ← u + l1·sign(w) + 2·l2·w`` with ``sign(0) = 0``. scikit-learn's
  ``ElasticNet(alpha=a, l1_ratio=ρ)`` is ``elastic(l1=a·ρ, l2=a·(1−ρ)/2)`` on the data term
  ``½·mean(r²)``. For exact zeros use ``prox_elastic``.

  Args:
    l1: the L1 weight ``≥ 0``: a number or a schedule.
    l2: the L2 weight ``≥ 0`` (penalty ``l2·Σw²``, no ½): a number or a schedule.
    mask: the leaves to decay; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> params = {"kernel": jnp.array([1.0, 0.0, -2.0])}
    >>> tx = optax_norms.elastic(0.25, 0.5)
    >>> updates, _ = tx.update({"kernel": jnp.zeros(3)}, tx.init(params), params)
    >>> updates["kernel"].tolist()
    [1.25, 0.0, -2.25]

  References:
    Keras ``keras.regularizers.L1L2(l1, l2)``; scikit-learn ``ElasticNet``; H. Zou and
    T. Hastie, "Regularization and variable selection via the elastic net", J. R. Stat. Soc.
    B 67(2), 2005.
  """

  def rule(u, w, *, l1, l2):
    return u + l1 * jnp.sign(w) + (2 * l2) * w

  return leafwise_transform("elastic", rule, {"l1": l1, "l2": l2}, mask=mask, needs_params=True)


def add_max_norm_decay(
  max_norm: ScalarOrSchedule,
  alpha: ScalarOrSchedule,
  *,
  axis: Axis = None,
  mask: Mask = None,
) -> optax.GradientTransformation:
  """Adds the gradient of the soft max-norm penalty ``α·Σ_units max(0, ‖w_unit‖ − c)²``.

  The penalty ``P(w) = α·Σ_units max(0, ‖w_unit‖ − c)²`` is zero inside the ball of radius
  ``c``. Its gradient gives ``u ← u + 2α·max(0, ‖w_unit‖ − c)·w_unit/‖w_unit‖``: zero for units
  inside the ball (and for zero units), a pull back towards the ball for units outside. The
  twin of ``max_norm_penalty``; for a hard bound use ``constrain_row_norm``.

  Args:
    max_norm: the radius ``c ≥ 0``: a number or a schedule.
    alpha: the penalty weight ``α ≥ 0``: a number or a schedule.
    axis: the reduced axes of a unit: ``None`` is all but the last for rank ≥ 2 (the
      incoming weights of each output of a Flax Dense/Conv kernel), the whole leaf for
      rank ≤ 1; an int, a tuple, or a callable ``(path, leaf) -> axes``.
    mask: the leaves to penalize; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])}  # unit norms 5 and 1
    >>> tx = optax_norms.add_max_norm_decay(2.5, 0.5)
    >>> updates, _ = tx.update({"kernel": jnp.zeros((2, 2))}, tx.init(params), params)
    >>> updates["kernel"].tolist()
    [[1.5, 0.0], [2.0, 0.0]]

  References:
    N. Srivastava et al., "Dropout: a simple way to prevent neural networks from
    overfitting", JMLR 15, 2014 (the hard max-norm constraint that this penalty softens).
  """

  def rule(u, w, *, max_norm, alpha, axes):
    del axes
    norm = yield w  # The factory computes every leaf's unit norms at once.
    excess = jnp.maximum(norm - max_norm, 0)
    coefficient = 2 * alpha * excess / jnp.where(norm > 0, norm, 1)
    return u + coefficient * w

  return leafwise_transform(
    "add_max_norm_decay",
    rule,
    {"max_norm": max_norm, "alpha": alpha},
    mask=mask,
    needs_params=True,
    per_unit=True,
    axis=axis,
  )
