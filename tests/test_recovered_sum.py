"""The identity the constraints rely on to skip the read of `u` in float32 leaves.

With ``v = fl(w + u)``, ``fl(w + fl(v − w)) == v``: adding back the rounded difference
recovers the rounded sum. A constraint returns ``fl(v − w)`` for every element it leaves
inside, so ``optax.apply_updates`` stores exactly what it stores for ``u``. Checked here in
XLA's own arithmetic (jit, which flushes subnormals on CPU) and in NumPy's IEEE arithmetic
(gradual underflow), on random pairs over the whole float32 range, near-cancelling pairs,
pairs whose sums are ties, and subnormal neighbourhoods; and it fails on the narrower leaves,
which is why those keep `u`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  sign = lambda: rng.choice(np.array([-1.0, 1.0]), n)  # noqa: E731
  # Random magnitudes over 2^-149 … 2^127.
  w = sign() * rng.uniform(1, 2, n) * 2.0 ** rng.integers(-149, 127, n)
  u = sign() * rng.uniform(1, 2, n) * 2.0 ** rng.integers(-149, 127, n)
  # Close magnitudes (cancellation and Sterbenz's range) ...
  w2 = sign() * rng.uniform(1, 2, n) * 2.0 ** rng.integers(-140, 120, n)
  u2 = -w2 * rng.uniform(0.0, 4.0, n)
  # ... sums that are ties: u on a grid finer than the ulp of w by one to three bits ...
  w3 = sign() * rng.integers(1 << 23, 1 << 24, n) * 2.0 ** rng.integers(-120, 80, n)
  ulp = np.abs(w3) * 2.0**-23
  u3 = rng.integers(-(1 << 12), 1 << 12, n) * ulp / rng.choice(np.array([2.0, 4.0, 8.0]), n)
  u3 = u3 * 2.0 ** rng.integers(0, 8, n)
  # ... and values near the smallest normal, where XLA:CPU flushes subnormals.
  w4 = sign() * rng.uniform(1, 2, n) * 2.0 ** rng.integers(-149, -110, n)
  u4 = sign() * rng.uniform(1, 2, n) * 2.0 ** rng.integers(-149, -110, n)
  with np.errstate(over="ignore"):
    w_all = np.concatenate([w, w2, w3, w4]).astype(np.float32)
    u_all = np.concatenate([u, u2, u3, u4]).astype(np.float32)
  finite = np.isfinite(w_all + u_all)
  return w_all[finite], u_all[finite]


@jax.jit
def _recovered(w, u):
  v = w + u
  return v, w + (v - w)


@pytest.mark.parametrize("seed", range(3))
def test_adding_back_the_rounded_difference_recovers_the_sum(seed):
  w, u = _pairs(np.random.default_rng(seed), 250_000)
  v, back = map(np.asarray, _recovered(jnp.asarray(w), jnp.asarray(u)))
  np.testing.assert_array_equal(back, v)  # XLA's arithmetic (float32, jit).
  with np.errstate(over="ignore"):
    v_ieee = w + u
    np.testing.assert_array_equal(w + (v_ieee - w), v_ieee)  # IEEE, gradual underflow.


def test_the_identity_fails_for_a_narrower_leaf_added_in_float32():
  # A bfloat16 leaf is added in float32 and rounded to bfloat16: two roundings, and there
  # (w + u) − w added back need not give the stored sum. Constraints keep `u` for such leaves.
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=200_000), jnp.bfloat16)
  u = jnp.asarray(rng.normal(size=200_000) * 10.0 ** rng.uniform(-3, 1, 200_000), jnp.bfloat16)

  def stored(a, b):  # What optax.apply_updates stores for a bfloat16 leaf.
    return (a.astype(jnp.float32) + b.astype(jnp.float32)).astype(jnp.bfloat16)

  v = stored(w, u)
  back = stored(w, (v.astype(jnp.float32) - w.astype(jnp.float32)).astype(jnp.bfloat16))
  assert int(jnp.sum(back != v)) > 0
