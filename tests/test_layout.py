"""One layout per leaf: every transform, report and describe_rules read the same stack,
reduced axes and block axis; no silent guess; constraints of one rule hold together.

Each test is named after the defect it covers (the numbered list of the layout issue); each
checks against a float64 NumPy reference or an exact count, never against our own output.
"""

from __future__ import annotations

import fractions
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on
from optax_norms._sparsity import budget_count, traced_budget_count
from optax_norms._units import AmbiguousLayoutError, resolve_layout

RNG = np.random.default_rng(0)


def _tree(path, leaf, tree=None):
  tree = {} if tree is None else tree
  node = tree
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = leaf
  return tree


def _step(tx, params, u):
  """One step with updates `u` (sgd(1) on the gradient -u), the stored values in float64."""
  chain = optax.chain(optax.sgd(1.0), tx)
  grads = jax.tree.map(lambda x: -x, u)
  updates, _ = jax.jit(chain.update)(grads, chain.init(params), params)
  return jax.tree.map(lambda x: np.asarray(x, np.float64), optax.apply_updates(params, updates))


def _sigma(matrix):
  return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)


# --- 1. spectral per layer of a stack ---------------------------------------------------------


@pytest.mark.slow
def test_1_spectral_in_a_rule_is_per_layer_of_a_stack():
  scales = np.asarray([0.16, 3.0, 2.3])[:, None, None]
  base = RNG.normal(size=(3, 6, 5))
  base /= np.stack([_sigma(b)[0] for b in base])[:, None, None]  # each layer σ_max 1
  w = jnp.asarray(scales * base, jnp.float32)
  params = {"blocks": {"mlp": {"kernel": w}}}
  axis = on.unit_axes(stacked="blocks/**")
  rules = [
    ("**", {"spectral_norm": {"max_norm": 1.0, "mode": "scale", "n_iter": 50}, "axis": axis})
  ]
  tx = on.regularize(optax.sgd(1.0), rules)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  got = np.asarray(optax.apply_updates(params, updates)["blocks"]["mlp"]["kernel"], np.float64)
  np.testing.assert_array_equal(got[0], np.asarray(w[0]))  # inside the ball: untouched
  for layer in (1, 2):
    assert _sigma(got[layer])[0] == pytest.approx(1.0, rel=1e-4)
  report = on.spectral_norm_report(params, axis=axis, n_iter=100)["blocks/mlp/kernel"]
  assert report.shape == (3,)
  np.testing.assert_allclose(report, [_sigma(x)[0] for x in np.asarray(w)], rtol=1e-5)


# --- 2. spectral reads the same role rule describe_rules prints ---------------------------------


@pytest.mark.slow
def test_2_spectral_default_axis_uses_the_role_rule_of_an_attention_kernel():
  w = jnp.asarray(RNG.normal(size=(16, 2, 8)), jnp.float32)
  params = {"attn": {"query": {"kernel": w}}}
  text = on.describe_rules([("**", {"spectral_norm": 1.0})], params)
  assert re.search(r"\(0,\)\s+16\s+matrix 16×16", text)
  tx = on.constrain_spectral_norm(1.0, mode="scale", n_iter=100)
  got = _step(tx, params, jax.tree.map(jnp.zeros_like, params))["attn"]["query"]["kernel"]
  assert _sigma(got.reshape(16, 16))[0] <= 1.0 + 1e-6  # the (in, heads·dim) matrix
  stacked = {"attn": {"query": {"kernel": jnp.ones((3, 16, 2, 8))}}}
  with pytest.raises(AmbiguousLayoutError, match="stacked attention kernel"):
    on.constrain_spectral_norm(1.0).init(stacked)
  with pytest.raises(AmbiguousLayoutError):
    on.describe_rules([("**", {"spectral_norm": 1.0})], stacked)


# --- 3. budget counts: the fraction as written --------------------------------------------------


@pytest.mark.slow
def test_3_budget_of_0_57_of_100_is_57_constant_and_schedule():
  w = jnp.asarray(RNG.permutation(100) + 1.0, jnp.float32)
  zero = {"w": jnp.zeros(100)}
  for fraction in (0.57, optax.constant_schedule(0.57)):
    got = _step(on.constrain_sparsity(fraction), {"w": w}, zero)["w"]
    assert int(np.sum(got == 0)) == 57


