"""Small leaves of one kind go to a rule as one stack: each leaf gets what it gets alone.

Every transform that reads a layout stacks same-shaped small leaves along a new layer axis
(one call of its rule, one set of kernels). These checks run a tree of such leaves, mixed with
leaves of another shape and dtype, for a few steps and compare every leaf bit for bit with the
same leaf transformed alone (a tree holding only it, under the same path), and the first
update with the float64 oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import CASES, PER_UNIT, default_axes

import optax_norms as on

READS_LAYOUT = [*PER_UNIT, "constrain_sparsity", "constrain_n_of_m"]
# prox_adam is an optimizer of its own, with no per-leaf rule: not stacked.
STACKED = [case for case in CASES if case.name in READS_LAYOUT and case.placement != "optimizer"]
SAME_SHAPE = 6  # (8, 4) kernels: one stack.


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  # Scales from 0.1 to 3: some units inside the bounds, some outside; one all-zero kernel.
  tree = {
    f"layer_{i}": {"kernel": jnp.asarray(rng.normal(size=(8, 4)) * (0.1 + 0.6 * i), jnp.float32)}
    for i in range(SAME_SHAPE)
  }
  tree["layer_0"]["kernel"] = jnp.zeros((8, 4), jnp.float32)
  tree["wide"] = {"kernel": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}
  tree["half"] = {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16)}
  return tree


def _chain(case):
  tx = case.make()
  if case.placement == "optimizer":
    return tx
  sgd = optax.sgd(0.1)
  return optax.chain(tx, sgd) if case.placement == "before" else optax.chain(sgd, tx)


def _run(case, params, steps=3):
  tx = _chain(case)
  state = tx.init(params)
  target = jax.tree.map(lambda w: jnp.full_like(w, 0.5), params)
  step = jax.jit(
    lambda p, s: tx.update(jax.tree.map(lambda w, t: w - t, p, target), s, p)
  )  # Gradient of ½‖w − t‖².
  history = []
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    history.append(updates)
  return history


@pytest.mark.parametrize("case", STACKED, ids=[c.name for c in STACKED])
def test_stacked_leaves_equal_each_leaf_alone_bit_for_bit(case):
  params = _tree()
  steps = 1 if "multistep" in case.skip else 3
  together = _run(case, params, steps)
  for name in params:
    alone = _run(case, {name: params[name]}, steps)
    for k in range(steps):
      np.testing.assert_array_equal(
        np.asarray(together[k][name]["kernel"], np.float64),
        np.asarray(alone[k][name]["kernel"], np.float64),
        err_msg=f"{case.name}: {name}, step {k + 1}",
      )


@pytest.mark.parametrize("case", STACKED, ids=[c.name for c in STACKED])
def test_stacked_leaves_match_the_float64_oracle(case):
  params = _tree(seed=1)
  grads = jax.tree.map(lambda w: jnp.full_like(w, 0.25) - 0.5 * w, params)
  tx = case.make()
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for name in params:
    if name == "half":
      continue  # The battery's half-precision checks cover bf16 leaves.
    u = np.asarray(grads[name]["kernel"], np.float64)
    w = np.asarray(params[name]["kernel"], np.float64)
    expected = case.oracle(u, w, case.hyperparams, default_axes(u.ndim))
    np.testing.assert_allclose(
      np.asarray(updates[name]["kernel"], np.float64),
      expected,
      rtol=1e-5,
      atol=1e-6,
      err_msg=f"{case.name}: {name}",
    )


@pytest.mark.parametrize("case", STACKED, ids=[c.name for c in STACKED])
def test_the_same_shaped_leaves_are_one_stack(case):
  params = _tree()
  tx = case.make()
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
  stacks = [
    eqn
    for eqn in jaxpr.jaxpr.eqns
    if eqn.primitive.name == "concatenate" and len(eqn.invars) == SAME_SHAPE
  ]
  assert stacks, f"{case.name}: the {SAME_SHAPE} (8, 4) float32 kernels were not stacked"


# Per-leaf state beyond the registry's defaults: the masks a periodic budget keeps.
PERIODIC = {
  "constrain_sparsity(update_every=2)": lambda: on.constrain_sparsity(0.5, update_every=2),
  "constrain_n_of_m(update_every=2)": lambda: on.constrain_n_of_m(2, 4, update_every=2),
}


@pytest.mark.parametrize("make", PERIODIC.values(), ids=list(PERIODIC))
def test_stacked_periodic_masks_equal_each_leaf_alone_bit_for_bit(make):
  def run(params, steps=4):
    tx = optax.chain(optax.sgd(0.1), make())
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.tree.map(lambda w: w - 0.5, p), s, p))
    history = []
    for _ in range(steps):
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
      history.append((updates, state))
    return history

  params = _tree()
  together = run(params)
  for name in params:
    alone = run({name: params[name]})
    for k, ((u_all, s_all), (u_one, s_one)) in enumerate(zip(together, alone)):
      np.testing.assert_array_equal(
        np.asarray(u_all[name]["kernel"], np.float64),
        np.asarray(u_one[name]["kernel"], np.float64),
        err_msg=f"{name}, step {k + 1}",
      )
      kept_all = s_all[1].leaves[name]["kernel"]
      kept_one = s_one[1].leaves[name]["kernel"]
      np.testing.assert_array_equal(np.asarray(kept_all), np.asarray(kept_one))


def test_an_invalid_scheduled_value_makes_every_leaf_of_a_stack_nan():
  # A negative radius from a schedule is caught at run time: each selected leaf's update is
  # NaN (never a silent step), also where the leaves ran as one stack; unselected leaves keep
  # their update.
  params = _tree()
  tx = on.constrain_row_norm(lambda count: jnp.where(count > 0, -1.0, 1.0), mask="layer_*/**")
  state = tx.init(params)
  updates = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(tx.update)
  first, state = step(updates, state, params)
  second, _ = step(updates, state, params)
  for name in params:
    if name.startswith("layer_"):
      assert np.isfinite(np.asarray(first[name]["kernel"], np.float32)).all(), name
      assert np.isnan(np.asarray(second[name]["kernel"], np.float32)).all(), name
    else:
      np.testing.assert_array_equal(second[name]["kernel"], updates[name]["kernel"])
