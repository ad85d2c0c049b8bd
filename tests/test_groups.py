"""regularize(optimizer, rules) and describe_rules: equivalence with the hand-written chain of
single masked transforms (Linen MLP, NNX transformer with stacked blocks), errors,
nnx.Optimizer, orbax, schedules."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_norms as on

ocp = pytest.importorskip("orbax.checkpoint")

STEPS = 20


def _assert_close(a, b, rtol=2e-6, atol=2e-7):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for path, x, y in zip(on.tree_paths(a), jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=path)


def _train(tx, params, loss, steps=STEPS, start=0, state=None):
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(params, state, i):
    grads = jax.grad(loss)(params, i)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(start, start + steps):
    params, state = step(params, state, i)
  return params, state


def _decoupled(decay, lr, mask):
  """Hand-written decoupled decay after the optimizer: u - lr*decay*w."""
  return optax.masked(optax.add_decayed_weights(-lr * decay), on.path_mask(mask))


# --- Linen MLP --------------------------------------------------------------------------------


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.LayerNorm()(x)
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def _linen_setup():
  model = MLP()
  x = jax.random.normal(jax.random.key(1), (32, 6))
  y = jax.random.normal(jax.random.key(2), (32, 3))
  params = model.init(jax.random.key(0), x)["params"]

  def loss(p, i):
    return jnp.mean((model.apply({"params": p}, x * (1 + 0.01 * i)) - y) ** 2)

  return params, loss


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax's adam and schedules
def test_regularize_equals_hand_written_chain_linen_mlp_3_groups_20_adam_steps():
  params, loss = _linen_setup()
  lr = optax.linear_schedule(3e-2, 1e-2, STEPS)
  l1 = optax.linear_schedule(1e-3, 1e-4, STEPS)
  rules = [
    ("Dense_0/kernel", {"clip_max_abs": 0.05, "l1": l1, "prox_l1": 0.5, "max_abs": 0.4}),
    ("Dense_1/kernel", {"clip_unit_norm": 0.1, "l2": 1e-2, "max_norm": 0.8, "prox_group": 0.5}),
    ("Dense_2/**", {"lr_scale": 0.5, "decoupled_decay": 0.2}),
    ("**", None),
  ]
  ours, _ = _train(on.regularize(optax.adam(lr), rules, learning_rate=lr), params, loss)
  hand = optax.chain(
    on.clip_by_max_abs(0.05, mask="Dense_0/kernel"),
    on.clip_by_row_norm(0.1, mask="Dense_1/kernel"),
    on.add_l2_decay(1e-2, mask="Dense_1/kernel"),
    on.add_l1_decay(l1, mask="Dense_0/kernel"),
    optax.adam(lr),
    optax.masked(optax.scale(0.5), on.path_mask("Dense_2/**")),
    # decoupled decay with the group's scheduled step size: u - lr(k)*lr_scale*0.2*w
    optax.masked(_scheduled_decay(lambda k: lr(k) * 0.5, 0.2), on.path_mask("Dense_2/**")),
    on.prox_l1(0.5, lr, mask="Dense_0/kernel"),
    on.prox_group_l2(0.5, lr, mask="Dense_1/kernel"),
    on.constrain_row_norm(0.8, mask="Dense_1/kernel"),
    on.constrain_max_abs(0.4, mask="Dense_0/kernel"),
  )
  reference, _ = _train(hand, params, loss)
  _assert_close(ours, reference)
  # The settings acted: zeros from prox_l1, the bounds hold, the decay moved Dense_2.
  assert np.mean(np.asarray(ours["Dense_0"]["kernel"]) == 0) > 0.05
  assert np.max(np.abs(ours["Dense_0"]["kernel"])) <= 0.4
  assert np.max(np.linalg.norm(ours["Dense_1"]["kernel"], axis=0)) <= 0.8
  plain, _ = _train(optax.adam(lr), params, loss)
  assert not np.allclose(plain["Dense_2"]["kernel"], ours["Dense_2"]["kernel"], atol=1e-4)


def _scheduled_decay(lr, decay):
  """u - lr(count)*decay*w: a hand-written decoupled decay with a scheduled lr."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    factor = lr(state.count) * decay
    new = jax.tree.map(lambda u, w: u - factor * w, updates, params)
    return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


# --- NNX transformer with stacked blocks -----------------------------------------------------


