"""The one-pass unit norm on XLA:CPU (one scaled sum of squares; the scaled-down and the
scaled-further-up sums only under a lax.cond when a unit overflows or nearly underflows): bit
for bit the all-sums norm, within float32 rounding of float64 over magnitudes 1e-28 to 1e30,
zero, NaN and inf units as before, and the bounds exact on the stored values of large leaves
and of units so small that their squares are subnormal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on
from optax_norms import _numerics

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROWS, COLS = 512, 128  # 65,536 entries: the one-pass size
assert ROWS * COLS >= _numerics.ONE_PASS_MIN_SIZE


def _leaf(exponents, seed=0):
  """Columns of normal entries scaled by 10**exponent."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(ROWS, COLS)) * 10.0 ** np.asarray(exponents, np.float64)[None, :]
  return x.astype(np.float32)


def _norms(x, one_pass):
  limit = _numerics.ONE_PASS_MIN_SIZE if one_pass else 2**62
  old, _numerics.ONE_PASS_MIN_SIZE = _numerics.ONE_PASS_MIN_SIZE, limit
  try:  # A fresh jit per setting: the size test runs at trace time.
    return np.asarray(jax.jit(lambda v: on._numerics.unit_norm(v, (0,)))(jnp.asarray(x)))
  finally:
    _numerics.ONE_PASS_MIN_SIZE = old


def _reference(x):
  return np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=0, keepdims=True))


@pytest.mark.slow
def test_one_pass_equals_two_passes_bit_for_bit_with_zero_nan_inf_and_overflowing_units():
  exponents = np.linspace(-28, 30, COLS)
  x = _leaf(exponents)
  x[:, 0] = 0.0
  x[3, 1] = np.nan
  x[5, 2] = np.inf
  for leaf in (x, x[:, 3:100]):  # with and without the units beyond ~4e9 (the cond's branch)
    one, two = _norms(np.ascontiguousarray(leaf), True), _norms(np.ascontiguousarray(leaf), False)
    np.testing.assert_array_equal(one.view(np.uint32), two.view(np.uint32))
  finite = np.isfinite(x).all(axis=0)
  np.testing.assert_allclose(_norms(x, True)[:, finite], _reference(x)[:, finite], rtol=2e-6)
  assert _norms(x, True)[0, 0] == 0 and np.isnan(_norms(x, True)[0, 1])
  assert _norms(x, True)[0, 2] == np.inf


@pytest.mark.slow
@given(
  exponents=st.lists(st.floats(-28, 30), min_size=COLS, max_size=COLS),
  one_pass=st.booleans(),
)
def test_the_norm_is_float32_accurate_over_1e_minus_28_to_1e30(exponents, one_pass):
  # Units of entries ~1e-28: their squares scaled up by 2^31 are subnormal and XLA:CPU flushes
  # them, so these units take the sum scaled by 2^92 (before: norms off by up to 4%).
  x = _leaf(exponents, seed=1)
  np.testing.assert_allclose(_norms(x, one_pass), _reference(x), rtol=2e-6)


