"""Formulas against optax and TF peers with explicit unit axes (peer-semantics.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on

RNG = np.random.default_rng(0)


def _tree():
  return {
    "dense": {
      "kernel": jnp.asarray(RNG.normal(size=(5, 4)), jnp.float32),
      "bias": jnp.asarray(RNG.normal(size=(4,)), jnp.float32),
    },
    "conv": {"kernel": jnp.asarray(RNG.normal(size=(3, 3, 2, 6)), jnp.float32)},
  }


@pytest.mark.parametrize("alpha", [0.0, 1e-4, 0.3])
def test_add_l2_decay_is_optax_add_decayed_weights_of_two_alpha(alpha):
  params, grads = _tree(), _tree()
  ours = on.add_l2_decay(alpha, mask="**/kernel")
  theirs = optax.add_decayed_weights(
    2 * alpha, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  )
  a, _ = jax.jit(ours.update)(grads, ours.init(params), params)
  b, _ = jax.jit(theirs.update)(grads, theirs.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # bit for bit


@pytest.mark.slow
def test_clip_by_max_abs_is_optax_clip():
  grads = jax.tree.map(lambda x: 3 * x, _tree())
  a, _ = on.clip_by_max_abs(0.7).update(grads, optax.EmptyState())
  b, _ = optax.clip(0.7).update(grads, optax.EmptyState())
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _tf_clip_by_norm(t, clip_norm, axes):
  """tf.clip_by_norm in float64 numpy (clip_ops.py): t * c / max(l2, c), reduced `axes`."""
  l2 = np.sqrt(np.sum(t * t, axis=axes, keepdims=True))
  return t * clip_norm / np.maximum(l2, clip_norm)


@pytest.mark.parametrize(
  "shape, axis, tf_axes",
  [
    ((6, 5), None, (0,)),  # Flax Dense (in, out): a unit is a column.
    ((3, 3, 4, 5), None, (0, 1, 2)),  # Flax Conv (h, w, in, out): a unit is a filter.
    ((5, 6), 1, (1,)),  # PyTorch-layout (out, in): axis=1.
    ((5, 6), -1, (1,)),  # negative axis
    ((7,), None, (0,)),  # a bias: the whole leaf is one unit.
  ],
)
def test_clip_by_row_norm_matches_tf_clip_by_norm(shape, axis, tf_axes):
  u = RNG.normal(size=shape) * 2
  c = 1.5
  tx = on.clip_by_row_norm(c, axis=axis)
  ours, _ = jax.jit(tx.update)({"w": jnp.asarray(u, jnp.float32)}, tx.init(None))
  np.testing.assert_allclose(ours["w"], _tf_clip_by_norm(u, c, tf_axes), rtol=2e-6, atol=1e-7)


@pytest.mark.slow
def test_clip_by_row_norm_stacked_layers_with_callable_axis():
  params = {
    "stacked": {"kernel": jnp.asarray(RNG.normal(size=(3, 4, 5)) * 2, jnp.float32)},
    "dense": {"kernel": jnp.asarray(RNG.normal(size=(4, 5)) * 2, jnp.float32)},
  }
  axis = lambda path, leaf: 1 if path[0] == "stacked" else None  # noqa: E731
  tx = on.clip_by_row_norm(1.0, axis=axis)
  ours, _ = tx.update(params, tx.init(params))
  np.testing.assert_allclose(
    ours["stacked"]["kernel"],
    _tf_clip_by_norm(np.asarray(params["stacked"]["kernel"], np.float64), 1.0, (1,)),
    rtol=2e-6,
    atol=1e-7,
  )
  np.testing.assert_allclose(
    ours["dense"]["kernel"],
    _tf_clip_by_norm(np.asarray(params["dense"]["kernel"], np.float64), 1.0, (0,)),
    rtol=2e-6,
    atol=1e-7,
  )


def test_unit_inside_the_ball_is_unchanged_bit_for_bit():
  u = RNG.normal(size=(50, 8)).astype(np.float32)
  u[:, :4] *= 1e-3  # these columns are well inside the ball
  norms = np.linalg.norm(u.astype(np.float64), axis=0)
  c = float(np.min(norms[4:]) * 0.5)
  assert np.all(norms[:4] < c)
  out, _ = jax.jit(on.clip_by_row_norm(c).update)({"w": jnp.asarray(u)}, optax.EmptyState())
  np.testing.assert_array_equal(np.asarray(out["w"])[:, :4], u[:, :4])
  # TF's own formula t*c/c is not bit-exact inside the ball; ours is. Outside: clipped to c.
  np.testing.assert_allclose(
    np.linalg.norm(np.asarray(out["w"], np.float64)[:, 4:], axis=0), c, rtol=1e-6
  )


@pytest.mark.slow
def test_clip_by_row_norm_differs_from_optax_adaptive_grad_clip_on_1_by_n_kernels():
  # optax.unitwise_norm squeezes a (1, n) kernel into one whole-array norm; our default
  # axis keeps n units (peer-semantics.md §5.2).
  u = jnp.asarray(RNG.normal(size=(1, 6)) * 3, jnp.float32)
  out, _ = on.clip_by_row_norm(1.0).update({"k": u}, optax.EmptyState())
  np.testing.assert_allclose(
    np.abs(np.asarray(out["k"])), np.minimum(np.abs(np.asarray(u)), 1.0), rtol=1e-6
  )
