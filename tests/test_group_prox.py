"""Proximal steps against brute-force numeric argmins (scipy, float64) of their objectives.

``prox_group_l2``: per unit, ``argmin_y ½‖y − v‖² + t‖y‖₂`` with ``v = w + u``, ``t = lr·α``.
``prox_l1`` / ``prox_elastic``: ``argmin_y ½(y − v)² + lr·(l1·|y| + l2·y²)`` per element.
With a schedule learning rate, step ``k`` thresholds with ``lr(k)``: checked against a numpy
ISTA loop with the same schedule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import optax_norms

F32 = np.finfo(np.float32).eps


def step(tx, w, u):
  """``w + u'`` after one jitted update of `tx` from updates `u` at params `w`."""
  params = {"kernel": jnp.asarray(w, jnp.float32)}
  updates, _ = jax.jit(tx.update)({"kernel": jnp.asarray(u, jnp.float32)}, tx.init(params), params)
  return np.asarray(optax.apply_updates(params, updates)["kernel"], np.float64)


def v_float32(w, u):
  """``w + u`` as the library sees it: the float32 sum."""
  return np.asarray(jnp.asarray(w, jnp.float32) + jnp.asarray(u, jnp.float32), np.float64)


# ------------------------------------------------------------------------------ group lasso


def group_argmin_scale(v: np.ndarray, t: float) -> float:
  """Brute force along the ray ``y = s·v``: bounded scalar minimization over ``s ∈ [0, 1]``."""
  nv = np.linalg.norm(v)
  objective = lambda s: 0.5 * (s - 1) ** 2 * nv**2 + t * s * nv
  res = optimize.minimize_scalar(
    objective, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-12}
  )
  # The bounded method never evaluates the end points; the minimum may sit at s = 0.
  return 0.0 if objective(0.0) <= res.fun else float(res.x)


def group_argmin_general(v: np.ndarray, t: float) -> np.ndarray:
  """Fully general minimization over ``y ∈ R^d`` (no assumption that y is along v)."""
  objective = lambda y: 0.5 * np.sum((y - v) ** 2) + t * np.linalg.norm(y)
  jac = lambda y: (y - v) + t * y / max(np.linalg.norm(y), 1e-300)
  rng = np.random.default_rng(0)
  start = v + rng.normal(size=v.shape)  # A start off the ray, so the direction is found.
  res = optimize.minimize(objective, start, jac=jac, method="BFGS", options={"gtol": 1e-12})
  return res.x


def _kernel_with_unit_norms(norms, fan_in, seed):
  rng = np.random.default_rng(seed)
  v = rng.normal(size=(fan_in, len(norms)))
  return v / np.linalg.norm(v, axis=0) * np.asarray(norms)


def test_group_prox_matches_ray_argmin_and_zeroes_units_at_threshold():
  lr, alpha = 0.1, 5.0
  t = lr * alpha  # 0.5
  # Unit norms of v = w + u: far below, just below, just above, and far above t.
  norms = np.array([0.05, 0.3, t * (1 - 1e-3), t * (1 + 1e-3), 0.7, 2.0, 10.0, t * (1 - 1e-4)])
  target = _kernel_with_unit_norms(norms, fan_in=6, seed=0)
  rng = np.random.default_rng(1)
  u = (rng.normal(size=target.shape) * 0.01).astype(np.float32)
  w = (target - u).astype(np.float32)
  ours = step(optax_norms.prox_group_l2(alpha, lr, mask="kernel"), w, u)
  v = v_float32(w, u)
  vnorm = np.linalg.norm(v, axis=0)
  ref = np.stack([group_argmin_scale(v[:, j], t) * v[:, j] for j in range(v.shape[1])], axis=1)
  # Exact zeros exactly for units with ‖v‖ <= t; the others keep every coordinate non-zero.
  np.testing.assert_array_equal(np.all(ours == 0, axis=0), vnorm <= t)
  assert np.all(ours[:, vnorm > t] != 0)
  # Values: the ray argmin, up to float32 rounding of w + (v·s − w) at the scale of |w|.
  atol = 1e-6 * np.max(np.abs(w)) + 4 * F32 * np.abs(w)
  assert np.all(np.abs(ours - ref) <= atol)
  # The shrunk norms are ‖v‖ − t (for units above t).
  np.testing.assert_allclose(
    np.linalg.norm(ours, axis=0)[vnorm > t], (vnorm - t)[vnorm > t], rtol=0, atol=1e-5
  )


def test_group_prox_general_argmin_is_along_v():
  """scipy's unconstrained minimization over all of R^3 lands on the same point."""
  lr, alpha = 0.5, 1.0
  t = lr * alpha
  w = _kernel_with_unit_norms([0.8, 1.5, 3.0], fan_in=3, seed=2).astype(np.float32)
  u = np.zeros_like(w)
  ours = step(optax_norms.prox_group_l2(alpha, lr), w, u)
  for j in range(w.shape[1]):
    ref = group_argmin_general(w[:, j].astype(np.float64), t)
    np.testing.assert_allclose(ours[:, j], ref, rtol=0, atol=1e-5)


