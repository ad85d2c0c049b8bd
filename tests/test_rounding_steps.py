"""The one-ulp step of the exact constraints (an integer step on the bit pattern) equals
numpy's nextafter towards zero and away from it, for every finite nonzero value class of
float32, bfloat16 and float16 (normal, subnormal, the largest), and its derivative is the
identity."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from optax_norms._constraints import _one_ulp


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_one_ulp_equals_nextafter_towards_and_away_from_zero(dtype):
  info = ml_dtypes.finfo(dtype)
  rng = np.random.default_rng(0)
  magnitudes = np.concatenate(
    [
      10.0 ** rng.uniform(np.log10(float(info.tiny)), np.log10(float(info.max)), 2000),
      [float(info.smallest_subnormal), float(info.tiny), float(info.max), 1.0],
    ]
  )
  x = (magnitudes * rng.choice([-1.0, 1.0], magnitudes.size)).astype(dtype)
  x = x[(x != 0) & np.isfinite(x.astype(np.float64))]
  wide = x.astype(np.float64)
  for toward_zero in (True, False):
    got = np.asarray(_one_ulp(jnp.asarray(x), jnp.full(x.shape, toward_zero)))
    target = np.where(toward_zero, 0.0, np.sign(wide) * np.inf)
    with np.errstate(over="ignore"):  # away from zero, the largest value steps to inf
      ref = np.array([np.nextafter(dtype(v), dtype(t)) for v, t in zip(x, target)], dtype)
    np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))


def test_one_ulp_differentiates_as_the_identity():
  grad = jax.grad(lambda x: _one_ulp(x, jnp.asarray(True)) * 3.0)(jnp.float32(1.5))
  assert float(grad) == 3.0