def _exact_count(fraction32, size):
  """⌊p⌋ of p = fraction·size in exact rational arithmetic, where p just below an integer,
  within a relative 1e-6 (and 1/4) of it, counts as that integer."""
  p = fractions.Fraction(float(fraction32)) * size
  nearest = round(p)
  if nearest > p and (nearest - p) <= min(
    fractions.Fraction(1, 10**6) * p, fractions.Fraction(1, 4)
  ):
    return nearest
  return math.floor(p)


@pytest.mark.parametrize("size", [100, 1000, 2**24 + 3, 3 * 10**8 + 7, 2**31 - 1])
def test_3_traced_budget_count_is_exact_beyond_2_24(size):
  fractions32 = np.concatenate(
    [RNG.uniform(size=40), [0.0, 1.0, 0.57, 0.1, 0.3, 0.7, 0.9, 0.5]]
  ).astype(np.float32)
  counts = jax.jit(jax.vmap(lambda f: traced_budget_count(f, size)))(jnp.asarray(fractions32))
  want = [_exact_count(f, size) for f in fractions32]
  np.testing.assert_array_equal(np.asarray(counts), want)
  # A constant gives the same count as the schedule of its float32 value.
  assert [budget_count(float(f), size) for f in fractions32[-6:]] == want[-6:]


@pytest.mark.slow
def test_3_sparsity_budget_is_per_layer_of_a_stack():
  w = jnp.asarray(RNG.normal(size=(3, 10, 10)) * np.asarray([0.01, 1.0, 100.0])[:, None, None])
  w = w.astype(jnp.float32)
  params = {"blocks": {"kernel": w}}
  tx = on.constrain_sparsity(0.57, axis=on.unit_axes(stacked="blocks/**"))
  got = _step(tx, params, jax.tree.map(jnp.zeros_like, params))["blocks"]["kernel"]
  for layer in range(3):  # 57 of each layer's 100, the smallest of that layer
    zeros = got[layer] == 0
    assert int(zeros.sum()) == 57
    mags = np.abs(np.asarray(w[layer], np.float64))
    assert mags[zeros].max() <= mags[~zeros].min()


# --- 4. composition inside one rule -------------------------------------------------------------

C = 0.8
CONSTRAINTS = {
  "non_negative": (True, lambda w, k: np.all(w >= 0)),
  "max_abs": (0.3, lambda w, k: np.all(np.abs(w) <= 0.3)),
  "n_of_m": ((2, 4), lambda w, k: np.all(np.sum(w.reshape(2, 4, -1) != 0, axis=1) <= 2)),
  "sparsity": (0.4, lambda w, k: np.sum(w == 0) >= math.floor(0.4 * w.size)),
  "unit_norm": (
    True,
    lambda w, k: np.all((_norms(w) == 0) | ((_norms(w) <= 1) & (_norms(w) >= 1 - 1e-5))),
  ),
  "min_max_norm": (
    {"min_norm": 0.5, "max_norm": 1.0},
    lambda w, k: np.all((_norms(w) == 0) | ((_norms(w) <= 1) & (_norms(w) >= 0.5 - 1e-5))),
  ),
  "spectral_norm": (
    {"max_norm": C, "mode": "scale", "n_iter": 60},
    lambda w, k: _sigma(w)[0] <= C * (1 + 1e-5),
  ),
  "max_norm": (C, lambda w, k: np.all(_norms(w) <= C)),
}


def _norms(w):
  return np.sqrt(np.sum(w * w, axis=0))


