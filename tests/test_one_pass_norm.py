"""The one-pass unit norm of large leaves on XLA:CPU (one scaled sum of squares; the second,
scaled-down sum only under a lax.cond when a unit overflows): bit for bit the two-pass norm,
within float32 rounding of float64 over magnitudes 1e-25 to 1e30, zero, NaN and inf units
as before, and the max-norm bound exact on the stored values of a large leaf."""

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


def test_one_pass_equals_two_passes_bit_for_bit_with_zero_nan_inf_and_overflowing_units():
  exponents = np.linspace(-25, 30, COLS)
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


@given(exponents=st.lists(st.floats(-25, 30), min_size=COLS, max_size=COLS))
def test_one_pass_norm_is_float32_accurate_over_1e_minus_25_to_1e30(exponents):
  # Below ~1e-27 the squares, scaled up by 2^31, fall below float32's normal range (so for the
  # two-pass norm too): such units keep a norm within 1e-25 of the truth, not a relative 2e-6.
  x = _leaf(exponents, seed=1)
  np.testing.assert_allclose(_norms(x, True), _reference(x), rtol=2e-6)


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
