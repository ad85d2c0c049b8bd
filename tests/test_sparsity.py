"""constrain_n_of_m and constrain_sparsity: exact budgets, ties, errors, NaN, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on


def _apply(tx, w, u=None):
  params = {"k": jnp.asarray(w)}
  u = {"k": jnp.zeros_like(params["k"]) if u is None else jnp.asarray(u)}
  updates, _ = jax.jit(tx.update)(u, tx.init(params), params)
  return np.asarray(optax.apply_updates(params, updates)["k"])


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (0, 2), (3, 3)])
@pytest.mark.parametrize(
  "shape, axis", [((8, 5), -2), ((3, 3, 8, 2), -2), ((6, 8), -1), ((8,), -2)]
)
def test_n_of_m_keeps_exactly_n_per_block_along_axis(n, m, shape, axis):
  if shape[axis if len(shape) > 1 else 0] % m:
    pytest.skip("axis length not a multiple of m")
  rng = np.random.default_rng(0)
  w = rng.normal(size=shape).astype(np.float32)
  u = rng.normal(size=shape).astype(np.float32)
  out = _apply(on.constrain_n_of_m(n, m, block_axis=axis), w, u)
  ax = 0 if len(shape) == 1 else axis % len(shape)
  v = np.moveaxis(w + u, ax, -1).reshape(-1, m)
  blocks = np.moveaxis(out, ax, -1).reshape(-1, m)
  assert np.all(np.sum(blocks != 0, axis=1) == n)
  for vb, ob in zip(v, blocks):
    kept = np.sort(np.argsort(-np.abs(vb), kind="stable")[:n])
    np.testing.assert_array_equal(np.flatnonzero(ob), kept)
    np.testing.assert_array_equal(ob[kept], vb[kept])


def test_n_of_m_ties_keep_the_lower_index():
  w = np.array([[1.0], [-1.0], [1.0], [1.0], [0.0], [0.0], [2.0], [0.0]], np.float32)
  out = _apply(on.constrain_n_of_m(2, 4), w)
  assert out[:, 0].tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(4, 1), (4, 8), (4, 3, 4, 2), (7, 3), (32, 16)])
def test_budgets_are_exact_when_the_update_is_computed_in_the_same_program(shape):
  # u = -0.1·g computed inside the jitted step (as any optimizer does). Unguarded, XLA:CPU
  # fused |w + u| into each operand of the comparisons and contracted w + (-0.1)·g into an
  # FMA in only some copies: an entry 1 ulp from itself beat itself (wrong counts).
  rng = np.random.default_rng(0)
  for tx, zeros in (
    (on.constrain_n_of_m(2, 4, block_axis=0), None),
    (on.constrain_sparsity(0.3), int(np.floor(0.3 * np.prod(shape)))),
  ):
    if zeros is None and shape[0] % 4:
      continue
    chain = optax.chain(optax.scale(-0.1), tx)
    step = jax.jit(
      lambda p, g, chain=chain: optax.apply_updates(p, chain.update(g, chain.init(p), p)[0])
    )
    for _ in range(30):
      w = rng.normal(size=shape).astype(np.float32)
      g = rng.normal(size=shape).astype(np.float32)
      out = np.asarray(step(w, g))
      if zeros is None:
        blocks = np.moveaxis(out, 0, -1).reshape(-1, 4)
        assert np.all(np.sum(blocks != 0, axis=1) == 2)
      else:
        assert int(np.sum(out == 0)) == zeros


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(4, 8), (8, 3), (64, 64)])
def test_budgets_are_exact_under_vmap_of_a_jitted_step(shape):
  # Under vmap a batched guard would become a fused select and the FMA mismatch above would
  # come back (17 of 64 draws of (4, 8) kept a wrong count before the guard's vmap rule).
  rng = np.random.default_rng(1)
  for tx, bad_count in (
    (
      on.constrain_n_of_m(2, 4, block_axis=0),
      lambda out: np.sum(np.count_nonzero(out.reshape(-1, 4, shape[1]), axis=1) != 2),
    ),
    (on.constrain_sparsity(0.5), lambda out: abs(int(np.sum(out == 0)) - out.size // 2)),
  ):
    chain = optax.chain(optax.sgd(0.1), tx)

    def step(w, g, chain=chain):
      return optax.apply_updates(w, chain.update(g, chain.init(w), w)[0])

    w = rng.normal(size=(64, *shape)).astype(np.float32)
    g = rng.normal(size=(64, *shape)).astype(np.float32)
    batched = np.asarray(jax.jit(jax.vmap(step))(w, g))
    assert sum(bad_count(out) for out in batched) == 0
    # Nested vmap with unbatched parameters.
    nested = jax.jit(jax.vmap(jax.vmap(step, in_axes=(None, 0)), in_axes=(None, 0)))
    out = np.asarray(nested(w[0], g[:8].reshape(2, 4, *shape)))
    assert sum(bad_count(o) for o in out.reshape(-1, *shape)) == 0


@pytest.mark.slow
def test_budgets_can_be_differentiated_through():
  # The guard that materializes the magnitudes carries no derivative (they only rank): a
  # differentiated step sees the kept entries' identity and the pruned ones' zero.
  w = jnp.asarray(np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32))
  for tx in (on.constrain_n_of_m(2, 4, block_axis=0), on.constrain_sparsity(0.5)):
    keep = np.asarray(optax.apply_updates(w, tx.update(jnp.zeros_like(w), tx.init(w), w)[0])) != 0
    grad = jax.grad(
      lambda p, tx=tx: optax.apply_updates(p, tx.update(jnp.zeros_like(p), tx.init(p), p)[0]).sum()
    )(w)
    np.testing.assert_array_equal(np.asarray(grad), keep.astype(np.float32))


def test_n_of_m_error_names_the_leaf_and_its_shape():
  params = {"dense": {"kernel": jnp.ones((8, 4))}, "conv": {"kernel": jnp.ones((3, 3, 3, 8))}}
  with pytest.raises(ValueError, match=r"'conv/kernel' of shape \(3, 3, 3, 8\).*not a multiple"):
    on.constrain_n_of_m(2, 4).init(params)
  on.constrain_n_of_m(2, 4, mask="dense/**").init(params)  # The right mask is fine.


@pytest.mark.parametrize(
  "n, m, match",
  [
    (-1, 4, "`n`"),
    (5, 4, "`n`"),
    (1.5, 4, "`n`"),
    (True, 4, "`n`"),
    (2, 0, "`m`"),
    (2, 4.0, "`m`"),
    (2, "4", "`m`"),
    (float("nan"), 4, "`n`"),
  ],
)
def test_n_of_m_validates_n_and_m(n, m, match):
  with pytest.raises(ValueError, match=match):
    on.constrain_n_of_m(n, m)


def test_n_of_m_nan_is_kept_and_stays_in_its_block():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(8, 3)).astype(np.float32)
  clean = _apply(on.constrain_n_of_m(2, 4), w)
  w[1, 2] = np.nan
  dirty = _apply(on.constrain_n_of_m(2, 4), w)
  assert np.isnan(dirty[1, 2])
  other = np.ones_like(w, bool)
  other[0:4, 2] = False
  np.testing.assert_array_equal(dirty[other], clean[other])


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_n_of_m_schedule_ramps_from_dense_to_2_of_4():
  w = np.random.default_rng(2).normal(size=(16, 4)).astype(np.float32)
  tx = on.constrain_n_of_m(optax.linear_schedule(4.0, 2.0, 2), 4)
  params = {"k": jnp.asarray(w)}
  state = tx.init(params)
  counts = []
  for _ in range(3):
    updates, state = jax.jit(tx.update)({"k": jnp.zeros((16, 4))}, state, params)
    counts.append(int(np.sum(np.asarray(optax.apply_updates(params, updates)["k"]) != 0)))
  assert counts == [64, 48, 32]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=str)
def test_pruned_entries_are_exact_zeros_in_the_leaf_dtype(dtype):
  rng = np.random.default_rng(3)
  params = {"k": jnp.asarray(rng.normal(size=(8, 6)), dtype)}
  grads = {"k": jnp.asarray(rng.normal(size=(8, 6)), dtype)}
  for tx in (on.constrain_n_of_m(2, 4), on.constrain_sparsity(0.75)):
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = np.asarray(optax.apply_updates(params, updates)["k"], np.float32)
    stored = np.asarray(params["k"] + grads["k"], np.float32)
    kept = new != 0
    np.testing.assert_array_equal(new[kept], stored[kept])  # Kept: exactly w + u.
    assert updates["k"].dtype == dtype


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("shape", [(10,), (7, 3), (2, 3, 4, 5)])
def test_sparsity_zeroes_exactly_floor_fraction_size(fraction, shape):
  rng = np.random.default_rng(4)
  w = rng.normal(size=shape).astype(np.float32)
  out = _apply(on.constrain_sparsity(fraction), w)
  k = int(np.floor(fraction * w.size))
  assert int(np.sum(out == 0)) == k
  if 0 < k < w.size:
    assert np.abs(w[out == 0]).max() <= np.abs(w[out != 0]).min()


@pytest.mark.slow
def test_sparsity_ties_keep_the_lower_index():
  w = np.array([3.0, 1.0, -1.0, 1.0, 0.5, 1.0], np.float32)  # Prune 3 of 6.
  out = _apply(on.constrain_sparsity(0.5), w)
  assert out.tolist() == [3.0, 1.0, -1.0, 0.0, 0.0, 0.0]
  out = _apply(on.constrain_sparsity(0.5), np.ones(6, np.float32))
  assert out.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(13,), (6, 5), (2, 3, 4)])
def test_sparsity_many_ties_match_a_stable_sort(fraction, shape):
  # Few distinct magnitudes: the threshold is shared by many entries, and the ties kept are
  # the lowest row-major indices (a stable sort of the magnitudes, pruning the first k).
  rng = np.random.default_rng(7)
  for _ in range(5):
    w = rng.integers(-3, 4, size=shape).astype(np.float32)
    out = _apply(on.constrain_sparsity(fraction), w)
    k = int(np.floor(fraction * w.size))
    order = np.argsort(-np.abs(w).reshape(-1), kind="stable")  # Largest first, lower index first.
    want = np.zeros(w.size, np.float32)
    want[order[: w.size - k]] = w.reshape(-1)[order[: w.size - k]]
    np.testing.assert_array_equal(out.reshape(-1), want)


@pytest.mark.slow
def test_sparsity_nan_is_kept():
  w = np.array([0.1, np.nan, 2.0, 0.3], np.float32)
  out = _apply(on.constrain_sparsity(0.75), w)
  assert np.isnan(out[1]) and int(np.sum(out == 0)) == 3  # NaN ranks as the largest.


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_sparsity_gradual_pruning_schedule_counts():
  w = np.random.default_rng(5).normal(size=(20, 10)).astype(np.float32)
  ramp = optax.polynomial_schedule(0.0, 0.8, power=3, transition_steps=4)  # Zhu & Gupta.
  tx = on.constrain_sparsity(ramp)
  params = {"k": jnp.asarray(w)}
  state = tx.init(params)
  zeros = []
  for step in range(6):
    updates, state = jax.jit(tx.update)({"k": jnp.zeros((20, 10))}, state, params)
    zeros.append(int(np.sum(np.asarray(optax.apply_updates(params, updates)["k"]) == 0)))
    assert zeros[-1] == int(np.floor(np.float32(ramp(step)) * np.float32(200)))
  assert zeros[0] == 0 and zeros[-1] == 160


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_sparsity_fraction_out_of_range_raises(bad):
  with pytest.raises(ValueError, match="`fraction`"):
    on.constrain_sparsity(bad)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_n_of_m_scheduled_state_round_trips_through_orbax_and_resumes(tmp_path):
  # The shared checkpoint test's trees have axis lengths 5 and 6 (not multiples of 4).
  pytest.importorskip("orbax.checkpoint")
  from test_checkpoint import _assert_trees_identical, _save_restore

  make = lambda: on.constrain_n_of_m(optax.linear_schedule(4.0, 2.0, 4), 4, mask="**/kernel")
  rng = np.random.default_rng(3)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}}
  params["dense"]["bias"] = jnp.ones((3,), jnp.float32)
  tx = make()
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(params, state, params)
  target = jax.eval_shape(make().init, params)
  restored = _save_restore(tmp_path, {"state": state}, {"state": target})["state"]
  _assert_trees_identical(restored, state)
  assert isinstance(restored, on.ScheduleState) and int(restored.count) == 3
  # Resumed at step 3 (n = 2.5, rounded up: 3 of 4 kept), then step 4 (n = 2).
  zero = jax.tree.map(jnp.zeros_like, params)
  for n_kept in (3, 2):
    updates, restored = tx.update(zero, restored, params)
    kernel = np.asarray(optax.apply_updates(params, updates)["dense"]["kernel"])
    assert np.all(np.count_nonzero(kernel.reshape(2, 4, 3), axis=1) == n_kept)