def test_group_prox_axis_conv_filters():
  """Conv kernel (h, w, in, out): a unit is a whole filter (default axes (0, 1, 2))."""
  lr, alpha = 1.0, 1.0
  rng = np.random.default_rng(3)
  w = rng.normal(size=(3, 3, 2, 5))
  w = w / np.sqrt(np.sum(w**2, axis=(0, 1, 2))) * np.array([0.5, 0.99, 1.01, 2.0, 4.0])
  w = w.astype(np.float32)
  ours = step(optax_norms.prox_group_l2(alpha, lr), w, np.zeros_like(w))
  for j in range(5):
    v = w[..., j].astype(np.float64).ravel()
    ref = group_argmin_scale(v, lr * alpha) * v
    np.testing.assert_allclose(ours[..., j].ravel(), ref, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(
    np.all(ours == 0, axis=(0, 1, 2)), [True, True, False, False, False]
  )


# ------------------------------------------------------------------------ l1 and elastic


def scalar_prox_argmin(v: float, lr: float, l1: float, l2: float) -> float:
  """``argmin_y ½(y − v)² + lr·(l1·|y| + l2·y²)`` by bounded scalar minimization."""
  objective = lambda y: 0.5 * (y - v) ** 2 + lr * (l1 * abs(y) + l2 * y * y)
  bound = abs(v) + 1.0
  res = optimize.minimize_scalar(
    objective, bounds=(-bound, bound), method="bounded", options={"xatol": 1e-12}
  )
  return 0.0 if objective(0.0) <= res.fun else float(res.x)


SCALARS = np.array([-3.0, -0.52, -0.5 + 1e-4, -0.1, 0.0, 0.05, 0.5 - 1e-4, 0.5 + 1e-3, 1.2, 7.0])


@pytest.mark.parametrize("l2", [0.0, 0.8])
def test_prox_l1_and_elastic_match_scalar_argmin(l2):
  lr, l1 = 0.25, 2.0  # threshold lr·l1 = 0.5
  w = (SCALARS * 0.5).astype(np.float32)
  u = (SCALARS - w).astype(np.float32)
  tx = optax_norms.prox_l1(l1, lr) if l2 == 0 else optax_norms.prox_elastic(l1, l2, lr)
  ours = step(tx, w, u)
  v = v_float32(w, u)
  ref = np.array([scalar_prox_argmin(x, lr, l1, l2) for x in v])
  np.testing.assert_array_equal(ours == 0, np.abs(v) <= lr * l1)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
  assert np.sum(ours == 0) >= 4 and np.sum(ours != 0) >= 4


# --------------------------------------------------------------------- schedules


def _quadratic(seed=0, n=6):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, n))
  a = m @ m.T / n + 0.5 * np.eye(n)
  b = rng.normal(size=n) * 2.0
  return a, b


def numpy_ista(a, b, w0, schedule, l1, l2, steps):
  """``w ← prox(w − lr_k·∇f(w), lr_k)`` with ``f = ½wᵀAw − bᵀw``, in float64 numpy."""
  w = np.asarray(w0, np.float64)
  for k in range(steps):
    lr = float(schedule(k))
    v = w - lr * (a @ w - b)
    w = np.sign(v) * np.maximum(np.abs(v) - lr * l1, 0) / (1 + 2 * lr * l2)
  return w


def optax_ista(a, b, w0, tx, steps):
  aj, bj = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  params = {"w": jnp.asarray(w0, jnp.float32)}
  grad = jax.grad(lambda p: 0.5 * p["w"] @ aj @ p["w"] - bj @ p["w"])

  @jax.jit
  def run(params, state):
    def body(_, carry):
      p, s = carry
      updates, s = tx.update(grad(p), s, p)
      return optax.apply_updates(p, updates), s

    return jax.lax.fori_loop(0, steps, body, (params, state))[0]

  return np.asarray(run(params, tx.init(params))["w"], np.float64)


@pytest.mark.standard_promotion
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_schedule_learning_rate_thresholds_with_lr_k(l2):
  a, b = _quadratic()
  w0 = np.random.default_rng(1).normal(size=6) * 3
  l1, steps = 0.9, 12
  # A sharply varying schedule, so using lr(k ± 1) or lr(0) would be visibly wrong.
  schedule = optax.piecewise_constant_schedule(0.4, {3: 0.25, 6: 4.0, 9: 0.1})
  prox = (
    optax_norms.prox_l1(l1, schedule) if l2 == 0 else optax_norms.prox_elastic(l1, l2, schedule)
  )
  ours = optax_ista(a, b, w0, optax.chain(optax.sgd(schedule), prox), steps)
  ref = numpy_ista(a, b, w0, schedule, l1, l2, steps)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
  # The references with an off-by-one or a constant threshold are far away.
  shifted = numpy_ista(a, b, w0, lambda k: schedule(k + 1), l1, l2, steps)
  assert np.max(np.abs(shifted - ref)) > 1e-2


@pytest.mark.standard_promotion
def test_l1_schedule_alpha_uses_alpha_k():
  a, b = _quadratic(seed=2)
  w0 = np.random.default_rng(3).normal(size=6)
  lr, steps = 0.3, 10
  alpha = optax.piecewise_constant_schedule(2.0, {4: 0.1})
  tx = optax.chain(optax.sgd(lr), optax_norms.prox_l1(alpha, lr))
  ours = optax_ista(a, b, w0, tx, steps)
  # numpy: the threshold at step k is lr·alpha(k).
  w = w0.copy()
  for k in range(steps):
    v = w - lr * (a @ w - b)
    w = np.sign(v) * np.maximum(np.abs(v) - lr * float(alpha(k)), 0)
  np.testing.assert_allclose(ours, w, rtol=0, atol=1e-5)
