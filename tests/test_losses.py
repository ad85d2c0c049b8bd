"""Loss-space penalties: float64 formulas, and T.update == g + jax.grad(P)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_norms as on

RNG = np.random.default_rng(3)


def _params(zero=False):
  tree = {
    "dense": {"kernel": RNG.normal(size=(4, 3)), "bias": RNG.normal(size=(3,))},
    "conv": {"kernel": RNG.normal(size=(2, 2, 3, 4))},
    "count": np.asarray(5, np.int32),
  }
  tree["dense"]["kernel"][:, 0] = 0.0  # a zero unit and zero elements
  tree["dense"]["kernel"][1, 2] = 0.0
  if zero:
    tree = jax.tree.map(np.zeros_like, tree)
  return jax.tree.map(
    jnp.asarray, jax.tree.map(lambda x: x.astype(np.float32) if x.dtype == np.float64 else x, tree)
  )


def _float_leaves(tree, mask_paths=None):
  out = []
  for path, leaf in zip(on.tree_paths(tree), jax.tree.leaves(tree)):
    if np.issubdtype(leaf.dtype, np.floating) and (mask_paths is None or path in mask_paths):
      out.append(np.asarray(leaf, np.float64))
  return out


def _unit_norms(w):
  axes = tuple(range(w.ndim - 1)) if w.ndim >= 2 else tuple(range(w.ndim))
  return np.sqrt(np.sum(w * w, axis=axes))


@pytest.mark.slow
def test_penalties_match_float64_formulas():
  params = _params()
  ws = _float_leaves(params)
  np.testing.assert_allclose(
    on.l2_penalty(params, 0.3), 0.3 * sum(np.sum(w * w) for w in ws), rtol=1e-6
  )
  np.testing.assert_allclose(
    on.l1_penalty(params, 0.3), 0.3 * sum(np.sum(np.abs(w)) for w in ws), rtol=1e-6
  )
  np.testing.assert_allclose(
    on.elastic_penalty(params, 0.2, 0.7),
    sum(0.2 * np.sum(np.abs(w)) + 0.7 * np.sum(w * w) for w in ws),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    on.group_l2_penalty(params, 0.5), 0.5 * sum(np.sum(_unit_norms(w)) for w in ws), rtol=1e-6
  )
  np.testing.assert_allclose(
    on.max_norm_penalty(params, 1.0, 0.5),
    0.5 * sum(np.sum(np.maximum(_unit_norms(w) - 1.0, 0) ** 2) for w in ws),
    rtol=1e-6,
  )
  kernels = _float_leaves(params, {"dense/kernel", "conv/kernel"})
  np.testing.assert_allclose(
    on.l2_penalty(params, 0.3, mask="**/kernel"),
    0.3 * sum(np.sum(w * w) for w in kernels),
    rtol=1e-6,
  )


PAIRS = [
  ("l2", lambda m: on.add_l2_decay(0.3, mask=m), lambda p, m: on.l2_penalty(p, 0.3, mask=m)),
  ("l1", lambda m: on.add_l1_decay(0.3, mask=m), lambda p, m: on.l1_penalty(p, 0.3, mask=m)),
  (
    "elastic",
    lambda m: on.elastic(0.2, 0.7, mask=m),
    lambda p, m: on.elastic_penalty(p, 0.2, 0.7, mask=m),
  ),
  (
    "max_norm",
    lambda m: on.add_max_norm_decay(0.5, 2.0, mask=m),
    lambda p, m: on.max_norm_penalty(p, 0.5, 2.0, mask=m),
  ),
  (
    "max_norm_zero_radius",
    lambda m: on.add_max_norm_decay(0.0, 2.0, mask=m),
    lambda p, m: on.max_norm_penalty(p, 0.0, 2.0, mask=m),
  ),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, make_tx, penalty", PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("zero", [False, True], ids=["w", "w=0"])
@pytest.mark.parametrize("mask", [None, "**/kernel"], ids=["all", "kernels"])
def test_update_equals_gradient_plus_grad_of_penalty(name, make_tx, penalty, zero, mask):
  params = _params(zero)
  grads = jax.tree.map(lambda x: jnp.ones_like(x) if x.dtype == jnp.float32 else x, params)
  tx = make_tx(mask)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  floats = {k: v for k, v in params.items() if k != "count"}
  penalty_grad = jax.grad(lambda p: penalty(p, mask))(floats)
  expected = jax.tree.map(lambda g, d: g + d, {k: grads[k] for k in floats}, penalty_grad)
  for path, a, e in zip(
    on.tree_paths(expected),
    jax.tree.leaves({k: updates[k] for k in floats}),
    jax.tree.leaves(expected),
  ):
    assert np.all(np.isfinite(np.asarray(e))), path
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.slow
def test_l1_gradient_at_zero_is_zero_unlike_jax_abs():
  w = {"k": jnp.zeros(3)}
  np.testing.assert_array_equal(jax.grad(on.l1_penalty)(w, 1.0)["k"], 0.0)
  np.testing.assert_array_equal(jax.grad(lambda p: jnp.sum(jnp.abs(p["k"])))(w)["k"], 1.0)
  np.testing.assert_array_equal(
    jax.grad(on.group_l2_penalty)({"k": jnp.zeros((3, 2))}, 1.0)["k"], 0.0
  )


def test_penalty_bad_hyperparameters():
  with pytest.raises(ValueError, match="`alpha` must be non-negative"):
    on.l2_penalty(_params(), -1.0)
  with pytest.raises(ValueError, match="`l2` must be finite"):
    on.elastic_penalty(_params(), 0.1, float("nan"))
  with pytest.raises(ValueError, match="`alpha` must be a number here, not a schedule"):
    on.l1_penalty(_params(), lambda step: 0.1)


@pytest.mark.slow
def test_penalties_are_jittable_and_keep_float32():
  params = _params()
  value = jax.jit(on.elastic_penalty, static_argnames="mask")(params, 0.1, 0.2, mask="**/kernel")
  assert value.dtype == jnp.float32
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, params)
  assert on.l2_penalty(bf16, 0.1).dtype == jnp.float32
