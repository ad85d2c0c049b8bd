"""Coupled groups across leaves: resolution, errors, the √p_g-scaled group prox, the report.

The references are float64 NumPy, written from the formulas: group ``g`` of an instance is
the union of the slices ``member[..., g, ...]``; the prox scales each of them by
``max(0, 1 − lr·α·√p_g/‖v_g‖)`` with ``v = w + u``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on

IN, H, D, OUT, F = 6, 4, 3, 6, 5

HEADS = {"query/kernel": 1, "key/kernel": 1, "value/kernel": 1, "out/kernel": 0}
NEURONS = {"mlp_in/kernel": -1, "mlp_in/bias": 0, "mlp_out/kernel": 0}
# With a leading layer axis: a member's axis indexes the leaf's full shape (negative axes
# read the same either way).
HEADS_STACKED = {"query/kernel": 2, "key/kernel": -2, "value/kernel": 2, "out/kernel": 1}
NEURONS_STACKED = {"mlp_in/kernel": -1, "mlp_in/bias": -1, "mlp_out/kernel": 1}


def _members(stacked):
  return (HEADS_STACKED, NEURONS_STACKED) if stacked else (HEADS, NEURONS)


def _tree(seed=0, layers=None, dtype=jnp.float32, scale=None):
  """A Flax-style block: attention (in, H, d)/(H, d, out) kernels and an MLP, with a
  LayerNorm scale outside every group; a leading layer axis when `layers`."""
  rng = np.random.default_rng(seed)
  lead = () if layers is None else (layers,)

  def arr(*shape):
    x = rng.normal(size=lead + shape)
    if scale is not None:  # Per-group scales spread the norms around the thresholds.
      x = x * scale(shape)
    return jnp.asarray(x, dtype)

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


def _np_leaf(tree, path):
  node = tree
  for key in path.split("/"):
    node = node[key]
  return np.asarray(node, np.float64)


def _ref_sq_norms(leaves_axes, stacked):
  """Σ over members of Σ over all axes but (layer,) group of v², float64."""
  total = 0.0
  for v, axis in leaves_axes:
    axis %= v.ndim
    moved = np.moveaxis(v, axis, 1 if stacked else 0)
    lead = 2 if stacked else 1
    total = total + np.sum(moved.reshape(moved.shape[:lead] + (-1,)) ** 2, axis=-1)
  return total


def _ref_prox(u_tree, w_tree, anchor, members, alpha, lr, stacked=False):
  """The reference prox of one anchor instance: new updates of its members."""
  vs = {
    rel: _np_leaf(w_tree, f"{anchor}/{rel}") + _np_leaf(u_tree, f"{anchor}/{rel}")
    for rel in members
  }
  size = 0
  for rel, axis in members.items():
    v = vs[rel]
    per = v.size // v.shape[axis % v.ndim]
    size += per // v.shape[0] if stacked else per
  norm = np.sqrt(_ref_sq_norms([(vs[r], a) for r, a in members.items()], stacked))
  t = lr * alpha * np.sqrt(size)
  factor = np.where(norm > 0, np.maximum(0.0, 1 - t / np.where(norm > 0, norm, 1)), 0.0)
  out = {}
  for rel, axis in members.items():
    v = vs[rel]
    axis %= v.ndim
    shape = [1] * v.ndim
    shape[axis] = v.shape[axis]
    if stacked:
      shape[0] = v.shape[0]
    out[rel] = v * factor.reshape(shape) - _np_leaf(w_tree, f"{anchor}/{rel}")
  return out, norm, t


def _spread(tree, stacked=False):
  """`tree` with group g of the heads and neurons scaled by a factor growing with g, so that
  the group norms spread across the thresholds (some groups die, some live)."""
  heads, neurons = _members(stacked)
  for anchor, members, count in (("attn", heads, H), ("mlp", neurons, F)):
    scales = np.linspace(0.02, 1.5, count)
    for rel, axis in members.items():
      node = tree["block"][anchor]
      keys = rel.split("/")
      for key in keys[:-1]:
        node = node[key]
      leaf = node[keys[-1]]
      shape = [1] * leaf.ndim
      shape[axis % leaf.ndim] = count
      node[keys[-1]] = (
        leaf.astype(jnp.float32) * jnp.asarray(scales.reshape(shape), jnp.float32)
      ).astype(leaf.dtype)
  return tree


def _grads(tree, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), tree)


# --- resolution and errors ---------------------------------------------------------------


def test_resolve_flax_attention_and_mlp():
  tree = _tree()
  (attn,) = on.coupled_groups("**/attn", HEADS).resolve(tree)
  assert attn.anchor == "block/attn" and attn.groups == H and attn.layers is None
  assert attn.size == 3 * IN * D + D * OUT
  assert [(m.path, m.axis) for m in attn.members] == [
    (("block", "attn", "query", "kernel"), 1),
    (("block", "attn", "key", "kernel"), 1),
    (("block", "attn", "value", "kernel"), 1),
    (("block", "attn", "out", "kernel"), 0),
  ]
  (mlp,) = on.coupled_groups("block/mlp", NEURONS).resolve(tree)
  assert (mlp.groups, mlp.size) == (F, IN + 1 + IN)
  assert [m.axis for m in mlp.members] == [1, 0, 0]  # -1 of the (IN, F) kernel is 1


def test_resolve_stacked_counts_one_layer():
  tree = _tree(layers=3)
  (attn,) = on.coupled_groups(
    "**/attn", {"query/kernel": 2, "out/kernel": -3}, stacked=True
  ).resolve(tree)
  assert (attn.groups, attn.layers, attn.size) == (H, 3, IN * D + D * OUT)
  assert [m.axis for m in attn.members] == [2, 1]


def test_anchor_glob_matches_every_instance():
  tree = {"blocks": {"0": _tree()["block"], "1": _tree(seed=3)["block"]}}
  instances = on.coupled_groups("blocks/*/attn", HEADS).resolve(tree)
  assert [i.anchor for i in instances] == ["blocks/0/attn", "blocks/1/attn"]


def test_error_anchor_matching_nothing_names_it():
  with pytest.raises(ValueError, match=r"'\*\*/attention'.*matches no module"):
    on.coupled_groups("**/attention", HEADS).resolve(_tree())


def test_error_missing_member_names_anchor_and_member():
  with pytest.raises(ValueError, match=r"'block/attn' has no member 'gate/kernel'"):
    on.coupled_groups("**/attn", {**HEADS, "gate/kernel": 1}).resolve(_tree())


def test_error_mismatched_lengths_name_leaves_and_lengths():
  groups = on.coupled_groups("**/attn", {"query/kernel": 1, "out/kernel": 1})
  with pytest.raises(ValueError, match=r"'block/attn/query/kernel': 4, 'block/attn/out/kernel': 3"):
    groups.resolve(_tree())


def test_error_axis_out_of_range_and_stacked_axis_zero():
  with pytest.raises(
    ValueError, match=r"'block/attn/out/kernel' of shape \(4, 3, 6\) has no axis 3"
  ):
    on.coupled_groups("**/attn", {"out/kernel": 3}).resolve(_tree())
  with pytest.raises(ValueError, match="layer axis"):
    on.coupled_groups("**/attn", {"out/kernel": 0}, stacked=True).resolve(_tree(layers=2))


def test_error_stacked_layer_counts_differ():
  tree = _tree(layers=2)
  tree["block"]["attn"]["out"]["kernel"] = jnp.ones((3, H, D, OUT))
  with pytest.raises(ValueError, match="layer counts"):
    on.coupled_groups("**/attn", HEADS_STACKED, stacked=True).resolve(tree)


def test_error_bad_construction():
  with pytest.raises(ValueError, match="non-empty dict"):
    on.coupled_groups("**/attn", {})
  with pytest.raises(ValueError, match="must be an int"):
    on.coupled_groups("**/attn", {"query/kernel": 1.5})
  with pytest.raises(ValueError, match="Malformed glob"):
    on.coupled_groups("a//b", HEADS)


def test_error_leaf_in_two_instances():
  groups = on.coupled_groups("**", {"kernel": 0})
  tree = {"a": {"kernel": jnp.ones((2, 2))}}
  # '**' matches 'a' only (a proper prefix), so one instance: fine.
  assert len(groups.resolve(tree)) == 1
  tx = on.prox_group_l2(1.0, 1.0, groups=[groups, on.coupled_groups("a", {"kernel": 1})])
  with pytest.raises(ValueError, match="'a/kernel' is a member of two group instances"):
    tx.init(tree)


def test_errors_come_at_init():
  tx = on.prox_group_l2(1.0, 0.1, groups=on.coupled_groups("**/attention", HEADS))
  with pytest.raises(ValueError, match="matches no module"):
    tx.init(_tree())
  with pytest.raises(ValueError, match="`axis` is not read with `groups`"):
    on.prox_group_l2(1.0, 0.1, groups=on.coupled_groups("**/attn", HEADS), axis=0)
  with pytest.raises(TypeError, match="must be a CoupledGroups"):
    on.prox_group_l2(1.0, 0.1, groups="**/attn")


# --- the prox --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["flat", "stacked"])
def test_prox_matches_float64_reference_across_leaves(stacked):
  layers = 2 if stacked else None
  params = _spread(_tree(layers=layers), stacked)
  grads = _grads(params)
  lr, alpha = 0.5, 0.9
  head_members, neuron_members = _members(stacked)
  heads = on.coupled_groups("**/attn", head_members, stacked=stacked)
  neurons = on.coupled_groups("**/mlp", neuron_members, stacked=stacked)
  tx = optax.chain(optax.sgd(lr), on.prox_group_l2(alpha, lr, groups=[heads, neurons]))
  state = tx.init(params)
  eager, _ = tx.update(grads, state, params)
  jitted, _ = jax.jit(tx.update)(grads, state, params)
  u = jax.tree.map(lambda g: -lr * np.asarray(g, np.float64), grads)
  dead = 0
  for anchor, members in (("block/attn", head_members), ("block/mlp", neuron_members)):
    expected, norm, t = _ref_prox(u, params, anchor, members, alpha, lr, stacked)
    dead += int(np.sum(norm <= t))
    for rel, exp in expected.items():
      got = _np_leaf(eager, f"{anchor}/{rel}")
      np.testing.assert_allclose(got, exp, rtol=2e-5, atol=2e-6, err_msg=rel)
      np.testing.assert_allclose(
        _np_leaf(jitted, f"{anchor}/{rel}"), got, rtol=1e-6, atol=1e-6, err_msg=rel
      )
  # Some groups die, some live: both branches of the formula are checked.
  assert 0 < dead < (H + F) * (layers or 1)
  # The LayerNorm scale is in no group: its update is the optimizer's, unchanged.
  np.testing.assert_array_equal(
    np.asarray(eager["block"]["ln"]["scale"]), np.asarray(-lr * grads["block"]["ln"]["scale"])
  )


@pytest.mark.slow
def test_sqrt_p_scaling_kills_groups_by_their_size():
  """Two instances whose groups have equal norm per entry: the √p_g threshold treats them the
  same (the unscaled one would kill the small group first)."""
  small = jnp.full((1, 2), 1.0)  # Groups of 1 entry of norm 1: ‖w_g‖/√p_g = 1.
  large = jnp.full((16, 2), 1.0)  # Groups of 16 entries, norm 4: ‖w_g‖/√p_g = 1.
  params = {"a": {"k": small}, "b": {"k": large}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for alpha, alive in ((0.9, True), (1.1, False)):
    tx = on.prox_group_l2(alpha, 1.0, groups=on.coupled_groups("*", {"k": 1}))
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for name in "ab":
      assert bool(np.all(np.asarray(new[name]["k"]) != 0)) == alive, (alpha, name)


def test_dead_groups_store_exact_zeros_after_apply_updates():
  params = _spread(_tree())
  grads = _grads(params)
  heads = on.coupled_groups("**/attn", HEADS)
  tx = optax.chain(optax.sgd(0.5), on.prox_group_l2(0.9, 0.5, groups=heads))
  step = jax.jit(lambda p, s: tx.update(grads, s, p))
  updates, _ = step(params, tx.init(params))
  new = optax.apply_updates(params, updates)
  u = jax.tree.map(lambda g: -0.5 * np.asarray(g, np.float64), grads)
  _, norm, t = _ref_prox(u, params, "block/attn", HEADS, 0.9, 0.5)
  dead = norm <= t
  assert dead.any() and not dead.all()
  attn = new["block"]["attn"]
  for rel, axis in HEADS.items():
    leaf = np.moveaxis(_np_leaf(attn, rel), axis, 0)
    assert np.all(leaf[dead] == 0), rel
    assert np.all(leaf[~dead] != 0), rel
  report = jax.jit(on.group_report, static_argnums=1)(new, heads)["block/attn"]
  assert int(report["zero_groups"]) == int(dead.sum())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=str)
def test_half_precision_dtype_kept(dtype):
  params = _spread(_tree(dtype=dtype))
  grads = _grads(params)
  lr, alpha = 0.5, 0.9
  tx = optax.chain(
    optax.sgd(lr), on.prox_group_l2(alpha, lr, groups=on.coupled_groups("**/mlp", NEURONS))
  )
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for leaf in jax.tree.leaves(updates):
    assert leaf.dtype == dtype
  sgd = jax.tree.map(lambda g: (-lr * g.astype(jnp.float32)).astype(dtype), grads)
  u = jax.tree.map(lambda x: np.asarray(x, np.float64), sgd)
  expected, _, _ = _ref_prox(u, params, "block/mlp", NEURONS, alpha, lr)
  for rel, exp in expected.items():
    np.testing.assert_allclose(_np_leaf(updates, f"block/mlp/{rel}"), exp, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_schedules_and_inject_hyperparams():
  params = _tree()
  grads = _grads(params)
  heads = on.coupled_groups("**/attn", HEADS)
  schedule = optax.linear_schedule(0.2, 0.6, 2)
  tx = on.prox_group_l2(schedule, 0.5, groups=heads)
  state = tx.init(params)
  update = jax.jit(tx.update)
  u = jax.tree.map(lambda g: np.asarray(g, np.float64), grads)
  for step in range(3):
    updates, state = update(grads, state, params)
    expected, _, _ = _ref_prox(u, params, "block/attn", HEADS, float(schedule(step)), 0.5)
    for rel, exp in expected.items():
      np.testing.assert_allclose(_np_leaf(updates, f"block/attn/{rel}"), exp, rtol=2e-5, atol=2e-6)
  injected = optax.inject_hyperparams(on.prox_group_l2)(alpha=0.3, learning_rate=0.5, groups=heads)
  istate = injected.init(params)
  istate.hyperparams["alpha"] = jnp.asarray(0.5, jnp.float32)
  updates, _ = jax.jit(injected.update)(grads, istate, params)
  expected, _, _ = _ref_prox(u, params, "block/attn", HEADS, 0.5, 0.5)
  for rel, exp in expected.items():
    np.testing.assert_allclose(_np_leaf(updates, f"block/attn/{rel}"), exp, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_negative_runtime_alpha_gives_nan_and_params_required():
  params, grads = _tree(), _grads(_tree())
  heads = on.coupled_groups("**/attn", HEADS)
  tx = on.prox_group_l2(lambda step: 0.5 - step.astype(jnp.float32), 0.5, groups=heads)
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  updates, _ = tx.update(grads, state, params)
  assert np.all(np.isnan(np.asarray(updates["block"]["attn"]["out"]["kernel"])))
  with pytest.raises(ValueError, match="`params` was not passed"):
    tx.update(grads, state)


def test_mask_must_select_every_member():
  params = _tree()
  heads = on.coupled_groups("**/attn", HEADS)
  with pytest.raises(ValueError, match="'block/attn/out/kernel'.*not selected by `mask`"):
    on.prox_group_l2(1.0, 0.1, groups=heads, mask="**/attn/[qkv]*/kernel").init(params)
  on.prox_group_l2(1.0, 0.1, groups=heads, mask="**/attn/**").init(params)


@pytest.mark.slow
def test_without_groups_unchanged():
  """groups=None is the per-unit prox of before (same numbers, same state)."""
  params = {"kernel": jnp.array([[3.0, 0.5], [4.0, 0.5]])}
  tx = on.prox_group_l2(2.5, 1.0)
  updates, state = tx.update({"kernel": jnp.zeros((2, 2))}, tx.init(params), params)
  assert isinstance(state, optax.EmptyState)
  np.testing.assert_allclose(
    np.asarray(optax.apply_updates(params, updates)["kernel"]), [[1.5, 0.0], [2.0, 0.0]]
  )


# --- group_report ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["flat", "stacked"])
def test_group_report_matches_reference(stacked):
  params = _tree(layers=2 if stacked else None)
  params["block"]["mlp"]["mlp_out"]["kernel"] = (
    params["block"]["mlp"]["mlp_out"]["kernel"].at[..., 1, :].set(0.0)
  )
  # Neuron 1 is zero in mlp_out only: not a zero group until its mlp_in slices are zero too.
  members = _members(stacked)[1]
  neurons = on.coupled_groups("**/mlp", members, stacked=stacked)
  report = jax.jit(on.group_report, static_argnums=1)(params, neurons)["block/mlp"]
  vs = [(_np_leaf(params, f"block/mlp/{r}"), a) for r, a in members.items()]
  np.testing.assert_allclose(
    np.asarray(report["norms"]), np.sqrt(_ref_sq_norms(vs, stacked)), rtol=1e-6
  )
  np.testing.assert_array_equal(np.asarray(report["zero_groups"]), np.zeros(2 if stacked else ()))
  mlp = params["block"]["mlp"]
  mlp["mlp_in"]["kernel"] = mlp["mlp_in"]["kernel"].at[..., 1].set(0.0)
  mlp["mlp_in"]["bias"] = mlp["mlp_in"]["bias"].at[..., 1].set(0.0)
  report = on.group_report(params, neurons)["block/mlp"]
  np.testing.assert_array_equal(np.asarray(report["zero_groups"]), np.ones(2 if stacked else ()))
  assert int(report["size"]) == 2 * IN + 1


# --- prox_adam(groups=...) -----------------------------------------------------------------


def _ref_prox_adam_first_step(grads, params, anchor, members, hp, stacked, eps=1e-8):
  """The first prox_adam update from a fresh state (m̂ = g, v̂ = g², d = |g| + eps) of the
  members of one instance: per coupled group, the float64 root (brentq) of
  Σ z²/(a·t + λ_g)² = 1 over the union of its slices, λ_g = lr·group·√p_g."""
  from scipy.optimize import brentq

  lr, l1, l2, group = hp["learning_rate"], hp["l1"], hp["l2"], hp["group"]
  zs, as_, ws = {}, {}, {}
  size = 0
  for rel, axis in members.items():
    g = _np_leaf(grads, f"{anchor}/{rel}")
    w = _np_leaf(params, f"{anchor}/{rel}")
    d = np.abs(g) + eps
    v = w - lr * g / d
    z = np.sign(d * v) * np.maximum(np.abs(d * v) - lr * l1, 0)
    a = d + 2 * lr * l2
    # Group axis (and layer axis) first, the slice flattened: (L?, G, slice).
    order = [0, axis % w.ndim] if stacked else [axis % w.ndim]
    rest = [i for i in range(w.ndim) if i not in order]
    zs[rel] = np.transpose(z, order + rest).reshape(
      (z.shape[0] if stacked else 1, z.shape[axis % w.ndim], -1)
    )
    as_[rel] = np.transpose(a, order + rest).reshape(zs[rel].shape)
    ws[rel] = (w, order, rest)
    size += zs[rel].shape[-1]
  lam = lr * group * np.sqrt(size)
  xs = {rel: np.zeros_like(z) for rel, z in zs.items()}
  layers, count = next(iter(zs.values())).shape[:2]
  for layer in range(layers):
    for g_ in range(count):
      z = np.concatenate([zs[r][layer, g_] for r in members])
      a = np.concatenate([as_[r][layer, g_] for r in members])
      if np.linalg.norm(z) <= lam:
        continue
      h = lambda t, z=z, a=a: np.sum(z**2 / (a * t + lam) ** 2) - 1
      t = brentq(h, 0.0, np.linalg.norm(z) / a.min(), xtol=1e-300, rtol=1e-15, maxiter=500)
      for r in members:
        xs[r][layer, g_] = zs[r][layer, g_] * t / (as_[r][layer, g_] * t + lam)
  out = {}
  for rel in members:
    w, order, rest = ws[rel]
    shape = [w.shape[i] for i in order + rest]
    x = np.transpose(xs[rel].reshape(shape), np.argsort(order + rest))
    out[rel] = x - w
  return out


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["flat", "stacked"])
def test_prox_adam_coupled_groups_match_brentq_reference(stacked):
  params = _spread(_tree(layers=2 if stacked else None), stacked)
  grads = _grads(params)
  hp = {"learning_rate": 0.1, "l1": 0.05, "l2": 0.1, "group": 1.0}
  head_members, neuron_members = _members(stacked)
  groups = [
    on.coupled_groups("**/attn", head_members, stacked=stacked),
    on.coupled_groups("**/mlp", neuron_members, stacked=stacked),
  ]
  tx = on.prox_adam(**hp, groups=groups)
  state = tx.init(params)
  eager, _ = tx.update(grads, state, params)
  jitted, _ = jax.jit(tx.update)(grads, state, params)
  dead = 0
  for anchor, members in (("block/attn", head_members), ("block/mlp", neuron_members)):
    expected = _ref_prox_adam_first_step(grads, params, anchor, members, hp, stacked)
    new = {r: _np_leaf(params, f"{anchor}/{r}") + expected[r] for r in members}
    axis = next(iter(members.values()))
    first = next(iter(members))
    moved = np.moveaxis(new[first], axis % new[first].ndim, -1)
    layers = moved.shape[0] if stacked else 1
    dead += int(np.sum(np.all(moved.reshape(layers, -1, moved.shape[-1]) == 0, axis=1)))
    for rel, exp in expected.items():
      got = _np_leaf(eager, f"{anchor}/{rel}")
      np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6, err_msg=rel)
      np.testing.assert_allclose(
        _np_leaf(jitted, f"{anchor}/{rel}"), got, rtol=1e-5, atol=1e-6, err_msg=rel
      )
  assert 0 < dead < (H + F) * (2 if stacked else 1)  # Some groups die, some live.
  # The LayerNorm scale (in no group) takes the l1/l2 prox in Adam's metric only.
  g = _np_leaf(grads, "block/ln/scale")
  w = _np_leaf(params, "block/ln/scale")
  d = np.abs(g) + 1e-8
  v = w - hp["learning_rate"] * g / d
  lr = hp["learning_rate"]
  x = np.sign(v) * np.maximum(np.abs(v) - lr * hp["l1"] / d, 0) / (1 + 2 * lr * hp["l2"] / d)
  np.testing.assert_allclose(_np_leaf(eager, "block/ln/scale"), x - w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_prox_adam_groups_exact_zeros_and_errors():
  params = _spread(_tree())
  grads = _grads(params)
  heads = on.coupled_groups("**/attn", HEADS)
  tx = on.prox_adam(0.1, group=1.0, groups=heads)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  report = on.group_report(new, heads)["block/attn"]
  zero = np.asarray(report["norms"]) == 0
  assert 0 < int(report["zero_groups"]) == int(zero.sum()) < H
  with pytest.raises(ValueError, match="`axis` is not read with `groups`"):
    on.prox_adam(0.1, group=0.3, groups=heads, axis=0)
  with pytest.raises(ValueError, match="not selected by `mask`"):
    on.prox_adam(0.1, group=0.3, groups=heads, mask="**/query/**").init(params)
