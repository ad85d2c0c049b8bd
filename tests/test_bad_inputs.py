"""The bad-input catalogue: every bad input raises our own ValueError/TypeError, from
optax_norms code, with a message that names the argument or the parameter path.

Each entry is (id, what the user did, thunk, exception type, `match` regex, a substring the
message must contain: the argument or the path). ``docs/bad-inputs.md`` lists the same
table; ``python tests/test_bad_inputs.py`` prints it.
"""

import math
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on
from optax_norms import decay_resolution_report

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}


def _init(tx, params=PARAMS):
  return tx.init(params)


def _update(tx, params=PARAMS, updates=None):
  state = tx.init(params)
  return tx.update(params if updates is None else updates, state, params)


def _traced_axis():
  tx = optax.inject_hyperparams(on.clip_by_row_norm)(max_norm=1.0, axis=0)  # No static_args.
  state = tx.init(PARAMS)
  return jax.jit(lambda g, s: tx.update(g, s))(PARAMS, state)


class _Module(NamedTuple):
  """An Equinox-like module whose activation function is a leaf."""

  weight: jax.Array
  activation: object


class Case(NamedTuple):
  id: str
  what: str
  thunk: Callable[[], Any]
  error: type
  match: str
  names: str


NAN, INF = math.nan, math.inf

