"""Rule tables as data: rules_from_data / rules_to_data round trips, numeric strings as YAML
gives them, data schedules, "re:" selectors, errors that name the rule and key, ConfigDict,
describe_rules(..., as_data=True), and a YAML table training exactly as its Python twin."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on
from optax_norms._groups import _MODIFIERS, SETTINGS

yaml = pytest.importorskip("yaml")

# One rule per setting (and modifier), in its canonical data form: what rules_to_data writes.
ONE_RULE_PER_SETTING = [
  {"match": "a/*", "freeze": True},
  {"match": "b/*", "clip_adaptive": {"z": 2.0, "decay": 0.9, "warmup": 5}},
  {"match": "c/*", "clip_global_norm": 1.0},
  {"match": "d/*", "clip_unit_norm": 0.5, "axis": "stacked:d/**"},
  {"match": "e/*", "clip_max_abs": 0.1},
  {
    "match": "re:f/.*",
    "l2": {
      "schedule": "linear_schedule",
      "init_value": 0.001,
      "end_value": 0.0,
      "transition_steps": 10,
    },
  },
  {"match": ["g/*", "g2/*"], "l1": 0.0001},
  {"match": "h/*", "lr_scale": 0.5},
  {
    "match": "i/*",
    "decoupled_decay": {"weight_decay": 0.1, "convention": "adamc", "cautious": True},
  },
  {
    "match": "j/*",
    "cpr": {"kappa_init_method": "warm_start", "kappa_init_param": 100, "reg_function": "l2"},
  },
  {"match": "k/*", "prox_l1": 0.001},
  {
    "match": "l/**",
    "prox_group": 0.01,
    "groups": [{"anchor": "l", "members": {"w_in": -1, "w_out": 0}}],
  },
  {"match": "m/*", "non_negative": True},
  {"match": "n/*", "max_abs": 0.3},
  {"match": "o/*", "n_of_m": [2, 4], "axis": [0]},
  {"match": "p/*", "sparsity": {"fraction": 0.5, "update_every": 10, "update_start": 0}},
  {
    "match": "q/**",
    "group_sparsity": {
      "schedule": "polynomial_sparsity_schedule",
      "final": 0.5,
      "begin_step": 0,
      "end_step": 100,
    },
    "groups": {"anchor": "q", "members": {"w_in": -1}, "stacked": True},
  },
  {"match": "r/*", "unit_norm": True, "axis": "torch"},
  {"match": "s/*", "min_max_norm": {"min_norm": 0.5, "max_norm": 2.0, "rate": 1.0}},
  {
    "match": "t/*",
    "spectral_norm": {"max_norm": 1.0, "mode": "scale"},
    "axis": {"layout": "torch", "stacked": ["t/*"]},
  },
  {
    "match": {"include": ["u/*"], "exclude": ["u/bias"]},
    "max_norm": 2.0,
    "axis": {"stack": [0], "reduce": [1], "block_axis": None},
  },
  {"match": "**"},
]


def test_every_setting_has_a_data_form_in_the_round_trip_table():
  used = {k for rule in ONE_RULE_PER_SETTING for k in rule if k != "match"}
  assert used == set(SETTINGS) | _MODIFIERS


def test_rules_from_data_then_rules_to_data_is_the_identity():
  rules = on.rules_from_data(ONE_RULE_PER_SETTING)
  assert on.rules_to_data(rules) == ONE_RULE_PER_SETTING
  # The Python side holds the built objects, and the data writes and reads as JSON and YAML.
  settings = {
    r["match"]: s for r, (_, s) in zip(ONE_RULE_PER_SETTING, rules) if isinstance(r["match"], str)
  }
  assert isinstance(settings["d/*"]["axis"], on.UnitAxes)
  assert settings["o/*"]["n_of_m"] == (2, 4)
  assert isinstance(settings["q/**"]["groups"], on.CoupledGroups)
  assert callable(settings["re:f/.*"]["l2"])
  assert isinstance(rules[-2][0], on.PathMask)
  for text in (json.dumps(ONE_RULE_PER_SETTING), yaml.safe_dump(ONE_RULE_PER_SETTING)):
    assert on.rules_to_data(on.rules_from_data(yaml.safe_load(text))) == ONE_RULE_PER_SETTING


def test_python_rules_go_to_data_and_back_to_the_same_data():
  axis = on.unit_axes(stacked="blocks/**")
  rules = [
    ("blocks/*/kernel", {"max_norm": np.float32(2.0), "axis": axis, "n_of_m": (2, 4)}),
    (("head/kernel", "embed/*"), {"l2": jnp.asarray(1e-4)}),
    (on.path_mask("**", exclude="x/*"), {"groups": on.coupled_groups("m", {"a": 1})}),
  ]
  data = on.rules_to_data(rules)
  assert data[0] == {
    "match": "blocks/*/kernel",
    "max_norm": 2.0,
    "axis": "stacked:blocks/**",
    "n_of_m": [2, 4],
  }
  assert data[1]["match"] == ["head/kernel", "embed/*"]
  assert data[1]["l2"] == pytest.approx(1e-4)
  assert data[2] == {
    "match": {"include": ["**"], "exclude": ["x/*"]},
    "groups": {"anchor": "m", "members": {"a": 1}},
  }
  assert on.rules_to_data(on.rules_from_data(data)) == data
  json.dumps(data)


@pytest.mark.slow
def test_data_schedules_equal_the_optax_schedules_they_name():
  ((_, settings),) = on.rules_from_data(
    [
      {
        "match": "**",
        "l2": {
          "schedule": "warmup_cosine_decay_schedule",
          "init_value": "0",
          "peak_value": "1e-3",
          "warmup_steps": 10,
          "decay_steps": "100",
        },
      }
    ]
  )
  reference = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)
  for step in (0, 5, 10, 50, 100):
    assert float(settings["l2"](step)) == float(reference(step))
  # piecewise boundaries as JSON gives them (string keys) and join_schedules of data schedules.
  ((_, settings),) = on.rules_from_data(
    [
      {
        "match": "**",
        "lr_scale": {
          "schedule": "piecewise_constant_schedule",
          "init_value": 1.0,
          "boundaries_and_scales": {"10": 0.5, "20": 0.5},
        },
      }
    ]
  )
  assert [float(settings["lr_scale"](s)) for s in (0, 15, 25)] == [1.0, 0.5, 0.25]
  joined = on.rules_from_data(
    [
      {
        "match": "**",
        "l1": {
          "schedule": "join_schedules",
          "boundaries": [5],
          "schedules": [
            {"schedule": "constant_schedule", "value": 1.0},
            {"schedule": "constant_schedule", "value": 2.0},
          ],
        },
      }
    ]
  )[0][1]["l1"]
  assert [float(joined(s)) for s in (0, 4, 5, 9)] == [1.0, 1.0, 2.0, 2.0]


def test_numeric_strings_are_numbers_as_pyyaml_gives_them():
  loaded = yaml.safe_load(
    "- {match: '**/kernel', l2: 1e-4, max_norm: 2, n_of_m: [2, 4]}\n- {match: '**'}"
  )
  assert loaded[0]["l2"] == "1e-4"  # PyYAML's YAML 1.1 reads 1e-4 (no dot) as a string
  (_, settings), _ = on.rules_from_data(loaded)
  assert settings == {"l2": 1e-4, "max_norm": 2, "n_of_m": (2, 4)}


@pytest.mark.parametrize(
  "rule, message",
  [
    (
      {"match": "**", "l2": "1e-4x"},
      r"Rule 0 \('\*\*'\), setting 'l2': 'l2' takes a number .* got the string '1e-4x'",
    ),
    (
      {"match": "**", "decoupled_decay": {"weight_decay": "lots"}},
      r"setting 'decoupled_decay': 'weight_decay' takes a number",
    ),
    (
      {"match": "**", "l2": {"schedule": "cosine_decay", "init_value": 1.0}},
      r"setting 'l2': unknown schedule 'cosine_decay'.*'cosine_decay_schedule'",
    ),
    (
      {
        "match": "**",
        "l2": {
          "schedule": "linear_schedule",
          "init_value": 1.0,
          "end_value": 0.0,
          "transition_steps": 5,
          "steps": 3,
        },
      },
      r"setting 'l2': the schedule 'linear_schedule' has no argument 'steps'",
    ),
    (
      {"match": "**", "l2": {"schedule": "inject_hyperparams"}},
      r"unknown schedule 'inject_hyperparams'",
    ),
    ({"match": "**", "axis": "stacked"}, r"setting 'axis': `axis` as data is"),
    ({"match": "**", "groups": {"anchor": "m"}}, r"setting 'groups': `groups` as data is"),
    (
      {"match": "**", "clip_globl_norm": 1.0},
      r"unknown setting 'clip_globl_norm'. Did you mean 'clip_global_norm'\?",
    ),
    ({"l2": 1.0}, r"Rule 0: a rule given as data needs 'match'"),
    ({"match": {"inclde": "**"}}, r"Rule 0 .*a selector given as a dict takes 'include'"),
    ({"match": "re:(unclosed"}, r"Rule 0 .*not a valid regular expression"),
  ],
)
def test_bad_data_names_the_rule_and_key(rule, message):
  with pytest.raises(ValueError, match=message):
    on.rules_from_data([rule, {"match": "**"}])


def test_rules_to_data_raises_for_what_has_no_data_form():
  with pytest.raises(
    ValueError, match=r"Rule 1 \('\*\*/kernel'\), setting 'l2': .*Python function"
  ):
    on.rules_to_data([("x", None), ("**/kernel", {"l2": lambda step: 1e-4})])
  with pytest.raises(ValueError, match=r"Rule 0 .*key 'match': .*predicate"):
    on.rules_to_data([(on.weights_only(), {"l2": 1e-4})])
  with pytest.raises(ValueError, match=r"setting 'axis': an `axis` callable"):
    on.rules_to_data([("**", {"max_norm": 1.0, "axis": lambda path, leaf: (0,)})])


def test_re_selectors_match_the_whole_path():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "kernel": jnp.ones(2)}
  rows = on.describe_rules(
    [{"match": "re:kernel", "l2": 1.0}, {"match": "**"}], params, as_data=True
  )
  assert {r["path"]: r["rule"] for r in rows} == {"dense/bias": 1, "dense/kernel": 1, "kernel": 0}
  rows = on.describe_rules(
    [{"match": ["re:.*/(kernel|bias)"], "l2": 1.0}, {"match": "**"}], params, as_data=True
  )
  assert {r["path"]: r["rule"] for r in rows} == {"dense/bias": 0, "dense/kernel": 0, "kernel": 1}
  with pytest.raises(ValueError, match=r"Rule 0 .*The regex 're:.\*/weight' matches no parameter"):
    on.regularize(optax.sgd(0.1), [{"match": "re:.*/weight", "l2": 1.0}, {"match": "**"}]).init(
      params
    )


def test_config_dicts_and_plain_dicts_give_the_same_table():
  ml_collections = pytest.importorskip("ml_collections")
  data = [{"match": "**/kernel", "l2": 1e-4, "axis": "stacked:blocks/**"}, {"match": "**"}]
  config = ml_collections.ConfigDict({"rules": data})
  from_config = on.rules_to_data(config.rules)
  from_items = on.rules_to_data([ml_collections.ConfigDict(r) for r in data])
  assert from_config == from_items == data


def test_describe_rules_as_data_is_json_and_matches_the_printed_table():
  params = {
    "blocks": {"kernel": jnp.ones((2, 3, 4))},
    "embed": {"embedding": jnp.ones((5, 3))},
    "bias": jnp.ones(3),
    "step": jnp.zeros((), jnp.int32),
  }
  rules = [
    {"match": "blocks/*", "max_norm": 2.0, "sparsity": 0.5, "axis": "stacked:blocks/**"},
    {"match": "embed/*", "l2": {"schedule": "constant_schedule", "value": 0.1}},
    ("**", {"lr_scale": lambda step: 1.0}),
  ]
  rows = on.describe_rules(rules, params, as_data=True)
  json.dumps(rows)
  by_path = {r["path"]: r for r in rows}
  assert by_path["blocks/kernel"] == {
    "path": "blocks/kernel",
    "shape": [2, 3, 4],
    "rule": 0,
    "match": "blocks/*",
    "settings": {"sparsity": 0.5, "max_norm": 2.0, "axis": "stacked:blocks/**"},
    "axes": {"stack": [0], "reduce": [1], "units": 4, "reads": "zero 6 of 12"},
  }
  assert by_path["embed/embedding"]["settings"] == {
    "l2": {"schedule": "constant_schedule", "value": 0.1}
  }
  assert by_path["embed/embedding"]["axes"] is None
  assert by_path["bias"]["settings"] == {"lr_scale": "schedule"}  # no data form: its text
  assert by_path["step"]["rule"] is None
  text = on.describe_rules(rules, params)
  assert "stack" in text and "zero 6 of 12" in text and "lr_scale=schedule" in text


# --- a YAML table against its Python twin on a stacked NNX transformer ---------------------

TRANSFORMER_YAML = """
- match: blocks/attn/*/kernel
  decoupled_decay: {weight_decay: 1e-1, cautious: true}
  max_norm: 0.5
  clip_global_norm: 1.0
  axis: stacked:blocks/**
- match: re:blocks/mlp_(in|out)/kernel
  l2: 1e-3
  clip_unit_norm: 0.05
  sparsity: {fraction: 0.25, update_every: 5}
  axis: stacked:blocks/**
- match: [embed/embedding]
  lr_scale: {schedule: linear_schedule, init_value: 1.0, end_value: 0.5, transition_steps: 10}
  clip_adaptive: {z: 2.0, decay: 0.9, warmup: 3}
  max_norm: 0.2
  axis: stacked:blocks/**
- match: blocks/ln*/**
  freeze: true
