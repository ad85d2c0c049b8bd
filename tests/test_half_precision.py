"""Half precision: dtypes are kept, norms accumulate in >= float32, no float32 copy of a
whole leaf beyond what a pure half-precision step needs, and bf16 decay resolution."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from _registry import REGISTRY

import optax_norms as on
from optax_norms import decay_resolution_report
from optax_norms.tools import bench_table

HALF = [jnp.bfloat16, jnp.float16]

# name -> (factory, float64 numpy reference (u, w) -> new update, per_unit); units are
# columns (axis 0 reduced), as the default axis for rank-2 leaves.
C, A, L1, L2, LR = 1.5, 0.3, 0.2, 0.4, 0.5


def _norm(x):
  return np.sqrt(np.sum(x * x, axis=0, keepdims=True))


def _soft(x, t):
  return np.sign(x) * np.maximum(np.abs(x) - t, 0)


def _scale(x, c):
  n = _norm(x)
  return np.where(n > c, c / np.where(n > c, n, 1), 1)


# Every registered transform with its float64 oracle; units are columns (axis 0 reduced),
# the default axis for the rank-2 leaves used here.
CASES = {
  entry.name: (entry.make, lambda u, w, entry=entry: entry.oracle(u, w, entry.hyperparams, (0,)))
  for entry in REGISTRY
  if "half_precision" not in entry.skip
}


def _step(tx, u, w):
  state = tx.init(w)
  return jax.jit(lambda u, w: tx.update(u, state, w)[0])(u, w)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", sorted(CASES))
def test_half_leaves_keep_their_dtype_and_match_float64(name, dtype):
  factory, reference = CASES[name]
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(6, 5)), dtype)
  u = jnp.asarray(rng.normal(size=(6, 5)), dtype)
  params, updates = {"k": w, "b": w[0]}, {"k": u, "b": u[0]}
  out = _step(factory(), updates, params)
  assert jax.tree.map(lambda x: x.dtype, out) == {"k": jnp.dtype(dtype), "b": jnp.dtype(dtype)}
  u64, w64 = np.asarray(u, np.float64), np.asarray(w, np.float64)
  want = reference(u64, w64)
  # One rounding to the half dtype, relative to the size of the values involved.
  eps = float(jnp.finfo(dtype).eps)
  scale = np.abs(want) + np.abs(w64) + np.abs(u64)
  np.testing.assert_array_less(
    np.abs(np.asarray(out["k"], np.float64) - want), 2 * eps * scale + 1e-6
  )


@pytest.mark.parametrize("name", ["clip_by_row_norm", "constrain_row_norm"])
def test_f16_unit_whose_squares_overflow_is_clipped_correctly(name):
  # 300² = 90000 > 65504 = f16 max: a norm accumulated in f16 is inf and the unit becomes 0.
  w = np.zeros((4, 3), np.float16)
  u = np.zeros((4, 3), np.float16)
  big = np.full(4, 300.0, np.float16)
  (u if name == "clip_by_row_norm" else w)[:, 0] = big
  u[:, 1] = 0.25  # A small unit: unchanged.
  tx = getattr(on, name)(100.0)
  out = np.asarray(_step(tx, jnp.asarray(u), jnp.asarray(w)), np.float64)
  v = u.astype(np.float64) + (0 if name == "clip_by_row_norm" else w.astype(np.float64))
  projected = v * np.minimum(1, 100.0 / np.maximum(_norm(v), 1e-300))
  want = projected - (0 if name == "clip_by_row_norm" else w.astype(np.float64))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, want, rtol=3e-3, atol=1e-3)
  # The constraint stores 49.875: of the sums one f16 addition 300 + u' can give, the
  # largest that is <= 50·(1 − δ) (the grid there is 0.125).
  np.testing.assert_allclose(
    out[:, 0] + (w[:, 0] if name != "clip_by_row_norm" else 0), 50.0, rtol=3e-3
  )


@pytest.mark.parametrize("name", ["prox_group_l2", "add_max_norm_decay"])
def test_f16_large_units_do_not_overflow_in_other_per_unit_transforms(name):
  w = np.full((4, 2), 300.0, np.float16)
  u = np.zeros((4, 2), np.float16)
  tx = (
    on.prox_group_l2(100.0, 1.0) if name == "prox_group_l2" else on.add_max_norm_decay(100.0, 1e-3)
  )
  out = np.asarray(_step(tx, jnp.asarray(u), jnp.asarray(w)), np.float64)
  w64 = w.astype(np.float64)
  if name == "prox_group_l2":  # ‖v‖ = 600, shrink by 1 − 100/600.
    want = w64 * (1 - 100 / 600) - w64
  else:  # 2α·(600 − 100)/600·w.
    want = 2e-3 * 500 / 600 * w64
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, want, rtol=2e-3)


# Pure half-precision, hand-written steps: the memory baseline (every op in the leaf dtype).
def _hand_norm(x):
  return jnp.sqrt(jnp.sum(x * x, axis=0, keepdims=True))


def _hand_soft(x, t):
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0)


# The same math written in plain jnp (the bench table's hand-written versions), with the
# registry's test hyperparameters.
HAND = {
  entry.name: bench_table.by_name(entry.name).hand_rule(  # type: ignore[misc]
    entry.hyperparams, entry.hyperparams.get("learning_rate", LR)
  )
  for entry in REGISTRY
  if "half_precision" not in entry.skip
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", sorted(CASES))
def test_no_float32_copy_of_a_leaf_beyond_a_pure_half_step(name, dtype):
  shape = (512, 256)
  u = jnp.ones(shape, dtype)
  w = jnp.ones(shape, dtype)
  tx = CASES[name][0]()
  state = tx.init(w)
  ours = jax.jit(lambda u, w: tx.update(u, state, w)[0]).lower(u, w).compile().memory_analysis()
  hand = jax.jit(HAND[name]).lower(u, w).compile().memory_analysis()
  leaf_f32 = np.prod(shape) * 4
  print(
    f"{name} {jnp.dtype(dtype).name}: temp ours {ours.temp_size_in_bytes} "
    f"hand {hand.temp_size_in_bytes}; output ours {ours.output_size_in_bytes} "
    f"hand {hand.output_size_in_bytes}; leaf in f32 {leaf_f32}"
  )
  assert ours.output_size_in_bytes == hand.output_size_in_bytes == np.prod(shape) * 2
  assert ours.temp_size_in_bytes - hand.temp_size_in_bytes < leaf_f32 // 2
  if name == "constrain_spectral_norm":  # Its other mode, with a loop of rounds.
    scale = on.constrain_spectral_norm(1.0, mode="scale", n_iter=50)
    state = scale.init(w)
    step = jax.jit(lambda u, w: scale.update(u, state, w)[0])
    stats = step.lower(u, w).compile().memory_analysis()
    assert stats.temp_size_in_bytes - hand.temp_size_in_bytes < leaf_f32 // 2


@pytest.mark.parametrize(
  "name",
  [
    n
    for n in sorted(CASES)
    if n
    not in {
      "add_max_norm_decay",
      "prox_group_l2",
      "clip_by_row_norm",
      "constrain_row_norm",
      "constrain_spectral_norm",
      "constrain_unit_norm",
      "constrain_min_max_norm",
      "cpr",
    }
  ],
)
def test_elementwise_half_steps_need_no_leaf_sized_temporary(name):
  u = w = jnp.ones((512, 256), jnp.bfloat16)
  tx = CASES[name][0]()
  state = tx.init(w)
  stats = jax.jit(lambda u, w: tx.update(u, state, w)[0]).lower(u, w).compile().memory_analysis()
  assert stats.temp_size_in_bytes < 512 * 256 * 2


# --- decay_resolution_report ---------------------------------------------------------


def _bf16_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(64, 32)), jnp.bfloat16),
      "bias": jnp.asarray(rng.normal(size=(32,)), jnp.bfloat16),
    },
    "f32": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
  }


def _unchanged_after_decay(params, alpha, lr):
  """Applies one real decay step (add_l2_decay + sgd, zero gradient) and reports, per
  leaf, the fraction of non-zero weights left bit-identical."""
  tx = optax.chain(on.add_l2_decay(alpha), optax.sgd(lr))
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  return {
    "/".join(str(k.key) for k in path): float(
      np.mean(np.asarray(a)[np.asarray(a) != 0] == np.asarray(b)[np.asarray(a) != 0])
    )
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new))
  }


@pytest.mark.slow
@pytest.mark.parametrize("alpha, lr", [(0.05, 1e-3), (0.5, 0.1), (0.75, 2e-3), (1e-6, 1e-4)])
def test_decay_resolution_report_agrees_with_applying_the_step(alpha, lr):
  params = _bf16_params()
  report = decay_resolution_report(params, alpha, lr)
  unchanged = _unchanged_after_decay(params, alpha, lr)
  assert set(report.leaves) == set(unchanged)
  for path, leaf in report.leaves.items():
    assert leaf.lost_fraction == pytest.approx(unchanged[path], abs=0.03), (path, leaf)
    assert leaf.rounds_away == (unchanged[path] > 0.5)
  assert report.rounds_away == tuple(p for p in report.leaves if unchanged[p] > 0.5)
  assert report.relative_step == pytest.approx(2 * alpha * lr)


def test_decay_resolution_report_flags_the_bf16_trap_and_not_f32():
  params = _bf16_params()
  report = decay_resolution_report(params, alpha=0.05, learning_rate=1e-3)  # lr·2α = 1e-4.
  assert report.rounds_away == ("dense/bias", "dense/kernel")
  assert "f32/kernel" not in report.rounds_away
  assert report.leaves["dense/kernel"].dtype == "bfloat16"
  assert "dense/kernel" in report.summary and "rounds away" in report.summary
  # The whole step really is a no-op on the bf16 leaves.
  unchanged = _unchanged_after_decay(params, 0.05, 1e-3)
  assert unchanged["dense/kernel"] == 1.0 and unchanged["f32/kernel"] == 0.0


def test_decay_resolution_report_matches_numpy_spacing_elementwise():
  # Independent check with numpy's spacing in bf16 (ml_dtypes): away from powers of two
  # the gap towards zero equals np.spacing, and the decay is lost iff step < spacing/2.
  rng = np.random.default_rng(3)
  w = rng.normal(size=4096).astype(ml_dtypes.bfloat16)
  mantissa = np.frexp(np.abs(w.astype(np.float64)))[0]
  w = w[(mantissa != 0.5) & (w != 0)]  # Drop exact powers of two and zeros.
  rel = 2 * 0.7 * 2e-3  # Close to bf16's half-ulp: the answer depends on each mantissa.
  step = rel * np.abs(w.astype(np.float64))
  lost = step < np.spacing(np.abs(w)).astype(np.float64) / 2
  assert 0.05 < lost.mean() < 0.95  # A discriminating case.
  report = decay_resolution_report({"w": jnp.asarray(w)}, alpha=0.7, learning_rate=2e-3)
  assert report.leaves["w"].lost_fraction == pytest.approx(lost.mean(), abs=1e-3)


def test_decay_resolution_report_mask_and_schedule():
  params = _bf16_params()
  schedule = optax.linear_schedule(1e-3, 0.5, 10)
  report = decay_resolution_report(params, 0.5, schedule, mask="**/kernel", step=10)
  assert set(report.leaves) == {"dense/kernel", "f32/kernel"}
  assert report.relative_step == pytest.approx(0.5)
  assert report.rounds_away == ()
  early = decay_resolution_report(params, 0.5, schedule, mask="**/kernel", step=0)
  assert early.rounds_away == ("dense/kernel",)
  with pytest.raises(ValueError, match="`alpha` must be non-negative"):
    decay_resolution_report(params, -1.0, 1e-3)
  with pytest.raises(ValueError, match="matches no parameter"):
    decay_resolution_report(params, 1.0, 1e-3, mask="**/kernal")
