"""prox_adam: Adam with the proximal step in Adam's own metric (ProxGen)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import brentq, minimize

import optax_norms as on
from optax_norms._prox_adam import _group_radius

B1, B2, EPS = 0.9, 0.999, 1e-8


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
    },
    "head": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)},
  }


def _grad_sequence(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    scale = 10.0 ** rng.uniform(-3, -1)
    out.append(
      jax.tree.map(
        lambda p, scale=scale: jnp.asarray(
          scale * rng.normal(size=p.shape) * 10 ** rng.uniform(-2, 1, p.shape), jnp.float32
        ),
        params,
      )
    )
  return out


def _soft(x, t):
  return np.sign(x) * np.maximum(np.abs(x) - t, 0)


def _ref_prox(v, d, lr, l1, l2, group):
  """argmin_x ½Σd(x−v)² + lr·(l1|x|₁ + l2‖x‖² + group‖x‖) for one unit (1-d), float64."""
  z = _soft(d * v, lr * l1)
  a = d + 2 * lr * l2
  lam = lr * group
  if lam == 0:
    return z / a
  if np.linalg.norm(z) <= lam:
    return np.zeros_like(z)
  t = brentq(
    lambda t: np.sum(z**2 / (a * t + lam) ** 2) - 1,
    0,
    np.linalg.norm(z) / a.min(),
    xtol=1e-300,
    rtol=1e-15,
  )
  return z * t / (a * t + lam)


def _correction(decay, k):
  """``1 − decay**k`` as optax.adam forms it: in float32 (at small k it carries a relative
  error of ~1e-5 from cancellation; the reference takes it as part of the algorithm)."""
  return float(np.float32(1) - np.float32(decay) ** np.float32(k))


class _Reference:
  """Float64 NumPy prox_adam on dict-of-dicts params; units are columns (axis 0 reduced)."""

  def __init__(self, params, lr, l1, l2, group, selected):
    self.w = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    self.m = jax.tree.map(np.zeros_like, self.w)
    self.v = jax.tree.map(np.zeros_like, self.w)
    self.k, self.hp, self.selected = 0, (lr, l1, l2, group), selected

  def step(self, grads):
    self.k += 1
    lr, l1, l2, group = (h(self.k - 1) if callable(h) else h for h in self.hp)
    for layer, leaves in self.w.items():
      for name, w in leaves.items():
        g = np.asarray(grads[layer][name], np.float64)
        m = self.m[layer][name] = B1 * self.m[layer][name] + (1 - B1) * g
        v = self.v[layer][name] = B2 * self.v[layer][name] + (1 - B2) * g * g
        d = np.sqrt(v / _correction(B2, self.k)) + EPS
        point = w - lr * m / _correction(B1, self.k) / d
        if f"{layer}/{name}" in self.selected:
          cols = point.reshape(point.shape[0], -1) if point.ndim > 1 else point[:, None]
          dc = d.reshape(cols.shape)
          new = np.stack(
            [_ref_prox(cols[:, j], dc[:, j], lr, l1, l2, group) for j in range(cols.shape[1])],
            axis=1,
          ).reshape(point.shape)
        else:
          new = point
        leaves[name] = new


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize(
  "penalties",
  [
    dict(l1=0.5, l2=0.0, group=0.0),
    dict(l1=0.2, l2=0.5, group=0.0),
    dict(l1=0.1, l2=0.5, group=2.0),
    dict(l1=0.0, l2=0.0, group=5.0),
  ],
  ids=["l1", "elastic", "sparse-group", "group"],
)
@pytest.mark.parametrize("scheduled", [False, True], ids=["const", "schedule"])
def test_prox_adam_matches_float64_reference_for_20_steps(penalties, scheduled):
  params = _params()
  lr = optax.linear_schedule(0.05, 0.01, 20) if scheduled else 0.03
  hp = {
    k: (optax.linear_schedule(v, 2 * v, 20) if scheduled and v else v) for k, v in penalties.items()
  }
  tx = on.prox_adam(lr, **hp, mask="**/kernel")
  ref = _Reference(params, lr, hp["l1"], hp["l2"], hp["group"], {"dense/kernel", "head/kernel"})
  state, update = tx.init(params), jax.jit(tx.update)
  zeros = 0
  for grads in _grad_sequence(params, 20):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ref.step(grads)
    for layer in params:
      for name in params[layer]:
        np.testing.assert_allclose(
          np.asarray(params[layer][name], np.float64),
          ref.w[layer][name],
          rtol=1e-5,
          atol=1e-6,
          err_msg=f"{layer}/{name}",
        )
  for layer in ("dense", "head"):
    np.testing.assert_array_equal(
      np.asarray(params[layer]["kernel"]) == 0, ref.w[layer]["kernel"] == 0
    )
    zeros += int(np.sum(np.asarray(params[layer]["kernel"]) == 0))
  assert zeros > 0  # Exact zeros appear.


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize(
  "lr", [1e-3, optax.cosine_decay_schedule(1e-2, 30)], ids=["const", "schedule"]
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mask", [None, "**/kernel"], ids=["all", "kernels"])
def test_zero_penalties_equal_optax_adam_bit_for_bit(lr, jit, mask):
  params = _params()
  ours, adam = on.prox_adam(lr, mask=mask), optax.adam(lr)
  s1, s2, p1, p2 = ours.init(params), adam.init(params), params, params
  u1f = jax.jit(ours.update) if jit else ours.update
  u2f = jax.jit(adam.update) if jit else adam.update
  for grads in _grad_sequence(params, 12):
    u1, s1 = u1f(grads, s1, p1)
    u2, s2 = u2f(grads, s2, p2)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves(s1.nu), jax.tree.leaves(s2[0].nu)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_unselected_leaves_take_plain_adam_steps_bit_for_bit():
  params = _params()
  ours = on.prox_adam(0.01, l1=0.1, group=0.5, mask="dense/kernel")
  adam = optax.adam(0.01)
  s1, s2, p1, p2 = ours.init(params), adam.init(params), params, params
  for grads in _grad_sequence(params, 5):
    u1, s1 = jax.jit(ours.update)(grads, s1, p1)
    u2, s2 = jax.jit(adam.update)(grads, s2, p2)
    for path in (("dense", "bias"), ("head", "kernel")):
      np.testing.assert_array_equal(
        np.asarray(u1[path[0]][path[1]]), np.asarray(u2[path[0]][path[1]])
      )
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  assert not np.array_equal(np.asarray(p1["dense"]["kernel"]), np.asarray(p2["dense"]["kernel"]))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_group_prox_equals_scipy_argmin_of_the_weighted_objective(seed):
  rng = np.random.default_rng(seed)
  n, units, lr = 7, 6, 0.1
  l1, l2, group = [(0.0, 0.0, 2.0), (0.3, 0.0, 1.0), (0.1, 0.4, 3.0)][seed % 3]
  w = rng.normal(size=(n, units)).astype(np.float32)
  # The first step from a fresh state has d = |g| + eps: the metric spans 4 decades.
  g = rng.choice([-1, 1], size=(n, units)) * 10 ** rng.uniform(-2, 2, size=(n, units))
  g = g.astype(np.float32)
  tx = on.prox_adam(lr, l1=l1, l2=l2, group=group)
  u, _ = jax.jit(tx.update)(
    {"k": jnp.asarray(g)}, tx.init({"k": jnp.asarray(w)}), {"k": jnp.asarray(w)}
  )
  x = w.astype(np.float64) + np.asarray(u["k"], np.float64)
  d = np.abs(g.astype(np.float64)) + EPS
  v = w - lr * g.astype(np.float64) / d
  dead = 0
  for j in range(units):
    dj, vj = d[:, j], v[:, j]

    def objective(y, dj=dj, vj=vj):
      penalty = l1 * np.abs(y).sum() + l2 * (y**2).sum() + group * np.linalg.norm(y)
      return 0.5 * np.sum(dj * (y - vj) ** 2) + lr * penalty

    best = minimize(
      objective, vj, method="Powell", options=dict(xtol=1e-12, ftol=1e-15, maxiter=200000)
    ).x
    assert objective(x[:, j]) <= objective(best) + 1e-6 * (1 + abs(objective(best)))
    np.testing.assert_allclose(x[:, j], best, atol=1e-4 * (1 + np.abs(best).max()))
    if np.linalg.norm(_soft(dj * vj, lr * l1)) <= lr * group:
      dead += 1
      assert np.all(x[:, j] == 0)  # A dead unit is exactly zero.
    else:
      assert np.any(x[:, j] != 0)


@pytest.mark.parametrize("spread", [1.0, 1e3, 1e6, 1e10])
def test_group_radius_newton_reaches_float32_precision(spread):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(50, 8)) * 10
  a = 10 ** rng.uniform(0, np.log10(spread), size=(50, 8))
  lam = 0.3 * np.linalg.norm(z, axis=0, keepdims=True)
  t = np.asarray(
    _group_radius(
      jnp.asarray(z, jnp.float32), jnp.asarray(a, jnp.float32), jnp.asarray(lam, jnp.float32), (0,)
    ),
    np.float64,
  )
  for j in range(8):
    zj, aj, lj = z[:, j], a[:, j], lam[0, j]
    root = brentq(
      lambda s, zj=zj, aj=aj, lj=lj: np.sum(zj**2 / (aj * s + lj) ** 2) - 1,
      0,
      np.linalg.norm(zj) / aj.min(),
      xtol=1e-300,
      rtol=1e-15,
    )
    np.testing.assert_allclose(t[0, j], root, rtol=2e-5)


@pytest.mark.slow
def test_state_holds_moments_for_float_leaves_and_count_advances():
  params = {**_params(), "step": jnp.asarray(3, jnp.int32), "frozen": None}
  tx = on.prox_adam(optax.constant_schedule(0.01), l1=0.1, mask="**/kernel")
  state = tx.init(params)
  assert isinstance(state, on.ProxAdamState) and state.count.dtype == jnp.int32
  assert isinstance(state.mu["step"], optax.MaskedNode)
  grads = jax.tree.map(lambda x: None if x is None else jnp.ones_like(x), params)
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, new_state = update(grads, state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    state = jax.lax.cond(True, lambda a, b: a, lambda a, b: b, new_state, state)
  assert int(state.count) == 3
  assert int(updates["step"]) == 1 and updates["frozen"] is None


@pytest.mark.parametrize("name", ["b1", "b2"])
def test_decay_rates_at_least_one_raise(name):
  with pytest.raises(ValueError, match=f"`{name}` must be < 1"):
    on.prox_adam(0.1, **{name: 1.0})


def test_mask_that_matches_nothing_raises_at_init():
  with pytest.raises(ValueError, match="matches no parameter"):
    on.prox_adam(0.1, l1=0.1, mask="**/kernal").init(_params())


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_state_round_trips_through_orbax(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  from test_checkpoint import _assert_trees_identical, _save_restore

  params = _params()
  tx = on.prox_adam(optax.linear_schedule(0.01, 0.001, 10), l1=0.1, group=0.2, mask="**/kernel")
  state = tx.init(params)
  for grads in _grad_sequence(params, 3):
    _, state = tx.update(grads, state, params)
  target = jax.eval_shape(tx.init, params)
  restored = _save_restore(tmp_path, {"state": state}, {"state": target})["state"]
  _assert_trees_identical(restored, state)
  assert type(restored) is on.ProxAdamState and int(restored.count) == 3


@pytest.mark.slow
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_gradient_stays_inside_its_unit(bad):
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  g = rng.normal(size=(6, 4)).astype(np.float32)
  tx = on.prox_adam(0.1, l1=0.1, group=0.2)
  clean = np.asarray(tx.update({"k": jnp.asarray(g)}, tx.init({"k": w}), {"k": w})[0]["k"])
  g[2, 1] = bad
  dirty = np.asarray(tx.update({"k": jnp.asarray(g)}, tx.init({"k": w}), {"k": w})[0]["k"])
  np.testing.assert_array_equal(dirty[:, [0, 2, 3]], clean[:, [0, 2, 3]])
  assert not np.isfinite(np.asarray(w)[:, 1] + dirty[:, 1]).all()  # Not hidden.