- match: "**"
"""


def _python_twin():
  axis = on.unit_axes(stacked="blocks/**")
  return [
    (
      "blocks/attn/*/kernel",
      {
        "decoupled_decay": {"weight_decay": 0.1, "cautious": True},
        "max_norm": 0.5,
        "clip_global_norm": 1.0,
        "axis": axis,
      },
    ),
    (
      "re:blocks/mlp_(in|out)/kernel",
      {
        "l2": 1e-3,
        "clip_unit_norm": 0.05,
        "sparsity": {"fraction": 0.25, "update_every": 5},
        "axis": axis,
      },
    ),
    (
      ["embed/embedding"],
      {
        "lr_scale": optax.linear_schedule(1.0, 0.5, 10),
        "clip_adaptive": {"z": 2.0, "decay": 0.9, "warmup": 3},
        "max_norm": 0.2,
        "axis": axis,
      },
    ),
    ("blocks/ln*/**", {"freeze": True}),
    ("**", None),
  ]


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax's adam and schedules
def test_a_yaml_table_and_its_python_twin_give_identical_updates_over_10_adam_steps():
  from test_groups import LR, _nnx_functional, _train

  _, params, loss = _nnx_functional()
  data = yaml.safe_load(TRANSFORMER_YAML)
  ours, _ = _train(
    on.regularize(optax.adam(LR), data, learning_rate=LR, clip_global_norm=5.0),
    params,
    loss,
    steps=10,
  )
  twin, _ = _train(
    on.regularize(optax.adam(LR), _python_twin(), learning_rate=LR, clip_global_norm=5.0),
    params,
    loss,
    steps=10,
  )
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(twin)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The table acted: frozen LayerNorms bit-identical, bounds hold, a quarter of each MLP layer zero.
  for name in ("ln1", "ln2"):
    for leaf in ("scale", "bias"):
      np.testing.assert_array_equal(ours["blocks"][name][leaf], params["blocks"][name][leaf])
  q = np.asarray(ours["blocks"]["attn"]["query"]["kernel"], np.float64)
  assert np.max(np.sqrt(np.sum(q * q, axis=1))) <= 0.5
  mlp = np.asarray(ours["blocks"]["mlp_in"]["kernel"])
  assert [int(np.sum(layer == 0)) for layer in mlp] == [mlp[0].size // 4] * mlp.shape[0]
