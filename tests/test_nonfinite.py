"""NaN/inf policy: a non-finite value stays inside its unit; zero units, zero thresholds
and zero weights never produce NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _registry import REGISTRY, by_name

import optax_norms as on

# The float64 numpy references compute with the same NaN/inf on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")

# Per-unit transforms, with a float64 numpy reference rule (u, w) -> new update per column.
C, A, LR = 1.0, 0.5, 0.5


def _norm(x):
  return np.sqrt(np.sum(x * x, axis=0, keepdims=True))


def _ref_clip(u, w):
  n = _norm(u)
  return u * np.where(n > C, C / np.where(n > C, n, 1), 1)


def _ref_constrain(u, w):
  v = w + u
  n = _norm(v)
  return np.where(n > C, v * C / np.where(n > C, n, 1) - w, u)


def _ref_group(u, w):
  v = w + u
  n = _norm(v)
  return v * np.where(n > 0, np.maximum(1 - LR * A / np.where(n > 0, n, 1), 0), 0) - w


def _ref_max_norm(u, w):
  n = _norm(w)
  return u + 2 * A * np.maximum(n - C, 0) / np.where(n > 0, n, 1) * w


def _ref_spectral(u, w):
  # The whole matrix is the unit: with a NaN or inf in it, σ is undefined and it is left
  # as w + u; else the largest singular value clipped to C (the default mode, converged).
  v = w + u
  if not np.isfinite(v).all():
    return u
  left, sigma, right = np.linalg.svd(v, full_matrices=False)
  # Aimed at C − δ·σ, the documented margin δ = (2(√m + √n) + 8)·2⁻²⁴.
  target = C - (2 * (np.sqrt(v.shape[0]) + np.sqrt(v.shape[1])) + 8) * 2.0**-24 * sigma[0]
  return v - (sigma[0] - target) * np.outer(left[:, 0], right[0]) - w if sigma[0] > target else u


def _ref_unit(u, w):
  v = w + u
  n = _norm(v)
  return np.where(n > 0, v / np.where(n > 0, n, 1) - w, u)


def _ref_min_max(u, w):
  v = w + u
  n = _norm(v)
  desired = 0.8 * np.clip(n, A, C) + 0.2 * n
  return np.where(n > 0, v * desired / np.where(n > 0, n, 1) - w, u)


# NaN-aware references of the per-unit transforms (the registry's own oracles do not
# special-case non-finite units); the list must stay the registry's per-unit list.
PER_UNIT = {
  "clip_by_row_norm": (lambda: on.clip_by_row_norm(C), _ref_clip),
  "constrain_row_norm": (lambda: on.constrain_row_norm(C), _ref_constrain),
  "prox_group_l2": (lambda: on.prox_group_l2(A, LR), _ref_group),
  "add_max_norm_decay": (lambda: on.add_max_norm_decay(C, A), _ref_max_norm),
  "constrain_spectral_norm": (lambda: on.constrain_spectral_norm(C, n_iter=50), _ref_spectral),
  "constrain_unit_norm": (lambda: on.constrain_unit_norm(), _ref_unit),
  "constrain_min_max_norm": (lambda: on.constrain_min_max_norm(A, C, 0.8), _ref_min_max),
}


def _step(tx, updates, params):
  state = tx.init(params)
  return jax.jit(lambda u, w: tx.update(u, state, w)[0])(updates, params)


def _clean():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 4)).astype(np.float32)
  u = rng.normal(size=(5, 4)).astype(np.float32)
  w2 = rng.normal(size=(3, 2)).astype(np.float32)
  u2 = rng.normal(size=(3, 2)).astype(np.float32)
  return u, w, u2, w2


@pytest.mark.slow
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["update", "param"])
@pytest.mark.parametrize("name", sorted(PER_UNIT))
def test_non_finite_value_stays_inside_its_unit(name, where, bad):
  factory, reference = PER_UNIT[name]
  u, w, u2, w2 = _clean()
  (u if where == "update" else w)[2, 1] = bad  # Unit (column) 1 of leaf "a".
  out = _step(factory(), {"a": u, "b": u2}, {"a": w, "b": w2})
  got_a, got_b = np.asarray(out["a"], np.float64), np.asarray(out["b"], np.float64)
  want_a = reference(u.astype(np.float64), w.astype(np.float64))
  want_b = reference(u2.astype(np.float64), w2.astype(np.float64))
  others = [0, 2, 3]
  assert np.isfinite(got_a[:, others]).all()
  np.testing.assert_allclose(got_a[:, others], want_a[:, others], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-6)
  # The bad unit itself: the non-finite value is never hidden. The unit's new weights
  # w + u' still contain a NaN or inf (which elements of the unit turn NaN is not specified).
  new_weights = w.astype(np.float64)[:, 1] + got_a[:, 1]
  assert not np.isfinite(new_weights).all(), new_weights


@pytest.mark.parametrize(
  "name", [e.name for e in REGISTRY if not e.per_unit and "nonfinite" not in e.skip]
)
def test_non_finite_element_stays_in_its_element(name):
  tx = by_name(name).make()
  u, w, _, _ = _clean()
  clean = np.asarray(_step(tx, {"a": u}, {"a": w})["a"])
  u[2, 1] = np.nan
  dirty = np.asarray(_step(tx, {"a": u}, {"a": w})["a"])
  keep = np.ones_like(u, bool)
  keep[2, 1] = False
  np.testing.assert_array_equal(dirty[keep], clean[keep])
  assert np.isnan(dirty[2, 1])  # NaN stays NaN: it is not hidden.


# Every transform, at its degenerate settings: zero units, zero thresholds, zero weights.
ALL_ZERO_SETTINGS = {
  "add_l2_decay(0)": (lambda: on.add_l2_decay(0.0), lambda u, w: u),
  "add_l1_decay(0)": (lambda: on.add_l1_decay(0.0), lambda u, w: u),
  "elastic(0, 0)": (lambda: on.elastic(0.0, 0.0), lambda u, w: u),
  "add_max_norm_decay(0, a)": (
    lambda: on.add_max_norm_decay(0.0, A),
    lambda u, w: u + 2 * A * w,
  ),  # Excess = ‖w‖: pull = 2αw.
  "add_max_norm_decay(c, 0)": (lambda: on.add_max_norm_decay(C, 0.0), lambda u, w: u),
  "prox_l1(0, lr)": (lambda: on.prox_l1(0.0, LR), lambda u, w: u),
  "prox_l1(a, 0)": (lambda: on.prox_l1(A, 0.0), lambda u, w: u),
  "prox_elastic(0, 0, lr)": (lambda: on.prox_elastic(0.0, 0.0, LR), lambda u, w: u),
  "prox_group_l2(0, lr)": (lambda: on.prox_group_l2(0.0, LR), lambda u, w: u),
  "prox_group_l2(a, 0)": (lambda: on.prox_group_l2(A, 0.0), lambda u, w: u),
  "clip_by_max_abs(0)": (lambda: on.clip_by_max_abs(0.0), lambda u, w: 0 * u),
  "clip_by_row_norm(0)": (lambda: on.clip_by_row_norm(0.0), lambda u, w: 0 * u),
  "constrain_max_abs(0)": (lambda: on.constrain_max_abs(0.0), lambda u, w: -w),
  "constrain_row_norm(0)": (lambda: on.constrain_row_norm(0.0), lambda u, w: -w),
  "constrain_spectral_norm(0)": (lambda: on.constrain_spectral_norm(0.0), lambda u, w: -w),
  "constrain_unit_norm()": (lambda: on.constrain_unit_norm(), _ref_unit),
  "constrain_min_max_norm(0, 0, 1)": (lambda: on.constrain_min_max_norm(0.0, 0.0), lambda u, w: -w),
  "constrain_min_max_norm(a, c, 0)": (lambda: on.constrain_min_max_norm(A, C, 0.0), lambda u, w: u),
  "constrain_non_negative()": (
    lambda: on.constrain_non_negative(),
    lambda u, w: np.maximum(w + u, 0) - w,
  ),
}


@pytest.mark.parametrize("setting", sorted(ALL_ZERO_SETTINGS))
def test_zero_hyperparameters_and_zero_units_never_give_nan(setting):
  factory, reference = ALL_ZERO_SETTINGS[setting]
  rng = np.random.default_rng(2)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  u = rng.normal(size=(4, 3)).astype(np.float32)
  w[:, 0] = 0.0  # A zero unit of weights...
  u[:, 0] = 0.0  # ...with a zero update,
  u[:, 1] = -w[:, 1]  # and a unit whose w + u is exactly zero.
  out = np.asarray(
    _step(
      factory(), {"k": u, "z": np.zeros(3, np.float32)}, {"k": w, "z": np.zeros(3, np.float32)}
    )["k"]
  )
  assert not np.isnan(out).any(), out
  np.testing.assert_allclose(
    out, reference(u.astype(np.float64), w.astype(np.float64)), rtol=1e-6, atol=1e-7
  )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PER_UNIT))
def test_all_zero_leaves_give_finite_zero_updates(name):
  tx = PER_UNIT[name][0]()
  zeros = {"k": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
  out = _step(tx, zeros, zeros)
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PER_UNIT))
def test_gradients_through_zero_units_are_finite(name):
  # Differentiating through the transform (meta-learning) at a zero unit must not give NaN.
  tx = PER_UNIT[name][0]()
  w = jnp.zeros((3, 2))
  state = tx.init(w)
  for u in (jnp.zeros_like(w), jnp.ones_like(w)):  # w + u zero, and u alone non-zero.
    grad = jax.grad(lambda w, u=u: jnp.sum(tx.update(u - w, state, w)[0] ** 2))(w)
    assert np.isfinite(np.asarray(grad)).all(), grad
    grad_u = jax.grad(lambda u: jnp.sum(tx.update(u, state, w)[0] ** 2))(jnp.zeros_like(w))
    assert np.isfinite(np.asarray(grad_u)).all(), grad_u


def test_per_unit_references_cover_the_registry():
  assert sorted(PER_UNIT) == sorted(
    e.name for e in REGISTRY if e.per_unit and "nonfinite" not in e.skip
  )