@pytest.mark.parametrize("name", ["constrain_unit_norm", "constrain_row_norm"])
@pytest.mark.parametrize("shape", [(16, 8), (ROWS, COLS)], ids=["small", "one-pass"])
def test_bounds_hold_on_stored_values_of_nearly_underflowing_units(name, shape):
  # Found by tools/device_report.py: a unit of entries ~1e-28 was stored with norm 1.04 by
  # constrain_unit_norm (its norm underestimated by the flushed squares).
  rng = np.random.default_rng(4)
  w = (rng.normal(size=shape) * 10.0 ** np.linspace(-28.5, -18, shape[1])).astype(np.float32)
  tx = on.constrain_unit_norm() if name == "constrain_unit_norm" else on.constrain_row_norm(1e-24)
  bound = 1.0 if name == "constrain_unit_norm" else 1e-24
  params = {"kernel": jnp.asarray(w)}
  zeros = {"kernel": jnp.zeros(shape, jnp.float32)}
  step = jax.jit(lambda p: optax.apply_updates(p, tx.update(zeros, tx.init(p), p)[0]))
  stored = np.asarray(step(params)["kernel"], np.float64)
  norms = np.sqrt(np.sum(stored**2, axis=0))
  before = np.sqrt(np.sum(w.astype(np.float64) ** 2, axis=0))
  assert norms.max() <= bound
  # The documented band below the bound, relative: δ + 2ε·(‖w_unit‖/c + 2), with
  # δ = (2√n + 8)·ε for units of n entries (‖w_unit‖ the norm before the step).
  eps = 2.0**-24
  band = (2 * np.sqrt(shape[0]) + 8) * eps + 2 * eps * (before / bound + 2)
  if name == "constrain_unit_norm":  # Every unit not flushed to zero lands on the sphere.
    kept = before > 1e-27
    assert np.all(norms[kept] >= 1.0 - band[kept])
  else:  # Units outside the ball land on it; those inside are kept.
    outside = before > bound
    assert np.all(norms[outside] >= bound * (1.0 - band[outside]))
    np.testing.assert_allclose(norms[~outside], before[~outside], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_max_norm_bound_is_exact_on_stored_values_of_a_large_leaf(dtype):
  w = jnp.asarray(_leaf(np.zeros(COLS)), dtype)
  grads = jnp.asarray(_leaf(np.full(COLS, -1.0), seed=2), dtype)
  tx = optax.chain(optax.sgd(1.0), on.constrain_row_norm(3.0))
  step = jax.jit(lambda w, g: optax.apply_updates(w, tx.update(g, tx.init(w), w)[0]))
  stored = np.asarray(step(w, grads), np.float64)
  assert np.max(np.sqrt(np.sum(stored**2, axis=0))) <= 3.0
  # Every unit was outside and is projected onto the ball (bfloat16 within the documented
  # 2ε·(‖w‖/c + 2) of it, ‖w‖ ≈ 23 here).
  tolerance = 1e-5 if dtype == jnp.float32 else 2 * 2.0**-8 * (23 / 3 + 2)
  assert np.min(np.sqrt(np.sum(stored**2, axis=0))) > 3.0 * (1 - tolerance)


@pytest.mark.parametrize(
  "shape, axes", [((64, COLS), (0,)), ((COLS, 64), (1,)), ((4, 16, COLS), (0, 1))]
)
def test_stacked_sums_equal_the_sibling_sums_bit_for_bit(shape, axes):
  """The small-leaf norm's one reduction over a stacked broadcast gives each scaled sum of
  squares exactly as its own reduction does (the sibling sums a GPU fuses into one pass)."""
  rng = np.random.default_rng(1)
  units = np.linspace(-28, 30, COLS)
  x = rng.normal(size=shape) * 10.0 ** (units if axes != (1,) else units[:, None])
  x = x.astype(np.float32)
  x.reshape(-1)[:3] = (0.0, np.nan, np.inf)
  scales = tuple(_numerics._norm_scales(jnp.float32))[:3]
  stacked = jax.jit(lambda v: _numerics._sums_sq(v, scales, axes))(jnp.asarray(x))
  sibling = jax.jit(lambda v: [_numerics._sum_sq(v, s, axes) for s in scales])(jnp.asarray(x))
  for got, want in zip(stacked, sibling):
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))


def _leaves_with(rare):
  """Four leaves of at least SHARED_COND_MIN_SIZE entries and one small one; `rare` puts
  units beyond ~4e9 or below ~4e-19 into the third leaf (and zero, NaN and inf units)."""
  rng = np.random.default_rng(7)
  shapes = [(64, 64), (64, 256), (256, 64), (128, 32), (8, 8)]
  assert sum(r * c >= _numerics.SHARED_COND_MIN_SIZE for r, c in shapes) >= 2
  leaves = [rng.normal(size=s).astype(np.float32) for s in shapes]
  leaves[0][:, 0], leaves[0][3, 1], leaves[0][5, 2] = 0.0, np.nan, np.inf
  if rare == "huge":
    leaves[2][:, 4] *= np.float32(1e25)
  elif rare == "tiny":
    leaves[2][:, 4] *= np.float32(1e-25)
  return leaves


@pytest.mark.parametrize("rare", ["none", "huge", "tiny"])
def test_one_conditional_for_all_leaves_equals_each_leafs_norm_bit_for_bit(rare):
  leaves = tuple(jnp.asarray(x) for x in _leaves_with(rare))
  axes = ((0,),) * len(leaves)
  shared = jax.jit(lambda xs: _numerics.unit_norms(xs, axes))(leaves)
  each = jax.jit(lambda xs: [_numerics.unit_norm(x, a) for x, a in zip(xs, axes)])(leaves)
  for s, e, x in zip(shared, each, leaves):
    np.testing.assert_array_equal(np.asarray(s).view(np.uint32), np.asarray(e).view(np.uint32))
    finite = np.isfinite(np.asarray(x)).all(axis=0)
    np.testing.assert_allclose(np.asarray(s)[:, finite], _reference(x)[:, finite], rtol=2e-6)
  # The rare unit got its true norm (a plain scaled sum gives inf or a flushed 0 there).
  assert 0 < float(shared[2][0, 4]) < np.inf


def test_the_derivative_of_the_shared_norms_is_each_leafs():
  leaves = tuple(jnp.asarray(x) for x in _leaves_with("none")[1:])
  tangents = tuple(jnp.ones_like(x) for x in leaves)
  axes = ((0,),) * len(leaves)
  _, shared = jax.jvp(lambda *xs: _numerics.unit_norms(xs, axes), leaves, tangents)
  for x, t, s in zip(leaves, tangents, shared):
    _, each = jax.jvp(lambda v: _numerics.unit_norm(v, (0,)), (x,), (t,))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(each))


def test_a_rule_may_ask_for_unit_norms_once():
  from optax_norms._transform import leafwise_transform

  def rule(u, w, *, axes):
    del w, axes
    yield u
    yield u
    return u

  tx = leafwise_transform("twice", rule, {}, mask=None, needs_params=False, per_unit=True)
  grads = {"w": jnp.ones((3, 2))}
  with pytest.raises(TypeError, match="yields more than once"):
    tx.update(grads, tx.init(grads))
