"""Proximal gradient descent with ``prox_l1`` / ``prox_elastic`` reaches scikit-learn's Lasso
and ElasticNet solutions (coefficients, intercept and the exact zero pattern).

Full-batch ISTA in float64 on the standardized diabetes data: ``optax.sgd(1/L)`` followed by
the proximal step, with the intercept masked out (sklearn never penalizes it). The data term
is ``½·mean(r²)``, sklearn's. An independent KKT check in numpy confirms the solution.

Run ``python tests/test_sklearn_reference.py`` to print the errors and zero patterns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_diabetes
from sklearn.linear_model import ElasticNet, Lasso

import optax_norms

LASSO_ALPHAS = (0.02, 0.05, 0.1)  # 3, 4 and 6 zeros out of 10 coefficients.
ELASTIC_CASES = ((0.1, 0.5), (0.2, 0.5), (0.1, 0.7))  # 4, 6 and 5 zeros.
STEPS = 20_000  # The ISTA contraction on the support is <= 1 - 0.057/4.02 per step.
COEF_ATOL = 1e-8  # Measured: <= 2e-13 (the brief asked for 1e-4).
KKT_ATOL = 1e-9


@functools.lru_cache(maxsize=1)
def diabetes() -> tuple[np.ndarray, np.ndarray]:
  """Diabetes features standardized, target divided by its std (so the intercept is ~2)."""
  x, y = load_diabetes(return_X_y=True)
  x = (x - x.mean(0)) / x.std(0)
  return x, y / y.std()


def lipschitz(x: np.ndarray) -> float:
  """Lipschitz constant of ∇ ½·mean((Xw + b − y)²) in (w, b): λ_max([X, 1]ᵀ[X, 1]/n)."""
  a = np.c_[x, np.ones(len(x))]
  return float(np.linalg.eigvalsh(a.T @ a / len(x)).max())


def ista(make_prox, steps: int = STEPS) -> tuple[np.ndarray, float]:
  """Runs ``chain(sgd(lr), make_prox(lr))`` in float64; returns (coef, intercept).

  x64 is enabled only inside this function (``jax.enable_x64`` restores it on exit).
  """
  x, y = diabetes()
  lr = 1.0 / lipschitz(x)
  with jax.enable_x64(True):
    xj, yj = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
    params = {"coef": jnp.zeros(x.shape[1], jnp.float64), "intercept": jnp.zeros((), jnp.float64)}
    tx = optax.chain(optax.sgd(lr), make_prox(lr))
    state = tx.init(params)

    def loss(p):
      r = xj @ p["coef"] + p["intercept"] - yj
      return 0.5 * jnp.mean(r**2)

    @jax.jit
    def run(params, state):
      def body(_, carry):
        p, s = carry
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

      return jax.lax.fori_loop(0, steps, body, (params, state))

    params, _ = run(params, state)
    assert params["coef"].dtype == jnp.float64
    return np.asarray(params["coef"]), float(params["intercept"])


def ours_lasso(alpha: float) -> tuple[np.ndarray, float]:
  return ista(lambda lr: optax_norms.prox_l1(alpha, lr, mask={"coef": True, "intercept": False}))


def ours_elastic(alpha: float, rho: float) -> tuple[np.ndarray, float]:
  # sklearn: α·ρ·‖w‖₁ + ½·α·(1−ρ)·‖w‖²; ours: l1·‖w‖₁ + l2·‖w‖².
  return ista(
    lambda lr: optax_norms.prox_elastic(alpha * rho, alpha * (1 - rho) / 2, lr, mask="coef")
  )


def sklearn_fit(model) -> tuple[np.ndarray, float]:
  x, y = diabetes()
  model.fit(x, y)
  return np.asarray(model.coef_, np.float64), float(model.intercept_)


def kkt_violation(coef: np.ndarray, intercept: float, l1: float, l2: float) -> float:
  """Largest violation of the optimality conditions of
  ``½·mean(r²) + l1·‖w‖₁ + l2·‖w‖²`` (unpenalized intercept), in float64 numpy.

  ``g = Xᵀ(y − Xw − b)/n − 2·l2·w`` must equal ``l1·sign(w_j)`` where ``w_j ≠ 0`` and lie in
  ``[−l1, l1]`` where ``w_j = 0``; the mean residual must be 0.
  """
  x, y = diabetes()
  r = y - x @ coef - intercept
  g = x.T @ r / len(y) - 2 * l2 * coef
  nonzero = coef != 0
  violations = [abs(r.mean())]
  violations += list(np.abs(g[nonzero] - l1 * np.sign(coef[nonzero])))
  violations += list(np.maximum(np.abs(g[~nonzero]) - l1, 0))
  return float(max(violations))


def _compare(ours, theirs):
  coef, intercept = ours
  ref_coef, ref_intercept = theirs
  return {
    "max_coef_err": float(np.max(np.abs(coef - ref_coef))),
    "intercept_err": abs(intercept - ref_intercept),
    "zeros_ours": int(np.sum(coef == 0)),
    "zeros_sklearn": int(np.sum(ref_coef == 0)),
    "same_zero_pattern": bool(np.array_equal(coef == 0, ref_coef == 0)),
  }


@pytest.mark.parametrize("alpha", LASSO_ALPHAS)
def test_prox_l1_matches_sklearn_lasso(alpha):
  ours = ours_lasso(alpha)
  ref = sklearn_fit(Lasso(alpha=alpha, tol=1e-12, max_iter=10**6))
  # The chosen alphas give both exact zeros and non-zeros, so the pattern check has teeth.
  assert 0 < np.sum(ref[0] == 0) < ref[0].size
  np.testing.assert_array_equal(ours[0] == 0, ref[0] == 0)
  np.testing.assert_allclose(ours[0], ref[0], rtol=0, atol=COEF_ATOL)
  np.testing.assert_allclose(ours[1], ref[1], rtol=0, atol=COEF_ATOL)
  assert kkt_violation(*ours, l1=alpha, l2=0.0) < KKT_ATOL


@pytest.mark.parametrize("alpha, rho", ELASTIC_CASES)
def test_prox_elastic_matches_sklearn_elastic_net(alpha, rho):
  ours = ours_elastic(alpha, rho)
  ref = sklearn_fit(ElasticNet(alpha=alpha, l1_ratio=rho, tol=1e-12, max_iter=10**6))
  assert 0 < np.sum(ref[0] == 0) < ref[0].size
  np.testing.assert_array_equal(ours[0] == 0, ref[0] == 0)
  np.testing.assert_allclose(ours[0], ref[0], rtol=0, atol=COEF_ATOL)
  np.testing.assert_allclose(ours[1], ref[1], rtol=0, atol=COEF_ATOL)
  assert kkt_violation(*ours, l1=alpha * rho, l2=alpha * (1 - rho) / 2) < KKT_ATOL


def test_intercept_is_not_thresholded():
  """Masking matters: with the intercept thresholded too, the solution differs from sklearn's
  (whose intercept is unpenalized), so the masked comparison above is not vacuous."""
  alpha = 0.1
  unmasked = ista(lambda lr: optax_norms.prox_l1(alpha, lr))
  _, ref_intercept = sklearn_fit(Lasso(alpha=alpha, tol=1e-12, max_iter=10**6))
  # Penalized intercept: the features are centered, so b decouples from w and its own
  # subproblem gives b = soft(mean(y), α) = sklearn's intercept − α (mean(y) ≈ 1.98 > α).
  np.testing.assert_allclose(unmasked[1], ref_intercept - alpha, rtol=0, atol=COEF_ATOL)


def test_x64_is_restored():
  ours_lasso(LASSO_ALPHAS[0])
  assert jnp.ones(1).dtype == jnp.float32


def report() -> None:
  """Prints max coefficient error, intercept error and zero-pattern agreement per setting."""
  for alpha in LASSO_ALPHAS:
    ours = ours_lasso(alpha)
    res = _compare(ours, sklearn_fit(Lasso(alpha=alpha, tol=1e-12, max_iter=10**6)))
    print(f"Lasso alpha={alpha}: {res} kkt={kkt_violation(*ours, alpha, 0.0):.1e}")
  for alpha, rho in ELASTIC_CASES:
    ours = ours_elastic(alpha, rho)
    model = ElasticNet(alpha=alpha, l1_ratio=rho, tol=1e-12, max_iter=10**6)
    res = _compare(ours, sklearn_fit(model))
    kkt = kkt_violation(*ours, alpha * rho, alpha * (1 - rho) / 2)
    print(f"ElasticNet alpha={alpha} l1_ratio={rho}: {res} kkt={kkt:.1e}")


if __name__ == "__main__":
  report()
