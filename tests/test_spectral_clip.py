"""constrain_spectral_norm's modes ("clip", "scale") and its rounding margin, against numpy's
SVD in float64. Unstacked leaves only: 2-D matrices and a Conv kernel (h, w, in, out)."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on
from optax_norms import _spectral

C = 1.0


def _matrix(w):
  """The float64 matrix of a leaf with the default axis: rows are all axes but the last."""
  w = np.asarray(w, np.float64)
  return w.reshape(-1, w.shape[-1])


def _sigmas(w):
  return np.linalg.svd(_matrix(w), compute_uv=False)


def _svd_clip(w, c):
  """The Euclidean projection onto {σ_max ≤ c} in float64: U·min(S, c)·Vᵀ."""
  left, s, right = np.linalg.svd(_matrix(w), full_matrices=False)
  return ((left * np.minimum(s, c)) @ right).reshape(np.shape(w))


def _with_singular_values(rng, shape, top, dtype=jnp.float32):
  """A leaf whose matrix has the singular values `top`, the others uniform in [0, 0.9·C)."""
  rows, cols = int(np.prod(shape[:-1])), shape[-1]
  k = min(rows, cols)
  left, _ = np.linalg.qr(rng.normal(size=(rows, k)))
  right, _ = np.linalg.qr(rng.normal(size=(cols, k)))
  s = np.sort(rng.uniform(0, 0.9 * C, size=k))[::-1]
  s[: len(top)] = top
  return jnp.asarray(((left * s) @ right.T).reshape(shape), dtype)


def _stepper(tx, grad=None):
  """A jitted `params -> params` step of `tx` (zero updates unless `grad` is given)."""

  @jax.jit
  def step(params, state):
    g = jax.tree.map(jnp.zeros_like, params) if grad is None else grad
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _delta(shape):
  rows, cols = int(np.prod(shape[:-1])), shape[-1]
  return _spectral._margin(rows, cols, jnp.float32)


# --- (a) eye(2) pushed along σ₁: clip keeps σ₂, scale lets it decay ---------------------


@pytest.mark.slow
@pytest.mark.parametrize("n_iter, sigma2_min", [(1, 0.9), (10, 0.98)])
def test_eye_pushed_along_sigma1_for_500_steps_clip_keeps_sigma2_scale_decays(n_iter, sigma2_min):
  # u = 0.01·e1e1ᵀ each step (sgd(1) on a constant gradient): V = diag(1.01, 1). The
  # projection onto {σ_max ≤ 1} keeps (1, 1). The early steps clip along a vector not yet
  # converged (σ₂/σ₁ = 1/1.01: slow), which costs σ₂ a little: measured 0.944–0.958 with
  # n_iter=1 and 0.989–0.992 with n_iter=10 over seeds 0–2.
  w = {"k": jnp.eye(2, dtype=jnp.float32)}
  grad = {"k": jnp.asarray([[-0.01, 0.0], [0.0, 0.0]], jnp.float32)}
  out = {}
  for mode in ("clip", "scale"):
    tx = optax.chain(optax.sgd(1.0), on.constrain_spectral_norm(C, mode=mode, n_iter=n_iter))
    params, state, step = w, tx.init(w), _stepper(tx, grad)
    for _ in range(500):
      params, state = step(params, state)
    out[mode] = _sigmas(params["k"])
  clip, scale = out["clip"], out["scale"]
  assert C * (1 - 1e-5) <= clip[0] <= C, clip
  assert clip[1] >= sigma2_min, clip
  # scale: σ₂ is multiplied by ≈ 1/1.01 at every step: 1.01⁻⁵⁰⁰ ≈ 0.0069.
  assert C * (1 - 1e-5) <= scale[0] <= C, scale
  assert scale[1] == pytest.approx(1.01**-500, rel=0.05), scale


# --- (b) After enough steps: the float64 SVD clip --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
  "shape, top, n_iter",
  [
    # One singular value above C: n_iter=10 converges the vector before the first clip
    # (σ₂/σ₁ ≤ 0.3: 0.09¹⁰ ≈ 3e-11).
    ((16, 8), [3.0], 10),
    ((32, 32), [3.0], 10),
    ((3, 3, 4, 8), [3.0], 10),
    # Three: after a clip the iteration starts on the clipped vector and must turn to the
    # next (2/1)² per round from rounding noise ~1e-7, then separate it from 1.5 (0.56 per
    # round): 50 rounds do both within one step; 5–20 rounds clip along mixed vectors and
    # end 1e-4 to 1e-1 away from the SVD clip (measured).
    ((16, 8), [3.0, 2.0, 1.5], 50),
    ((32, 32), [3.0, 2.0, 1.5], 50),
  ],
)
def test_after_50_steps_the_stored_matrix_is_the_float64_svd_clip(shape, top, n_iter):
  rng = np.random.default_rng(len(top) * 100 + len(shape))
  w = _with_singular_values(rng, shape, top)
  want = _svd_clip(w, C)
  params = {"k": w}
  tx = on.constrain_spectral_norm(C, n_iter=n_iter)
  state, step = tx.init(params), _stepper(tx)
  for _ in range(50):
    params, state = step(params, state)
  got = np.asarray(params["k"], np.float64)
  # Tolerance: the margin puts each clipped singular value at C − δ·σ̂ (a change of at most
  # δ·max(top) in spectral norm, so in any entry), plus 1e-6 (≈ 17·2⁻²⁴) for the float32
  # vectors and entries (measured: 1.4e-6 in all).
  np.testing.assert_allclose(got, want, rtol=0, atol=_delta(shape) * max(top) + 1e-6)
  sigmas = _sigmas(got)
  assert sigmas[0] <= C
  np.testing.assert_allclose(sigmas[: len(top)], C, rtol=_delta(shape) * max(top) + 1e-6)
  # The singular values below C are kept.
  np.testing.assert_allclose(sigmas[len(top) :], _sigmas(w)[len(top) :], rtol=0, atol=2e-6)


@pytest.mark.slow
def test_one_step_scale_is_the_float64_rescale():
  rng = np.random.default_rng(7)
  w = _with_singular_values(rng, (16, 8), [3.0, 2.0])
  out, _ = jax.jit(on.constrain_spectral_norm(C, mode="scale", n_iter=50).update)(
    {"k": jnp.zeros_like(w)}, on.constrain_spectral_norm(C, mode="scale").init({"k": w}), {"k": w}
  )
  w64 = np.asarray(w, np.float64)
  want = w64 * C / np.linalg.norm(w64, 2)
  got = w64 + np.asarray(out["k"], np.float64)
  np.testing.assert_allclose(got, want, rtol=3 * _delta((16, 8)), atol=1e-7)
  # Every singular value shrinks by 3: the second is 2/3, not kept at 1 as "clip" would.
  np.testing.assert_allclose(_sigmas(got)[:2], [C, 2 / 3], rtol=1e-5)


# --- (c) Zero matrices, matrices inside the ball -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["clip", "scale"])
def test_zero_matrix_stays_zero_and_inside_is_untouched(mode):
  rng = np.random.default_rng(3)
  params = {
    "zero": jnp.zeros((6, 4), jnp.float32),
    "inside": jnp.asarray(0.05 * rng.normal(size=(6, 4)), jnp.float32),
  }
  updates = {"zero": jnp.zeros((6, 4), jnp.float32), "inside": 0.01 * params["inside"]}
  tx = on.constrain_spectral_norm(C, mode=mode, n_iter=3)
  state = tx.init(params)
  out, new_state = jax.jit(tx.update)(updates, state, params)
  for leaf in jax.tree.leaves((out, new_state)):
    assert np.isfinite(np.asarray(leaf)).all()
  np.testing.assert_array_equal(np.asarray(out["zero"]), 0.0)
  # Inside the ball the stored values are exactly w + u (the update is (w + u) − w in float32).
  stored, plain = optax.apply_updates(params, out), optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(stored["inside"]), np.asarray(plain["inside"]))
  np.testing.assert_array_equal(np.asarray(stored["zero"]), 0.0)

  # Gradients through the transform at a zero matrix are finite.
  def loss(w):
    new, _ = tx.update({"zero": jnp.ones((6, 4)) - w, "inside": updates["inside"]}, state, params)
    return jnp.sum(new["zero"] ** 2)

  assert np.isfinite(np.asarray(jax.grad(loss)(jnp.zeros((6, 4))))).all()


# --- Rounding margin (DEFECT 7) ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["clip", "scale"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_converged_estimate_puts_sigma_max_at_most_c_on_the_stored_values(mode, dtype):
  # 20 matrices, σ₁ in [2, 4]·C and the rest < 0.9·C (one singular value above C, so one
  # "clip" step is the projection); 50 rounds converge the estimate ((0.45)¹⁰⁰).
  rng = np.random.default_rng(11)
  shapes = [(16, 8), (32, 32), (64, 16), (8, 24), (3, 3, 4, 8)] * 4
  params = {
    f"w{i}": _with_singular_values(rng, s, [rng.uniform(2, 4)], dtype) for i, s in enumerate(shapes)
  }
  tx = on.constrain_spectral_norm(C, mode=mode, n_iter=50)
  out, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, out)
  assert all(new[k].dtype == dtype for k in new)
  sigma = np.asarray([_sigmas(new[f"w{i}"])[0] for i in range(len(shapes))])
  assert (sigma <= C).all(), sigma / C - 1
  if dtype == jnp.float32:
    # The margin is not absurdly large: "clip" lands at C − δ·σ̂ ≥ C·(1 − 4δ), "scale"
    # at C·(1 − δ).
    floor = np.asarray([C * (1 - 10 * _delta(s)) for s in shapes])
  else:
    # bf16: the new entries are rounded towards zero to 8 bits, and u' = q − w to bf16:
    # measured 2e-3 to 8e-3 below C for σ₁ ≤ 3·C.
    floor = np.full(len(shapes), C * (1 - 2.0**-5))
  assert (sigma >= floor).all(), sigma / C - 1


def test_margin_formula():
  # δ = (2·(√m + √n) + 8)·2⁻²⁴, computed independently.
  assert _spectral._margin(32, 32, jnp.float32) == pytest.approx(
    (2 * (2 * 32**0.5) + 8) / 2**24, rel=1e-12
  )
  assert _spectral._margin(1024, 1024, jnp.float32) == pytest.approx(136 / 2**24, rel=1e-12)


# --- mode: validation, static under inject_hyperparams, docstring -----------------------


@pytest.mark.parametrize("mode", ["Clip", "project", "", None, 1, ("clip",)])
def test_bad_mode_raises_naming_it_and_the_valid_values(mode):
  with pytest.raises(ValueError, match=r"`mode` must be one of \('clip', 'scale'\)"):
    on.constrain_spectral_norm(C, mode=mode)


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize("mode", ["clip", "scale"])
def test_mode_is_static_under_inject_hyperparams(mode):
  rng = np.random.default_rng(5)
  params = {"k": _with_singular_values(rng, (16, 8), [3.0, 2.0])}
  zeros = jax.tree.map(jnp.zeros_like, params)
  injected = optax.inject_hyperparams(on.constrain_spectral_norm)(C, mode=mode, n_iter=50)
  state = injected.init(params)
  assert set(state.hyperparams) == {"max_norm", "n_iter", "seed"}  # Not `mode`.
  got, _ = jax.jit(injected.update)(zeros, state, params)
  direct = on.constrain_spectral_norm(C, mode=mode, n_iter=50)
  want, _ = jax.jit(direct.update)(zeros, direct.init(params), params)
  np.testing.assert_array_equal(np.asarray(got["k"]), np.asarray(want["k"]))
  with pytest.raises(ValueError, match="`mode`"):
    optax.inject_hyperparams(on.constrain_spectral_norm)(C, mode="bogus").init(params)


def test_docstring_example():
  finder = doctest.DocTestFinder()
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  (test,) = finder.find(on.constrain_spectral_norm, "constrain_spectral_norm", globs={})
  assert "mode=" in test.docstring and len(test.examples) >= 6
  result = runner.run(test)
  assert result.failed == 0 and result.attempted == len(test.examples)
