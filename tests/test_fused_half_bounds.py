"""Constraint bounds in bf16/f16 hold in the normal fused step: ``jax.grad``, ``tx.update`` and
``optax.apply_updates`` in one ``jax.jit``.

Inside one fusion XLA may keep half-precision intermediates in float32 (its excess-precision
rewrite drops ``f32 → bf16 → f32`` convert pairs), so a repeated ``apply_updates`` addition
written as ``w.astype(bf16) + u.astype(bf16)`` is not rounded as the stored one is. Before the
fix, units whose unrounded norm was just inside ``c·(1 − δ)`` were kept and then stored with
norms up to ``c·(1 + 8e-4)`` (``constrain_row_norm``, ``constrain_min_max_norm`` in bf16).
Every bound is checked here in float64 on the stored values. Float32 leaves are checked too:
there the constraints return ``(w + u) − w`` for the elements they keep, and LLVM may contract
sgd's ``w − lr·g`` into a fused multiply-add in one loop and not in another.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on

# optax's adam is not strict-promotion clean (see tests/conftest.py).
pytestmark = pytest.mark.standard_promotion

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
C = 1.0  # The norm bound (representable in both dtypes).
MAX_ABS = 0.05  # Not representable in bf16/f16: the box bound is rounded towards zero.

CONSTRAINTS = {
  "constrain_row_norm": lambda: on.constrain_row_norm(C, mask="**/kernel"),
  "constrain_min_max_norm": lambda: on.constrain_min_max_norm(0.5, C, mask="**/kernel"),
  "constrain_unit_norm": lambda: on.constrain_unit_norm(mask="**/kernel"),
  "constrain_max_abs": lambda: on.constrain_max_abs(MAX_ABS, mask="**/kernel"),
  "constrain_non_negative": lambda: on.constrain_non_negative(mask="**/kernel"),
}


def _excess(name, kernel):
  """How far the stored kernel (float64) is outside the constraint's bound (> 0: broken)."""
  k = np.asarray(kernel, np.float64)
  if name == "constrain_max_abs":
    return np.abs(k).max() - MAX_ABS
  if name == "constrain_non_negative":
    return -k.min()
  return np.sqrt(np.sum(k * k, axis=-2)).max() - C  # Units: columns of (..., in, out).


def _fused_step(tx, loss):
  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _near_bound(dtype, seed):
  """A Dense kernel (64, 32) whose units have norm ≈ C (in the leaf dtype) and a linear
  loss with a fixed gradient ``G``: after one step many units are a rounding away from C."""
  rng = np.random.default_rng(seed)
  d = rng.normal(size=(64, 32))
  d *= C / np.sqrt(np.sum(d * d, axis=0))
  params = {"dense": {"kernel": jnp.asarray(d, dtype), "bias": jnp.zeros(32, dtype)}}
  g = jnp.asarray(rng.normal(size=(64, 32)) * 0.01, dtype)

  def loss(p):
    k = p["dense"]["kernel"].astype(jnp.float32)
    return jnp.sum(k * g.astype(jnp.float32)) + jnp.sum(p["dense"]["bias"].astype(jnp.float32))

  return params, loss


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_bound_holds_on_units_a_rounding_away_in_a_fused_step(name, dtype, opt):
  # adam's eps must be representable in f16 (1e-8 is 0 there, and 0/0 makes NaN updates).
  optimizer = optax.sgd(0.1) if opt == "sgd" else optax.adam(1e-3, eps=1e-3)
  tx = optax.chain(optimizer, CONSTRAINTS[name]())
  free = optax.chain(optimizer)
  for seed in range(3):
    params, loss = _near_bound(dtype, seed)
    new, _ = _fused_step(tx, loss)(params, tx.init(params))
    assert new["dense"]["kernel"].dtype == jnp.dtype(dtype)
    assert np.isfinite(np.asarray(new["dense"]["kernel"], np.float64)).all()
    assert _excess(name, new["dense"]["kernel"]) <= 0, seed
    # The case is discriminating: without the constraint the step breaks the bound.
    unconstrained, _ = _fused_step(free, loss)(params, free.init(params))
    assert _excess(name, unconstrained["dense"]["kernel"]) > 0


def _regression(dtype, seed):
  """A Dense layer (64 → 32) on a regression whose least-squares weights are far outside."""
  kp, kx, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {
    "dense": {
      "kernel": (0.1 * jax.random.normal(kp, (64, 32))).astype(dtype),
      "bias": jnp.zeros((32,), dtype),
    }
  }
  x = jax.random.normal(kx, (128, 64)).astype(dtype)
  y = 3.0 * jax.random.normal(ky, (128, 32))

  def loss(p):
    out = (x @ p["dense"]["kernel"] + p["dense"]["bias"]).astype(jnp.float32)
    return jnp.mean((out - y) ** 2)

  return params, loss


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_bound_holds_through_fused_half_training(name, dtype):
  tx = optax.chain(optax.adam(0.1, eps=1e-3), CONSTRAINTS[name]())
  worst, active = -np.inf, 0.0
  for seed in range(2):
    params, loss = _regression(dtype, seed)
    step, state = _fused_step(tx, loss), tx.init(params)
    for _ in range(20):
      params, state = step(params, state)
      kernel = params["dense"]["kernel"]
      assert np.isfinite(np.asarray(kernel, np.float64)).all()
      worst = max(worst, _excess(name, kernel))
    active = max(active, _excess(name, kernel))
  assert worst <= 0
  # The bound is active at the end: some weight or unit is within 1% of it.
  scale = MAX_ABS if name == "constrain_max_abs" else C
  assert active > -0.01 * scale
