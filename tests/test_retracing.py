"""No retracing: a jitted training step with schedules (and with injected hyperparameters)
is traced once over a 100-step loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import CASES, chain_of_all

import optax_norms as on

# optax's schedules and optimizers are not strict-promotion clean.
pytestmark = pytest.mark.standard_promotion


def _params():
  rng = np.random.default_rng(0)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
      "bias": jnp.zeros(3, jnp.float32),
    },
    "head": {"kernel": jnp.asarray(rng.normal(size=(3, 1)), jnp.float32)},
  }


def _loss(params, x):
  h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
  return jnp.mean((h @ params["head"]["kernel"] - 1.0) ** 2)


def _count_traces(tx, steps=100):
  traces = []

  @jax.jit
  def step(params, state, x):
    traces.append(1)  # Python side effect: runs once per trace, never per call.
    grads = jax.grad(_loss)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = _params()
  state = tx.init(params)
  first = params
  for i in range(steps):
    x = jnp.asarray(np.random.default_rng(i).normal(size=(4, 5)), jnp.float32)
    params, state = step(params, state, x)
  return len(traces), first, params, state


@pytest.mark.slow
def test_schedules_compile_once_over_100_steps():
  lr = optax.cosine_decay_schedule(0.1, 100)
  # Every registered transform, every hyperparameter on a schedule.
  tx = chain_of_all(optax.sgd(lr), lambda v: optax.linear_schedule(v, v / 2, 50))
  traces, first, last, state = _count_traces(tx)
  assert traces == 1
  counts = [
    int(s.count)
    for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, on.ScheduleState))
    if isinstance(s, on.ScheduleState)
  ]
  # One ScheduleState per transform in the chain with a hyperparameter and no per-leaf state.
  scheduled = [
    e
    for e in CASES
    if e.hyperparams
    and not e.stateful
    and "chain_of_all" not in e.skip
    and e.placement != "optimizer"
  ]
  assert len(counts) == len(scheduled) and set(counts) == {100}
  assert not np.array_equal(
    np.asarray(first["dense"]["kernel"]), np.asarray(last["dense"]["kernel"])
  )


@pytest.mark.slow
def test_injected_hyperparameters_compile_once():
  tx = optax.chain(
    optax.inject_hyperparams(on.add_l2_decay)(alpha=1e-3, mask="**/kernel"),
    optax.sgd(0.1),
    optax.inject_hyperparams(on.prox_l1)(alpha=1e-3, learning_rate=0.1),
    optax.inject_hyperparams(on.constrain_row_norm, static_args=("axis",))(max_norm=2.0, axis=0),
  )
  traces = []

  @jax.jit
  def step(params, state, x, alpha):
    traces.append(1)
    state[0].hyperparams["alpha"] = alpha  # Changed every step, as a schedule of one's own.
    grads = jax.grad(_loss)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = _params()
  state = tx.init(params)
  for i in range(100):
    x = jnp.asarray(np.random.default_rng(i).normal(size=(4, 5)), jnp.float32)
    params, state = step(params, state, x, jnp.asarray(1e-3 * (i % 7), jnp.float32))
  assert len(traces) == 1
  # The injected value was used: the last step's alpha is in the state.
  np.testing.assert_allclose(float(state[0].hyperparams["alpha"]), 1e-3 * (99 % 7), rtol=1e-6)


def test_python_float_hyperparameters_do_not_retrace_per_value():
  # Two transforms built with different Python floats are different functions (a retrace
  # each, as in optax); the same transform object never retraces across steps.
  tx = optax.chain(on.add_l2_decay(0.1), optax.sgd(0.1))
  traces, _, _, _ = _count_traces(tx, steps=30)
  assert traces == 1