def _draw(seed):
  """An (8, 6) kernel whose units span tiny, ordinary and large norms, mixed signs."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(8, 6)) * np.asarray([1e-3, 0.1, 0.5, 1.0, 3.0, 30.0])).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("pair", list(itertools.combinations(CONSTRAINTS, 2)), ids=str)
def test_4_every_pair_of_constraints_in_one_rule_holds_or_is_refused(pair):
  settings = {name: CONSTRAINTS[name][0] for name in pair}
  rules = [("**", settings)]
  try:
    tx = on.regularize(optax.sgd(1.0), rules)
  except ValueError as error:
    assert "cannot hold together" in str(error)
    assert pair in REFUSED or pair[::-1] in REFUSED, (pair, str(error))
    return
  assert pair not in REFUSED and pair[::-1] not in REFUSED, pair
  for seed in range(3):
    w = jnp.asarray(_draw(seed))
    u = jnp.asarray(_draw(seed + 10) * 0.5)
    params = {"dense": {"kernel": w}}
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)({"dense": {"kernel": -u}}, state, params)
    stored = np.asarray(optax.apply_updates(params, updates)["dense"]["kernel"], np.float64)
    for name in pair:
      assert CONSTRAINTS[name][1](stored, name), (pair, name, seed)


REFUSED = {
  ("max_abs", "unit_norm"),
  ("max_abs", "min_max_norm"),
  ("unit_norm", "spectral_norm"),
  ("min_max_norm", "spectral_norm"),
  ("unit_norm", "max_norm"),  # max_norm 0.8 < 1
}


def test_4_spectral_clip_with_a_pattern_and_prox_with_prox_adam_are_refused():
  with pytest.raises(ValueError, match="'mode': 'scale'"):
    on.regularize(optax.sgd(1.0), [("**", {"spectral_norm": 1.0, "sparsity": 0.5})])
  with pytest.raises(ValueError, match="prox_adam"):
    on.regularize(on.prox_adam(0.1, l1=0.1), [("**", {"prox_l1": 0.1})], learning_rate=0.1)


# --- 5. stacked Conv kernels, LoRA factors, biases: no silent reading ----------------------------


@pytest.mark.parametrize(
  "tree, path",
  [
    (
      {"blocks": {"conv": {"kernel": jnp.ones((3, 3, 3, 2, 5)), "bias": jnp.ones((3, 5))}}},
      "blocks/conv/kernel",
    ),
    ({"blocks": {"lora": {"lora_a": jnp.ones((3, 16, 4))}}}, "blocks/lora/lora_a"),
    ({"blocks": {"mlp": {"bias": jnp.ones((3, 16))}}}, "blocks/mlp/bias"),
  ],
)
def test_5_stacked_conv_lora_and_bias_raise_with_the_default_axis(tree, path):
  for tx in (on.constrain_row_norm(1.0, mask=path), on.constrain_n_of_m(2, 4, mask=path)):
    with pytest.raises(AmbiguousLayoutError, match=re.escape(repr(path))) as info:
      tx.init(tree)
    assert any(layout.stack == (0,) for _, _, layout in info.value.readings)
  # The stacked fix reads one set of units per layer.
  axis = on.unit_axes(stacked="blocks/**")
  leaf = jax.tree.leaves(tree)[-1] if path.endswith("kernel") else jax.tree.leaves(tree)[0]
  assert resolve_layout(axis, tuple(path.split("/")), leaf).stack == (0,)


def test_5_an_unstacked_conv_kernel_with_its_bias_reads_as_a_conv():
  tree = {"conv": {"kernel": jnp.ones((3, 3, 2, 5)), "bias": jnp.ones(5)}}
  shapes = {("conv", "kernel"): (3, 3, 2, 5), ("conv", "bias"): (5,)}
  assert resolve_layout(None, ("conv", "kernel"), tree["conv"]["kernel"], shapes=shapes).reduce == (
    0,
    1,
    2,
  )


# --- 6. N:M blocks along the input axis of each layer, settable from a rule ----------------------


@pytest.mark.slow
def test_6_n_of_m_in_a_rule_blocks_along_the_input_axis_of_a_stacked_attention_kernel():
  w = jnp.asarray(RNG.normal(size=(2, 8, 4, 3)), jnp.float32)  # (layers, in, heads, dim)
  params = {"blocks": {"attn": {"query": {"kernel": w}}}}
  axis = on.unit_axes(stacked="blocks/**")
  zero = jax.tree.map(jnp.zeros_like, params)
  for setting, block in [((2, 4), 1), ({"n": 2, "m": 4, "block_axis": 2}, 2)]:
    rules = [("**", {"n_of_m": setting, "axis": axis})]
    assert f"2:4 along axis {block}" in on.describe_rules(rules, params)
    tx = on.regularize(optax.sgd(1.0), rules)
    updates, _ = tx.update(zero, tx.init(params), params)
    got = np.asarray(optax.apply_updates(params, updates)["blocks"]["attn"]["query"]["kernel"])
    moved = np.moveaxis(got, block, -1).reshape(-1, 4)
    np.testing.assert_array_equal(np.sum(moved != 0, axis=1), 2)
    ref = np.moveaxis(np.asarray(w), block, -1).reshape(-1, 4)
    keep = np.sort(np.argsort(-np.abs(ref), axis=1, kind="stable")[:, :2], axis=1)
    np.testing.assert_array_equal(np.sort(np.argwhere(moved != 0)[:, 1].reshape(-1, 2)), keep)


# --- 8. lr_scale is the group's learning-rate multiplier, prox thresholds included ---------------


def test_8_lr_scale_with_prox_l1_converges_to_the_lasso_minimiser():
  # f(w) = ½(w − 1)² + λ|w|, λ = 0.5: the minimiser is soft(1, 0.5) = 0.5.
  params = {"w": jnp.zeros(1)}
  lr, scale, lam = 0.5, 0.1, 0.5
  tx = on.regularize(optax.sgd(lr), [("**", {"lr_scale": scale, "prox_l1": lam})], learning_rate=lr)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.tree.map(lambda w: w - 1.0, p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(400):
    params, state = step(params, state)
  assert float(params["w"][0]) == pytest.approx(0.5, abs=1e-5)


# --- 9. and 15. every named fix gives the reading it names; torch weights ------------------------

AMBIGUOUS = [
  (("DenseGeneral_0", "kernel"), (16, 2, 8)),
  (("qkv", "kernel"), (16, 2, 8)),
  (("blocks", "mlp", "kernel"), (3, 16, 64)),
  (("blocks", "attn", "query", "kernel"), (3, 16, 2, 8)),
  (("conv", "weight"), (8, 3, 5, 5)),
  (("embed", "embedding"), (3, 50, 16)),
  (("blocks", "ln", "scale"), (3, 16)),
]


@pytest.mark.parametrize("path, shape", AMBIGUOUS, ids=str)
def test_9_each_fix_an_ambiguity_error_names_gives_its_reading(path, shape):
  leaf = jnp.ones(shape)
  with pytest.raises(AmbiguousLayoutError) as info:
    resolve_layout(None, path, leaf)
  message = str(info.value)
  assert repr("/".join(path)) in message and str(shape) in message
  assert len(info.value.readings) >= 2
  for what, fix, layout in info.value.readings:
    assert f"axis={fix}" in message
    got = resolve_layout(eval(fix, {"optax_norms": on}), path, leaf)  # noqa: S307
    assert (got.stack, got.reduce) == (layout.stack, layout.reduce), what


def test_9_dense_general_with_two_output_axes_is_not_read_silently_by_unit_axes():
  leaf = jnp.ones((16, 2, 8))
  for path in (("DenseGeneral_0", "kernel"), ("qkv", "kernel")):
    with pytest.raises(AmbiguousLayoutError) as info:
      on.unit_axes()(path, leaf)
    readings = {layout.reduce for _, _, layout in info.value.readings}
    assert (0,) in readings  # the (in, heads, dim) reading is offered, with its fix


@pytest.mark.slow
def test_15_torch_weights_read_as_out_in():
  w = jnp.asarray(RNG.normal(size=(6, 10)) * 3, jnp.float32)  # an Equinox Linear (out, in)
  params = {"linear": {"weight": w}}
  got = _step(on.constrain_row_norm(1.0), params, jax.tree.map(jnp.zeros_like, params))
  rows = np.linalg.norm(got["linear"]["weight"], axis=1)  # one unit per output row
  assert np.all(rows <= 1.0) and np.all(rows >= 1.0 - 1e-5)
  conv = {"conv": {"weight": jnp.asarray(RNG.normal(size=(4, 3, 3, 3)), jnp.float32)}}
  with pytest.raises(AmbiguousLayoutError):
    on.constrain_spectral_norm(1.0).init(conv)
  report = on.spectral_norm_report(conv, axis=on.unit_axes("torch"), n_iter=200)["conv/weight"]
  torch_matrix = np.asarray(conv["conv"]["weight"]).reshape(4, -1)  # torch's (out, in·h·w)
  assert float(report) == pytest.approx(_sigma(torch_matrix)[0], rel=1e-5)


# --- 10. and 13. wrappers and None updates --------------------------------------------------------


def test_10_describe_rules_of_a_wrapped_transform_says_so():
  tx = on.regularize(optax.sgd(0.1), [("**", {"l2": 1e-4})])
  params = {"w": jnp.ones(2)}
  for wrapped in (optax.MultiSteps(tx, 2), optax.chain(tx)):
    with pytest.raises(ValueError, match="not a .* that wraps it"):
      on.describe_rules(wrapped, params)


NONE_CASES = {
  "add_l2_decay": lambda: on.add_l2_decay(1e-3),
  "clip_by_row_norm": lambda: on.clip_by_row_norm(1.0),
  "constrain_row_norm": lambda: on.constrain_row_norm(1.0),
  "constrain_spectral_norm": lambda: on.constrain_spectral_norm(1.0),
  "constrain_sparsity": lambda: on.constrain_sparsity(0.5),
  "constrain_n_of_m": lambda: on.constrain_n_of_m(1, 2),
  "prox_l1": lambda: on.prox_l1(0.1, 0.1),
  "prox_adam": lambda: on.prox_adam(0.1, l1=0.1),
}


@pytest.mark.parametrize("name", list(NONE_CASES))
def test_13_update_of_none_returns_none_as_optax(name):
  tx = NONE_CASES[name]()
  params = {"kernel": jnp.ones((4, 2))}
  state = tx.init(params)
  updates, new_state = tx.update(None, state, params)
  assert updates is None
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


# --- describe_rules prints what runs: checked by perturbing one entry ---------------------------


def _transformer():
  rng = np.random.default_rng(7)
  f = lambda *s: jnp.asarray(rng.normal(size=s) * 3, jnp.float32)  # noqa: E731
  return {
    "blocks": {
      "attn": {"query": {"kernel": f(2, 8, 2, 4)}, "key": {"kernel": f(2, 8, 2, 4)}},
      "mlp_in": {"kernel": f(2, 8, 12)},
      "mlp_out": {"kernel": f(2, 12, 8)},
    },
    "embed": {"embedding": f(10, 8)},
  }


AXIS = on.unit_axes(stacked="blocks/**")
RULES = [
  ("blocks/attn/query/kernel", {"max_norm": 1.0, "axis": AXIS}),
  ("blocks/attn/key/kernel", {"spectral_norm": {"max_norm": 1.0, "mode": "scale"}, "axis": AXIS}),
  ("blocks/mlp_in/kernel", {"n_of_m": (2, 4), "axis": AXIS}),
  ("blocks/mlp_out/kernel", {"sparsity": 0.5, "axis": AXIS}),
  ("embed/embedding", {"max_norm": 1.0, "axis": AXIS}),
]


def _printed(text):
  """{path: (stack, reduce, reads)} parsed from describe_rules' table."""
  lines = text.splitlines()
  header = lines[0]
  starts = [header.index(c) for c in ("stack", "axes", "units", "reads")]
  out = {}
  for line in lines[1:]:
    path = line.split()[0]
    cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
    parse = lambda t: tuple(int(x) for x in re.findall(r"\d+", t))  # noqa: E731
    out[path] = (parse(cells[0]), parse(cells[1]), cells[3])
  return out


