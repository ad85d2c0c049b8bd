"""Clipping per rule and freezing in regularize: clip_global_norm (per rule and model-wide)
against a NumPy reference that leaves frozen leaves out, the documented order, freeze (zero
gradient first, no optimizer state, bit-identical parameters), and clip_adaptive against a
float64 NumPy run of its recursion (constant norms untouched, a 100x spike to μ + z·σ, zero
and NaN norms)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on
from optax_norms._rule_clipping import ClipAdaptiveState


def _tree(key, scale=1.0):
  keys = jax.random.split(jax.random.key(key), 4)
  return {
    "a": {
      "w1": scale * jax.random.normal(keys[0], (3, 4)),
      "w2": scale * jax.random.normal(keys[1], (5,)),
    },
    "b": {"w": scale * jax.random.normal(keys[2], (4, 2))},
    "f": {"w": scale * jax.random.normal(keys[3], (6,))},
  }


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _norm(leaves):
  return np.sqrt(sum(float(np.sum(x * x)) for x in leaves))


@pytest.mark.slow
def test_global_norm_per_rule_and_model_wide_equal_numpy_and_leave_frozen_leaves_out():
  grads = _tree(1, scale=3.0)
  grads["f"]["w"] = grads["f"]["w"] * 1e6  # a frozen leaf's huge gradient must not count
  params = _tree(2)
  rules = [
    ("a/*", {"clip_global_norm": 0.5}),
    ("f/*", {"freeze": True}),
    ("**", None),
  ]
  tx = on.regularize(optax.sgd(1.0), rules, clip_global_norm=2.0)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)

  g = _np(grads)
  total = _norm([g["a"]["w1"], g["a"]["w2"], g["b"]["w"]])  # frozen leaf left out
  assert total > 2.0
  g = jax.tree.map(lambda x: x * min(1.0, 2.0 / total), g)
  group = _norm([g["a"]["w1"], g["a"]["w2"]])
  assert group > 0.5
  expected = {
    "a": {k: -g["a"][k] * 0.5 / group for k in ("w1", "w2")},
    "b": {"w": -g["b"]["w"]},
  }
  for path in (("a", "w1"), ("a", "w2"), ("b", "w")):
    got = np.asarray(updates[path[0]][path[1]])
    np.testing.assert_allclose(got, expected[path[0]][path[1]], rtol=2e-6, err_msg=str(path))
  assert _norm([np.asarray(updates["a"][k], np.float64) for k in ("w1", "w2")]) == pytest.approx(
    0.5, rel=1e-6
  )
  np.testing.assert_array_equal(updates["f"]["w"], np.zeros(6))
  # optax.clip_by_global_norm on the whole tree would let the frozen gradient shrink the rest.
  whole, _ = optax.clip_by_global_norm(2.0).update(grads, optax.EmptyState())
  assert np.max(np.abs(whole["b"]["w"])) < 1e-5


@pytest.mark.slow
def test_a_norm_inside_the_bound_and_a_zero_or_nan_norm_are_left_bit_identical():
  params = _tree(2)
  tx = on.regularize(optax.sgd(1.0), [("**", {"clip_global_norm": 1e6})], clip_global_norm=1e6)
  for grads in (
    _tree(1),
    jax.tree.map(jnp.zeros_like, params),
    jax.tree.map(lambda x: x * jnp.nan, params),
  ):
    updates, _ = tx.update(grads, tx.init(params), params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(np.asarray(u), -np.asarray(g))


def test_clips_run_before_the_coupled_penalty_so_its_gradient_is_never_clipped():
  params, grads = _tree(2), _tree(1, scale=10.0)
  tx = on.regularize(optax.sgd(1.0), [("**", {"clip_global_norm": 1.0, "l2": 0.3})])
  updates, _ = tx.update(grads, tx.init(params), params)
  g, w = _np(grads), _np(params)
  n = _norm(jax.tree.leaves(g))
  expected = jax.tree.map(lambda gi, wi: -(gi / n + 0.6 * wi), g, w)
  for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(u), e, rtol=2e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax's adamw
def test_freeze_keeps_parameters_bit_identical_holds_no_state_and_hides_gradients():
  params = _tree(2)
  params["f"]["w"] = params["f"]["w"].at[0].set(-0.0)  # +0.0 updates would flip this sign bit
  rules = [("f/*", {"freeze": True}), ("**", {"clip_max_abs": 0.5})]
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.5))
  tx = on.regularize(optimizer, rules)

  def run(frozen_scale):
    p, state = params, tx.init(params)
    for i in range(10):
      grads = _tree(10 + i)
      grads["f"]["w"] = grads["f"]["w"] * frozen_scale
      updates, state = jax.jit(tx.update)(grads, state, p)
      p = optax.apply_updates(p, updates)
    return p, state

  ours, state = run(1.0)
  np.testing.assert_array_equal(
    np.asarray(ours["f"]["w"]).view(np.uint32), np.asarray(params["f"]["w"]).view(np.uint32)
  )
  assert not np.allclose(ours["b"]["w"], params["b"]["w"])
  # No optimizer state for the frozen leaf: adam's moments hold a MaskedNode there.
  (adam_state,) = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
    if isinstance(s, optax.ScaleByAdamState)
  ]
  assert isinstance(adam_state.mu["f"]["w"], optax.MaskedNode)
  assert adam_state.mu["b"]["w"].shape == (4, 2)
  # The user's own global clip never sees the frozen gradient: the same run with it 1e6x.
  louder, _ = run(1e6)
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(louder)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_freeze_with_another_setting_is_refused():
  with pytest.raises(ValueError, match=r"Rule 0 .*frozen rule.*\['l2'\]"):
    on.regularize(optax.sgd(1.0), [("**", {"freeze": True, "l2": 1e-3})])
  with pytest.raises(ValueError, match=r"`freeze` takes True"):
    on.regularize(optax.sgd(1.0), [("**", {"freeze": 1})])


# --- clip_adaptive ---------------------------------------------------------------------------


def _adaptive_reference(norms, z, decay, warmup):
  """Float64 NumPy run of the documented recursion: the scale of every step and the final
  (count, μ, σ²)."""
  scales, seen, mean, var = [], [], 0.0, 0.0
  for n in norms:
    if not np.isfinite(n):
      scales.append(1.0)
      continue
    if len(seen) < warmup:
      seen.append(n)
      scales.append(1.0)
      if len(seen) == warmup:
        mean, var = float(np.mean(seen)), float(np.var(seen))
      continue
    seen.append(n)
    threshold = mean + z * np.sqrt(var)
    clipped = min(n, threshold)
    scales.append(clipped / n if n > threshold else 1.0)
    mean = decay * mean + (1 - decay) * clipped
    var = decay * var + (1 - decay) * (clipped - mean) ** 2
  return scales, (len(seen), mean, var)


def _adaptive_run(norms, z=2.0, decay=0.9, warmup=5, jit=True, dtype=jnp.float32):
  direction = _tree(7)
  unit = _norm(jax.tree.leaves(_np(direction)))
  params = jax.tree.map(lambda x: jnp.zeros_like(x, dtype), direction)
  tx = on.regularize(
    optax.sgd(1.0), [("**", {"clip_adaptive": {"z": z, "decay": decay, "warmup": warmup}})]
  )
  update = jax.jit(tx.update) if jit else tx.update
  state, out = tx.init(params), []
  for n in norms:
    grads = jax.tree.map(lambda x, n=n: (x * (n / unit)).astype(dtype), direction)
    updates, state = update(grads, state, params)
    out.append((grads, updates))
  (stats,) = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, ClipAdaptiveState))
    if isinstance(s, ClipAdaptiveState)
  ]
  return out, stats


@pytest.mark.slow
def test_adaptive_clip_leaves_a_run_of_constant_norm_untouched():
  steps, _ = _adaptive_run([3.0] * 40)
  for grads, updates in steps:
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(np.asarray(u), -np.asarray(g))


@pytest.mark.slow
@pytest.mark.parametrize("jit", [True, False])
def test_adaptive_clip_scales_a_100x_spike_to_mean_plus_z_sigma_as_the_numpy_recursion(jit):
  rng = np.random.default_rng(0)
  norms = list(1.0 + 0.1 * rng.standard_normal(30))
  norms += [100.0 * norms[-1]] + list(1.0 + 0.1 * rng.standard_normal(9))
  norms[35] = 0.0  # a zero norm: not scaled, counts as 0 in the statistics
  z, decay, warmup = 2.5, 0.97, 25
  steps, stats = _adaptive_run(norms, z, decay, warmup, jit=jit)
  scales, (count, mean, var) = _adaptive_reference(norms, z, decay, warmup)
  assert scales[30] < 0.02 and all(s == 1.0 for s in scales[:25])
  for (grads, updates), scale in zip(steps, scales):
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
      assert np.all(np.isfinite(np.asarray(u)))
      np.testing.assert_allclose(
        np.asarray(u), -np.asarray(g, np.float64) * scale, rtol=1e-5, atol=1e-7
      )
  # The spike's clipped norm is the bound μ + z·σ of the statistics before it.
  _, (_, mean_30, var_30) = _adaptive_reference(norms[:30], z, decay, warmup)
  spike = _norm([np.asarray(u, np.float64) for u in jax.tree.leaves(steps[30][1])])
  assert spike == pytest.approx(mean_30 + z * np.sqrt(var_30), rel=1e-5)
  assert int(stats.count) == count
  assert float(stats.mean) == pytest.approx(mean, rel=1e-5)
  assert float(stats.var) == pytest.approx(var, rel=1e-4)


@pytest.mark.slow
def test_adaptive_clip_passes_a_nan_norm_on_and_keeps_its_statistics():
  norms = [1.0, 1.2, 0.9, 1.1, 1.0, 1.05]
  steps, before = _adaptive_run(norms)
  nan_steps, after = _adaptive_run(norms + [float("nan")])
  assert all(np.all(np.isnan(np.asarray(u))) for u in jax.tree.leaves(nan_steps[-1][1]))
  for x, y in zip(before, after):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  del steps


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_adaptive_and_global_clips_keep_the_dtype(dtype):
  steps, _ = _adaptive_run([1.0] * 6 + [50.0], dtype=dtype)
  for u in jax.tree.leaves(steps[-1][1]):
    assert u.dtype == dtype
  params = jax.tree.map(lambda x: x.astype(dtype), _tree(2))
  tx = on.regularize(optax.sgd(1.0), [("**", {"clip_global_norm": 0.1})], clip_global_norm=1.0)
  updates, _ = tx.update(params, tx.init(params), params)
  assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}
  norm = _norm([np.asarray(u, np.float64) for u in jax.tree.leaves(updates)])
  assert norm == pytest.approx(0.1, rel=1e-2)


@pytest.mark.parametrize(
  "settings, message",
  [
    ({"clip_adaptive": {"z": -1.0}}, r"Rule 0 \('\*\*'\), setting 'clip_adaptive': `z`"),
    ({"clip_adaptive": {"decay": 1.5}}, r"setting 'clip_adaptive': `decay`"),
    ({"clip_adaptive": {"warmup": 0}}, r"setting 'clip_adaptive': `warmup`"),
    ({"clip_adaptive": {"warmup": 2.5}}, r"setting 'clip_adaptive': `warmup`"),
    (
      {"clip_adaptive": {"zz": 1.0}},
      r"setting 'clip_adaptive': `clip_adaptive` takes a dict with keys among",
    ),
    (
      {"clip_global_norm": -1.0},
      r"setting 'clip_global_norm': `clip_global_norm` must be non-negative",
    ),
  ],
)
def test_bad_clip_values_name_the_rule_and_argument(settings, message):
  wrong_type = settings.get("clip_adaptive", {}).get("warmup") == 2.5
  with pytest.raises(TypeError if wrong_type else ValueError, match=message):
    on.regularize(optax.sgd(1.0), [("**", settings)])


def test_bad_model_wide_clip_names_the_argument():
  with pytest.raises(
    ValueError,
    match=r"regularize\(\.\.\., clip_global_norm=\.\.\.\).*`clip_global_norm` must be non-negative",
  ):
    on.regularize(optax.sgd(1.0), [("**", None)], clip_global_norm=-2.0)
  with pytest.raises(ValueError, match=r"clip_global_norm.*takes a number .*'two'"):
    on.regularize(optax.sgd(1.0), [("**", None)], clip_global_norm="two")
