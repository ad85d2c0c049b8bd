"""Periodic masks of constrain_sparsity and constrain_n_of_m (``update_every``,
``update_start``, ``update_end``) against float64 NumPy references.

The reference chooses the mask at steps ``start, start + k, …`` below ``end`` from that
step's ``v = w + u`` (the ``⌊fraction·size⌋`` smallest ``|v|`` pruned, or the ``n`` largest
of each block of ``m`` kept; equal magnitudes keep the lower index,
``np.argsort(kind="stable")``), keeps everything before ``start``, and applies the chosen
mask at every step: stored entries are ``v`` where kept and exactly ``0`` elsewhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on
from optax_norms._transform import LeafwiseState


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(8, 3)), dtype),
      "bias": jnp.asarray(rng.normal(size=(4,)), dtype),
    },
  }


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: (
      jnp.asarray(rng.normal(size=p.shape), p.dtype)
      if jnp.issubdtype(p.dtype, jnp.floating)
      else jnp.zeros_like(p)
    ),
    params,
  )


def _keep_largest(v, count):
  order = np.argsort(-np.abs(v), kind="stable")
  keep = np.zeros(v.shape, bool)
  keep[order[:count]] = True
  return keep


def _sparsity_keep(v, fraction):
  flat = v.ravel()
  return _keep_largest(flat, flat.size - math.floor(fraction * flat.size)).reshape(v.shape)


def _n_of_m_keep(v, n, m=4):
  ax = 0 if v.ndim == 1 else v.ndim - 2  # The input axis of a Dense kernel (in, out).
  moved = np.moveaxis(v, ax, -1)
  keep = np.stack([_keep_largest(b, n) for b in moved.reshape(-1, m)])
  return np.moveaxis(keep.reshape(moved.shape), -1, ax)


def _simulate(tx, keep_fn, chosen, steps, lr=0.1, dtype=jnp.float32):
  """Runs `tx` after sgd for `steps` steps, checking every stored leaf against the reference
  that re-chooses its mask (``keep_fn(v)``) at the steps in `chosen`."""
  params = _params(dtype)
  chain = optax.chain(optax.sgd(lr), tx)
  state = chain.init(params)
  step = jax.jit(chain.update)
  keep = {k: np.ones(v.shape, bool) for k, v in params["dense"].items()}
  for t in range(steps):
    grads = _grads(params, 10 + t)
    updates, state = step(grads, state, params)
    sgd = jax.tree.map(lambda g: -lr * g, grads)
    v_tree = {k: optax.apply_updates(params["dense"][k], sgd["dense"][k]) for k in keep}
    params = optax.apply_updates(params, updates)
    for name, v in v_tree.items():
      v64 = np.asarray(v, np.float64)
      if t in chosen:
        keep[name] = keep_fn(v64)
      stored = np.asarray(params["dense"][name], np.float64)
      assert params["dense"][name].dtype == dtype
      np.testing.assert_array_equal(stored, np.where(keep[name], v64, 0.0), err_msg=f"{name}@{t}")
  return state


@pytest.mark.slow
@pytest.mark.parametrize(
  "every, start, end, chosen",
  [(3, None, None, {0, 3, 6}), (2, None, 3, {0, 2}), (2, 3, None, {3, 5}), (1, 2, 4, {2, 3})],
  ids=["every-3", "end-3", "start-3", "window"],
)
def test_constrain_sparsity_periodic(every, start, end, chosen):
  tx = on.constrain_sparsity(0.4, update_every=every, update_start=start, update_end=end)
  state = _simulate(tx, lambda v: _sparsity_keep(v, 0.4), chosen, 7)
  masks = state[1].leaves["dense"]
  assert masks["kernel"].dtype == jnp.bool_ and masks["kernel"].shape == (8, 3)
  assert int(np.sum(~np.asarray(masks["kernel"]))) == math.floor(0.4 * 24)


@pytest.mark.parametrize(
  "every, start, end, chosen",
  [(3, None, None, {0, 3, 6}), (2, None, 3, {0, 2}), (2, 3, None, {3, 5})],
  ids=["every-3", "end-3", "start-3"],
)
def test_constrain_n_of_m_periodic(every, start, end, chosen):
  tx = on.constrain_n_of_m(2, 4, update_every=every, update_start=start, update_end=end)
  _simulate(tx, lambda v: _n_of_m_keep(v, 2), chosen, 7)


def test_block_axis_given_periodic():
  tx = on.constrain_n_of_m(1, 4, block_axis=0, update_every=2, mask="**/kernel")
  params = {"dense": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)))}}
  state = tx.init(params)
  grads = _grads(params, 3)
  updates, state = jax.jit(tx.update)(grads, state, params)
  v = np.asarray(optax.apply_updates(params, grads)["dense"]["kernel"], np.float64)
  stored = np.asarray(optax.apply_updates(params, updates)["dense"]["kernel"], np.float64)
  np.testing.assert_array_equal(stored, np.where(_n_of_m_keep(v, 1), v, 0.0))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=str)
def test_half_precision_periodic_keeps_dtype_and_exact_zeros(dtype):
  tx = on.constrain_sparsity(0.5, update_every=2)
  _simulate(tx, lambda v: _sparsity_keep(v, 0.5), {0, 2, 4}, 5, dtype=dtype)


@pytest.mark.slow
def test_schedule_budget_taken_at_the_choosing_step():
  schedule = on.polynomial_sparsity_schedule(0.75, begin_step=0, end_step=4)
  tx = on.constrain_sparsity(schedule, update_every=2, update_end=4)
  params = _params()
  chain = optax.chain(optax.sgd(0.1), tx)
  state = chain.init(params)
  step = jax.jit(chain.update)
  for t in range(7):
    updates, state = step(_grads(params, 10 + t), state, params)
    params = optax.apply_updates(params, updates)
    chosen_at = min(t - t % 2, 2)  # Frozen from step 4: the mask of step 2 holds.
    expected = math.floor(float(schedule(chosen_at)) * 24 + 1e-9)
    assert int(np.sum(np.asarray(params["dense"]["kernel"]) == 0)) == expected, t


def test_defaults_keep_the_stateless_transform():
  params = _params()
  for tx in (on.constrain_sparsity(0.5), on.constrain_n_of_m(2, 4)):
    assert isinstance(tx.init(params), optax.EmptyState)
  state = on.constrain_sparsity(optax.linear_schedule(0.1, 0.5, 4)).init(params)
  assert isinstance(state, on.ScheduleState)
  periodic = on.constrain_sparsity(0.5, update_every=2).init(params)
  assert isinstance(periodic, LeafwiseState)
  params["step"] = jnp.asarray(3, jnp.int32)  # Integer leaves hold no mask.
  periodic = on.constrain_sparsity(0.5, update_every=2).init(params)
  assert isinstance(periodic.leaves["step"], optax.MaskedNode)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_inject_hyperparams_with_static_period():
  params, grads = _params(), _grads(_params(), 1)
  injected = optax.inject_hyperparams(on.constrain_sparsity, static_args=("update_every",))(
    fraction=0.25, update_every=3
  )
  state = injected.init(params)
  state.hyperparams["fraction"] = jnp.asarray(0.5, jnp.float32)
  updates, state = jax.jit(injected.update)(grads, state, params)
  stored = optax.apply_updates(params, updates)["dense"]["kernel"]
  assert int(np.sum(np.asarray(stored) == 0)) == 12
  injected = optax.inject_hyperparams(on.constrain_sparsity)(fraction=0.25, update_every=3)
  state = injected.init(params)
  with pytest.raises(ValueError, match=r"static_args=\('update_every'"):
    jax.jit(injected.update)(grads, state, params)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"update_every": 0}, "`update_every`"),
    ({"update_every": 2.0}, "`update_every`"),
    ({"update_start": -1}, "`update_start`"),
    ({"update_end": 0}, "`update_end`"),
    ({"update_start": 5, "update_end": 3}, "`update_end`"),
  ],
)
def test_bad_period_arguments_name_them(kwargs, match):
  with pytest.raises(ValueError, match=match):
    on.constrain_sparsity(0.5, **kwargs)
  with pytest.raises(ValueError, match=match):
    on.constrain_n_of_m(2, 4, **kwargs)


@pytest.mark.slow
def test_ranking_skipped_off_update_steps_but_state_carried_under_vmap():
  """Under vmap over independent runs (unbatched step count) the mask state stays per run."""
  tx = on.constrain_sparsity(0.5, update_every=2)
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)), jnp.float32)}
  states = jax.vmap(tx.init)(params)
  grads = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 6)), jnp.float32)}
  updates, states = jax.vmap(tx.update)(grads, states, params)
  for i in range(3):
    v = np.asarray(params["w"][i] + grads["w"][i], np.float64)
    stored = np.asarray(params["w"][i] + updates["w"][i], np.float64)
    np.testing.assert_array_equal(stored, np.where(_sparsity_keep(v, 0.5), v, 0.0))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["sparsity", "n_of_m", "group"])
def test_mask_state_round_trips_through_orbax(tmp_path, which):
  ocp = pytest.importorskip("orbax.checkpoint")
  params = _params()
  make = {
    "sparsity": lambda: on.constrain_sparsity(0.5, update_every=4),
    "n_of_m": lambda: on.constrain_n_of_m(2, 4, update_every=4),
    "group": lambda: on.constrain_group_sparsity(
      0.5, groups=on.coupled_groups("dense", {"kernel": 0, "bias": 0}), update_every=4
    ),
  }[which]
  if which == "group":
    params["dense"]["bias"] = jnp.ones((8,), jnp.float32)  # 8 groups: kernel rows + bias
  tx = make()
  state = tx.init(params)
  for t in range(2):
    _, state = tx.update(_grads(params, t), state, params)
  path = tmp_path / "ckpt"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"state": state})
  checkpointer.wait_until_finished()
  target = jax.eval_shape(make().init, params)
  restored = ocp.StandardCheckpointer().restore(path, {"state": target})["state"]
  assert type(restored) is type(state) and int(restored.count) == 2
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  grads = _grads(params, 9)  # Step 2: no new mask, so the restored mask decides.
  a, _ = tx.update(grads, state, params)
  b, _ = make().update(grads, restored, params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_the_documented_freeze_of_a_polynomial_ramp_reaches_the_final_budget():
  """``update_end=end_step + 1`` (the docstring's recipe): the last mask is chosen at
  ``end_step`` with the budget ⌊final·G⌋; ``update_end=end_step`` stops one period short."""
  groups = on.coupled_groups("m", {"a": 0})
  params = {"m": {"a": jnp.arange(1.0, 5.0)[:, None] * jnp.ones((4, 3))}}
  ramp = on.polynomial_sparsity_schedule(0.5, begin_step=0, end_step=20)
  zero_groups = {}
  for end in (20, 21):
    tx = on.constrain_group_sparsity(ramp, groups=groups, update_every=10, update_end=end)
    state, p = tx.init(params), params
    for _ in range(40):
      updates, state = tx.update({"m": {"a": jnp.zeros((4, 3))}}, state, p)
      p = optax.apply_updates(p, updates)
    zero_groups[end] = int(on.group_report(p, groups)["m"]["zero_groups"])
  assert zero_groups == {20: 1, 21: 2}  # ⌊0.5·4⌋ = 2 only with update_end = end_step + 1


def _top_level_conds(tx, params, grads):
  jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(params), params)
  return sum(eqn.primitive.name == "cond" for eqn in jaxpr.jaxpr.eqns)


@pytest.mark.parametrize(
  "make",
  [
    lambda: on.constrain_sparsity(0.5, update_every=10),
    lambda: on.constrain_n_of_m(2, 4, update_every=10, mask="**/kernel"),
    lambda: on.constrain_n_of_m(2, 4, block_axis=0, update_every=10, mask="**/kernel"),
  ],
  ids=["sparsity", "n_of_m", "n_of_m_block_axis"],
)
def test_one_conditional_per_step_decides_every_leaf(make):
  """Off the choosing steps nothing but the stored masks is read; which step it is, is decided
  once for the whole tree (a conditional per leaf would be a synchronization point each)."""
  rng = np.random.default_rng(0)
  shapes = {"a": (8, 3), "b": (12, 5), "c": (16, 7)}  # Three shapes: never stacked.
  params = {k: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for k, s in shapes.items()}
  grads = _grads(params, 1)
  assert _top_level_conds(make(), params, grads) == 1


def test_leaves_share_a_conditional_up_to_the_byte_bound(monkeypatch):
  """A conditional's operands are live together (the leaves' updates): past the bound, the next
  leaves take a conditional of their own."""
  from optax_norms import _transform

  rng = np.random.default_rng(0)
  shapes = {"a": (8, 4), "b": (12, 4), "c": (16, 4)}  # Arguments (u, w): 256, 384, 512 bytes.
  params = {k: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for k, s in shapes.items()}
  grads = _grads(params, 1)
  make = lambda: on.constrain_sparsity(0.5, update_every=10)  # noqa: E731
  for bound, conds in ((1 << 20, 1), (640, 2), (639, 3), (1, 3)):
    monkeypatch.setattr(_transform, "REFRESH_SHARE_MAX_BYTES", bound)
    assert _top_level_conds(make(), params, grads) == conds, bound
