"""Paths and masks: normalization, globs, presets, labels, errors."""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict

import optax_norms as on


def _linen_params():
  model = nn.Sequential([nn.Dense(4), nn.LayerNorm(), nn.Dense(2)])
  return model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]


class Pair(NamedTuple):
  weight: jax.Array
  bias: jax.Array


@pytest.mark.slow
def test_paths_of_every_container_kind():
  assert on.tree_paths(_linen_params()) == [
    "layers_0/bias",
    "layers_0/kernel",
    "layers_1/bias",
    "layers_1/scale",
    "layers_2/bias",
    "layers_2/kernel",
  ]
  assert on.tree_paths(FrozenDict({"a": {"kernel": jnp.ones(1)}})) == ["a/kernel"]
  assert on.tree_paths([jnp.ones(1), {"w": jnp.ones(1)}]) == ["0", "1/w"]
  assert on.tree_paths(Pair(jnp.ones(1), jnp.ones(1))) == ["weight", "bias"]
  model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
  paths = on.tree_paths(eqx.filter(model, eqx.is_array))
  assert paths == ["layers/0/weight", "layers/0/bias", "layers/1/weight", "layers/1/bias"]


def test_nnx_paths_drop_variable_value():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)

  model = Model(nnx.Rngs(0))
  with_variables = nnx.state(model, nnx.Param)  # what nnx.Optimizer passes to init
  raw = jax.tree.map(lambda v: v, nnx.to_pure_dict(with_variables))  # what update sees
  expected = ["linear/bias", "linear/kernel", "norm/bias", "norm/scale"]
  assert on.tree_paths(with_variables) == expected
  assert on.tree_paths(raw) == expected


@pytest.mark.parametrize(
  "globs, selected",
  [
    ("**/kernel", {"layers_0/kernel", "layers_2/kernel"}),
    ("*/kernel", {"layers_0/kernel", "layers_2/kernel"}),
    ("layers_0/**", {"layers_0/kernel", "layers_0/bias"}),
    (["**", "!**/bias", "!layers_1/*"], {"layers_0/kernel", "layers_2/kernel"}),
    (["!**/bias"], {"layers_0/kernel", "layers_1/scale", "layers_2/kernel"}),
    ("layers_[02]/kernel", {"layers_0/kernel", "layers_2/kernel"}),
    ("layers_?/scale", {"layers_1/scale"}),
  ],
)
def test_globs_select_the_right_leaves(globs, selected):
  params = _linen_params()
  mask = on.path_mask(globs)(params)
  got = {p for p, m in zip(on.tree_paths(params), jax.tree.leaves(mask)) if m}
  assert got == selected


def test_double_star_spans_any_depth_single_star_one_segment():
  tree = {"a": {"kernel": 1.0, "b": {"kernel": 2.0}}, "kernel": 3.0}
  pick = lambda g: sorted(
    p for p, m in zip(on.tree_paths(tree), jax.tree.leaves(on.path_mask(g)(tree))) if m
  )  # noqa: E731
  assert pick("**/kernel") == ["a/b/kernel", "a/kernel", "kernel"]
  assert pick("*/kernel") == ["a/kernel"]
  assert pick("a/**") == ["a/b/kernel", "a/kernel"]
  assert pick("a/**/kernel") == ["a/b/kernel", "a/kernel"]


def test_unknown_glob_raises_at_init_listing_real_paths():
  params = _linen_params()
  tx = on.add_l2_decay(1e-3, mask="*/kernal")
  with pytest.raises(ValueError, match=r"'\*/kernal' matches no parameter.*'layers_0/kernel'"):
    tx.init(params)
  with pytest.raises(ValueError, match=r"'!\*\*/bais' matches no parameter"):
    on.add_l2_decay(1e-3, mask=["**", "!**/bais"]).init(params)
  with pytest.raises(ValueError, match="regex 'kernal' matches no parameter"):
    on.clip_by_max_abs(1.0, mask=on.path_mask(regex="kernal")).init(params)


def test_malformed_globs_raise():
  for glob, message in [
    ("a//b", "doubled"),
    ("/a", "leading"),
    ("a**/b", "whole path segment"),
    ("a/[bc", "is never closed"),
  ]:
    with pytest.raises(ValueError, match=message):
      on.path_mask(glob)


def test_weights_only_does_not_rely_on_ndim():
  # A scanned/stacked transformer: LayerNorm scales are 2-D (layers, d).
  params = {
    "embed": {"embedding": jnp.ones((10, 4))},
    "blocks": {
      "attn": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4))},
      "LayerNorm_0": {"scale": jnp.ones((2, 4)), "bias": jnp.ones((2, 4))},
      "ln_1": {"weight": jnp.ones((2, 4))},  # PyTorch-style name
    },
    "head": {"kernel": jnp.ones((4, 10))},
  }
  mask = on.weights_only()(params)
  got = {p for p, m in zip(on.tree_paths(params), jax.tree.leaves(mask)) if m}
  assert got == {"embed/embedding", "blocks/attn/kernel", "head/kernel"}
  # The documented way to leave the embedding table out, as levanter's default does.
  kernels = on.path_mask("**/kernel")(params)
  got = {p for p, m in zip(on.tree_paths(params), jax.tree.leaves(kernels)) if m}
  assert got == {"blocks/attn/kernel", "head/kernel"}


