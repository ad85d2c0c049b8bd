"""One battery run over every transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import CASE_IDS, CASES, default_axes

import optax_norms as on


def _params(dtype=jnp.float32, seed=0):
  # Axis lengths along axis -2 (and of the bias) are multiples of 4, for constrain_n_of_m.
  rng = np.random.default_rng(seed)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(4, 3)), dtype),
      "bias": jnp.asarray(rng.normal(size=(4,)), dtype),
    },
    "conv": {"kernel": jnp.asarray(rng.normal(size=(2, 2, 4, 5)), dtype)},
    "step": jnp.asarray(7, jnp.int32),
    "frozen": None,
  }


def _grads(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: (
      jnp.asarray(rng.normal(size=p.shape), p.dtype)
      if jnp.issubdtype(p.dtype, jnp.floating)
      else jnp.zeros_like(p)
    ),
    params,
  )


def _oracle_tree(case, grads, params, hp):
  def leaf(u, w):
    if not jnp.issubdtype(u.dtype, jnp.floating):
      return np.asarray(u)
    u64, w64 = np.asarray(u, np.float64), np.asarray(w, np.float64)
    return case.oracle(u64, w64, hp, default_axes(u64.ndim))

  return jax.tree.map(leaf, grads, params)


def _assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
  e_leaves = jax.tree.leaves(expected)
  assert len(a_leaves) == len(e_leaves)
  for (path, a), e in zip(a_leaves, e_leaves):
    np.testing.assert_allclose(
      np.asarray(a, np.float64),
      np.asarray(e, np.float64),
      rtol=rtol,
      atol=atol,
      err_msg=f"at {jax.tree_util.keystr(path)}",
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_float64_oracle_jit_and_nojit(case):
  params, tx = _params(), case.make()
  grads = _grads(params)
  expected = _oracle_tree(case, grads, params, case.hyperparams)
  state = tx.init(params)
  eager, _ = tx.update(grads, state, params)
  jitted, _ = jax.jit(tx.update)(grads, state, params)
  _assert_close(eager, expected)
  # optax.adam itself differs between eager and jit by an ulp (under jit XLA divides by the
  # bias correction as a multiplication by its reciprocal): an optimizer gets the oracle's
  # tolerance here.
  # Update-form constraints (u' = q − w) may differ by one ulp of |w| between the two.
  close = (1e-6, 4e-7) if case.placement != "optimizer" else (1e-5, 1e-6)
  _assert_close(jitted, eager, rtol=close[0], atol=close[1])
  assert eager["frozen"] is None
  assert int(eager["step"]) == int(grads["step"])  # integer leaves untouched


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("optimizer", [optax.sgd(0.1), optax.adam(0.01)], ids=["sgd", "adam"])
def test_chains_with_optimizer(case, optimizer):
  params = _params()
  mine = optax.chain(case.make(), optimizer)
  state = mine.init(params)
  grads = _grads(params)

  @jax.jit
  def step(params, state):
    updates, state = mine.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  # Reference: apply the oracle by hand, then the optimizer.
  ref_params, ref_opt = params, optimizer.init(params)
  for _ in range(1 if "multistep" in case.skip else 3):
    params, state = step(params, state)
    pre = jax.tree.map(
      lambda x: None if x is None else jnp.asarray(x, jnp.float32),
      _oracle_tree(case, grads, ref_params, case.hyperparams),
    )
    pre["step"] = grads["step"]
    updates, ref_opt = optimizer.update(pre, ref_opt, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  # constrain/prox go last in real chains; here the point is only that the chain composes.
  _assert_close(params, ref_params, rtol=2e-5, atol=2e-5)


@pytest.mark.standard_promotion
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_inject_hyperparams(case):
  params, grads = _params(), _grads(_params())
  injected = optax.inject_hyperparams(case.factory)(**case.hyperparams)
  state = injected.init(params)
  updates, state = jax.jit(injected.update)(grads, state, params)
  expected = _oracle_tree(case, grads, params, case.hyperparams)
  _assert_close(updates, expected)
  if not case.hyperparams:  # Nothing to inject (e.g. constrain_unit_norm).
    return
  # Changing a hyperparameter in the injected state changes the update accordingly.
  name = next(iter(case.hyperparams))
  doubled = {**case.hyperparams, name: 2 * case.hyperparams[name]}
  state = injected.init(params)  # The oracle is an update from a fresh state.
  state.hyperparams[name] = jnp.asarray(doubled[name], jnp.float32)
  updates, _ = jax.jit(injected.update)(grads, state, params)
  _assert_close(updates, _oracle_tree(case, grads, params, doubled))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=str)
def test_dtypes_kept_and_no_promotion_from_float64_hyperparameters(case, dtype):
  params = _params(dtype)
  grads = _grads(params)
  hp = {k: np.float64(v) for k, v in case.hyperparams.items()}
  tx = case.make(**hp)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert u.dtype == g.dtype
  tol = {jnp.bfloat16: 3e-2, jnp.float16: 3e-3, jnp.float32: 1e-5}[dtype]
  _assert_close(updates, _oracle_tree(case, grads, params, case.hyperparams), rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_structure_stable_and_schedule_advances(case):
  if case.placement == "optimizer":
    pytest.skip("an optimizer holds moments: tests/test_prox_adam.py checks its state")
  params, grads = _params(), _grads(_params())
  if not case.hyperparams:  # No hyperparameter to schedule: no state at all.
    assert jax.tree.leaves(case.make().init(params)) == []
    return
  name = next(iter(case.hyperparams))
  base = case.hyperparams[name]
  schedule = optax.linear_schedule(base, 3 * base, transition_steps=4)
  tx = case.make(**{name: schedule})
  state = tx.init(params)
  # Stateful transforms (per-leaf state) hold the count in a LeafwiseState.
  assert isinstance(state, on.ScheduleState) or case.stateful
  assert state.count.dtype == jnp.int32
  update = jax.jit(tx.update)
  for step in range(3):
    updates, new_state = update(grads, state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(
      lambda x: (x.shape, x.dtype), state
    )
    # optax's convention: the update at count k uses schedule(k).
    hp = {**case.hyperparams, name: float(schedule(step))}
    if step == 0 or "multistep" not in case.skip:
      _assert_close(updates, _oracle_tree(case, grads, params, hp), rtol=2e-5, atol=2e-6)
    # lax.cond between the old and the new state must type-check (optax's stability test).
    state = jax.lax.cond(True, lambda a, b: a, lambda a, b: b, new_state, state)
  assert int(state.count) == 3
  # Without a schedule: no state beyond EmptyState (stateful ones: a count and their state).
  if not case.stateful:
    assert jax.tree.leaves(case.make().init(params)) == []


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
  "mask",
  [
    "**/kernel",
    ["**", "!conv/**"],
    on.path_mask(regex=r"kernel$"),
    {"dense": {"kernel": True, "bias": False}, "conv": False, "step": False, "frozen": None},
    lambda p: jax.tree.map(lambda x: x.ndim == 2, p),
  ],
  ids=["glob", "glob-exclude", "regex", "bool-tree", "callable"],
)
def test_masks_select_by_path(case, mask):
  if case.placement == "optimizer":
    pytest.skip("an optimizer updates unselected leaves too: tests/test_prox_adam.py")
  params, grads = _params(), _grads(_params())
  selected = {
    "**/kernel": {"dense/kernel", "conv/kernel"},
    "glob-exclude": {"dense/kernel", "dense/bias"},
  }
  tx = case.make(mask=mask)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  full = _oracle_tree(case, grads, params, case.hyperparams)
  if isinstance(mask, str):
    chosen = selected[mask]
  elif isinstance(mask, list):
    chosen = selected["glob-exclude"]
  elif isinstance(mask, on.PathMask):
    chosen = {"dense/kernel", "conv/kernel"}
  else:
    chosen = {"dense/kernel"}
  for path, u, g, f in zip(
    on.tree_paths(params), jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(full)
  ):
    if path in chosen:
      np.testing.assert_allclose(np.asarray(u), f, rtol=1e-5, atol=1e-6, err_msg=path)
    else:
      np.testing.assert_array_equal(np.asarray(u), np.asarray(g), err_msg=path)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("zero_hp", [False, True], ids=["hp", "zero-hp"])
def test_no_nan_from_zeros(case, zero_hp):
  params = jax.tree.map(lambda x: None if x is None else jnp.zeros_like(x), _params())
  grads = jax.tree.map(lambda x: None if x is None else jnp.zeros_like(x), params)
  hp = {k: 0.0 for k in case.hyperparams} if zero_hp else case.hyperparams
  tx = case.make(**hp)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for leaf in jax.tree.leaves(updates):
    assert np.all(np.isfinite(np.asarray(leaf)))
    np.testing.assert_array_equal(np.asarray(leaf), 0)
  # Zero units next to non-zero ones: still finite.
  params = _params()
  params["dense"]["kernel"] = params["dense"]["kernel"].at[:, 0].set(0.0)
  grads = jax.tree.map(lambda x: None if x is None else jnp.zeros_like(x), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(updates))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
  "bad", [-1.0, float("nan"), float("inf"), np.ones(2)], ids=["negative", "nan", "inf", "array"]
)
def test_bad_hyperparameters_raise_naming_the_argument(case, bad):
  for name in case.hyperparams:
    with pytest.raises(ValueError, match=f"`{name}`"):
      case.make(**{name: bad})


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_missing_params(case):
  params, grads = _params(), _grads(_params())
  tx = case.make()
  state = tx.init(params)
  if case.needs_params:
    with pytest.raises(ValueError, match="`params` was not passed"):
      tx.update(grads, state)
  else:
    updates, _ = tx.update(grads, state)
    _assert_close(updates, _oracle_tree(case, grads, params, case.hyperparams))


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=str)
def test_inject_hyperparams_with_half_precision_params(case, dtype):
  """optax.inject_hyperparams casts injected values to the params' dtype (bf16 here)."""
  if case.placement == "optimizer":
    pytest.skip("b2=0.999 rounds to 1.0 in half precision: prox_adam rightly rejects it")
  params = jax.tree.map(
    lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, _params()
  )
  grads = _grads(params)
  injected = optax.inject_hyperparams(case.factory)(**case.hyperparams)
  state = injected.init(params)
  updates, _ = jax.jit(injected.update)(grads, state, params)
  for leaf in jax.tree.leaves(updates):
    assert leaf.dtype in (dtype, jnp.int32)
  # The hyperparameters themselves are rounded to the half dtype by optax.
  hp = {k: float(jnp.asarray(v, dtype)) for k, v in case.hyperparams.items()}
  _assert_close(updates, _oracle_tree(case, grads, params, hp), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_update_inside_lax_cond(case):
  """``lax.cond`` around ``update`` itself (optax's own tests do this): both branches must
  type-check, and the taken branch equals the plain update."""
  params, grads = _params(), _grads(_params())
  tx = case.make()
  state = tx.init(params)
  plain, _ = tx.update(grads, state, params)

  @jax.jit
  def step(flag, g, s, p):
    return jax.lax.cond(flag, lambda: tx.update(g, s, p), lambda: (g, s))

  taken, _ = step(True, grads, state, params)
  skipped, _ = step(False, grads, state, params)
  # Jitted inside a cond vs eager: XLA may fuse differently, one ulp of |w| (update = q − w).
  _assert_close(taken, plain, rtol=1e-6, atol=4e-7)
  _assert_close(skipped, grads, rtol=0, atol=0)
