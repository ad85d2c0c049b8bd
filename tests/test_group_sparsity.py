"""constrain_group_sparsity and polynomial_sparsity_schedule against float64 NumPy references.

The reference ranks the groups of every anchor instance (and layer) by the float64 norm of
the union of their slices of ``v = w + u``, keeps the ``G − ⌊fraction·G⌋`` largest
(``np.argsort(-norm, kind="stable")``: equal norms keep the lower index) and zeroes the
others; with ``update_every`` the mask is chosen at the update steps only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on

IN, H, D, OUT, F = 6, 4, 3, 6, 10
HEADS = {"query/kernel": 1, "key/kernel": 1, "value/kernel": 1, "out/kernel": 0}
NEURONS = {"mlp_in/kernel": -1, "mlp_in/bias": 0, "mlp_out/kernel": 0}
HEADS_STACKED = {"query/kernel": 2, "key/kernel": 2, "value/kernel": -2, "out/kernel": 1}
NEURONS_STACKED = {"mlp_in/kernel": -1, "mlp_in/bias": 1, "mlp_out/kernel": 1}
ANCHORS = {"attn": "block/attn", "mlp": "block/mlp"}


def _tree(seed=0, layers=None, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  lead = () if layers is None else (layers,)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=lead + shape), dtype)

  return {
    "block": {
      "attn": {
        "query": {"kernel": arr(IN, H, D)},
        "key": {"kernel": arr(IN, H, D)},
        "value": {"kernel": arr(IN, H, D)},
        "out": {"kernel": arr(H, D, OUT)},
      },
      "mlp": {
        "mlp_in": {"kernel": arr(IN, F), "bias": arr(F)},
        "mlp_out": {"kernel": arr(F, IN)},
      },
      "ln": {"scale": arr(IN)},
    }
  }


def _get(tree, path):
  node = tree
  for key in path.split("/"):
    node = node[key]
  return node


def _groups(stacked):
  heads, neurons = (HEADS_STACKED, NEURONS_STACKED) if stacked else (HEADS, NEURONS)
  return (
    on.coupled_groups("**/attn", heads, stacked=stacked),
    on.coupled_groups("**/mlp", neurons, stacked=stacked),
  ), {"block/attn": heads, "block/mlp": neurons}


def _ref_norms(v_tree, anchor, members, stacked):
  total = 0.0
  for rel, axis in members.items():
    v = np.asarray(_get(v_tree, f"{anchor}/{rel}"), np.float64)
    moved = np.moveaxis(v, axis % v.ndim, 1 if stacked else 0)
    lead = 2 if stacked else 1
    total = total + np.sum(moved.reshape(moved.shape[:lead] + (-1,)) ** 2, axis=-1)
  return np.sqrt(total)


def _ref_keep(norms, fraction):
  """Keep the G − ⌊fraction·G⌋ largest of each row; equal norms keep the lower index."""
  norms = np.atleast_2d(norms)
  count = norms.shape[-1] - math.floor(fraction * norms.shape[-1])
  keep = np.zeros(norms.shape, bool)
  for row, n in enumerate(norms):
    keep[row, np.argsort(-n, kind="stable")[:count]] = True
  return keep


def _expand(keep, v, axis, stacked):
  """A (L, G) (or (1, G)) mask broadcast onto a member leaf."""
  axis %= v.ndim
  shape = [1] * v.ndim
  shape[axis] = keep.shape[-1]
  if stacked:
    shape[0] = keep.shape[0]
    return keep.reshape(shape)
  return keep[0].reshape(shape)


def _ref_stored(v_tree, keep_by_anchor, member_map, stacked):
  """The parameters the reference stores: v on kept groups, exactly 0 on the others."""
  out = jax.tree.map(lambda x: np.asarray(x, np.float64), v_tree)
  for anchor, members in member_map.items():
    for rel, axis in members.items():
      keys = f"{anchor}/{rel}".split("/")
      node = out
      for key in keys[:-1]:
        node = node[key]
      v = node[keys[-1]]
      node[keys[-1]] = np.where(_expand(keep_by_anchor[anchor], v, axis, stacked), v, 0.0)
  return out


def _grads(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["flat", "stacked"])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_exact_budget_per_instance_matches_reference(stacked, fraction):
  params = _tree(layers=3 if stacked else None)
  grads = _grads(params, 1)
  groups, member_map = _groups(stacked)
  tx = optax.chain(optax.sgd(0.1), on.constrain_group_sparsity(fraction, groups=groups))
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  jitted, _ = jax.jit(tx.update)(grads, state, params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  new = optax.apply_updates(params, updates)
  v_tree = optax.apply_updates(params, jax.tree.map(lambda g: -0.1 * g, grads))
  keep = {a: _ref_keep(_ref_norms(v_tree, a, m, stacked), fraction) for a, m in member_map.items()}
  expected = _ref_stored(v_tree, keep, member_map, stacked)
  for path, got, exp in zip(on.tree_paths(new), jax.tree.leaves(new), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got, np.float64), exp, err_msg=path)
  report = on.group_report(new, groups)
  for anchor in member_map:
    zeros = np.asarray(report[anchor]["zero_groups"])
    groups_count = H if anchor == "block/attn" else F
    np.testing.assert_array_equal(zeros, math.floor(fraction * groups_count))


@pytest.mark.slow
def test_ties_keep_the_lower_index_and_nan_is_kept():
  params = {"mlp": {"w_in": jnp.ones((2, 5)), "w_out": jnp.ones((5, 3))}}
  mlp = on.coupled_groups("mlp", {"w_in": 1, "w_out": 0})
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = on.constrain_group_sparsity(0.4, groups=mlp)  # 2 of 5, all norms equal
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert np.asarray(new["mlp"]["w_in"][0]).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
  params["mlp"]["w_in"] = params["mlp"]["w_in"].at[0, 0].set(jnp.nan)
  params["mlp"]["w_out"] = params["mlp"]["w_out"].at[1].set(0.5)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  row = np.asarray(new["mlp"]["w_in"][1]).tolist()
  assert row == [1.0, 0.0, 1.0, 1.0, 0.0]  # NaN group 0 kept; group 1 smallest; tie: 4 goes


@pytest.mark.slow
def test_leaves_outside_groups_and_dtype_kept():
  params = _tree(dtype=jnp.bfloat16)
  grads = _grads(params, 1)
  groups, _ = _groups(False)
  tx = optax.chain(optax.sgd(0.1), on.constrain_group_sparsity(0.5, groups=groups))
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  sgd, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params), params)
  np.testing.assert_array_equal(
    np.asarray(updates["block"]["ln"]["scale"]), np.asarray(sgd["block"]["ln"]["scale"])
  )
  new = optax.apply_updates(params, updates)
  report = on.group_report(new, groups)
  assert int(report["block/attn"]["zero_groups"]) == H // 2
  assert int(report["block/mlp"]["zero_groups"]) == F // 2


def _run(tx, params, steps, lr=0.1):
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(jax.tree.map(lambda x: -lr * x, g), s, p))
  history = []
  for t in range(steps):
    grads = _grads(params, 100 + t)
    updates, state = step(params, state, grads)
    v_tree = optax.apply_updates(params, jax.tree.map(lambda x: -lr * x, grads))
    params = optax.apply_updates(params, updates)
    history.append((v_tree, params))
  return history, state


@pytest.mark.slow
@pytest.mark.parametrize(
  "every, start, end, chosen",
  [
    (3, 0, None, {0, 3, 6}),
    (2, 0, 3, {0, 2}),  # Frozen from step 3 on.
    (2, 2, None, {2, 4, 6}),  # Nothing pruned before step 2.
  ],
)
def test_periodic_mask_chosen_at_update_steps_only(every, start, end, chosen):
  params = _tree()
  groups, member_map = _groups(False)
  tx = on.constrain_group_sparsity(
    0.5, groups=groups, update_every=every, update_start=start, update_end=end
  )
  history, state = _run(tx, params, 7)
  keep = {a: np.ones((1, H if a == "block/attn" else F), bool) for a in member_map}
  for t, (v_tree, stored) in enumerate(history):
    if t in chosen:
      keep = {a: _ref_keep(_ref_norms(v_tree, a, m, False), 0.5) for a, m in member_map.items()}
    expected = _ref_stored(v_tree, keep, member_map, False)
    for path, got, exp in zip(
      on.tree_paths(stored), jax.tree.leaves(stored), jax.tree.leaves(expected)
    ):
      np.testing.assert_array_equal(np.asarray(got, np.float64), exp, err_msg=f"{path} @ {t}")
  assert int(state.count) == 7
  assert [k.dtype for k in state.keep] == [jnp.bool_, jnp.bool_]
  np.testing.assert_array_equal(np.asarray(state.keep[0]), keep["block/attn"][0])


@pytest.mark.slow
def test_schedule_budget_of_the_choosing_step_and_inject_hyperparams():
  params = _tree()
  groups, member_map = _groups(False)
  schedule = on.polynomial_sparsity_schedule(0.8, begin_step=1, end_step=4)
  tx = on.constrain_group_sparsity(schedule, groups=groups, update_every=2)
  history, _ = _run(tx, params, 6)
  for t, (_, stored) in enumerate(history):
    chosen_at = t - t % 2
    report = on.group_report(stored, groups)
    for anchor, count in (("block/attn", H), ("block/mlp", F)):
      expected = math.floor(float(schedule(chosen_at)) * count + 1e-9)
      assert int(report[anchor]["zero_groups"]) == expected, (t, anchor)
  injected = optax.inject_hyperparams(on.constrain_group_sparsity)(fraction=0.25, groups=groups)
  state = injected.init(params)
  state.hyperparams["fraction"] = jnp.asarray(0.5, jnp.float32)
  grads = _grads(params, 1)
  updates, _ = jax.jit(injected.update)(grads, state, params)
  report = on.group_report(optax.apply_updates(params, updates), groups)
  assert int(report["block/attn"]["zero_groups"]) == 2
  assert int(report["block/mlp"]["zero_groups"]) == 5


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"update_every": 0}, "`update_every`"),
    ({"update_every": 1.5}, "`update_every`"),
    ({"update_start": -1}, "`update_start`"),
    ({"update_start": 4, "update_end": 4}, "`update_end`"),
    ({"fraction": 1.5}, "`fraction`"),
    ({"fraction": -0.1}, "`fraction`"),
  ],
)
def test_bad_arguments_name_them(kwargs, match):
  groups, _ = _groups(False)
  with pytest.raises(ValueError, match=match):
    on.constrain_group_sparsity(**{"fraction": 0.5, **kwargs}, groups=groups)


def test_group_errors_at_init_and_params_required():
  tx = on.constrain_group_sparsity(0.5, groups=on.coupled_groups("**/heads", HEADS))
  with pytest.raises(ValueError, match=r"'\*\*/heads' matches no module"):
    tx.init(_tree())
  bad = on.coupled_groups("**/attn", {"query/kernel": 1, "out/kernel": 1})
  with pytest.raises(ValueError, match=r"'block/attn/query/kernel': 4, 'block/attn/out/kernel': 3"):
    on.constrain_group_sparsity(0.5, groups=bad).init(_tree())
  groups, _ = _groups(False)
  tx = on.constrain_group_sparsity(0.5, groups=groups)
  params = _tree()
  with pytest.raises(ValueError, match="`params` was not passed"):
    tx.update(params, tx.init(params))


@pytest.mark.slow
def test_state_is_plain_arrays_that_round_trip():
  """The state is a NamedTuple of plain arrays: it survives a host round trip (what a
  checkpoint does) and the restored state gives the same updates."""
  params = _tree()
  groups, _ = _groups(False)
  tx = on.constrain_group_sparsity(0.5, groups=groups, update_every=5)
  history, state = _run(tx, params, 2)
  restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  grads = _grads(params, 7)
  a, _ = tx.update(grads, state, params)
  b, _ = tx.update(grads, restored, params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- polynomial_sparsity_schedule --------------------------------------------------------


def test_polynomial_schedule_matches_formula():
  s = on.polynomial_sparsity_schedule(0.9, begin_step=10, end_step=50, initial=0.1, power=2)
  for t in [0, 10, 11, 30, 49, 50, 1000]:
    progress = min(max((t - 10) / 40, 0.0), 1.0)
    expected = 0.9 + (0.1 - 0.9) * (1 - progress) ** 2
    np.testing.assert_allclose(float(s(jnp.asarray(t, jnp.int32))), expected, rtol=1e-6)
  assert s(jnp.asarray(3, jnp.int32)).dtype == jnp.float32
  np.testing.assert_allclose(float(jax.jit(s)(jnp.asarray(30, jnp.int32))), 0.7, rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"final": 1.5}, "`final`"),
    ({"final": -0.1}, "`final`"),
    ({"initial": 2.0}, "`initial`"),
    ({"end_step": 10}, "`end_step`"),
    ({"end_step": 5}, "`end_step`"),
    ({"power": 0}, "`power`"),
    ({"power": -1.0}, "`power`"),
    ({"begin_step": 1.5}, "`begin_step`"),
  ],
)
def test_polynomial_schedule_bad_values_name_them(kwargs, match):
  with pytest.raises(ValueError, match=match):
    on.polynomial_sparsity_schedule(**{"final": 0.5, "begin_step": 10, "end_step": 20, **kwargs})


def test_one_conditional_per_step_decides_every_instance():
  params = _tree()
  groups, _ = _groups(False)
  tx = on.constrain_group_sparsity(0.5, groups=groups, update_every=10)
  jaxpr = jax.make_jaxpr(tx.update)(_grads(params, 1), tx.init(params), params)
  assert sum(eqn.primitive.name == "cond" for eqn in jaxpr.jaxpr.eqns) == 1