class Block(nnx.Module):
  def __init__(self, d, heads, rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    # No attention biases: the key bias has a zero gradient (softmax is shift-invariant), so
    # adam would turn its rounding noise into full steps and the two runs could not agree.
    self.attn = nnx.MultiHeadAttention(heads, d, decode=False, use_bias=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.mlp_in = nnx.Linear(d, 4 * d, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x))))


class Transformer(nnx.Module):
  """Embedding, a stack of blocks made with nnx.vmap (every block leaf has a leading layer
  axis), run with nnx.scan, a final LayerNorm and a head."""

  def __init__(self, rngs, vocab=32, d=16, heads=2, layers=3):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(d, heads, rngs)

    self.blocks = make(rngs)
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(self.ln(body(x, self.blocks)))


TOKENS = jax.random.randint(jax.random.key(3), (4, 7), 0, 32)
TARGETS = jax.random.randint(jax.random.key(4), (4, 7), 0, 32)
AXIS = on.unit_axes(stacked="blocks/**")
LR = 1e-2


def _transformer_rules(axis=AXIS, lr_scale=0.5):
  return [
    ("blocks/attn/*/kernel", {"l2": 1e-3, "max_norm": 0.5, "axis": axis}),
    (
      ["blocks/mlp_*/kernel", "head/kernel"],
      {"clip_unit_norm": 0.05, "decoupled_decay": 0.1, "prox_group": 1e-2, "axis": axis},
    ),
    (
      "embed/embedding",
      {"lr_scale": lr_scale, "prox_l1": 1e-3, "max_abs": 0.05, "max_norm": 0.2, "axis": axis},
    ),
    ("**", None),
  ]


def _transformer_hand_chain():
  attn, mlp, emb = "blocks/attn/*/kernel", ["blocks/mlp_*/kernel", "head/kernel"], "embed/embedding"
  return optax.chain(
    on.clip_by_row_norm(0.05, axis=AXIS, mask=mlp),
    on.add_l2_decay(1e-3, mask=attn),
    optax.adam(LR),
    optax.masked(optax.scale(0.5), on.path_mask(emb)),
    _decoupled(0.1, LR, mlp),
    on.prox_l1(1e-3, LR * 0.5, mask=emb),  # the group's step size: lr·lr_scale
    on.prox_group_l2(1e-2, LR, axis=AXIS, mask=mlp),
    on.constrain_max_abs(0.05, mask=emb),  # pattern constraints first, then rescaling ones
    on.constrain_row_norm(0.5, axis=AXIS, mask=attn),
    on.constrain_row_norm(0.2, axis=AXIS, mask=emb),
  )


