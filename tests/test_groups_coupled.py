"""Coupled groups (heads, neurons) from a rule of ``regularize``.

References: float64 NumPy written from the formulas: the group lasso prox over the union of a
group's slices with the ``√p_g`` threshold, and the exact ``⌊fraction·G⌋`` budget with ties to
the lower index (a stable argsort).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on

L, D, H, K, F = 2, 6, 4, 3, 5
LR = 0.1

HEADS = on.coupled_groups(
  "**/attn", {"query/kernel": 2, "key/kernel": 2, "value/kernel": 2, "out/kernel": 1}, stacked=True
)
NEURONS = on.coupled_groups(
  "**/mlp", {"mlp_in/kernel": -1, "mlp_in/bias": -1, "mlp_out/kernel": 1}, stacked=True
)
ATTN = ("query", "key", "value", "out")


def _params(seed=0):
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  attn = {name: {"kernel": normal(L, D, H, K)} for name in ATTN[:3]}
  attn["out"] = {"kernel": normal(L, H, K, D)}
  # Heads and neurons of very different norms, so some die and others do not.
  scale = jnp.asarray([0.05, 1.0, 0.2, 2.0], jnp.float32)
  head_axis = {"query": (1, 1, H, 1), "key": (1, 1, H, 1), "value": (1, 1, H, 1)}
  head_axis["out"] = (1, H, 1, 1)
  attn = {n: {"kernel": attn[n]["kernel"] * scale.reshape(head_axis[n])} for n in ATTN}
  mlp = {
    "mlp_in": {"kernel": normal(L, D, F), "bias": normal(L, F)},
    "mlp_out": {"kernel": normal(L, F, D)},
  }
  return {"blocks": {"attn": attn, "mlp": mlp, "norm": {"scale": jnp.ones((L, D))}}}


def _grads(params):
  return jax.tree.map(lambda w: 0.3 * jnp.cos(2 * w), params)


def _head_slices(tree, layer, head):
  a = tree["blocks"]["attn"]
  parts = [np.asarray(a[n]["kernel"], np.float64)[layer, :, head] for n in ATTN[:3]]
  parts.append(np.asarray(a["out"]["kernel"], np.float64)[layer, head])
  return parts


def _neuron_slices(tree, layer, neuron):
  m = tree["blocks"]["mlp"]
  return [
    np.asarray(m["mlp_in"]["kernel"], np.float64)[layer, :, neuron],
    np.asarray(m["mlp_in"]["bias"], np.float64)[layer, neuron : neuron + 1],
    np.asarray(m["mlp_out"]["kernel"], np.float64)[layer, neuron],
  ]


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax.sgd
def test_prox_group_over_heads_and_neurons_matches_the_float64_group_prox():
  alpha = 0.6
  rules = [("blocks/attn/**", {"prox_group": alpha, "groups": HEADS})]
  rules += [("blocks/mlp/**", {"prox_group": alpha, "groups": NEURONS}), ("**", None)]
  tx = on.regularize(optax.sgd(LR), rules, learning_rate=LR)
  params = _params()
  grads = _grads(params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  v = jax.tree.map(
    lambda w, g: np.asarray(w, np.float64) - LR * np.asarray(g, np.float64), params, grads
  )
  dead = 0
  for slices, count, size in ((_head_slices, H, 4 * D * K), (_neuron_slices, F, 2 * D + 1)):
    for layer in range(L):
      for g in range(count):
        parts = slices(v, layer, g)
        norm = np.sqrt(sum(np.sum(p * p) for p in parts))
        factor = max(0.0, 1 - LR * alpha * np.sqrt(size) / norm)
        dead += factor == 0
        for got, want in zip(slices(new, layer, g), parts):
          np.testing.assert_allclose(got, want * factor, rtol=2e-6, atol=2e-7)
  assert 0 < dead < L * (H + F)  # some groups die, not all: the reference is not vacuous
  # Leaves of the rules that are no group's members (none here) and other rules: plain SGD.
  np.testing.assert_allclose(
    new["blocks"]["norm"]["scale"], v["blocks"]["norm"]["scale"], rtol=1e-6
  )


@pytest.mark.standard_promotion
@pytest.mark.parametrize("fraction", [0.4, 0.5, 0.75])
def test_group_sparsity_zeroes_exactly_the_budget_of_smallest_groups_per_layer(fraction):
  rules = [("blocks/attn/**", {"group_sparsity": fraction, "groups": HEADS}), ("**", None)]
  tx = on.regularize(optax.sgd(LR), rules)
  params = _params(1)
  grads = _grads(params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  v = jax.tree.map(
    lambda w, g: np.asarray(w, np.float32) - np.float32(LR) * np.asarray(g, np.float32),
    params,
    grads,
  )
  budget = int(np.floor(fraction * H))
  for layer in range(L):
    norms = np.array(
      [
        np.sqrt(sum(np.sum(np.square(p, dtype=np.float64)) for p in _head_slices(v, layer, h)))
        for h in range(H)
      ]
    )
    pruned = set(np.argsort(norms, kind="stable")[:budget].tolist())
    for h in range(H):
      for got, want in zip(_head_slices(new, layer, h), _head_slices(v, layer, h)):
        if h in pruned:
          assert np.all(got == 0), (layer, h)
        else:
          np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_a_periodic_sparsity_rule_keeps_its_mask_between_updates():
  params = {
    "dense": {"kernel": jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)), jnp.float32)}
  }
  rules = [("**/kernel", {"sparsity": {"fraction": 0.5, "update_every": 3}})]
  tx = on.regularize(optax.sgd(LR), rules)
  state = tx.init(params)
  zeros = []
  for step in range(6):
    grads = jax.tree.map(lambda w, step=step: jnp.sin(5 * w + step), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    zeros.append(np.asarray(params["dense"]["kernel"]) == 0)
  assert all(z.sum() == 16 for z in zeros)
  np.testing.assert_array_equal(zeros[0], zeros[1])
  np.testing.assert_array_equal(zeros[1], zeros[2])
  np.testing.assert_array_equal(zeros[3], zeros[4])


def test_a_member_leaf_taken_by_another_rule_raises_naming_the_leaf_and_the_rule():
  rules = [
    ("blocks/attn/query/**", {"prox_group": 0.1, "groups": HEADS}),
    ("**", None),
  ]
  tx = on.regularize(optax.sgd(LR), rules, learning_rate=LR)
  with pytest.raises(ValueError, match=r"'blocks/attn/key/kernel'.*rule 1 \('\*\*'\)"):
    tx.init(_params())
  with pytest.raises(ValueError, match="'blocks/attn/key/kernel'"):
    on.describe_rules(rules, _params())


@pytest.mark.parametrize(
  "settings, match",
  [
    ({"groups": HEADS, "l2": 0.1}, "'groups' is read by 'prox_group' and 'group_sparsity'"),
    ({"group_sparsity": 0.5}, "give the rule a 'groups' setting"),
    ({"group_sparsity": {"fraction": 0.5, "every": 2}, "groups": HEADS}, "keys among"),
    ({"sparsity": {"update_every": 2}}, "needs 'fraction'"),
  ],
)
def test_bad_group_settings_raise_naming_the_rule(settings, match):
  with pytest.raises(ValueError, match=match) as error:
    on.regularize(optax.sgd(LR), [("blocks/**", settings), ("**", None)], learning_rate=LR)
  assert "Rule 0 ('blocks/**')" in str(error.value)


def test_describe_rules_shows_which_leaves_and_axes_make_each_group():
  rules = [("blocks/attn/**", {"prox_group": 0.1, "groups": HEADS}), ("**", None)]
  table = on.describe_rules(rules, _params())
  lines = {line.split()[0]: line for line in table.splitlines()[1:]}
  assert (
    f"group 'blocks/attn' along axis 2: {H} groups of {4 * D * K} entries per layer of {L}"
    in lines["blocks/attn/query/kernel"]
  )
  assert "along axis 1" in lines["blocks/attn/out/kernel"]
  assert "group" not in lines["blocks/mlp/mlp_in/kernel"]
