"""Adam with the proximal step taken in Adam's own diagonal metric (ProxGen)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_norms._coupled import (
  CoupledGroups,
  GroupInstance,
  as_group_list,
  member_selection,
  member_view,
  resolve_all,
)
from optax_norms._hyperparams import Hyperparams, ScalarOrSchedule, is_schedule
from optax_norms._layout import Axis, check_axis_spec
from optax_norms._masks import Mask, compile_mask
from optax_norms._messages import missing_params
from optax_norms._numerics import compute_dtype, unit_norm
from optax_norms._paths import flatten, format_path
from optax_norms._prox import soft_threshold
from optax_norms._transform import aligned_params, leaf_kind, selected_leaves
from optax_norms._units import resolve_axes

__all__ = ["ProxAdamState", "prox_adam"]

# Newton steps of the group prox's scalar equation. The iteration is monotone from a lower
# bound and the function is nearly linear (see `_group_radius`); 12 steps reach float32
# precision for metrics spread over 10 orders of magnitude (tests/test_prox_adam.py).
NEWTON_STEPS = 12


class ProxAdamState(NamedTuple):
  """State of ``prox_adam``.

  Attributes:
    count: int32, the number of updates applied so far (schedules and the bias correction
      read it).
    mu: Adam's first moment, per floating-point leaf (``optax.MaskedNode()`` elsewhere).
    nu: Adam's second moment, likewise.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> tx = optax_norms.prox_adam(0.1, l1=1.0)
    >>> state = tx.init({"w": jnp.ones(2), "step": jnp.asarray(0)})
    >>> int(state.count), state.mu["w"].tolist(), type(state.mu["step"]).__name__
    (0, [0.0, 0.0], 'MaskedNode')
  """

  count: jax.Array  # type: ignore[assignment]
  mu: Any
  nu: Any


def _group_radius(z, a, lam, axes):
  """``t = ‖x‖`` of each unit, with ``x = z·t/(a·t + λ)``: the root of
  ``F(t) = (Σ z²/(a·t + λ)²)^(−1/2) − 1``.

  ``F`` is increasing and concave for ``t > 0`` (it is Moré–Sorensen's secular function with
  shifts ``λ/a``), so Newton's method started at the lower bound ``(‖z‖ − λ)/max a`` (where
  ``F ≤ 0``) increases monotonically to the root and never overshoots; for a unit with
  constant ``a``, ``F`` is linear and one step is exact. Units with ``‖z‖ ≤ λ`` (the zero
  units) are handled by the caller.
  """
  zz = z * z
  norm = jnp.sqrt(jnp.sum(zz, axis=axes, keepdims=True))
  a_max = jnp.max(a, axis=axes, keepdims=True)
  a_min = jnp.min(a, axis=axes, keepdims=True)
  gap = jnp.maximum(norm - lam, 0)
  lo, hi = gap / a_max, gap / a_min

  def newton(_, t):
    denom = a * t + lam
    safe = jnp.where(denom > 0, denom, 1)
    s = jnp.sum(zz / (safe * safe), axis=axes, keepdims=True)
    q = jnp.sum(zz * a / (safe * safe * safe), axis=axes, keepdims=True)
    step = (s * jnp.sqrt(s) - s) / jnp.where(q > 0, q, 1)
    return jnp.clip(t + jnp.where(s > 0, step, 0), lo, hi)

  return jax.lax.fori_loop(0, NEWTON_STEPS, newton, lo)


def prox_adam(
  learning_rate: ScalarOrSchedule,
  *,
  l1: ScalarOrSchedule = 0.0,
  l2: ScalarOrSchedule = 0.0,
  group: ScalarOrSchedule = 0.0,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  axis: Axis = None,
  mask: Mask = None,
  groups: CoupledGroups | Sequence[CoupledGroups] | None = None,
) -> optax.GradientTransformation:
  """Adam whose step ends with the proximal step in Adam's own metric (ProxGen): exact zeros.

  An optimizer, used instead of ``optax.adam`` (not a link of a chain). Every floating-point
  leaf takes Adam's step; on the leaves `mask` selects, that step is the proximal point of
  the penalty ``P(w) = l1·Σ|w| + l2·Σw² + group·Σ_units ‖w_unit‖₂`` in the diagonal metric
  Adam itself uses. With ``m̂``, ``v̂`` bias-corrected as in ``optax.adam``,
  ``d = √v̂ + eps`` and the Adam point ``v = w − lr·m̂/d``, the new weight is

  ``x = argmin_x ½·Σ d·(x − v)² + lr·P(x)``.

  Without ``group`` this is closed form per coordinate:
  ``x = soft(v, lr·l1/d) / (1 + 2·lr·l2/d)`` — the threshold is ``lr·l1/d``, large where
  Adam's steps are small, so the L1 penalty acts with the same strength relative to each
  coordinate's step (``adam → prox_l1`` thresholds every coordinate at ``lr·l1`` instead).
  With ``group``, per unit (``axis``, as for ``prox_group_l2``), with ``z = soft(d·v, lr·l1)``,
  ``a = d + 2·lr·l2`` and ``λ = lr·group``: the unit is exactly zero when ``‖z‖ ≤ λ``, else
  ``x = z·t/(a·t + λ)`` where ``t = ‖x‖`` is the root of ``Σ z²/(a·t + λ)² = 1`` (one
  decreasing scalar equation per unit), solved with 12 monotone Newton steps to float32
  precision. The update is ``x − w``. Adam's step is ``optax.scale_by_adam``'s own (this
  transform reuses it and reads the metric from its second moment), so with
  ``l1 = l2 = group = 0`` the update is exactly ``optax.adam``'s (bit for bit in float32).

  **Coupled groups.** With ``groups`` (from ``coupled_groups``: heads or neurons spread over
  several leaves), the group term is ``group·Σ_g √p_g·‖w_g‖₂`` over the coupled groups (as
  ``prox_group_l2(groups=...)``): ``λ_g = lr·group·√p_g``, the group is exactly zero when
  ``‖z_g‖ ≤ λ_g`` (``‖z_g‖`` over the union of its slices in all its member leaves), else
  ``x = z·t/(a·t + λ_g)`` on every slice, with ``t`` the root of one scalar equation per
  group, ``Σ z²/(a·t + λ_g)² = 1`` summed over all the group's slices. The other selected
  leaves take the ``l1``/``l2`` prox only (no per-unit group term); ``axis`` is not read, and
  ``mask``, when given, must select every member leaf.

  Moments are stored in each leaf's dtype (as ``optax.adam``); the arithmetic runs in at
  least float32.

  Args:
    learning_rate: the step size ``lr``: a number or a schedule.
    l1: the L1 weight ``≥ 0`` (penalty ``l1·Σ|w|``): a number or a schedule.
    l2: the L2 weight ``≥ 0`` (penalty ``l2·Σw²``, no ½): a number or a schedule.
    group: the group-lasso weight ``≥ 0`` (penalty ``group·Σ_units ‖w_unit‖₂``).
    b1: Adam's first-moment decay, ``0 ≤ b1 < 1``: a number or a schedule.
    b2: Adam's second-moment decay, ``0 ≤ b2 < 1``: a number or a schedule.
    eps: added to ``√v̂``, ``≥ 0``: a number or a schedule.
    axis: the reduced axes of a unit for ``group`` (default: all but the last for rank ≥ 2,
      the whole leaf for rank ≤ 1), an int, a tuple or a callable ``(path, leaf) -> axes``.
    mask: where the proximal step applies; ``None`` is every floating-point leaf. The other
      floating-point leaves take plain Adam steps.
    groups: ``None`` (the group term per unit of each leaf, by ``axis``), or a
      ``CoupledGroups`` or a list of them: the ``√p_g``-scaled group term across leaves.

  Returns:
    An ``optax.GradientTransformation`` (an optimizer: its updates include ``−lr``); its
    ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> params = {"w": jnp.array([0.05, 0.5, -1.0])}
    >>> tx = optax_norms.prox_adam(0.1, l1=1.0)
    >>> grads = {"w": jnp.array([1.0, 1.0, -0.5])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> [round(x, 4) for x in optax.apply_updates(params, updates)["w"].tolist()]
    [0.0, 0.3, -0.7]

    The first step from a fresh state has ``m̂ = g``, ``d = |g|``: Adam's point is
    ``w − 0.1·sign(g) = [−0.05, 0.4, −0.9]``; the thresholds ``lr·l1/d`` are 0.1, 0.1 and
    0.2 (the last coordinate's gradient is smaller, so its threshold is larger).

  References:
    J. Yun, A. C. Lozano and E. Yang, "Adaptive proximal gradient methods for structured
    neural networks" (ProxGen), NeurIPS 2021; D. P. Kingma and J. Ba, "Adam: a method for
    stochastic optimization", ICLR 2015; J. J. Moré and D. C. Sorensen, "Computing a trust
    region step", SIAM J. Sci. Stat. Comput. 4(3), 1983 (the secular equation).
  """
  hparams = Hyperparams(
    {
      "learning_rate": learning_rate,
      "l1": l1,
      "l2": l2,
      "group": group,
      "b1": b1,
      "b2": b2,
      "eps": eps,
    }
  )
  for name in ("b1", "b2"):
    value = hparams.values[name]
    if isinstance(value, np.floating) and value >= 1:
      raise ValueError(f"`{name}` must be < 1, got {float(value)}.")
  check_axis_spec(axis)
  selector = compile_mask(mask)
  group_list = None if groups is None else as_group_list(groups, "prox_adam")
  if group_list is not None and axis is not None:
    raise ValueError(
      "prox_adam: `axis` is not read with `groups` (the groups name their axes); pass one or "
      "the other."
    )
  # With group = 0 (a constant), the per-unit solve is left out of the program.
  has_group = (
    is_schedule(group)
    or isinstance(hparams.values["group"], jax.core.Tracer)
    or (float(hparams.values["group"]) > 0)
  )

  def instances_of(params) -> tuple[GroupInstance, ...]:
    if group_list is None:
      return ()
    paths, leaves, _ = flatten(params)
    return resolve_all(group_list, paths, leaves)

  def init_fn(params):
    paths, leaves, treedef, _ = selected_leaves(selector, params, check=True)
    if group_list is not None:
      member_selection("prox_adam", selector, params, instances_of(params))
    moments = [
      jnp.zeros_like(leaf) if leaf_kind(path, leaf) == "float" else optax.MaskedNode()
      for path, leaf in zip(paths, leaves)
    ]
    tree = jax.tree_util.tree_unflatten(treedef, moments)
    return ProxAdamState(count=jnp.zeros([], jnp.int32), mu=tree, nu=tree)

  def update_fn(updates, state, params=None):
    if updates is None:  # As optax's transforms: no updates, nothing to do.
      return None, state
    if params is None:
      raise missing_params("prox_adam")
    values = hparams.at(ProxAdamState(state.count, None, None))
    bad = hparams.valid(values)
    for name in ("b1", "b2"):
      if isinstance(values[name], jax.Array):
        ok = jnp.asarray(values[name]) < 1
        bad = ok if bad is None else bad & ok
    paths, u_leaves, treedef = flatten(updates)
    p_leaves = aligned_params(paths, params)
    _, _, _, prox_on = selected_leaves(selector, params, check=False)
    mu_leaves = treedef.flatten_up_to(state.mu)
    nu_leaves = treedef.flatten_up_to(state.nu)
    order = [
      i
      for i, (path, g) in enumerate(zip(paths, u_leaves))
      if g is not None and leaf_kind(path, g) == "float"
    ]
    for i in order:
      if jnp.shape(p_leaves[i]) != jnp.shape(u_leaves[i]):
        raise ValueError(
          f"The update and the parameter {format_path(paths[i])!r} differ in shape: "
          f"{jnp.shape(u_leaves[i])} vs {jnp.shape(p_leaves[i])}."
        )
    # Adam itself: optax's own transformation on the floating-point leaves, in at least
    # float32 (in half precision, eps = 1e-8 rounds to 0 and g² underflows).
    cts = {
      i: compute_dtype(max(u_leaves[i].dtype, p_leaves[i].dtype, key=lambda t: t.itemsize))
      for i in order
    }
    steps, adam_state = _adam_steps(
      [u_leaves[i].astype(cts[i]) for i in order],
      optax.ScaleByAdamState(
        count=state.count,
        mu=[mu_leaves[i].astype(cts[i]) for i in order],
        nu=[nu_leaves[i].astype(cts[i]) for i in order],
      ),
      values,
    )
    new_u, new_mu, new_nu = list(u_leaves), list(mu_leaves), list(nu_leaves)
    instances = instances_of(params)
    members = {m.position for inst in instances for m in inst.members} if has_group else set()
    per_unit_group = has_group and group_list is None
    coupled: dict[int, tuple[Any, Any, Any]] = {}
    for i, step, mu, nu in zip(order, steps, adam_state.mu, adam_state.nu):
      new_u[i] = step
      new_mu[i], new_nu[i] = mu.astype(mu_leaves[i].dtype), nu.astype(nu_leaves[i].dtype)
      if not (prox_on[i] or i in members):
        continue
      w, ct = p_leaves[i], cts[i]
      hp = hparams.in_dtype(values, ct)
      point = (w.astype(ct), step, _metric(nu, hp, adam_state.count))
      if i in members:
        coupled[i] = point  # Solved per coupled group below.
      else:
        axes = resolve_axes(axis, paths[i], w) if per_unit_group else ()
        new_u[i] = _prox(*point, hp, axes, per_unit_group)
    for inst in instances if has_group else ():
      positions = [m.position for m in inst.members]
      if any(i not in coupled for i in positions):
        raise ValueError(
          f"`prox_adam`: the update of a member of {inst.anchor!r} is None or not "
          "floating-point; a coupled group needs the updates of all its members."
        )
      ct = max((coupled[i][0].dtype for i in positions), key=lambda t: jnp.dtype(t).itemsize)
      points = [tuple(x.astype(ct) for x in coupled[i]) for i in positions]
      for i, out in zip(positions, _coupled_prox(inst, points, hparams.in_dtype(values, ct))):
        new_u[i] = out
    for i in order:
      out = new_u[i]
      if bad is not None:
        out = jnp.where(bad, out, jnp.full((), jnp.nan, out.dtype))
      new_u[i] = out.astype(u_leaves[i].dtype)
    unflat = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
    new_state = ProxAdamState(count=adam_state.count, mu=unflat(new_mu), nu=unflat(new_nu))
    return unflat(new_u), new_state

  # `regularize` refuses a prox setting on top of this optimizer, which already takes one.
  update_fn.takes_prox = True  # type: ignore[attr-defined]
  return optax.GradientTransformation(init_fn, update_fn)


def _adam_steps(grads, adam_state, values):
  """``optax.adam``'s updates of `grads` and its new state, by reuse: ``optax.scale_by_adam``,
  then the step ``−lr·u`` as ``optax.scale_by_learning_rate`` takes it.

  Constant hyperparameters go in as Python floats, as ``optax.adam`` receives them, so the
  bits are optax's; arrays (schedules, ``inject_hyperparams``) go in as they are, and the
  steps keep the dtypes of `grads` (the caller casts the moments back to their own).
  """
  b1, b2, eps, lr = (
    float(v) if isinstance(v, np.floating) else v
    for v in (values["b1"], values["b2"], values["eps"], values["learning_rate"])
  )
  # optax's bias correction raises a Python float to the int32 count, a promotion that the
  # strict mode refuses; optax runs it under the default mode.
  with jax.numpy_dtype_promotion("standard"):
    u, adam_state = optax.scale_by_adam(b1, b2, eps).update(grads, adam_state)
  if isinstance(lr, float):
    steps = [(-lr) * x for x in u]
  else:
    steps = [jnp.asarray(-lr, x.dtype) * x for x in u]
  return [x.astype(g.dtype) for x, g in zip(steps, grads)], adam_state


def _metric(nu, hp, count):
  """Adam's diagonal metric ``d = √v̂ + eps`` of one leaf, read from its new second moment
  (``v̂ = nu/(1 − b2^count)``), in the dtype of `hp`."""
  dtype = hp["eps"].dtype
  return jnp.sqrt(nu.astype(dtype) / (1 - hp["b2"] ** count.astype(dtype))) + hp["eps"]


def _prox(w, step, d, hp, axes, has_group):
  """The update ``x − w`` of the proximal point in the metric ``d``, or `step` itself when
  every penalty is zero (so that the update is Adam's, bit for bit)."""
  lr, l1, l2 = hp["learning_rate"], hp["l1"], hp["l2"]
  v = w + step
  if not has_group:
    x = soft_threshold(v, lr * l1 / d) / (1 + 2 * lr * l2 / d)
    active = (l1 > 0) | (l2 > 0)
  else:
    lam = lr * hp["group"]
    z = soft_threshold(d * v, lr * l1)
    a = d + 2 * lr * l2
    norm = unit_norm(z, axes)
    t = _group_radius(z, a, lam, axes)
    alive = ~(norm <= lam)  # A NaN unit stays NaN (never hidden behind a zero unit).
    denom = a * t + lam
    x = jnp.where(alive, z * t / jnp.where(alive, denom, 1), 0)
    active = (l1 > 0) | (l2 > 0) | (lam > 0)
  return jnp.where(active, x - w, step)


def _coupled_prox(inst: GroupInstance, members: list[tuple[Any, Any, Any]], hp) -> list[Any]:
  """The updates ``x − w`` of the members of `inst` (each ``(w, step, d)``): the proximal
  point of ``l1·Σ|x| + l2·Σx² + group·√p_g·‖x_g‖`` in the metric ``d``, one scalar equation
  per coupled group (``_group_radius`` across the slices of all its members)."""
  stacked = inst.layers is not None
  lr, l1, l2 = hp["learning_rate"], hp["l1"], hp["l2"]
  dtype = members[0][0].dtype
  lam = lr * hp["group"] * jnp.sqrt(jnp.asarray(inst.size, dtype))
  views = [member_view(m.axis, w.ndim, stacked) for m, (w, _, _) in zip(inst.members, members)]
  zs = [soft_threshold(d * (w + step), lr * l1) for w, step, d in members]
  as_ = [d + 2 * lr * l2 for _, _, d in members]
  zzs = [z * z for z in zs]

  def total(arrays):
    out = None
    for x, view in zip(arrays, views):
      part = jnp.sum(x, axis=view)
      out = part if out is None else out + part
    return out

  def spread(x, view):
    return jnp.expand_dims(x, view)

  norm = jnp.sqrt(total(zzs))
  a_max = jnp.max(jnp.stack([jnp.max(a, axis=v) for a, v in zip(as_, views)]), axis=0)
  a_min = jnp.min(jnp.stack([jnp.min(a, axis=v) for a, v in zip(as_, views)]), axis=0)
  gap = jnp.maximum(norm - lam, 0)
  lo, hi = gap / a_max, gap / a_min

  def newton(_, t):
    s_parts, q_parts = [], []
    for zz, a, view in zip(zzs, as_, views):
      denom = a * spread(t, view) + lam
      safe = jnp.where(denom > 0, denom, 1)
      s_parts.append(zz / (safe * safe))
      q_parts.append(zz * a / (safe * safe * safe))
    s, q = total(s_parts), total(q_parts)
    step = (s * jnp.sqrt(s) - s) / jnp.where(q > 0, q, 1)
    return jnp.clip(t + jnp.where(s > 0, step, 0), lo, hi)

  t = jax.lax.fori_loop(0, NEWTON_STEPS, newton, lo)
  alive = ~(norm <= lam)  # A NaN group stays NaN (never hidden behind a zero group).
  active = (l1 > 0) | (l2 > 0) | (lam > 0)
  outs = []
  for (w, step, _), z, a, view in zip(members, zs, as_, views):
    live, radius = spread(alive, view), spread(t, view)
    x = jnp.where(live, z * radius / jnp.where(live, a * radius + lam, 1), 0)
    outs.append(jnp.where(active, x - w, step))
  return outs
