"""Weight constraints (max norm on weights): project ``w + u`` back inside the bound.

Place them **last** in the chain. The update becomes ``u' = proj(w + u) − w`` where the
bound is violated and stays ``u`` elsewhere, so ``optax.apply_updates`` gives ``w + u``
unchanged for elements/units already inside.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from optax_norms._clipping import unit_scale
from optax_norms._hyperparams import ScalarOrSchedule
from optax_norms._numerics import Axis
from optax_norms._paths import Mask
from optax_norms._transform import leafwise_transform

__all__ = ["constrain_max_abs", "constrain_row_norm"]


def constrain_max_abs(
    max_abs: ScalarOrSchedule, *, mask: Mask = None
) -> optax.GradientTransformation:
  r"""Keeps every selected weight in ``[−c, c]``: ``w + u' = clip(w + u, −c, c)``.

  Args:
    max_abs: the bound ``c ≥ 0``.
    mask: the leaves to constrain; ``None`` is every floating-point leaf.

  Example:
    >>> import optax, optax_norms
    >>> tx = optax.chain(optax.adam(1e-3), optax_norms.constrain_max_abs(0.5))
  """

  def rule(u, w, hp, axes):
    del axes
    v = w + u
    return jnp.where(jnp.abs(v) > hp["max_abs"], jnp.clip(v, -hp["max_abs"], hp["max_abs"]) - w, u)

  return leafwise_transform(
      "constrain_max_abs", {"max_abs": max_abs}, rule, mask=mask, needs_params=True
  )


def constrain_row_norm(
    max_norm: ScalarOrSchedule, *, axis: Axis = None, mask: Mask = None
) -> optax.GradientTransformation:
  r"""Keeps each unit's weight vector in the ball ``‖w_unit‖₂ ≤ c`` (Keras ``MaxNorm``).

  ``w + u'`` is the per-unit projection of ``v = w + u``: ``v_unit·min(1, c/‖v_unit‖)``.
  Units inside the ball are left exactly as ``w + u`` (no Keras-style ``n/(n + 1e-7)``
  shrink); zero units stay zero. Keras ``MaxNorm(c, axis=0)`` on a Dense kernel and
  ``MaxNorm(c, axis=[0, 1, 2])`` on a Conv kernel are this transform with the default axis;
  PyTorch ``torch.renorm(W, 2, 0, c)`` on an ``(out, in)`` weight is ``axis=1``.

  Args:
    max_norm: the radius ``c ≥ 0``.
    axis: the reduced axes of a unit (default all but the last for rank ≥ 2, the whole
      leaf for rank ≤ 1), an int, a tuple, or a callable ``(path, leaf) -> axes``.
    mask: the leaves to constrain; ``None`` is every floating-point leaf.

  Example:
    >>> import optax, optax_norms
    >>> tx = optax.chain(optax.adam(1e-3), optax_norms.constrain_row_norm(3.0, mask="**/kernel"))
  """

  def rule(u, w, hp, axes):
    v = w + u
    scale = unit_scale(v, hp["max_norm"], axes)
    # Inside the ball (scale == 1) return u itself, so apply_updates gives exactly w + u.
    # (u + v·(scale − 1) would save a select but cancels catastrophically for large steps.)
    return jnp.where(scale < 1, v * scale - w, u)

  return leafwise_transform(
      "constrain_row_norm", {"max_norm": max_norm}, rule, mask=mask, needs_params=True, axis=axis
  )