def _nnx_functional():
  model = Transformer(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, i):
    del i
    logits = nnx.merge(graphdef, p, rest)(TOKENS)
    return optax.softmax_cross_entropy_with_integer_labels(logits, TARGETS).mean()

  return model, params, loss


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax's adam
def test_regularize_equals_hand_written_chain_nnx_transformer_stacked_3_groups_20_adam_steps():
  _, params, loss = _nnx_functional()
  ours, _ = _train(
    on.regularize(optax.adam(LR), _transformer_rules(), learning_rate=LR), params, loss
  )
  reference, _ = _train(_transformer_hand_chain(), params, loss)
  # 20 adam steps amplify float32 rounding differences between two compiled chains.
  _assert_close(ours, reference, atol=1e-6)
  # Per-layer, per-(head, dim) units of the stacked attention kernels are inside the ball.
  q = np.asarray(ours["blocks"]["attn"]["query"]["kernel"], np.float64)
  assert q.shape == (3, 16, 2, 8)
  assert np.max(np.sqrt(np.sum(q * q, axis=1))) <= 0.5
  emb = np.asarray(ours["embed"]["embedding"], np.float64)
  assert np.max(np.linalg.norm(emb, axis=1)) <= 0.2 and np.max(np.abs(emb)) <= 0.05


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_regularize_inside_nnx_optimizer_equals_functional_run():
  model, params, loss = _nnx_functional()
  reference, _ = _train(
    on.regularize(optax.adam(LR), _transformer_rules(), learning_rate=LR), params, loss, steps=5
  )
  optimizer = nnx.Optimizer(
    model, on.regularize(optax.adam(LR), _transformer_rules(), learning_rate=LR), wrt=nnx.Param
  )

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(
      lambda m: optax.softmax_cross_entropy_with_integer_labels(m(TOKENS), TARGETS).mean()
    )(model)
    optimizer.update(model, grads)

  for _ in range(5):
    step(model, optimizer)
  _assert_close(nnx.state(model, nnx.Param), reference)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_regularize_state_round_trips_with_orbax_and_resumes_bit_identical(tmp_path):
  params, loss = _linen_setup()
  lr = optax.cosine_decay_schedule(3e-2, STEPS)

  def make():
    return on.regularize(
      optax.adam(lr),
      [
        ("Dense_0/kernel", {"l2": optax.linear_schedule(1e-2, 0.0, STEPS), "prox_l1": 1e-2}),
        ("**/kernel", {"max_norm": optax.linear_schedule(2.0, 0.5, STEPS), "decoupled_decay": 0.1}),
        ("**", None),
      ],
      learning_rate=lr,
    )

  full, full_state = _train(make(), params, loss)
  half, half_state = _train(make(), params, loss, steps=STEPS // 2)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": half, "opt_state": half_state})
  checkpointer.wait_until_finished()
  fresh = make()
  target = jax.eval_shape(lambda p: {"params": p, "opt_state": fresh.init(p)}, params)
  restored = ocp.StandardCheckpointer().restore(tmp_path / "ckpt", target)
  resumed, resumed_state = _train(
    fresh,
    restored["params"],
    loss,
    steps=STEPS - STEPS // 2,
    start=STEPS // 2,
    state=restored["opt_state"],
  )
  for a, b in zip(jax.tree.leaves((resumed, resumed_state)), jax.tree.leaves((full, full_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_regularize_schedules_in_settings_follow_the_step():
  # lr_scale as a schedule: 0 for the first step, then 1: the group moves from step 2 only.
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
  scale = lambda k: jnp.where(k >= 1, 1.0, 0.0)  # noqa: E731
  tx = on.regularize(optax.sgd(0.1), [("a/**", {"lr_scale": scale}), ("**", None)])
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, params)
  first, state = step(grads, state, params)
  second, state = step(grads, state, params)
  np.testing.assert_array_equal(first["a"]["kernel"], 0.0)
  np.testing.assert_allclose(second["a"]["kernel"], -0.1)
  np.testing.assert_allclose(first["b"]["kernel"], -0.1)


@pytest.mark.slow
def test_describe_rules_of_the_nnx_transformer():
  _, params, _ = _nnx_functional()
  tx = on.regularize(optax.sgd(LR), _transformer_rules(), learning_rate=LR)
  text = on.describe_rules(tx, params)
  assert text == on.describe_rules(_transformer_rules(), params)
  lines = {line.split()[0]: line for line in text.splitlines()[1:]}
  assert len(lines) == len(on.tree_paths(params))
  query = lines["blocks/attn/query/kernel"]
  assert "(3, 16, 2, 8)" in query and "0 'blocks/attn/*/kernel'" in query
  # stack, reduced axes, units per layer
  assert "l2=0.001 max_norm=0.5" in query and re.search(r"\(0,\)\s+\(1,\)\s+3 layers × 16", query)
  out = lines["blocks/attn/out/kernel"]
  assert re.search(r"\(0,\)\s+\(1, 2\)\s+3 layers × 16", out)
  assert lines["embed/embedding"].split()[-2:] == ["(1,)", "32"]  # one unit per token
  assert "3 '**'" in lines["blocks/ln1/scale"] and lines["blocks/ln1/scale"].rstrip().endswith("-")


# --- errors ----------------------------------------------------------------------------------

PARAMS = {
  "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
  "norm": {"scale": jnp.ones(2)},
  "step": jnp.zeros((), jnp.int32),
}


def test_error_uncovered_leaf_lists_the_unmatched_paths():
  tx = on.regularize(optax.sgd(0.1), [("**/kernel", {"l2": 1e-4})])
  with pytest.raises(ValueError) as info:
    tx.init(PARAMS)
  message = str(info.value)
  assert "No rule matches the floating-point parameter(s) 'dense/bias', 'norm/scale'" in message
  assert "'step'" not in message.split("Rules:")[0]  # integer leaves need no rule
  assert "('**', None)" in message


def test_error_rule_matching_nothing():
  tx = on.regularize(optax.sgd(0.1), [("**/kernal", {"l2": 1e-4}), ("**", None)])
  with pytest.raises(
    ValueError, match=r"Rule 0 \('\*\*/kernal'\): The glob '\*\*/kernal' matches no"
  ):
    tx.init(PARAMS)
  tx = on.regularize(optax.sgd(0.1), [("**", None), ("dense/kernel", {"l2": 1e-4})])
  with pytest.raises(
    ValueError,
    match=r"Rule 1 \('dense/kernel'\) matches no leaf: every parameter "
    r"it selects \('dense/kernel'\) is taken by an earlier rule",
  ):
    tx.init(PARAMS)
  tx = on.regularize(optax.sgd(0.1), [("step", {"l2": 1e-4}), ("**", None)])
  with pytest.raises(ValueError, match=r"Rule 0 \('step'\) matches no floating-point parameter"):
    tx.init(PARAMS)


def test_error_unknown_setting_names_key_and_lists_valid_ones():
  with pytest.raises(ValueError) as info:
    on.regularize(optax.sgd(0.1), [("**/kernel", {"l2_decay": 1e-4}), ("**", None)])
  message = str(info.value)
  assert "unknown setting 'l2_decay'" in message and "Did you mean 'l2'?" in message
  from optax_norms._groups import SETTINGS

  valid = ", ".join(sorted([*SETTINGS, "axis", "groups"]))
  assert f"Valid settings: {valid}." in message and "clip_max_abs, clip_unit_norm" in message


@pytest.mark.slow
def test_error_ambiguous_unit_of_a_stacked_kernel_with_default_axis():
  _, params, _ = _nnx_functional()
  tx = on.regularize(optax.sgd(0.1), _transformer_rules(axis=None), learning_rate=0.1)
  # The first per-unit setting in the chain is clip_unit_norm on the stacked MLP kernels.
  with pytest.raises(
    ValueError,
    match=r"The layout of the parameter 'blocks/mlp_in/kernel' of "
    r"shape \(3, 16, 64\) is ambiguous",
  ) as info:
    tx.init(params)
  assert (
    "a stacked Dense kernel (layers, in, out) (stack (0,), reduce (1,)): "
    "axis=optax_norms.unit_axes(stacked='blocks/**')" in str(info.value)
  )
  with pytest.raises(ValueError, match="ambiguous"):
    on.describe_rules(_transformer_rules(axis=None), params)


def test_error_missing_learning_rate():
  with pytest.raises(
    ValueError,
    match=r"Rule 0 \('\*\*/kernel'\), setting 'prox_l1' needs the "
    r"optimizer's learning rate: pass regularize\(optimizer, rules, learning_rate=...\)",
  ):
    on.regularize(optax.sgd(0.1), [("**/kernel", {"prox_l1": 1e-4}), ("**", None)])
  for key in ("decoupled_decay", "prox_group"):
    with pytest.raises(ValueError, match=f"setting '{key}' needs"):
      on.regularize(optax.sgd(0.1), [("**/kernel", {key: 1e-4}), ("**", None)])


def test_error_bad_values_and_tables():
  with pytest.raises(
    ValueError, match=r"Rule 0 \('\*\*/kernel'\), setting 'l2': `alpha` must be non-negative"
  ):
    on.regularize(optax.sgd(0.1), [("**/kernel", {"l2": -1.0}), ("**", None)])
  with pytest.raises(ValueError, match=r"Rule 0 \('\*\*/kernel'\): `axis` must be"):
    on.regularize(optax.sgd(0.1), [("**/kernel", {"max_norm": 1.0, "axis": 1.5}), ("**", None)])
  with pytest.raises(TypeError, match="non-empty list of"):
    on.regularize(optax.sgd(0.1), {"**": None})
  with pytest.raises(TypeError, match=r"Rule 0 must be a \(selector, settings\) pair"):
    on.regularize(optax.sgd(0.1), ["**"])
  with pytest.raises(TypeError, match="settings must be a dict or None"):
    on.regularize(optax.sgd(0.1), [("**", 1e-4)])
  with pytest.raises(ValueError, match="Malformed glob"):
    on.regularize(optax.sgd(0.1), [("a//b", None)])
  tx = on.regularize(
    optax.sgd(0.1), [("**", {"max_norm": 1.0, "axis": on.unit_axes(stacked="blokcs/**")})]
  )
  with pytest.raises(ValueError, match=r"stacked glob 'blokcs/\*\*'"):
    tx.init(PARAMS)
  with pytest.raises(ValueError, match="describe_rules takes the rules"):
    on.describe_rules(optax.chain(tx), PARAMS)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_path_mask_selectors_and_none_settings_leave_leaves_alone():
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  tx = on.regularize(
    optax.sgd(1.0),
    [
      (on.path_mask("**", where=lambda path, leaf: leaf.ndim == 2), {"max_abs": 0.5}),
      (["dense/bias"], {}),
    ],
  )
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["dense"]["kernel"], 0.5)
  np.testing.assert_array_equal(new["dense"]["bias"], 1.0)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_readme_transformer_example_runs_and_prints_the_table_shown(capsys):
  import pathlib
  import re

  readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
  section = readme.split("## Regularizing a transformer", 1)[1]
  code, table = re.findall(r"```(?:python)?\n(.*?)```", section, re.DOTALL)[:2]
  exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
  printed = capsys.readouterr().out
  assert printed.startswith(table)
  per_layer = np.array([float(v) for v in printed[len(table) :].strip().strip("[]").split()])
  assert per_layer.shape == (2,) and np.all(per_layer <= 2.0)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_regularize_under_jit_with_named_sharding_keeps_shardings():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
  params = {
    "dense": {
      "kernel": jax.device_put(jnp.ones((4, 2)), spec),
      "bias": jax.device_put(
        jnp.ones(2), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
      ),
    }
  }
  tx = on.regularize(optax.adam(0.1), [("**/kernel", {"max_norm": 1.0, "l2": 1e-3}), ("**", None)])
  state = jax.jit(tx.init)(params)
  updates, _ = jax.jit(tx.update)(params, state, params)
  assert updates["dense"]["kernel"].sharding.is_equivalent_to(spec, 2)
  new = optax.apply_updates(params, updates)
  assert np.max(np.linalg.norm(np.asarray(new["dense"]["kernel"]), axis=0)) <= 1.0


@pytest.mark.slow
@pytest.mark.standard_promotion  # prox_adam's bias correction follows optax (not strict-clean).
def test_newer_transforms_are_reachable_from_rules_with_prox_adam_as_the_optimizer():
  """spectral_norm, min_max_norm, n_of_m, sparsity and non_negative settings, around
  prox_adam; each bound checked on the stored values with NumPy."""
  rng = np.random.default_rng(0)
  params = {k: {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)} for k in "abc"}
  params["bias"] = jnp.zeros(4)
  rules = [
    ("a/kernel", {"spectral_norm": 1.0}),
    ("b/kernel", {"min_max_norm": {"min_norm": 0.5, "max_norm": 1.0}, "n_of_m": (2, 4)}),
    ("c/kernel", {"sparsity": 0.5, "non_negative": True}),
    ("**", None),
  ]
  tx = on.regularize(on.prox_adam(1e-2, l1=1e-3), rules, learning_rate=1e-2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(30):
    grads = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), w.dtype), params)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  sigma = np.linalg.svd(np.asarray(params["a"]["kernel"], np.float64), compute_uv=False).max()
  assert sigma <= 1.0 * 1.01  # power iteration, one round per step
  b = np.asarray(params["b"]["kernel"], np.float64)
  assert np.all((b.reshape(2, 4, 4) != 0).sum(axis=1) <= 2)  # 2:4 along the input axis
  c = np.asarray(params["c"]["kernel"], np.float64)
  assert np.all(c >= 0) and (c == 0).sum() >= c.size // 2
  with pytest.raises(ValueError, match=r"`unit_norm` takes True"):
    on.regularize(optax.sgd(0.1), [("**", {"unit_norm": 1.0})]).init(params)


def test_glob_masks_and_regularize_work_with_optax_tree_map_params():
  """optax.tree_map_params initializes with a placeholder tree that has no leaves: a glob
  or a rule table must not call that 'a typo' (state shardings are derived this way)."""
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  for tx in (
    optax.chain(on.add_l2_decay(0.1, mask="**/kernel"), optax.adam(1e-3)),
    on.regularize(optax.adam(1e-3), [("**/kernel", {"l2": 0.1}), ("**", None)]),
  ):
    state = tx.init(params)
    mapped = optax.tree_map_params(tx, lambda p: p * 0, state)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
  # A real tree still gets the typo check.
  with pytest.raises(ValueError, match=r"matches no parameter"):
    on.add_l2_decay(0.1, mask="**/kernal").init(params)
