"""constrain_spectral_norm and spectral_norm_report against numpy's SVD (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on
from optax_norms._transform import LeafwiseState


def _sigma(w, rows=None):
  """Exact σ_max in float64: rows are `rows` (default all but the last), columns the rest."""
  w = np.asarray(w, np.float64)
  rows = tuple(range(w.ndim - 1)) if rows is None else rows
  cols = [a for a in range(w.ndim) if a not in rows]
  m = np.transpose(w, list(rows) + cols).reshape(int(np.prod([w.shape[a] for a in rows])), -1)
  return float(np.linalg.svd(m, compute_uv=False)[0])


def _matrix(w, rows):
  rows = tuple(range(w.ndim - 1)) if rows is None else rows
  cols = [a for a in range(w.ndim) if a not in rows]
  m = np.transpose(w, list(rows) + cols).reshape(int(np.prod([w.shape[a] for a in rows])), -1)
  return m, list(rows) + cols


def _project(v, c, rows=None):
  """One step of the default mode="clip" with a converged estimate, in float64: the largest
  singular value clipped to `c` (the others kept)."""
  v = np.asarray(v, np.float64)
  m, order = _matrix(v, rows)
  left, s, right = np.linalg.svd(m, full_matrices=False)
  if s[0] <= c:
    return v
  s[0] = c
  clipped = ((left * s) @ right).reshape([v.shape[a] for a in order])
  return np.transpose(clipped, np.argsort(order))


# --- Training: 50+ steps of adam on a 3-layer MLP -------------------------------------

SIZES = (16, 32, 32, 4)
C = 1.0


def _mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    f"layer{i}": {
      "kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
      "bias": jnp.zeros(b, jnp.float32),
    }
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))
  }


def _mlp(params, x):
  for i in range(len(SIZES) - 1):
    x = x @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
    if i < len(SIZES) - 2:
      x = jnp.tanh(x)
  return x


def train_mlp(constrained, steps=60, lr=0.03, n_iter=1):
  """Fits a random teacher with large weights (so σ grows); returns σ_max per layer."""
  teacher = jax.tree.map(lambda w: 4 * w, _mlp_params(seed=1))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(256, SIZES[0])), jnp.float32)
  y = _mlp(teacher, x)
  params = _mlp_params()
  parts = [optax.adam(lr)]
  if constrained:
    # mode="scale": one rank-1 clip per step (mode="clip") lets Adam push the other
    # singular values past C on this MLP (σ_max ≈ 1.5–2.5·C, see test_spectral_clip.py).
    parts.append(on.constrain_spectral_norm(C, mode="scale", n_iter=n_iter, mask="**/kernel"))
  tx = optax.chain(*parts)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.mean((_mlp(p, x) - y) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return [_sigma(params[f"layer{i}"]["kernel"]) for i in range(len(SIZES) - 1)]


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_after_60_adam_steps_sigma_max_is_within_1_percent_of_the_bound():
  free = train_mlp(constrained=False)
  bound = train_mlp(constrained=True)
  assert max(free) > 1.5 * C, free  # Without the constraint the weights do grow past C.
  for s in bound:
    assert s <= 1.01 * C, bound
  assert min(bound) > 0.9 * C, bound  # The training pushes against the bound.


# --- One step with many iterations = the exact SVD projection -------------------------


def _one_step(tx, params, updates):
  state = tx.init(params)
  return jax.jit(tx.update)(updates, state, params)


def _with_singular_values(rng, shape, values):
  """A float32 leaf whose matrix (rows: all but the last axis) has singular `values`."""
  rows, cols = int(np.prod(shape[:-1])), shape[-1]
  left, _ = np.linalg.qr(rng.normal(size=(rows, cols)))
  right, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
  return jnp.asarray((left * np.asarray(values)) @ right.T, jnp.float32).reshape(shape)


@pytest.mark.slow
def test_one_step_with_50_iterations_is_the_exact_svd_projection():
  # The estimate converges like (σ₂/σ₁)^(2k): with σ₂/σ₁ = 2/3, 50 rounds reach float32
  # precision from any start (a random matrix with σ₂/σ₁ = 0.95 would need ~200).
  rng = np.random.default_rng(0)
  params = {
    "dense": _with_singular_values(rng, (8, 5), [4.5, 3.0, 2.0, 1.0, 0.5]),
    "conv": _with_singular_values(rng, (3, 3, 4, 6), [6.0, 4.0, 3.0, 2.0, 1.0, 0.0]),
    "small": jnp.asarray(0.01 * rng.normal(size=(4, 3)), jnp.float32),
  }
  updates = {name: jnp.zeros_like(p) for name, p in params.items()}
  updates["small"] = jnp.asarray(0.1 * rng.normal(size=(4, 3)), jnp.float32)
  out, _ = _one_step(on.constrain_spectral_norm(2.0, n_iter=50), params, updates)
  for name in ("dense", "conv"):
    w, u = np.asarray(params[name], np.float64), np.asarray(updates[name], np.float64)
    assert _sigma(w + u) > 2.0
    want = _project(w + u, 2.0) - w
    np.testing.assert_allclose(np.asarray(out[name], np.float64), want, rtol=1e-5, atol=1e-6)
    new = np.asarray(optax.apply_updates(params, out)[name], np.float64)
    # mode="clip": σ₁ is clipped to 2, σ₂ (3 for "dense", 4 for "conv") is kept.
    want_sigmas = np.linalg.svd(_matrix(want + w, None)[0], compute_uv=False)
    got_sigmas = np.linalg.svd(_matrix(new, None)[0], compute_uv=False)
    np.testing.assert_allclose(got_sigmas, want_sigmas, rtol=1e-5, atol=1e-6)
  # Inside the ball: the update is returned as is (bit for bit).
  np.testing.assert_array_equal(np.asarray(out["small"]), np.asarray(updates["small"]))


@pytest.mark.slow
def test_explicit_axis_pytorch_layout():
  # PyTorch (out, in) weight: rows are `in` (axis=1); the same singular values either way.
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  out, _ = _one_step(
    on.constrain_spectral_norm(1.0, axis=1, n_iter=50), {"w": w}, {"w": jnp.zeros_like(w)}
  )
  want = _project(np.asarray(w, np.float64), 1.0, rows=(1,)) - np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(out["w"]), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_rank_one_leaf_is_an_n_by_1_matrix():
  b = jnp.asarray([3.0, 4.0], jnp.float32)  # σ of the 2×1 matrix = ‖b‖ = 5: exact at once.
  out, state = _one_step(on.constrain_spectral_norm(2.5), {"b": b}, {"b": jnp.zeros(2)})
  # rtol: the rounding margin (σ lands at 2.5 − δ·σ̂, δ ≈ 7.6e-7 for a 2 × 1 matrix).
  np.testing.assert_allclose(np.asarray(b + out["b"]), [1.5, 2.0], rtol=5e-6)
  assert state.leaves["b"].shape == ()


# --- Stacks: one matrix per layer ----------------------------------------------------------------


@pytest.mark.slow
def test_stacked_layers_are_constrained_per_layer():
  rng = np.random.default_rng(1)
  scales = np.asarray([3.0, 0.05, 1.0])[:, None, None]  # Layer 1 lies inside the ball.
  w = jnp.asarray(scales * rng.normal(size=(3, 6, 5)), jnp.float32)
  u = jnp.asarray(0.01 * rng.normal(size=(3, 6, 5)), jnp.float32)
  tx = on.constrain_spectral_norm(1.0, axis=on.unit_axes(stacked="stack"), n_iter=50)
  out, state = _one_step(tx, {"stack": w}, {"stack": u})
  assert state.leaves["stack"].shape == (3, 5)  # One vector per layer, over the kept axis.
  w64, u64, got = (np.asarray(a, np.float64) for a in (w, u, out["stack"]))
  for layer in range(3):
    want = _project(w64[layer] + u64[layer], 1.0) - w64[layer]
    np.testing.assert_allclose(got[layer], want, rtol=1e-5, atol=1e-6, err_msg=str(layer))
  # Inside the ball the stored layer is exactly w + u: the update is (w + u) − w in float32,
  # which round-to-nearest adds back to w + u (tests/test_recovered_sum.py).
  np.testing.assert_array_equal(np.asarray(w[1] + out["stack"][1]), np.asarray(w[1] + u[1]))
  np.testing.assert_array_equal(got[1], np.asarray((w[1] + u[1]) - w[1]))
  # Versus the same leaf as one big matrix: a different answer.
  joint, _ = _one_step(
    on.constrain_spectral_norm(1.0, axis=(0, 1), n_iter=50), {"stack": w}, {"stack": u}
  )
  assert not np.allclose(np.asarray(joint["stack"]), got)


@pytest.mark.slow
def test_spectral_norm_report_matches_numpy_svd():
  rng = np.random.default_rng(4)
  params = {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(10, 6)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(6,)), jnp.float32),
    },
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
    "stack": {"kernel": jnp.asarray(rng.normal(size=(3, 7, 5)), jnp.float32)},
  }
  report = jax.jit(
    lambda p: on.spectral_norm_report(p, n_iter=100, mask=["dense/kernel", "conv/kernel"])
  )(params)
  assert set(report) == {"dense/kernel", "conv/kernel"}
  for path, leaf in [
    ("dense/kernel", params["dense"]["kernel"]),
    ("conv/kernel", params["conv"]["kernel"]),
  ]:
    assert report[path].dtype == jnp.float32 and report[path].shape == ()
    assert float(report[path]) == pytest.approx(_sigma(leaf), rel=1e-5)
  stacked = on.spectral_norm_report(
    params["stack"], axis=on.unit_axes(stacked="kernel"), n_iter=100
  )["kernel"]
  assert stacked.shape == (3,)
  np.testing.assert_allclose(
    np.asarray(stacked),
    [_sigma(layer) for layer in np.asarray(params["stack"]["kernel"])],
    rtol=1e-5,
  )
  bias = on.spectral_norm_report(params["dense"], mask="**/bias")["bias"]
  assert float(bias) == pytest.approx(float(np.linalg.norm(params["dense"]["bias"])), rel=1e-6)


# --- State: init, structure, masks, checkpoints -----------------------------------------


def _params():
  rng = np.random.default_rng(5)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    },
    "head": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
  }


@pytest.mark.slow
def test_state_holds_one_unit_vector_per_matrix_and_masked_nodes():
  params = _params()
  tx = on.constrain_spectral_norm(1.0, mask="**/kernel")
  state = tx.init(params)
  assert isinstance(state, LeafwiseState) and state.count.dtype == jnp.int32
  assert isinstance(state.leaves["dense"]["bias"], optax.MaskedNode)
  assert state.leaves["dense"]["kernel"].shape == (4,)
  assert state.leaves["head"]["kernel"].shape == (2,)
  for v in (state.leaves["dense"]["kernel"], state.leaves["head"]["kernel"]):
    assert float(jnp.linalg.norm(v)) == pytest.approx(1.0, rel=1e-6)
  update = jax.jit(tx.update)
  for _ in range(3):
    new_updates, new_state = update(params, state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(
      lambda x: (x.shape, x.dtype), state
    )
    state = jax.lax.cond(True, lambda a, b: a, lambda a, b: b, new_state, state)
  assert int(state.count) == 3
  np.testing.assert_array_equal(
    np.asarray(new_updates["dense"]["bias"]), np.asarray(params["dense"]["bias"])
  )


@pytest.mark.slow
def test_initial_vectors_are_deterministic_from_seed_and_path():
  params = _params()
  a = on.constrain_spectral_norm(1.0, seed=0).init(params)
  b = jax.jit(on.constrain_spectral_norm(1.0, seed=0).init)(params)
  c = on.constrain_spectral_norm(1.0, seed=1).init(params)
  again = on.constrain_spectral_norm(1.0, seed=0).init(params)
  for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(again), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Under jit XLA may fuse the normalization differently: equal up to one rounding.
    np.testing.assert_allclose(np.asarray(x), np.asarray(z), rtol=2e-7, atol=0)
  assert not np.array_equal(
    np.asarray(a.leaves["dense"]["kernel"]), np.asarray(c.leaves["dense"]["kernel"])
  )
  # Two leaves of the same shape get different vectors (the path enters the key).
  same = on.constrain_spectral_norm(1.0).init({"x": jnp.ones((3, 4)), "y": jnp.ones((3, 4))})
  assert not np.array_equal(np.asarray(same.leaves["x"]), np.asarray(same.leaves["y"]))


@pytest.mark.slow
def test_zero_matrices_give_no_nan_and_keep_their_vector():
  zeros = {"k": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
  tx = on.constrain_spectral_norm(1.0, n_iter=3)
  state = tx.init(zeros)
  out, new_state = jax.jit(tx.update)(zeros, state, zeros)
  for leaf in jax.tree.leaves((out, new_state)):
    assert np.isfinite(np.asarray(leaf)).all()
  np.testing.assert_array_equal(np.asarray(out["k"]), 0.0)
  np.testing.assert_array_equal(np.asarray(new_state.leaves["k"]), np.asarray(state.leaves["k"]))
  # A NaN in one matrix: that matrix is left as w + u, the vector stays finite.
  bad = {"k": zeros["k"].at[0, 0].set(jnp.nan), "b": zeros["b"]}
  out, new_state = jax.jit(tx.update)(bad, state, zeros)
  assert np.isfinite(np.asarray(new_state.leaves["k"])).all()
  assert np.isnan(np.asarray(out["k"])[0, 0])

  # Gradients through the transform at a zero matrix are finite.
  def loss(w):
    new, _ = tx.update(
      {"k": jnp.ones((4, 3)) - w, "b": zeros["b"]}, state, {"k": w, "b": zeros["b"]}
    )
    return jnp.sum(new["k"] ** 2)

  grad = jax.grad(loss)(jnp.zeros((4, 3)))
  assert np.isfinite(np.asarray(grad)).all()


ocp = pytest.importorskip("orbax.checkpoint")


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_state_survives_an_orbax_round_trip_and_the_resumed_run_is_identical(tmp_path):
  params = _params()

  def make():
    return optax.chain(optax.adam(0.05), on.constrain_spectral_norm(1.0, mask="**/kernel"))

  def run(tx, params, state, steps):
    @jax.jit
    def step(params, state):
      updates, state = tx.update(jax.tree.map(lambda p: -p, params), state, params)
      return optax.apply_updates(params, updates), state

    for _ in range(steps):
      params, state = step(params, state)
    return params, state

  tx = make()
  full_params, full_state = run(tx, params, tx.init(params), 10)
  half_params, half_state = run(tx, params, tx.init(params), 5)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": half_params, "opt_state": half_state})
  checkpointer.wait_until_finished()
  fresh = make()
  target = jax.eval_shape(lambda p: {"params": p, "opt_state": fresh.init(p)}, params)
  restored = ocp.StandardCheckpointer().restore(tmp_path / "ckpt", target)
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(half_state)
  assert isinstance(restored["opt_state"][1].leaves["dense"]["bias"], optax.MaskedNode)
  for x, y in zip(jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(half_state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  resumed_params, resumed_state = run(fresh, restored["params"], restored["opt_state"], 5)
  for x, y in zip(
    jax.tree.leaves((resumed_params, resumed_state)), jax.tree.leaves((full_params, full_state))
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- Bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"n_iter": 0}, "`n_iter`"),
    ({"n_iter": 1.5}, "`n_iter`"),
    ({"seed": 0.5}, "`seed`"),
    ({"axis": "x"}, "`axis`"),
  ],
)
def test_bad_arguments_raise_naming_them(kwargs, match):
  with pytest.raises(ValueError, match=match):
    on.constrain_spectral_norm(1.0, **kwargs)


def test_bad_axes_raise_at_init_naming_the_path():
  params = {"stack": {"kernel": jnp.ones((2, 3, 4))}}
  with pytest.raises(ValueError, match="'stack/kernel'.*reduces a stack axis"):
    on.constrain_spectral_norm(1.0, axis=lambda p, w: on.Layout((0,), (0, 1))).init(params)
  with pytest.raises(ValueError, match="`axis` 3 is out of range.*'stack/kernel'"):
    on.constrain_spectral_norm(1.0, axis=3).init(params)
  with pytest.raises(ValueError, match="'stack/kernel'.*ambiguous"):
    on.constrain_spectral_norm(1.0).init(params)
