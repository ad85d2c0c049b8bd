"""Checkpoints: every transform's optimizer state saves and restores with orbax, and a run
stopped halfway, saved, restored into fresh objects and resumed ends bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import chain_of_all
from _registry import REGISTRY, by_name

import optax_norms as on

ocp = pytest.importorskip("orbax.checkpoint")

# optax's schedules and optimizers are not strict-promotion clean.
pytestmark = pytest.mark.standard_promotion


def _schedule(start):
  return optax.linear_schedule(start, start / 4, transition_steps=7)


# Every factory, once with constants (EmptyState) and once with a schedule (ScheduleState).
FACTORIES = {
  entry.name: lambda s, entry=entry: entry.make_scheduled(
    s, **({"axis": 0} if entry.per_unit else {})
  )
  for entry in REGISTRY
  if "checkpoint" not in entry.skip
}


def _params():
  rng = np.random.default_rng(0)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    },
    "head": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
  }


def _loss(params, x, y):
  h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
  return jnp.mean((h @ params["head"]["kernel"] - y) ** 2)


def _data(step):
  rng = np.random.default_rng(1000 + step)
  return (
    jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
    jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
  )


def _full_chain():
  """A chain with adam and every transform on a schedule (a fresh object each call)."""
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.05, 3, 20, 0.005)
  return chain_of_all(optax.adam(lr), lambda v: _schedule(v / 10))


def _run(tx, params, state, start, stop):
  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(start, stop):
    params, state = step(params, state, *_data(i))
  return params, state


def _save_restore(tmp_path, tree, target):
  checkpointer = ocp.StandardCheckpointer()
  path = tmp_path / "ckpt"
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  restored = ocp.StandardCheckpointer().restore(path, target)
  return restored


def _assert_trees_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
@pytest.mark.parametrize("scheduled", [False, True], ids=["constant", "schedule"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_of_every_transform_round_trips(tmp_path, name, scheduled):
  make = lambda: FACTORIES[name](_schedule if scheduled else (lambda v: v))
  params = _params()
  tx = make()
  state = tx.init(params)
  for _ in range(3):  # Advance the counts so a restored zero would be caught.
    _, state = tx.update(params, state, params)
  entry = by_name(name)
  if entry.stateful:  # Per-leaf state (e.g. power-iteration vectors) and its count.
    assert int(state.count) == 3 and len(jax.tree.leaves(state)) > 1
  elif scheduled and entry.hyperparams:
    assert isinstance(state, on.ScheduleState) and int(state.count) == 3
  else:
    assert state == optax.EmptyState()
  fresh = make()
  target = jax.eval_shape(fresh.init, params)
  restored = _save_restore(tmp_path, {"state": state}, {"state": target})["state"]
  _assert_trees_identical(restored, state)
  assert type(restored) is type(state)


@pytest.mark.slow
def test_resume_from_checkpoint_is_bit_identical(tmp_path):
  steps = 20
  params0 = _params()

  tx = _full_chain()
  full_params, full_state = _run(tx, params0, tx.init(params0), 0, steps)

  tx_a = _full_chain()
  half_params, half_state = _run(tx_a, params0, tx_a.init(params0), 0, steps // 2)
  counts = [
    s.count
    for s in jax.tree.leaves(half_state, is_leaf=lambda s: isinstance(s, on.ScheduleState))
    if isinstance(s, on.ScheduleState)
  ]
  assert len(counts) >= 11 and all(int(c) == steps // 2 for c in counts)

  # A fresh "process": new transform objects, targets from their own init.
  tx_b = _full_chain()
  target = jax.eval_shape(lambda p: {"params": p, "opt_state": tx_b.init(p)}, params0)
  restored = _save_restore(tmp_path, {"params": half_params, "opt_state": half_state}, target)
  _assert_trees_identical(restored["opt_state"], half_state)
  resumed_params, resumed_state = _run(
    tx_b, restored["params"], restored["opt_state"], steps // 2, steps
  )
  _assert_trees_identical(resumed_params, full_params)
  _assert_trees_identical(resumed_state, full_state)
  # The run did something: the schedules and the penalties moved the weights.
  assert not np.array_equal(
    np.asarray(full_params["dense"]["kernel"]), np.asarray(params0["dense"]["kernel"])
  )


@pytest.mark.slow
def test_resume_without_restoring_counts_differs(tmp_path):
  # Control: resuming with a fresh (count 0) state is NOT identical, so the test above
  # really depends on the restored ScheduleState counts.
  steps = 20
  params0 = _params()
  tx = _full_chain()
  full_params, _ = _run(tx, params0, tx.init(params0), 0, steps)
  half_params, _ = _run(tx, params0, tx.init(params0), 0, steps // 2)
  tx_b = _full_chain()
  wrong, _ = _run(tx_b, half_params, tx_b.init(half_params), steps // 2, steps)
  assert not np.array_equal(
    np.asarray(wrong["dense"]["kernel"]), np.asarray(full_params["dense"]["kernel"])
  )