CASES = [
  # --- hyperparameters -------------------------------------------------------------
  Case(
    "alpha_string",
    'add_l2_decay("0.1")',
    lambda: on.add_l2_decay("0.1"),  # type: ignore[arg-type]
    TypeError,
    r"must be a non-negative real number or a schedule, got '0\.1'",
    "`alpha`",
  ),
  Case(
    "alpha_none",
    "add_l2_decay(None)",
    lambda: on.add_l2_decay(None),  # type: ignore[arg-type]
    TypeError,
    r"must be a non-negative real number .* got None",
    "`alpha`",
  ),
  Case(
    "alpha_bool",
    "add_l1_decay(True)",
    lambda: on.add_l1_decay(True),
    TypeError,
    r"must be a non-negative real number .* got True",
    "`alpha`",
  ),
  Case(
    "alpha_negative",
    "add_l2_decay(-1.0)",
    lambda: on.add_l2_decay(-1.0),
    ValueError,
    r"must be non-negative, got -1\.0",
    "`alpha`",
  ),
  Case(
    "alpha_nan",
    "add_l1_decay(nan)",
    lambda: on.add_l1_decay(NAN),
    ValueError,
    r"must be finite, got nan",
    "`alpha`",
  ),
  Case(
    "l2_inf",
    "elastic(1.0, inf)",
    lambda: on.elastic(1.0, INF),
    ValueError,
    r"must be finite, got inf",
    "`l2`",
  ),
  Case(
    "alpha_array",
    "add_l2_decay(jnp.ones(3))",
    lambda: on.add_l2_decay(jnp.ones(3)),
    ValueError,
    r"must be a scalar, got an array of shape \(3,\)",
    "`alpha`",
  ),
  Case(
    "alpha_complex",
    "add_l2_decay(1j)",
    lambda: on.add_l2_decay(1j),  # type: ignore[arg-type]
    ValueError,
    r"must be a real number, got dtype complex",
    "`alpha`",
  ),
  Case(
    "max_norm_negative",
    "clip_by_row_norm(-1.0)",
    lambda: on.clip_by_row_norm(-1.0),
    ValueError,
    r"must be non-negative",
    "`max_norm`",
  ),
  Case(
    "learning_rate_negative",
    "prox_l1(0.1, -0.1)",
    lambda: on.prox_l1(0.1, -0.1),
    ValueError,
    r"must be non-negative",
    "`learning_rate`",
  ),
  Case(
    "max_abs_numpy_nan",
    "clip_by_max_abs(np.float32(nan))",
    lambda: on.clip_by_max_abs(np.float32(NAN)),
    ValueError,
    r"must be finite",
    "`max_abs`",
  ),
  Case(
    "injected_negative",
    "inject_hyperparams(add_l2_decay)(alpha=-1.0).init(params)",
    lambda: _init(optax.inject_hyperparams(on.add_l2_decay)(alpha=-1.0)),
    ValueError,
    r"must be non-negative, got -1\.0",
    "`alpha`",
  ),
  # --- schedules ---------------------------------------------------------------------
  Case(
    "prox_schedule_starts_negative",
    "prox_l1(0.1, linear_schedule(-0.1, 0.1, 100))",
    lambda: on.prox_l1(0.1, optax.linear_schedule(-0.1, 0.1, 100)),
    ValueError,
    r"must be non-negative, got -0\.1\d* \(the schedule's value at step 0\)",
    "`learning_rate`",
  ),
  Case(
    "schedule_raises",
    "add_l2_decay(lambda step: 1 / 0).init(params)",
    lambda: _init(on.add_l2_decay(lambda step: 1 / 0)),
    ValueError,
    r"looks like a schedule but calling it at step 0 failed: "
    r"ZeroDivisionError",
    "`alpha`",
  ),
  Case(
    "schedule_takes_no_step",
    "add_l2_decay(lambda: 0.1).init(params)",
    lambda: _init(on.add_l2_decay(lambda: 0.1)),  # type: ignore[arg-type,misc]
    ValueError,
    r"looks like a schedule but calling it .* failed: TypeError",
    "`alpha`",
  ),
  Case(
    "schedule_returns_array",
    "add_l2_decay(lambda step: jnp.ones(3)).init(params)",
    lambda: _init(on.add_l2_decay(lambda step: jnp.ones(3))),
    ValueError,
    r"must be a scalar, got an array of shape \(3,\) \(the schedule's value",
    "`alpha`",
  ),
  Case(
    "schedule_returns_nan",
    "clip_by_max_abs(lambda step: nan).init(params)",
    lambda: _init(on.clip_by_max_abs(lambda step: jnp.nan)),
    ValueError,
    r"must be finite, got nan \(the schedule's value at step 0\)",
    "`max_abs`",
  ),
  Case(
    "penalty_with_schedule",
    "l2_penalty(params, constant_schedule(0.1))",
    lambda: on.l2_penalty(PARAMS, optax.constant_schedule(0.1)),
    ValueError,
    r"must be a number here, not a schedule",
    "`alpha`",
  ),
  Case(
    "penalty_negative",
    "l1_penalty(params, -0.1)",
    lambda: on.l1_penalty(PARAMS, -0.1),
    ValueError,
    r"must be non-negative",
    "`alpha`",
  ),
  # --- globs, regexes and masks ------------------------------------------------------
  Case(
    "glob_matches_nothing",
    'add_l2_decay(0.1, mask="*/kernal")',
    lambda: _init(on.add_l2_decay(0.1, mask="*/kernal")),
    ValueError,
    r"The glob '\*/kernal' matches no parameter\. The parameter paths are",
    "'dense/kernel'",
  ),
  Case(
    "exclusion_matches_nothing",
    'path_mask(exclude="**/kernal")',
    lambda: _init(on.add_l2_decay(0.1, mask=on.path_mask(exclude="**/kernal"))),
    ValueError,
    r"The exclusion glob '!\*\*/kernal' matches no parameter",
    "'dense/bias'",
  ),
  Case(
    "regex_matches_nothing",
    'path_mask(regex="kernal$")',
    lambda: _init(on.add_l2_decay(0.1, mask=on.path_mask(regex="kernal$"))),
    ValueError,
    r"The regex 'kernal\$' matches no parameter",
    "'dense/kernel'",
  ),
  Case(
    "regex_invalid",
    'path_mask(regex="ker(nel")',
    lambda: on.path_mask(regex="ker(nel"),
    ValueError,
    r"is not a valid regular expression",
    "`regex`",
  ),
  Case(
    "glob_unbalanced_bracket",
    'mask="**/kern[el"',
    lambda: _init(on.add_l2_decay(0.1, mask="**/kern[el")),
    ValueError,
    r"Malformed glob .*is never closed",
    "'**/kern[el'",
  ),
  Case(
    "glob_double_slash",
    'mask="dense//kernel"',
    lambda: _init(on.add_l2_decay(0.1, mask="dense//kernel")),
    ValueError,
    r"Malformed glob .* doubled '/'",
    "'dense//kernel'",
  ),
  Case(
    "glob_trailing_slash",
    'mask="dense/"',
    lambda: _init(on.add_l2_decay(0.1, mask="dense/")),
    ValueError,
    r"Malformed glob .* trailing",
    "'dense/'",
  ),
  Case(
    "glob_double_star_inside_segment",
    'mask="dense/**kernel"',
    lambda: _init(on.add_l2_decay(0.1, mask="dense/**kernel")),
    ValueError,
    r"'\*\*' must be a whole path segment",
    "'dense/**kernel'",
  ),
  Case(
    "glob_empty",
    'mask=""',
    lambda: _init(on.add_l2_decay(0.1, mask="")),
    ValueError,
    r"Malformed glob '': it must be a non-empty string",
    "''",
  ),
  Case(
    "mask_empty_list",
    "mask=[]",
    lambda: _init(on.add_l2_decay(0.1, mask=[])),
    ValueError,
    r"is an empty list",
    "`mask`",
  ),
  Case(
    "mask_list_with_non_string",
    'mask=["**/kernel", 3]',
    lambda: _init(on.add_l2_decay(0.1, mask=["**/kernel", 3])),
    TypeError,
    r"is a list of globs, but it contains 3, not a string",
    "`mask`",
  ),
  Case(
    "mask_not_a_mask",
    "mask=3",
    lambda: _init(on.add_l2_decay(0.1, mask=3)),
    ValueError,
    r"must be None, a glob, a list of globs, .* got 3",
    "`mask`",
  ),
  Case(
    "mask_tree_non_bool_leaf",
    'mask={"dense": {"kernel": "yes", "bias": False}}',
    lambda: _init(on.add_l2_decay(0.1, mask={"dense": {"kernel": "yes", "bias": False}})),
    ValueError,
    r"The mask leaf at .* must be a bool, got 'yes'",
    "'dense/kernel'",
  ),
  Case(
    "mask_tree_missing_leaf",
    'mask={"dense": {"kernel": True}}',
    lambda: _init(on.add_l2_decay(0.1, mask={"dense": {"kernel": True}})),
    ValueError,
    r"The mask does not cover the parameter",
    "'dense/bias'",
  ),
  Case(
    "mask_tree_extra_leaf",
    'mask={"dense": {..., "scale": True}}',
    lambda: _init(
      on.add_l2_decay(0.1, mask={"dense": {"kernel": True, "bias": False, "scale": True}})
    ),
    ValueError,
    r"The mask has a leaf at .* that is not a parameter",
    "'dense/scale'",
  ),
  Case(
    "mask_callable_wrong_structure",
    'mask=lambda p: {"x": True}',
    lambda: _init(on.add_l2_decay(0.1, mask=lambda p: {"x": True})),
    ValueError,
    r"The mask does not cover the parameter",
    "'dense/bias'",
  ),
  Case(
    "where_not_callable",
    "path_mask(where=3)",
    lambda: on.path_mask(where=3),  # type: ignore[arg-type]
    TypeError,
    r"must be a callable \(path, leaf\) -> bool",
    "`where`",
  ),
  Case(
    "path_labels_unlabelled_leaf",
    'path_labels({"decay": "**/kernel"})(params)',
    lambda: on.path_labels({"decay": "**/kernel"})(PARAMS),
    ValueError,
    r"No rule labels the parameter",
    "'dense/bias'",
  ),
  Case(
    "path_labels_no_rules",
    "path_labels({})",
    lambda: on.path_labels({}),
    ValueError,
    r"must be a non-empty dict",
    "`rules`",
  ),
  # --- params and updates ------------------------------------------------------------
  Case(
    "missing_params",
    "add_l2_decay(0.1).update(grads, state)",
    lambda: on.add_l2_decay(0.1).update(PARAMS, optax.EmptyState()),
    ValueError,
    r"reads the current parameters, but `params` was not passed",
    "add_l2_decay",
  ),
  Case(
    "params_structure_mismatch",
    "update(grads missing 'dense/bias', state, params)",
    lambda: _update(on.add_l2_decay(0.1), updates={"dense": {"kernel": jnp.ones((3, 2))}}),
    ValueError,
    r"`params` must have the structure of `updates`; they first differ",
    "'dense/bias'",
  ),
  Case(
    "update_shape_mismatch",
    "update(grads with kernel (2, 2), state, params (3, 2))",
    lambda: _update(
      on.add_l2_decay(0.1), updates={"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    ),
    ValueError,
    r"differ in shape: \(2, 2\) vs \(3, 2\)",
    "'dense/kernel'",
  ),
  Case(
    "function_leaf",
    "Equinox-like module with jax.nn.relu as a leaf",
    lambda: _update(on.add_l2_decay(0.1), params=_Module(jnp.ones((2, 2)), jax.nn.relu)),
    TypeError,
    r"is a \w+, not an array\. Filter non-array leaves out first",
    "'activation'",
  ),
  Case(
    "string_leaf",
    '{"w": ..., "name": "dense"}',
    lambda: _update(on.clip_by_max_abs(1.0), params={"w": jnp.ones(2), "name": "dense"}),
    TypeError,
    r"is a str, not an array",
    "'name'",
  ),
  Case(
    "complex_leaf",
    "complex64 parameter",
    lambda: _update(on.add_l2_decay(0.1), params={"w": jnp.ones(2, jnp.complex64)}),
    TypeError,
    r"has complex dtype complex64",
    "'w'",
  ),
  Case(
    "mask_selects_only_integer_leaves",
    'mask="step" on a tree with an int32 step',
    lambda: _init(
      on.add_l2_decay(0.1, mask="step"), params={"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)}
    ),
    ValueError,
    r"selects only integer or bool leaves .* would do nothing",
    "'step'",
  ),
  Case(
    "mask_all_false",
    "a bool mask that selects nothing",
    lambda: _init(on.add_l2_decay(0.1, mask={"dense": {"kernel": False, "bias": False}})),
    ValueError,
    r"`mask` selects no parameter, so the transform would do nothing",
    "'dense/kernel'",
  ),
  # --- axes --------------------------------------------------------------------------
  Case(
    "axis_out_of_range",
    "clip_by_row_norm(1.0, axis=2) on a rank-2 kernel",
    lambda: _update(on.clip_by_row_norm(1.0, axis=2), params={"k": jnp.ones((3, 2))}),
    ValueError,
    r"`axis` 2 is out of range for the parameter .* of shape \(3, 2\)",
    "'k'",
  ),
  Case(
    "axis_out_of_range_on_a_bias",
    "clip_by_row_norm(1.0, axis=1) on a tree with a bias",
    lambda: _update(on.clip_by_row_norm(1.0, axis=1)),
    ValueError,
    r"`axis` 1 is out of range .* \(rank 1\)\. Pass a callable",
    "'dense/bias'",
  ),
  Case(
    "axis_string",
    'clip_by_row_norm(1.0, axis="rows")',
    lambda: on.clip_by_row_norm(1.0, axis="rows"),  # type: ignore[arg-type]
    ValueError,
    r"must be None, an int, a tuple of ints, an optax_norms.Layout or a callable",
    "`axis`",
  ),
  Case(
    "axis_float",
    "constrain_row_norm(1.0, axis=1.0)",
    lambda: on.constrain_row_norm(1.0, axis=1.0),  # type: ignore[arg-type]
    ValueError,
    r"must be None, an int, a tuple of ints, an optax_norms.Layout or a callable .* got 1\.0",
    "`axis`",
  ),
  Case(
    "axis_bool",
    "prox_group_l2(0.1, 0.1, axis=True)",
    lambda: on.prox_group_l2(0.1, 0.1, axis=True),
    ValueError,
    r"must be None, an int, .* got True",
    "`axis`",
  ),
  Case(
    "axis_repeated",
    "clip_by_row_norm(1.0, axis=(0, -2))",
    lambda: _update(on.clip_by_row_norm(1.0, axis=(0, -2)), params={"k": jnp.ones((3, 2))}),
    ValueError,
    r"repeats an axis",
    "'k'",
  ),
  Case(
    "axis_callable_out_of_range",
    "axis=lambda path, leaf: 5",
    lambda: _update(on.add_max_norm_decay(1.0, 0.1, axis=lambda path, leaf: 5)),
    ValueError,
    r"`axis` 5 is out of range",
    "'dense/",
  ),
  Case(
    "axis_traced_by_inject_hyperparams",
    "jit(inject_hyperparams(clip_by_row_norm)(max_norm=1.0, axis=0).update)",
    lambda: _traced_axis(),
    ValueError,
    r"`axis` is traced\. Under optax.inject_hyperparams .* pass "
    r"static_args=\('axis',\)",
    "static_args",
  ),
  # --- diagnostics -------------------------------------------------------------------
  Case(
    "norm_report_glob_typo",
    'norm_report(params, mask="**/kernal")',
    lambda: on.norm_report(PARAMS, mask="**/kernal"),
    ValueError,
    r"matches no parameter",
    "'dense/kernel'",
  ),
  Case(
    "decay_report_negative_alpha",
    "decay_resolution_report(params, -1.0, 1e-3)",
    lambda: decay_resolution_report(PARAMS, -1.0, 1e-3),
    ValueError,
    r"must be non-negative",
    "`alpha`",
  ),
  # --- found by an adversarial review -------------------------------------------------
  Case(
    "glob_empty_range",
    'mask="[z-a]x"',
    lambda: on.add_l2_decay(0.1, mask="[z-a]x"),
    ValueError,
    r"the range 'z-a' is empty",
    "'[z-a]x'",
  ),
  Case(
    "glob_negated_unclosed",
    'mask="[!]"',
    lambda: on.add_l2_decay(0.1, mask="[!]"),
    ValueError,
    r"is never closed",
    "'[!]'",
  ),
  Case(
    "mask_factory_uncalled",
    "mask=on.path_mask",
    lambda: on.add_l2_decay(0.1, mask=on.path_mask),
    ValueError,
    r"is the function `path_mask` itself: call it",
    "`mask`",
  ),
  Case(
    "paths_collide",
    '{"a/b": x, "a": {"b": y}} with mask="a/b"',
    lambda: _init(on.add_l2_decay(0.1, mask="a/b"), {"a/b": jnp.ones(2), "a": {"b": jnp.ones(2)}}),
    ValueError,
    r"names two parameters",
    "'a/b'",
  ),
  Case(
    "mask_called_as_schedule",
    "inject_hyperparams(add_l2_decay)(mask=path_mask(...))",
    lambda: _init(
      optax.inject_hyperparams(on.add_l2_decay)(alpha=0.1, mask=on.path_mask("**/kernel"))
    ),
    ValueError,
    r"static_args=\('mask',\)",
    "static_args",
  ),
  Case(
    "axis_float_array",
    "clip_by_row_norm(1.0, axis=jnp.array(0.9))",
    lambda: on.clip_by_row_norm(1.0, axis=jnp.array(0.9)),  # type: ignore[arg-type]
    ValueError,
    r"`axis` must be None, an int",
    "`axis`",
  ),
  Case(
    "alpha_overflows_float32",
    "add_l2_decay(1e39)",
    lambda: on.add_l2_decay(1e39),
    ValueError,
    r"overflows float32",
    "`alpha`",
  ),
  Case(
    "schedule_vector_valued",
    "add_l2_decay(lambda s: jnp.array([0.1, 5.0]))",
    lambda: on.add_l2_decay(lambda s: jnp.array([0.1, 5.0])),
    ValueError,
    r"must be a scalar, got an array of shape \(2,\) \(the schedule's value at step 0\)",
    "`alpha`",
  ),
  Case(
    "decay_report_under_jit",
    "jax.jit(decay_resolution_report)",
    lambda: jax.jit(lambda p: decay_resolution_report(p, 0.1, 1e-3).relative_step)(PARAMS),
    ValueError,
    r"call it outside `jax.jit`",
    "decay_resolution_report",
  ),
]


def test_catalogue_has_at_least_25_distinct_cases():
  ids = [case.id for case in CASES]
  assert len(set(ids)) == len(ids) >= 60


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_raises_our_error_naming_the_culprit(case):
  with pytest.raises(case.error, match=case.match) as info:
    case.thunk()
  assert type(info.value) in (ValueError, TypeError)
  message = str(info.value)
  assert case.names in message, message
  # Raised by optax_norms itself, not deep inside JAX/NumPy.
  frames = traceback.extract_tb(info.value.__traceback__)
  assert "optax_norms" in frames[-1].filename.replace("\\", "/").split("/")[-2], frames[-1]


def _markdown_table() -> str:
  rows = ["| # | Bad input | Error | Message excerpt |", "|---|---|---|---|"]
  for i, case in enumerate(CASES, 1):
    try:
      case.thunk()
      message = "(no error!)"
    except Exception as error:  # noqa: BLE001 - the table shows what is raised.
      message = str(error).split(". ")[0][:110]
    for char in "|*_":  # Markdown: keep the message literal.
      message = message.replace(char, "\\" + char)
    rows.append(f"| {i} | `{case.what}` | `{case.error.__name__}` | {message} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(_markdown_table())


def test_docs_table_is_current():
  """docs/bad-inputs.md holds the table this file generates (regenerate it if this fails)."""
  import pathlib

  docs = pathlib.Path(__file__).resolve().parent.parent / "docs" / "bad-inputs.md"
  assert _markdown_table() in docs.read_text()
