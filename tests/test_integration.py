"""End to end: Flax Linen, Flax NNX (nnx.Optimizer) and Equinox training steps."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_norms as on

X = jax.random.normal(jax.random.key(1), (32, 6))
Y = jax.random.normal(jax.random.key(2), (32, 3))

# optax's schedules and optimizers are not strict-promotion clean.
pytestmark = pytest.mark.standard_promotion


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8)(x))
    x = nn.LayerNorm()(x)
    return nn.Dense(3)(x)


@pytest.mark.slow
def test_linen_elastic_chain_equals_grad_of_loss_plus_penalty():
  model = MLP()
  params = model.init(jax.random.key(0), X)["params"]
  l1, l2, lr = 1e-3, 5e-3, 0.05

  def data_loss(p):
    return jnp.mean((model.apply({"params": p}, X) - Y) ** 2)

  tx = optax.chain(on.elastic(l1, l2, mask="**/kernel"), optax.sgd(lr))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(data_loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  @jax.jit
  def reference_step(p):  # plain gradient descent on loss + penalty, no optax_norms transform
    g = jax.grad(lambda q: data_loss(q) + on.elastic_penalty(q, l1, l2, mask="**/kernel"))(p)
    return jax.tree.map(lambda w, d: w - lr * d, p, g)

  ours, ref = params, params
  for _ in range(30):
    ours, state = step(ours, state)
    ref = reference_step(ref)
  for path, a, b in zip(on.tree_paths(ours), jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path)
  # and the penalty really acted: kernels differ from an unregularized run
  plain = params
  sgd = optax.sgd(lr)
  s = sgd.init(plain)
  for _ in range(30):
    u, s = sgd.update(jax.grad(data_loss)(plain), s)
    plain = optax.apply_updates(plain, u)
  assert not np.allclose(plain["Dense_0"]["kernel"], ours["Dense_0"]["kernel"], atol=1e-5)


class NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(6, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.norm(nnx.relu(self.linear(x))))


@pytest.mark.slow
def test_nnx_optimizer_with_adam_updates_exactly_the_selected_leaves():
  model = NNXModel(nnx.Rngs(0))
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # A transform that only moves what its mask selects: decay, then adam, with zero gradients.
  tx = optax.chain(on.add_l2_decay(0.5, mask=["**/kernel", "!out/**"]), optax.adam(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # init sees nnx.Variable leaves

  @nnx.jit
  def step(model, optimizer):
    grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)  # update sees raw arrays

  for _ in range(3):
    step(model, optimizer)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  changed = {
    p
    for p, a, b in zip(on.tree_paths(after), jax.tree.leaves(after), jax.tree.leaves(before))
    if not np.array_equal(a, b)
  }
  assert changed == {"linear/kernel"}
  # Reference: optax alone on the pure dict, with optax's own masked decay (wd = 2·alpha).
  mask = jax.tree.map(lambda _: False, before)
  mask["linear"]["kernel"] = True
  ref_tx = optax.chain(optax.masked(optax.add_decayed_weights(1.0), mask), optax.adam(0.1))
  ref, ref_state = before, ref_tx.init(before)
  for _ in range(3):
    updates, ref_state = ref_tx.update(jax.tree.map(jnp.zeros_like, ref), ref_state, ref)
    ref = optax.apply_updates(ref, updates)
  for path, a, b in zip(on.tree_paths(after), jax.tree.leaves(after), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=path)


def test_nnx_unknown_glob_raises_inside_optimizer():
  model = NNXModel(nnx.Rngs(0))
  try:
    nnx.Optimizer(model, on.add_l2_decay(0.1, mask="*/kernal"), wrt=nnx.Param)
  except ValueError as error:
    assert "'linear/kernel'" in str(error)
  else:
    raise AssertionError("expected ValueError")


@pytest.mark.slow
def test_equinox_with_the_same_mask_strings():
  model = eqx.nn.MLP(6, 3, 8, 2, key=jax.random.key(0))
  params = eqx.filter(model, eqx.is_array)
  tx = optax.chain(
    on.add_l2_decay(1e-2, mask="**/weight"),
    optax.sgd(0.1),
    on.constrain_row_norm(0.5, axis=1, mask="**/weight"),
  )  # (out, in) layout
  state = tx.init(params)

  @eqx.filter_jit
  def step(model, state):
    loss = lambda m: jnp.mean((jax.vmap(m)(X) - Y) ** 2)  # noqa: E731
    grads = eqx.filter_grad(loss)(model)
    updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state

  for _ in range(20):
    model, state = step(model, state)
  for layer in model.layers:
    norms = np.linalg.norm(np.asarray(layer.weight, np.float64), axis=1)
    assert np.all(norms <= 0.5 * (1 + 1e-6)), norms


def test_path_mask_as_optax_adamw_mask_inside_nnx_optimizer():
  # jax #31256: an adamw mask that breaks between init (Variables) and update (arrays).
  model = NNXModel(nnx.Rngs(0))
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = optax.adamw(0.1, weight_decay=0.5, mask=on.path_mask("**/kernel"))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for path, a, b in zip(on.tree_paths(after), jax.tree.leaves(after), jax.tree.leaves(before)):
    if path.endswith("kernel"):  # decoupled decay: w ← w − lr·wd·w with zero gradients
      np.testing.assert_allclose(a, b * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=path)
    else:
      np.testing.assert_array_equal(a, b, err_msg=path)
