"""The elastic net's grouping effect (Zou & Hastie 2005, Theorem 1), as a test.

On standardized columns and a centred response, with the objective
``|y − Xβ|² + λ₂|β|² + λ₁|β|₁`` (``prox_elastic(l1=λ₁, l2=λ₂, lr)`` after ``optax.sgd(lr)`` on
``|y − Xβ|²``), two features with correlation ``ρ`` and same-sign weights satisfy
``|β_i − β_j| / |y|₁ ≤ √(2(1 − ρ)) / λ₂``. The lasso (``λ₂ = 0``) has no such bound: its split of
the weight between near-duplicate features is left to an objective that is nearly flat along
that split.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on

N, D = 60, 5
L1, L2 = 0.1, 0.5


def _data():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((N, D))
  z = np.concatenate([z[:, :1] + 0.03 * rng.standard_normal((N, 1)), z], 1)  # x0' ≈ x0
  z -= z.mean(0)
  z /= np.linalg.norm(z, axis=0)
  y = z @ np.array([0, 2.0, -1.0, 0.0, 0.5, 0.0]) + 0.05 * rng.standard_normal(N)
  return z, y - y.mean()


def _ista(z, y, tx_factory, steps=20_000):
  lr = 1.0 / (2 * np.linalg.norm(z, 2) ** 2)  # 1/L for the gradient of |y − Xβ|²
  tx = optax.chain(optax.sgd(lr), tx_factory(lr))
  x, target = jnp.asarray(z, jnp.float32), jnp.asarray(y, jnp.float32)
  grad = jax.grad(lambda p: jnp.sum((target - x @ p["w"]) ** 2))

  @jax.jit
  def run(params, state):
    def body(_, carry):
      params, state = carry
      updates, state = tx.update(grad(params), state, params)
      return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, steps, body, (params, state))[0]

  params = {"w": jnp.zeros(z.shape[1])}
  return np.asarray(run(params, tx.init(params))["w"], np.float64)


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax.sgd
def test_elastic_net_grouping_bound_holds_where_the_lasso_split_is_arbitrary():
  sklearn = pytest.importorskip("sklearn.linear_model")
  z, y = _data()
  rho = float(z[:, 0] @ z[:, 1])
  assert rho > 0.999
  elastic = _ista(z, y, lambda lr: on.prox_elastic(L1, L2, lr))
  lasso = _ista(z, y, lambda lr: on.prox_l1(L1, lr))

  # An independent solver of the same problem: scikit-learn's ElasticNet minimizes
  # |y − Xβ|²/(2n) + α·r·|β|₁ + α(1 − r)/2·|β|², i.e. λ₁ = 2nαr, λ₂ = nα(1 − r).
  alpha = L1 / (2 * N) + L2 / N
  reference = sklearn.ElasticNet(
    alpha=alpha, l1_ratio=L1 / (2 * N) / alpha, fit_intercept=False, tol=1e-12, max_iter=10**6
  ).fit(z, y)
  np.testing.assert_allclose(elastic, reference.coef_, atol=1e-5)

  # Theorem 1 of Zou & Hastie: same-sign weights of correlated features are close.
  assert elastic[0] * elastic[1] > 0
  split = abs(elastic[0] - elastic[1]) / np.abs(y).sum()
  assert split <= np.sqrt(2 * (1 - rho)) / L2

  # The lasso's split is not pinned down: moving weight between the two features changes its
  # objective by a relative 1e-3 at most, over a range wider than the elastic net's whole split.
  def lasso_objective(beta):
    return np.sum((y - z @ beta) ** 2) + L1 * np.abs(beta).sum()

  shift = np.zeros_like(lasso)
  shift[0], shift[1] = 1.0, -1.0
  best = lasso_objective(lasso)
  width = 10 * abs(elastic[0] - elastic[1])
  for t in np.linspace(-width, width, 9):
    assert lasso_objective(lasso + t * shift) <= best * (1 + 1e-3)
  assert abs(lasso[0] - lasso[1]) > 10 * abs(elastic[0] - elastic[1])
