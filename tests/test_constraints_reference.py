"""``constrain_row_norm`` and ``constrain_max_abs`` against float64 numpy references of Keras
``MaxNorm``, ``torch.renorm`` and ``np.clip``, plus invariants after a training run.

With zero updates and parameters ``w``, ``w + u'`` is the projection of ``w`` itself, the
thing the Keras constraint / torch renorm compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms

KERAS_EPS = 1e-7  # keras.backend.epsilon(), added to the norm in MaxNorm's denominator.
TORCH_EPS = 1e-7  # torch.renorm's epsilon on the clipped branch.
F32_RTOL = 4 * np.finfo(np.float32).eps  # a norm and a product and a difference in float32.


def keras_max_norm(w: np.ndarray, max_value: float, axis) -> np.ndarray:
  """Keras 3 ``MaxNorm(max_value, axis)(w)`` in float64 numpy (``axis``: reduced axes)."""
  w = np.asarray(w, np.float64)
  n = np.sqrt(np.sum(np.square(w), axis=axis, keepdims=True))
  return w * np.clip(n, 0, max_value) / (KERAS_EPS + n)


def torch_renorm(w: np.ndarray, maxnorm: float, dim: int) -> np.ndarray:
  """``torch.renorm(w, p=2, dim, maxnorm)`` in float64 numpy: ``dim`` is the KEPT axis."""
  w = np.asarray(w, np.float64)
  reduced = tuple(a for a in range(w.ndim) if a != dim)
  n = np.sqrt(np.sum(np.square(w), axis=reduced, keepdims=True))
  return w * np.where(n > maxnorm, maxnorm / (n + TORCH_EPS), 1.0)


def unit_norms(w: np.ndarray, axis) -> np.ndarray:
  return np.sqrt(np.sum(np.square(np.asarray(w, np.float64)), axis=axis))


def with_unit_norms(shape, reduced, norms, seed) -> np.ndarray:
  """A float32 array whose units (over `reduced` axes) have the given norms."""
  w = np.random.default_rng(seed).normal(size=shape)
  w = w / np.sqrt(np.sum(w**2, axis=reduced, keepdims=True))
  kept_shape = [1 if a in reduced else s for a, s in enumerate(shape)]
  return (w * np.asarray(norms).reshape(kept_shape)).astype(np.float32)


def project(tx, params):
  """``params + u'`` for zero updates ``u``: the transform's projection of `params`."""
  state = tx.init(params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, state, params)
  return optax.apply_updates(params, updates)


def radius_margin(units):
  """The documented relative margin δ = (2·√n + 8)·2⁻²⁴ of constrain_row_norm (an upper
  bound for a unit of at most `units` entries)."""
  return (2 * np.sqrt(units) + 8) * 2.0**-24


def assert_projection_close(ours, ref, w, min_norm):
  """``ours ≈ ref`` up to Keras's/torch's epsilon and float32 rounding.

  Keras's and torch's 1e-7 changes the result by a relative ``1e-7/n``, so ``rtol`` is
  ``1e-7/min_norm`` plus a few float32 ulps (our norm and division). ``optax.apply_updates``
  computes ``w + (proj(w) − w)`` in float32, which rounds at the scale of ``|w|``, not of the
  (smaller) projected value: hence an elementwise ``atol`` of two ulps of ``|w|``.
  """
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  # constrain_row_norm projects onto c·(1 − δ(n)) so that the stored norm is ≤ c exactly.
  tol = (KERAS_EPS / min_norm + F32_RTOL + radius_margin(ours.size)) * np.abs(ref) + 2 * np.finfo(
    np.float32
  ).eps * np.abs(w)
  excess = np.abs(ours - ref) - tol
  assert np.all(excess <= 0), f"max excess {excess.max():.3g} at {np.argmax(excess)}"


# Norms straddle c = 1.5: well inside, just inside/outside, and far outside.
NORMS = np.array([0.3, 0.9, 1.4999, 1.5001, 2.0, 7.5, 0.6, 30.0])
C = 1.5


def test_dense_kernel_matches_keras_max_norm_axis0():
  w = with_unit_norms((20, 8), (0,), NORMS, seed=0)
  ours = project(optax_norms.constrain_row_norm(C), {"dense": {"kernel": jnp.asarray(w)}})
  ours = np.asarray(ours["dense"]["kernel"], np.float64)
  ref = keras_max_norm(w, C, axis=0)
  assert_projection_close(ours, ref, w, NORMS.min())
  # And it is not the identity: the outside units really moved.
  assert np.max(np.abs(ours - w)) > 0.1


def test_conv_kernel_matches_keras_max_norm_axis012():
  norms = np.concatenate([NORMS, NORMS[::-1] * 0.7])
  w = with_unit_norms((3, 3, 4, 16), (0, 1, 2), norms, seed=1)
  ours = project(optax_norms.constrain_row_norm(C), {"conv": {"kernel": jnp.asarray(w)}})
  ours = np.asarray(ours["conv"]["kernel"], np.float64)
  ref = keras_max_norm(w, C, axis=(0, 1, 2))
  assert_projection_close(ours, ref, w, norms.min())
  np.testing.assert_array_less(unit_norms(ours, (0, 1, 2)), C * (1 + 1e-6))


def test_keras_default_axis_on_conv_is_different():
  """Keras MaxNorm's default axis=0 on a conv kernel reduces over h only: not our default
  per-filter unit, so the comparison above really depends on the axis."""
  w = with_unit_norms((3, 3, 4, 16), (0, 1, 2), np.full(16, 3.0), seed=2)
  ours = project(optax_norms.constrain_row_norm(C), {"kernel": jnp.asarray(w)})["kernel"]
  assert np.max(np.abs(np.asarray(ours) - keras_max_norm(w, C, axis=0))) > 1e-2


def test_torch_layout_matches_renorm_with_axis1():
  w = with_unit_norms((8, 20), (1,), NORMS, seed=3)  # (out, in): one row per output unit.
  ours = project(optax_norms.constrain_row_norm(C, axis=1), {"weight": jnp.asarray(w)})
  ours = np.asarray(ours["weight"], np.float64)
  ref = torch_renorm(w, C, dim=0)
  assert_projection_close(ours, ref, w, NORMS.min())
  # torch.renorm leaves rows inside the ball bit-identical, and so do we.
  inside = NORMS <= C
  np.testing.assert_array_equal(ours[inside], w[inside].astype(np.float64))


def test_torch_conv_layout_matches_renorm():
  norms = np.linspace(0.5, 4.0, 6)
  w = with_unit_norms((6, 3, 2, 2), (1, 2, 3), norms, seed=4)  # (out, in, kh, kw)
  ours = project(optax_norms.constrain_row_norm(C, axis=(1, 2, 3)), {"weight": jnp.asarray(w)})
  ref = torch_renorm(w, C, dim=0)
  assert_projection_close(ours["weight"], ref, w, norms.min())


def test_constrain_max_abs_matches_np_clip():
  rng = np.random.default_rng(5)
  w = rng.normal(scale=1.0, size=(30, 7)).astype(np.float32)
  u = rng.normal(scale=0.5, size=(30, 7)).astype(np.float32)
  c = 0.8
  tx = optax_norms.constrain_max_abs(c)
  params = {"kernel": jnp.asarray(w)}
  updates, _ = jax.jit(tx.update)({"kernel": jnp.asarray(u)}, tx.init(params), params)
  new = np.asarray(optax.apply_updates(params, updates)["kernel"], np.float64)
  v = w.astype(np.float64) + u.astype(np.float64)
  ref = np.clip(v, -c, c)
  # w + (clip(v) − w) in float32: one rounding of a number of size <= max(|w|, |v|).
  atol = 2 * np.finfo(np.float32).eps * np.maximum(np.abs(w), np.abs(v))
  assert np.all(np.abs(new - ref) <= atol)
  assert np.sum(np.abs(v) > c) > 20  # Many elements were clipped.
  # Inside the box: bit for bit the unconstrained step w + u.
  inside = np.abs(np.asarray(jnp.asarray(w) + jnp.asarray(u))) <= c
  plain = np.asarray(jnp.asarray(w) + jnp.asarray(u))
  np.testing.assert_array_equal(new[inside], plain[inside].astype(np.float64))
  # The update there is (w + u) − w rounded in float32 (no read of u): see test_recovered_sum.py.
  np.testing.assert_array_equal(np.asarray(updates["kernel"])[inside], (plain - w)[inside])


def test_units_inside_ball_are_bit_for_bit_the_step():
  rng = np.random.default_rng(6)
  w = with_unit_norms((10, 8), (0,), NORMS * 0.9, seed=6)
  u = (rng.normal(size=(10, 8)) * 0.05).astype(np.float32)
  params = {"kernel": jnp.asarray(w)}
  tx = optax_norms.constrain_row_norm(C)
  updates, _ = jax.jit(tx.update)({"kernel": jnp.asarray(u)}, tx.init(params), params)
  new = np.asarray(optax.apply_updates(params, updates)["kernel"])
  plain = np.asarray(optax.apply_updates(params, {"kernel": jnp.asarray(u)})["kernel"])
  inside = unit_norms(w.astype(np.float64) + u, 0) < C * (1 - 1e-4)
  outside = unit_norms(w.astype(np.float64) + u, 0) > C * (1 + 1e-4)
  assert inside.sum() >= 3 and outside.sum() >= 2
  np.testing.assert_array_equal(new[:, inside], plain[:, inside])
  # The update of an inside unit is (w + u) − w rounded in float32, not a read of u: in binary
  # round-to-nearest w + ((w + u) − w) recovers the float w + u (test_recovered_sum.py).
  np.testing.assert_array_equal(np.asarray(updates["kernel"])[:, inside], (plain - w)[:, inside])
  # Projected onto C·(1 − δ); the update's rounding at the scale of |w| moves it a few ulps more.
  np.testing.assert_allclose(unit_norms(new[:, outside], 0), C, rtol=radius_margin(10) + 1e-6)
  assert unit_norms(new, 0).max() <= C


def _train(tx, steps=100, seed=0):
  """Adam training on a random regression whose least-squares weights are large, so the
  unconstrained norms want to grow well past the bound. Returns the params at every step."""
  key_x, key_w, key_c = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(key_x, (64, 12))
  true_w = 5.0 * jax.random.normal(key_w, (12, 6))
  y = x @ true_w
  params = {
    "dense": {"kernel": 0.1 * jax.random.normal(key_c, (12, 6)), "bias": jnp.zeros(6)},
    "conv": {"kernel": 0.1 * jax.random.normal(key_c, (2, 2, 3, 6))},
  }

  def loss(p):
    conv_out = jnp.einsum("nhwi,hwio->no", x[:, :12].reshape(64, 2, 2, 3), p["conv"]["kernel"])
    return jnp.mean((x @ p["dense"]["kernel"] + p["dense"]["bias"] - y) ** 2) + jnp.mean(
      (conv_out - y) ** 2
    )

  state = tx.init(params)

  @jax.jit
  def run(params, state):
    def body(carry, _):
      p, s = carry
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      p = optax.apply_updates(p, updates)
      return (p, s), p

    return jax.lax.scan(body, (params, state), None, length=steps)[1]

  return run(params, state)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_row_norm_bound_holds_through_training():
  c = 2.0
  tx = optax.chain(optax.adam(0.3), optax_norms.constrain_row_norm(c, mask="**/kernel"))
  history = _train(tx)
  free = _train(optax.adam(0.3))
  for name, axes in (("dense", (1,)), ("conv", (1, 2, 3))):
    # history[...] has a leading step axis: reduce over the unit's axes, shifted by one.
    norms = unit_norms(history[name]["kernel"], axes)
    assert norms.shape[0] == 100
    assert np.max(norms) <= c * (1 + 1e-6)
    assert np.sum(norms[-1] > c * (1 - 1e-5)) >= 3  # The bound is active at the end...
    free_norms = unit_norms(free[name]["kernel"][-1], tuple(a - 1 for a in axes))
    assert np.max(free_norms) > 2 * c  # ...and unconstrained training goes far past it.


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_max_abs_bound_holds_through_training():
  c = 0.7
  tx = optax.chain(optax.adam(0.3), optax_norms.constrain_max_abs(c, mask="**/kernel"))
  history = _train(tx)
  for name in ("dense", "conv"):
    k = np.asarray(history[name]["kernel"], np.float64)
    assert np.max(np.abs(k)) <= c * (1 + 1e-6)
    assert np.mean(np.abs(k[-1]) >= c * (1 - 1e-6)) > 0.2  # Many weights sit on the bound.


@pytest.mark.slow
@pytest.mark.parametrize(
  "make, w",
  [
    (lambda: optax_norms.constrain_row_norm(C), with_unit_norms((20, 8), (0,), NORMS, 7)),
    (
      lambda: optax_norms.constrain_row_norm(C),
      with_unit_norms((3, 3, 2, 8), (0, 1, 2), NORMS * 3, 8),
    ),
    (
      lambda: optax_norms.constrain_max_abs(0.5),
      np.random.default_rng(9).normal(size=(20, 8)).astype(np.float32),
    ),
  ],
)
def test_projection_is_idempotent(make, w):
  once = project(make(), {"kernel": jnp.asarray(w)})
  twice = project(make(), once)
  np.testing.assert_allclose(
    np.asarray(twice["kernel"]), np.asarray(once["kernel"]), rtol=F32_RTOL, atol=0
  )
  assert np.max(np.abs(np.asarray(once["kernel"]) - w)) > 0.1  # The first one did something.
