"""Clipping of updates (max norm on gradients): element-wise and per unit."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jax import lax

from optax_norms._hyperparams import ScalarOrSchedule
from optax_norms._layout import Axis
from optax_norms._masks import Mask
from optax_norms._transform import leafwise_transform

__all__ = ["clip_by_max_abs", "clip_by_row_norm", "unit_scale"]


def unit_scale(norm, max_norm):
  """Per-unit factor ``min(1, c/‖x_unit‖)`` from the unit norms (reduced dims kept).

  Exactly 1 inside the ball and for zero or NaN units. Both operands of the division are
  selected by ``norm > c`` so XLA fuses the norm's ``sqrt`` into the element-wise pass
  instead of running it as a kernel of its own; ``lax.select`` rather than ``jnp.where``
  keeps tracing cheap on trees with many leaves.
  """
  outside = lax.gt(norm, lax.full_like(norm, max_norm))
  # full_like (not full/broadcast): the constants take the norm's sharding, which explicit
  # mesh axes (jax.set_mesh) require of select's operands.
  one = lax.full_like(norm, 1)
  return lax.div(
    lax.select(outside, lax.full_like(norm, max_norm), one), lax.select(outside, norm, one)
  )


def clip_by_max_abs(
  max_abs: ScalarOrSchedule, *, mask: Mask = None
) -> optax.GradientTransformation:
  """Clips every update element to ``[−c, c]``.

  ``u ← clip(u, −c, c)``: the projection of the update onto the box ``‖u‖_∞ ≤ c`` (max norm
  on gradients, element-wise; called "l1-style" max norm in some texts). Same as
  ``optax.clip(c)``, Keras ``clipvalue`` and PyTorch ``clip_grad_value_``, with a mask and
  schedules. NaN stays NaN.

  Args:
    max_abs: the bound ``c ≥ 0``: a number or a schedule.
    mask: the leaves to clip; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation`` to place before the optimizer; its ``update`` does
    not need ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> grads = {"w": jnp.array([0.5, -3.0, 2.0])}
    >>> tx = optax_norms.clip_by_max_abs(1.0)
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> updates["w"].tolist()
    [0.5, -1.0, 1.0]

  References:
    optax ``clip(c)``; Keras optimizers' ``clipvalue=c``; PyTorch
    ``torch.nn.utils.clip_grad_value_(parameters, c)``.
  """

  def rule(u, w, *, max_abs):
    del w
    return jnp.clip(u, -max_abs, max_abs)

  return leafwise_transform(
    "clip_by_max_abs", rule, {"max_abs": max_abs}, mask=mask, needs_params=False
  )


def clip_by_row_norm(
  max_norm: ScalarOrSchedule, *, axis: Axis = None, mask: Mask = None
) -> optax.GradientTransformation:
  """Clips the update of each unit to norm ``c``.

  ``u_unit ← u_unit·min(1, c/‖u_unit‖)``: the projection of each unit's update onto the ball
  ``‖u_unit‖₂ ≤ c`` (max norm on gradients, l2-style; TF's ``clip_by_norm`` per unit). A unit
  inside the ball is returned bit for bit unchanged (no epsilon, no ``c/c`` rounding); a zero
  unit stays zero; a NaN unit stays as it is and never affects other units. Norms accumulate
  in ≥ float32.

  Args:
    max_norm: the radius ``c ≥ 0``: a number or a schedule.
    axis: the reduced axes of a unit: ``None`` is all but the last for rank ≥ 2 (Flax Dense
      ``(in, out)``: each column; Conv ``(h, w, in, out)``: each filter), the whole leaf for
      rank ≤ 1; an int, a tuple, or a callable ``(path, leaf) -> axes`` (PyTorch-layout
      ``(out, in)`` needs ``axis=1``; stacked ``(layers, in, out)`` needs ``axis=1``).
    mask: the leaves to clip; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation`` to place before the optimizer; its ``update`` does
    not need ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> grads = {"kernel": jnp.array([[3.0, 0.0], [4.0, 0.5]])}  # unit norms 5 and 0.5
    >>> tx = optax_norms.clip_by_row_norm(2.5)
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> updates["kernel"].tolist()
    [[1.5, 0.0], [2.0, 0.5]]

  References:
    TensorFlow ``tf.clip_by_norm`` (on one unit); R. Pascanu, T. Mikolov and Y. Bengio, "On
    the difficulty of training recurrent neural networks", ICML 2013 (clipping by norm).
  """

  def rule(u, w, *, max_norm, axes):
    del w, axes
    norm = yield u  # The factory computes every leaf's unit norms at once.
    return u * unit_scale(norm, max_norm)

  return leafwise_transform(
    "clip_by_row_norm",
    rule,
    {"max_norm": max_norm},
    mask=mask,
    needs_params=False,
    per_unit=True,
    axis=axis,
  )
