"""Units by role: unit_axes on attention, embedding, stacked and torch layouts, the default
axis=None that refuses to guess, and norm_report per layer."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on
from optax_norms import _units

RNG = np.random.default_rng(0)


def _f32(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def _np_unit_norms(w, axes):
  w = np.asarray(w, np.float64)
  return np.sqrt(np.sum(w * w, axis=axes, keepdims=True))


# (path, shape, hand-computed reduced axes) for unit_axes("flax", stacked="blocks/**").
FLAX_CASES = [
  (("Dense_0", "kernel"), (6, 4), (0,)),
  (("Conv_0", "kernel"), (3, 3, 2, 5), (0, 1, 2)),
  (("attn", "query", "kernel"), (16, 2, 8), (0,)),  # (in, heads, head_dim)
  (("attn", "key", "kernel"), (16, 2, 8), (0,)),
  (("attn", "value", "kernel"), (16, 2, 8), (0,)),
  (("attn", "out", "kernel"), (2, 8, 16), (0, 1)),  # (heads, head_dim, out)
  (("attn", "query", "bias"), (2, 8), (0, 1)),  # a bias is one unit
  (("embed", "embedding"), (50, 16), (1,)),  # one token's row
  (("ln", "scale"), (16,), (0,)),
  (("blocks", "mlp_in", "kernel"), (3, 16, 64), (1,)),  # stacked Dense
  (("blocks", "attn", "query", "kernel"), (3, 16, 2, 8), (1,)),  # stacked attention
  (("blocks", "attn", "out", "kernel"), (3, 2, 8, 16), (1, 2)),
  (("blocks", "attn", "query", "bias"), (3, 2, 8), (1, 2)),  # per layer
  (("blocks", "ln1", "scale"), (3, 16), (1,)),
  (("blocks", "conv", "kernel"), (3, 3, 3, 2, 5), (1, 2, 3)),  # stacked Conv
  (("conv1d", "kernel"), (5, 4, 8), (0, 1)),  # not stacked: a Conv1D
]

TORCH_CASES = [
  (("linear", "weight"), (8, 6), (1,)),  # (out, in)
  (("conv", "weight"), (8, 3, 5, 5), (1, 2, 3)),  # (out, in, kh, kw)
  (("linear", "bias"), (8,), (0,)),
  (("embedding", "weight"), (100, 16), (1,)),  # one token's row
  (("norm", "weight"), (16,), (0,)),
  (("layers", "linear", "weight"), (4, 8, 6), (2,)),  # stacked (eqx.filter_vmap)
]


@pytest.mark.parametrize("path, shape, axes", FLAX_CASES, ids=lambda x: str(x))
def test_unit_axes_flax_layout_matches_hand_computed_axes(path, shape, axes):
  assert on.unit_axes(stacked="blocks/**")(path, jnp.ones(shape)).reduce == axes


@pytest.mark.parametrize("path, shape, axes", TORCH_CASES, ids=lambda x: str(x))
def test_unit_axes_torch_layout_matches_hand_computed_axes(path, shape, axes):
  assert on.unit_axes("torch", stacked="layers/**")(path, jnp.ones(shape)).reduce == axes


@pytest.mark.slow
@pytest.mark.parametrize("layout, cases", [("flax", FLAX_CASES), ("torch", TORCH_CASES)])
def test_unit_axes_norms_match_float64_numpy_per_unit_norms(layout, cases):
  axis = on.unit_axes(layout, stacked=["blocks/**", "layers/**"])
  for path, shape, axes in cases:
    w = _f32(*shape)
    report = on.norm_report({"/".join(path): w}, axis=lambda p, leaf, path=path: axis(path, leaf))
    stats = report["/".join(path)]
    norms = _np_unit_norms(w, axes)
    # A stacked leaf reports per layer (the layout the callable returns has its stack).
    np.testing.assert_allclose(np.max(stats["max_unit_norm"]), norms.max(), rtol=1e-6)
    assert float(np.sum(stats["units"])) == norms.size
    # clip_by_row_norm with the same axes: every unit of norm > c lands on c (float64).
    tx = on.clip_by_row_norm(0.5, axis=lambda p, leaf, path=path: axis(path, leaf))
    clipped, _ = tx.update({"w": w}, tx.init({"w": w}))
    np.testing.assert_allclose(
      _np_unit_norms(clipped["w"], axes), np.minimum(norms, 0.5), rtol=2e-6
    )


@pytest.mark.slow
def test_norm_report_stacked_is_per_layer_and_matches_numpy():
  w = _f32(3, 16, 2, 8)
  params = {"blocks": {"attn": {"query": {"kernel": w}}}, "head": {"kernel": _f32(16, 4)}}
  for kwargs in ({"stacked": "blocks/**"}, {"axis": on.unit_axes(stacked="blocks/**")}):
    report = jax.jit(lambda p, kw=kwargs: on.norm_report(p, **kw))(params)
    stats = report["blocks/attn/query/kernel"]
    norms = _np_unit_norms(w, (1,))  # (3, 1, 2, 8)
    assert stats["max_unit_norm"].shape == (3,)
    np.testing.assert_allclose(stats["max_unit_norm"], norms.reshape(3, -1).max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(
      stats["l2"], np.linalg.norm(np.asarray(w, np.float64).reshape(3, -1), axis=1), rtol=1e-6
    )
    np.testing.assert_array_equal(stats["units"], [16.0, 16.0, 16.0])
    np.testing.assert_array_equal(stats["axes"], [1])
    assert report["head/kernel"]["l2"].shape == ()
    np.testing.assert_array_equal(report["head/kernel"]["axes"], [0])


def test_norm_report_stacked_glob_that_matches_nothing_raises():
  with pytest.raises(ValueError, match=r"stacked glob 'blokcs/\*\*'.*matches no parameter"):
    on.norm_report({"blocks": {"kernel": jnp.ones((3, 4, 2))}}, stacked="blokcs/**")


# --- axis=None: no silent guess ------------------------------------------------------------

AMBIGUOUS = [
  (("blocks", "mlp_in", "kernel"), (3, 16, 64), "stacked Dense kernel"),
  (("blocks", "attn", "query", "kernel"), (3, 16, 2, 8), "stacked attention kernel"),
  (("blocks", "attn", "out", "kernel"), (3, 2, 8, 16), "stacked attention kernel"),
  (("ScanBlock_0", "Dense_0", "kernel"), (3, 4, 4, 5), "Linen Dense kernel is 2-D"),
  (("embed", "embedding"), (3, 50, 16), "stacked table"),
  (("conv", "weight"), (8, 3, 5, 5), "PyTorch/Equinox Conv weight"),
]


@pytest.mark.parametrize("path, shape, reading", AMBIGUOUS, ids=lambda x: str(x))
def test_default_axis_raises_for_an_ambiguous_unit_at_init(path, shape, reading):
  params = {}
  node = params
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = jnp.ones(shape)
  text = "/".join(path)
  for tx in (
    on.clip_by_row_norm(1.0),
    on.constrain_row_norm(1.0),
    on.prox_group_l2(0.1, 0.1),
    on.add_max_norm_decay(1.0, 0.1),
  ):
    with pytest.raises(ValueError, match="ambiguous") as info:
      tx.init(params)
    message = str(info.value)
    assert repr(text) in message and str(shape) in message and reading in message
    assert "unit_axes(" in message and "explicit axis" in message
  with pytest.raises(ValueError, match="ambiguous"):
    on.group_l2_penalty(params, 0.1)
  with pytest.raises(ValueError, match="ambiguous"):
    on.norm_report(params)


@pytest.mark.parametrize(
  "path, shape, axes",
  [
    (("Dense_0", "kernel"), (6, 4), (0,)),  # Linen auto-named: as before
    (("Conv_0", "kernel"), (3, 3, 2, 5), (0, 1, 2)),
    (("Conv_0", "kernel"), (5, 2, 4), (0, 1)),  # Conv1D under a Conv name
    (("encoder", "layer1", "kernel"), (3, 3, 2, 5), (0, 1, 2)),  # rank >= 4: a Conv
    (("attn", "query", "kernel"), (16, 2, 8), (0,)),  # attention role
    (("attn", "out", "kernel"), (2, 8, 16), (0, 1)),
    (("embed", "embedding"), (50, 16), (1,)),  # one token's row (was: one per dim)
    (("w",), (2, 3, 4), (0, 1)),  # no framework name: the rank rule, as documented
    ((), (2, 3, 4), (0, 1)),  # a bare array
    (("attn", "query", "bias"), (2, 8), (0, 1)),  # an attention bias: one unit, as unit_axes
    (("linear", "weight"), (8, 6), (1,)),  # torch/Equinox (out, in): one unit per output
  ],
)
def test_default_axis_where_the_path_decides(path, shape, axes):
  assert _units.default_axes(path, shape) == axes


def test_unit_axes_under_inject_hyperparams_needs_static_args():
  params = {"blocks": {"kernel": jnp.ones((3, 4, 2))}}
  axis = on.unit_axes(stacked="blocks/**")
  tx = optax.inject_hyperparams(on.clip_by_row_norm)(max_norm=1.0, axis=axis)
  with pytest.raises(ValueError, match=r"static_args=\('axis',\)"):
    tx.init(params)
  tx = optax.inject_hyperparams(on.clip_by_row_norm, static_args=("axis",))(max_norm=1.0, axis=axis)
  out, _ = tx.update(params, tx.init(params))
  # Each unit w[l, :, j] has norm 2 (four ones): clipped to norm 1.
  np.testing.assert_allclose(_np_unit_norms(out["blocks"]["kernel"], (1,)), 1.0, rtol=1e-6)


def test_unit_axes_bad_arguments():
  with pytest.raises(ValueError, match="`layout`"):
    on.unit_axes("jax")
  with pytest.raises(TypeError, match="glob strings"):
    on.unit_axes(stacked=[1])
  with pytest.raises(ValueError, match="Malformed glob"):
    on.unit_axes(stacked="a//b")
  with pytest.raises(ValueError, match="scalar"):
    on.unit_axes(stacked="**")(("a",), jnp.ones(()))
  with pytest.raises(ValueError, match="Linen Dense kernel"):
    on.unit_axes()(("Dense_0", "kernel"), jnp.ones((3, 4, 2)))


@pytest.mark.slow
@pytest.mark.standard_promotion  # the regularize example runs optax.adam
def test_docstring_examples_run():
  for module in (_units, on._groups, on._diagnostics):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed, module.__name__
