"""Proximal steps: exact zeros from L1, elastic-net and group-L2 penalties.

Place them **last**, after the learning-rate scaling. Each turns the optimizer's update
``u`` into ``u' = prox(w + u) − w``, so that ``optax.apply_updates`` lands on the proximal
point of the gradient step: proximal gradient descent (ISTA) when the optimizer is
``optax.sgd(lr)``. Pass them the same learning rate (number or schedule) as the optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_norms._coupled import (
  CoupledGroups,
  as_group_list,
  group_sq_norms,
  member_selection,
  member_view,
  resolve_all,
)
from optax_norms._hyperparams import Hyperparams, ScalarOrSchedule
from optax_norms._layout import Axis
from optax_norms._masks import Mask, compile_mask
from optax_norms._numerics import compute_dtype
from optax_norms._paths import flatten
from optax_norms._transform import flatten_with_params, leafwise_transform

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
  groups: CoupledGroups | Sequence[CoupledGroups] | None = None,
  axis: Axis = None,
  mask: Mask = None,
) -> optax.GradientTransformation:
  """Proximal step of the group lasso ``α·Σ_units ‖w_unit‖₂``: whole units become zero.

  With ``v = w + u`` (the optimizer's step) and ``t = lr·α``, each unit becomes
  ``v_unit·max(0, 1 − t/‖v_unit‖)``, the solution of ``argmin_y ½‖y − v_unit‖² + t·‖y‖₂``:
  a unit whose norm is at most ``t`` becomes exactly zero (a dead neuron or filter), the
  others shrink towards zero. The update becomes ``u' = that − w``.

  **Coupled groups.** With ``groups`` (from ``coupled_groups``: heads or neurons spread over
  several leaves), the penalty is Yuan & Lin's size-scaled group lasso
  ``α·Σ_g √p_g·‖w_g‖₂`` over the groups ``g`` of every anchor instance (and layer, when
  stacked), ``p_g`` the number of entries of group ``g``: one ``α`` then means the same for
  heads and neurons of different sizes. Every slice of group ``g`` of ``v = w + u`` is scaled
  by ``max(0, 1 − lr·α·√p_g/‖v_g‖)``, ``‖v_g‖`` the norm of the union of its slices over all
  the members, so a head dies in all its leaves at once. Leaves outside every group keep
  their update unchanged. ``axis`` is not read then; ``mask``, when given, must select every
  member leaf (else ``ValueError`` at ``init``) and selects nothing else. The squared norms
  are summed in float32 (half-precision leaves are upcast and the result cast back).

  Args:
    alpha: the group weight ``α ≥ 0``: a number or a schedule.
    learning_rate: the optimizer's learning rate (number or the same schedule).
    groups: ``None`` (per-unit groups of each leaf, by ``axis``), or a ``CoupledGroups`` or a
      list of them: groups across leaves, with the ``√p_g``-scaled penalty.
    axis: the reduced axes of a unit (default: all but the last for rank ≥ 2, so a unit is
      the incoming weights of one output; the whole leaf for rank ≤ 1), an int, a tuple or
      a callable ``(path, leaf) -> axes``. Not allowed with ``groups``.
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

    A neuron across two leaves (its column of ``w_in``, its row of ``w_out``; ``p_g = 2``):

    >>> mlp = optax_norms.coupled_groups("mlp", {"w_in": 1, "w_out": 0})
    >>> params = {"mlp": {"w_in": jnp.array([[3.0, 0.5]]), "w_out": jnp.array([[4.0], [0.5]])}}
    >>> tx = optax_norms.prox_group_l2(1.0, 1.0, groups=mlp)  # threshold √2 per group
    >>> zeros = {"mlp": {"w_in": jnp.zeros((1, 2)), "w_out": jnp.zeros((2, 1))}}
    >>> updates, _ = tx.update(zeros, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)["mlp"]
    >>> [round(x, 4) for x in new["w_in"][0].tolist()], new["w_out"][1].tolist()
    ([2.1515, 0.0], [0.0])

  References:
    jaxopt ``prox_group_lasso(x, l2reg=α, scaling=lr)`` applied per unit; M. Yuan and Y. Lin,
    "Model selection and estimation in regression with grouped variables", J. R. Stat. Soc.
    B 68(1), 2006.
  """

  def rule(u, w, *, alpha, learning_rate, axes):
    del axes
    v = w + u
    norm = yield v  # The factory computes every leaf's unit norms at once.
    threshold = learning_rate * alpha
    # max(0, 1 − t/‖v‖) written as max(‖v‖ − t, 0)/‖v‖: one fused pass, 0 for a zero unit.
    shrink = jnp.maximum(norm - threshold, 0) / jnp.where(norm > 0, norm, 1)
    return v * shrink - w

  if groups is not None:
    if axis is not None:
      raise ValueError(
        "prox_group_l2: `axis` is not read with `groups` (the groups name their axes); "
        "pass one or the other."
      )
    return _coupled_prox_group_l2(alpha, learning_rate, groups, mask)
  return leafwise_transform(
    "prox_group_l2",
    rule,
    {"alpha": alpha, "learning_rate": learning_rate},
    mask=mask,
    needs_params=True,
    per_unit=True,
    axis=axis,
  )


def _coupled_prox_group_l2(
  alpha: ScalarOrSchedule, learning_rate: ScalarOrSchedule, groups: Any, mask: Mask
) -> optax.GradientTransformation:
  """``prox_group_l2(groups=...)``: the √p_g-scaled group prox across member leaves."""
  group_list = as_group_list(groups, "prox_group_l2")
  hparams = Hyperparams({"alpha": alpha, "learning_rate": learning_rate})
  selector = compile_mask(mask)

  def instances_of(params):
    paths, leaves, _ = flatten(params)
    return resolve_all(group_list, paths, leaves), paths, leaves

  def init_fn(params):
    instances, _, _ = instances_of(params)
    member_selection("prox_group_l2", selector, params, instances)
    return hparams.init_state()

  def update_fn(updates, state, params=None):
    if updates is None:
      return None, state
    u_paths, u_leaves, treedef, p_leaves = flatten_with_params("prox_group_l2", updates, params)
    values = hparams.at(state)
    valid = hparams.valid(values)
    instances, _, _ = instances_of(params)
    new_leaves = list(u_leaves)
    for inst in instances:
      stacked = inst.layers is not None
      us = [u_leaves[m.position] for m in inst.members]
      ws = [p_leaves[m.position] for m in inst.members]
      if any(u is None for u in us):
        raise ValueError(
          f"`prox_group_l2`: the update of a member of {inst.anchor!r} is None; a coupled "
          "group needs the updates of all its members."
        )
      dtype = compute_dtype(max((x.dtype for x in us + ws), key=lambda d: jnp.dtype(d).itemsize))
      vs = [
        lax.convert_element_type(w, dtype) + lax.convert_element_type(u, dtype)
        for u, w in zip(us, ws)
      ]
      hp = hparams.in_dtype(values, dtype)
      norm = jnp.sqrt(group_sq_norms(inst, vs, stacked))
      threshold = hp["learning_rate"] * hp["alpha"] * jnp.sqrt(jnp.asarray(inst.size, dtype))
      # max(0, 1 − t/‖v_g‖) as max(‖v_g‖ − t, 0)/‖v_g‖: 0 for a zero group, never NaN.
      shrink = jnp.maximum(norm - threshold, 0) / jnp.where(norm > 0, norm, 1)
      for member, u, w, v in zip(inst.members, us, ws, vs):
        factor = jnp.expand_dims(shrink, member_view(member.axis, v.ndim, stacked))
        new = v * factor - lax.convert_element_type(w, dtype)
        if valid is not None:
          new = jnp.where(valid, new, jnp.full((), jnp.nan, new.dtype))
        new_leaves[member.position] = lax.convert_element_type(new, u.dtype)
    return jax.tree_util.tree_unflatten(treedef, new_leaves), hparams.next_state(state)

  return optax.GradientTransformation(init_fn, update_fn)
