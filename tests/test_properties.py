"""Property-based tests (Hypothesis) over random small shapes, dtypes, masks and
hyperparameters: gradient equivalence with the loss-space penalties, projections, prox
optimality conditions and clip bounds.

Profiles (tests/conftest.py): "ci" runs 200 examples per property, "long" (``--long`` or
``OPTAX_NORMS_LONG=1``) runs 2000. Everything runs eagerly (no ``jax.jit``) on shapes from
a small set, so JAX's per-op caches stay warm and no example pays for a compilation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import optax_norms as on  # noqa: E402

SHAPES = [(3,), (4, 3), (2, 1), (2, 3, 2)]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _eps(dtype):
  return float(jnp.finfo(dtype).eps)


@st.composite
def arrays(draw, shape=None, low=-6.0, high=6.0):
  """A float64 numpy array of a small shape; exact zeros (and zero units) are common."""
  shape = draw(st.sampled_from(SHAPES)) if shape is None else shape
  # No subnormals: XLA on CPU flushes them to zero in arithmetic (outside our control).
  elements = st.one_of(
    st.just(0.0), st.floats(low, high, allow_nan=False, allow_subnormal=False, width=32)
  )
  x = draw(hnp.arrays(np.float64, shape, elements=elements))
  if len(shape) >= 2 and draw(st.booleans()):
    x[..., 0] = 0.0  # A whole zero unit.
  return x


hyper = st.one_of(st.just(0.0), st.floats(1e-3, 3.0))
positive = st.floats(1e-2, 3.0)
dtypes = st.sampled_from(sorted(DTYPES))


@st.composite
def trees(draw, dtype_names=("float32",)):
  """(params, updates, mask) with two leaves and a random mask form. The kernel sits under
  a 'conv' module: a rank-3 kernel elsewhere has an ambiguous unit with axis=None."""
  dtype = DTYPES[draw(st.sampled_from(dtype_names))]
  wa, wk = draw(arrays()), draw(arrays())
  ua, uk = draw(arrays(wa.shape)), draw(arrays(wk.shape))
  cast = lambda x: jnp.asarray(x, dtype)
  params = {"a": cast(wa), "conv": {"kernel": cast(wk)}}
  updates = {"a": cast(ua), "conv": {"kernel": cast(uk)}}
  mask = draw(
    st.sampled_from(
      [
        None,
        "**/kernel",
        ["a"],
        {"a": True, "conv": {"kernel": False}},
        on.path_mask(exclude="a"),
        lambda p: {"a": False, "conv": {"kernel": True}},
      ]
    )
  )
  return params, updates, mask


def _selected(mask, params):
  """Which leaves a mask selects, computed independently of the library for our forms."""
  if mask is None:
    return {"a": True, "kernel": True}
  if mask == "**/kernel" or isinstance(mask, on.PathMask) or callable(mask):
    return {"a": False, "kernel": True}
  if mask == ["a"]:
    return {"a": True, "kernel": False}
  return {"a": mask["a"], "kernel": mask["conv"]["kernel"]}


def _leaves(tree):
  return {"a": tree["a"], "kernel": tree["conv"]["kernel"]}


def _unit_axes(x):
  return tuple(range(x.ndim - 1)) if x.ndim >= 2 else tuple(range(x.ndim))


def _unit_norm(x):
  return np.sqrt(np.sum(np.square(x), axis=_unit_axes(x), keepdims=True))


# --- gradient equivalence: T.update(g, s, w)[0] == g + jax.grad(P)(w) ----------------

PAIRS = {
  "l2": (
    lambda h: on.add_l2_decay(h[0], mask=h[-1]),
    lambda w, h: on.l2_penalty(w, h[0], mask=h[-1]),
  ),
  "l1": (
    lambda h: on.add_l1_decay(h[0], mask=h[-1]),
    lambda w, h: on.l1_penalty(w, h[0], mask=h[-1]),
  ),
  "elastic": (
    lambda h: on.elastic(h[0], h[1], mask=h[-1]),
    lambda w, h: on.elastic_penalty(w, h[0], h[1], mask=h[-1]),
  ),
  "max_norm": (
    lambda h: on.add_max_norm_decay(h[2], h[0], mask=h[-1]),
    lambda w, h: on.max_norm_penalty(w, h[2], h[0], mask=h[-1]),
  ),
}


@pytest.mark.slow
@pytest.mark.parametrize("pair", sorted(PAIRS))
@given(tree=trees(("float32", "bfloat16")), a=hyper, b=hyper, c=positive)
def test_transform_equals_gradient_of_penalty(pair, tree, a, b, c):
  params, grads, mask = tree
  make_tx, penalty = PAIRS[pair]
  h = (a, b, c, mask)
  tx = make_tx(h)
  got = tx.update(grads, tx.init(params), params)[0]
  grad_p = jax.grad(lambda w: penalty(w, h))(params)
  want = jax.tree.map(
    lambda g, d: np.asarray(g, np.float64) + np.asarray(d, np.float64), grads, grad_p
  )
  dtype = jax.tree.leaves(params)[0].dtype
  tol = 8 * _eps(dtype)
  for key in ("a", "kernel"):
    x, y = np.asarray(_leaves(got)[key], np.float64), np.asarray(_leaves(want)[key])
    g = np.asarray(_leaves(grads)[key], np.float64)
    d = np.asarray(_leaves(grad_p)[key], np.float64)
    assert _leaves(got)[key].dtype == dtype
    # Each side rounds once or twice to the leaf dtype: the error is relative to |g|, |∇P|.
    assert np.all(np.abs(x - y) <= tol * (np.abs(g) + np.abs(d)) + 1e-30), (x, y)
    if not _selected(mask, params)[key]:
      np.testing.assert_array_equal(x, g)  # Unselected leaves pass through untouched.


# --- projections: inside the bound, and idempotent ------------------------------------


@pytest.mark.slow
@given(w=arrays(), data=st.data(), c=positive, dtype=dtypes)
def test_constrain_row_norm_lands_inside_and_is_idempotent(w, data, c, dtype):
  u = data.draw(arrays(w.shape))
  tx = on.constrain_row_norm(c)
  W, U = jnp.asarray(w, dtype), jnp.asarray(u, dtype)
  new_w = W + tx.update(U, tx.init(W), W)[0]
  y = np.asarray(new_w, np.float64)
  eps = _eps(dtype)
  # w + (proj(v) − w) rounds relative to |w|, not to the (smaller) projected unit.
  slack = 4 * eps * (c + _unit_norm(np.asarray(W, np.float64)))
  assert np.all(_unit_norm(y) <= c + slack)
  v = np.asarray(W, np.float64) + np.asarray(U, np.float64)
  inside = np.broadcast_to(_unit_norm(v) <= c * (1 - 4 * eps), v.shape)
  np.testing.assert_allclose(y[inside], np.asarray(W + U, np.float64)[inside], rtol=0, atol=0)
  again = new_w + tx.update(jnp.zeros_like(new_w), tx.init(new_w), new_w)[0]
  # Re-projecting moves a unit at most by its distance to the ball: within the slack.
  assert np.all(np.abs(np.asarray(again, np.float64) - y) <= np.broadcast_to(slack, y.shape))


@pytest.mark.slow
@given(w=arrays(), data=st.data(), c=st.one_of(st.just(0.0), positive), dtype=dtypes)
def test_constrain_max_abs_lands_inside_and_is_idempotent(w, data, c, dtype):
  u = data.draw(arrays(w.shape))
  tx = on.constrain_max_abs(c)
  W, U = jnp.asarray(w, dtype), jnp.asarray(u, dtype)
  new_w = W + tx.update(U, tx.init(W), W)[0]
  y = np.asarray(new_w, np.float64)
  eps = _eps(dtype)
  c = max(c, float(np.float32(c)))  # The bound as the float32 compute dtype rounds it.
  # w + (clip(v) − w): the update is rounded in the leaf dtype, relative to |w|.
  slack = 2 * eps * (c + np.abs(np.asarray(W, np.float64)))
  assert np.all(np.abs(y) <= c + slack)
  want = np.clip(np.asarray(W, np.float64) + np.asarray(U, np.float64), -c, c)
  assert np.all(np.abs(y - want) <= slack)
  again = new_w + tx.update(jnp.zeros_like(new_w), tx.init(new_w), new_w)[0]
  assert np.all(np.abs(np.asarray(again, np.float64) - y) <= slack)


# --- proximal steps: optimality conditions ----------------------------------------------


def _prox_point(tx, w, u):
  W, U = jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32)
  y = np.asarray(W + tx.update(U, tx.init(W), W)[0], np.float64)
  v = np.asarray(W, np.float64) + np.asarray(U, np.float64)
  return y, v


@pytest.mark.slow
@given(w=arrays(), data=st.data(), alpha=hyper, lr=positive)
def test_prox_l1_satisfies_optimality(w, data, alpha, lr):
  u = data.draw(arrays(w.shape))
  y, v = _prox_point(on.prox_l1(alpha, lr), w, u)
  t = lr * alpha
  scale = 1e-5 * (1 + np.abs(v) + t)
  nz = y != 0
  assert np.all(np.abs(y[nz] - v[nz] + t * np.sign(y[nz])) <= scale[nz])
  assert np.all(np.abs(v[~nz]) <= t + scale[~nz])


@pytest.mark.slow
@given(w=arrays(), data=st.data(), l1=hyper, l2=hyper, lr=positive)
def test_prox_elastic_satisfies_optimality(w, data, l1, l2, lr):
  u = data.draw(arrays(w.shape))
  y, v = _prox_point(on.prox_elastic(l1, l2, lr), w, u)
  scale = 1e-5 * (1 + np.abs(v) + lr * (l1 + l2))
  nz = y != 0
  residual = y - v + lr * l1 * np.sign(y) + 2 * lr * l2 * y
  assert np.all(np.abs(residual[nz]) <= scale[nz])
  assert np.all(np.abs(v[~nz]) <= lr * l1 + scale[~nz])


@pytest.mark.slow
@given(w=arrays(), data=st.data(), alpha=hyper, lr=positive)
def test_prox_group_l2_satisfies_optimality_per_unit(w, data, alpha, lr):
  u = data.draw(arrays(w.shape))
  y, v = _prox_point(on.prox_group_l2(alpha, lr), w, u)
  t = lr * alpha
  ny, nv = _unit_norm(y), _unit_norm(v)
  zero_unit = np.broadcast_to(ny == 0, y.shape)
  residual = y - v + t * y / np.where(ny > 0, ny, 1)
  # float32 leaves y with an absolute error e ~ eps·(|w| + |v|) per element; the term
  # t·y/‖y‖ turns it into a direction error t·e/‖y‖, large when ‖y‖ is tiny (‖v‖ ≈ t).
  e = 8 * np.finfo(np.float32).eps * (np.abs(w).max() + _unit_norm(v))
  tol = 1e-5 * (1 + nv + t) + t * e / np.where(ny > 0, ny, 1)
  nonzero_unit = ~zero_unit
  assert np.all(np.abs(residual)[nonzero_unit] <= np.broadcast_to(tol, y.shape)[nonzero_unit])
  assert np.all((nv <= t + tol)[ny == 0])
  assert np.all(y[zero_unit] == 0)


# --- clipping bounds --------------------------------------------------------------------


@pytest.mark.slow
@given(u=arrays(low=-50, high=50), c=st.one_of(st.just(0.0), positive), dtype=dtypes)
def test_clip_by_row_norm_bounds_units_and_keeps_small_ones(u, c, dtype):
  U = jnp.asarray(u, dtype)
  tx = on.clip_by_row_norm(c)
  out = tx.update(U, tx.init(U))[0]
  assert out.dtype == U.dtype
  x = np.asarray(out, np.float64)
  x_in = np.asarray(U, np.float64)
  eps = _eps(dtype)
  # 1e-18: a unit whose float32 sum of squares underflows (|u| < ~1e-19) counts as zero.
  assert np.all(_unit_norm(x) <= c * (1 + 4 * eps) + 1e-18)
  inside = np.broadcast_to(_unit_norm(x_in) <= c, x.shape)
  np.testing.assert_array_equal(x[inside], x_in[inside])  # Bit for bit.
  # Direction is kept: the clipped unit is a non-negative multiple of the input unit.
  assert np.all(x * x_in >= 0)


@pytest.mark.slow
@given(u=arrays(low=-50, high=50), c=st.one_of(st.just(0.0), positive), dtype=dtypes)
def test_clip_by_max_abs_bounds_elements(u, c, dtype):
  U = jnp.asarray(u, dtype)
  tx = on.clip_by_max_abs(c)
  x = np.asarray(tx.update(U, tx.init(U))[0], np.float64)
  c_d = float(jnp.asarray(c, dtype))
  assert np.all(np.abs(x) <= max(c, c_d))
  np.testing.assert_allclose(
    x, np.clip(np.asarray(U, np.float64), -c, c), rtol=_eps(dtype), atol=_eps(dtype) * c
  )


def test_constrain_row_norm_is_accurate_for_a_large_step_from_zero():
  # Deterministic companion of the property above: with w = 0 there is no cancellation
  # against w, so the projection of a large step must land on the sphere to float32
  # rounding (an update written as u + v·(scale − 1) loses ~eps·‖u‖/c here).
  w = jnp.zeros((3, 2), jnp.float32)
  u = jnp.full((3, 2), 1e4, jnp.float32)
  tx = on.constrain_row_norm(1.0)
  y = np.asarray(w + tx.update(u, tx.init(w), w)[0], np.float64)
  # The projection aims at the radius c·(1 − δ), δ = (2·√n + 8)·2⁻²⁴, so the stored norm is ≤ c.
  margin = (2 * np.sqrt(3) + 8) * 2.0**-24
  assert _unit_norm(y).max() <= 1.0
  np.testing.assert_allclose(_unit_norm(y), 1.0, rtol=margin + 4 * _eps(jnp.float32))
  np.testing.assert_allclose(y, 1 / np.sqrt(3), rtol=margin + 4 * _eps(jnp.float32))