@pytest.mark.slow
def test_weights_only_on_equinox_excludes_norm_modules():
  class Block(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    emb: eqx.nn.Embedding

  key = jax.random.key(0)
  block = Block(eqx.nn.Linear(3, 3, key=key), eqx.nn.LayerNorm(3), eqx.nn.Embedding(5, 3, key=key))
  tx = on.add_l2_decay(0.5, mask=on.weights_only())
  params = eqx.filter(block, eqx.is_array)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates.linear.weight, 1.0 * params.linear.weight)
  np.testing.assert_allclose(updates.emb.weight, 1.0 * params.emb.weight)
  np.testing.assert_array_equal(updates.norm.weight, 0.0)
  np.testing.assert_array_equal(updates.linear.bias, 0.0)


@pytest.mark.slow
def test_bool_tree_mask_may_be_a_prefix_and_frozendict_matches_dict():
  params = FrozenDict(_linen_params())
  mask = {"layers_0": True, "layers_1": False, "layers_2": {"kernel": True, "bias": False}}
  tx = on.add_l2_decay(0.5, mask=mask)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat = dict(zip(on.tree_paths(updates), jax.tree.leaves(updates)))
  ref = dict(zip(on.tree_paths(params), jax.tree.leaves(params)))
  for path in flat:
    want = ref[path] if path.startswith("layers_0") or path == "layers_2/kernel" else 0 * ref[path]
    np.testing.assert_allclose(flat[path], want, err_msg=path)


def test_mask_structure_mismatch_names_the_first_path():
  params = _linen_params()
  with pytest.raises(ValueError, match="does not cover the parameter 'layers_2/bias'"):
    on.add_l2_decay(0.1, mask={"layers_0": True, "layers_1": True}).init(params)
  with pytest.raises(ValueError, match="'layers_9' that is not a parameter"):
    on.add_l2_decay(
      0.1, mask={"layers_0": True, "layers_1": True, "layers_2": True, "layers_9": True}
    ).init(params)


@pytest.mark.slow
def test_equinox_module_as_a_mask_is_a_tree_not_a_function():
  # optax #913: Equinox modules are callable pytrees; optax.masked would call them.
  model = eqx.filter(eqx.nn.Linear(3, 2, key=jax.random.key(0)), eqx.is_array)
  mask = jax.tree.map(lambda x: x.ndim == 2, model)
  assert callable(mask)
  tx = on.add_l2_decay(0.5, mask=mask)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, model), tx.init(model), model)
  np.testing.assert_allclose(updates.weight, model.weight)
  np.testing.assert_array_equal(updates.bias, 0.0)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_path_mask_is_a_valid_optax_mask():
  params = _linen_params()
  mask = on.path_mask("**/kernel")
  ours = optax.adamw(1e-2, weight_decay=0.1, mask=mask)
  theirs = optax.adamw(1e-2, weight_decay=0.1, mask=jax.tree.map(lambda x: x.ndim == 2, params))
  grads = jax.tree.map(jnp.ones_like, params)
  a, _ = ours.update(grads, ours.init(params), params)
  b, _ = theirs.update(grads, theirs.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_path_labels_for_partition():
  params = _linen_params()
  labels = on.path_labels({"decay": "**/kernel", "norm": "layers_1/**"}, default="rest")(params)
  assert dict(zip(on.tree_paths(params), jax.tree.leaves(labels))) == {
    "layers_0/bias": "rest",
    "layers_0/kernel": "decay",
    "layers_1/bias": "norm",
    "layers_1/scale": "norm",
    "layers_2/bias": "rest",
    "layers_2/kernel": "decay",
  }
  tx = optax.partition(
    {"decay": optax.sgd(1.0), "norm": optax.set_to_zero(), "rest": optax.sgd(0.5)},
    on.path_labels({"decay": "**/kernel", "norm": "layers_1/**"}, default="rest"),
  )
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["layers_1"]["scale"], 0.0)
  np.testing.assert_array_equal(updates["layers_0"]["kernel"], -1.0)
  np.testing.assert_array_equal(updates["layers_0"]["bias"], -0.5)
  with pytest.raises(ValueError, match="No rule labels the parameter 'layers_0/bias'"):
    on.path_labels({"decay": "**/kernel"})(params)


def test_predicate_and_regex_combine():
  params = _linen_params()
  mask = on.path_mask(regex="layers_[12]", where=lambda path, leaf: path[-1] != "bias")(params)
  got = {p for p, m in zip(on.tree_paths(params), jax.tree.leaves(mask)) if m}
  assert got == {"layers_1/scale", "layers_2/kernel"}