def _with_leaf(tree, path, value):
  """A copy of the nested dict `tree` with the leaf at the ``/``-joined `path` replaced."""
  head, *rest = path.split("/")
  return {
    k: (_with_leaf(v, "/".join(rest), value) if rest else value) if k == head else v
    for k, v in tree.items()
  }


def _get(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _moved_entries(step, state, params, base, path, index):
  """The entries of the leaf at `path`, other than `index`, whose stored value changes when
  the update at `index` is bumped (the bump makes it the largest of its unit, block, layer)."""
  leaf = _get(params, path)
  bump = np.zeros(leaf.shape, np.float32)
  bump[index] = 50.0
  grads = _with_leaf(jax.tree.map(jnp.zeros_like, params), path, jnp.asarray(-bump))
  new = optax.apply_updates(params, step(grads, state, params)[0])
  changed = np.asarray(_get(new, path)) != np.asarray(_get(base, path))
  changed[index] = False
  return [tuple(i) for i in np.argwhere(changed)]


@pytest.mark.slow
def test_describe_rules_layouts_are_what_the_transforms_read():
  params = _transformer()
  printed = _printed(on.describe_rules(RULES, params))
  tx = on.regularize(optax.sgd(1.0), RULES)
  state = tx.init(params)
  step = jax.jit(tx.update)
  zero = jax.tree.map(jnp.zeros_like, params)
  base = optax.apply_updates(params, step(zero, state, params)[0])
  for path in on.tree_paths(params):
    leaf = _get(params, path)
    stack, reduce, reads = printed[path]
    # The smallest entry: pruned by N:M and by the budget, so its bump moves another entry.
    index = np.unravel_index(np.argmin(np.abs(np.asarray(leaf))), leaf.shape)
    moved = _moved_entries(step, state, params, base, path, index)
    assert moved, path  # the perturbation acted beyond its own entry
    others = [a for a in range(leaf.ndim) if a not in stack]
    for i in moved:
      assert all(i[a] == index[a] for a in stack), (path, "left its layer")
      if "along axis" in reads:  # one block of 4 along the printed axis
        block = int(reads.split("along axis ")[1])
        assert i[block] // 4 == index[block] // 4, path
        assert all(i[a] == index[a] for a in others if a != block), path
      elif not ("matrix" in reads or "zero" in reads):  # a unit: the printed reduced axes
        assert all(i[a] == index[a] for a in others if a not in reduce), path
    if not reads:
      assert len(moved) == math.prod(leaf.shape[a] for a in reduce) - 1, path
