"""Weight decay conventions, cautious decay and CPR from a rule of ``regularize``.

References: float64 NumPy steps of SGD followed by the decay with each convention's
coefficient (``lr_t``, ``lr_t/peak``, ``lr_t²/peak``, times ``lr_scale`` where the rule's step
size enters), and ``cpr`` itself (tested against the reference AdamCPR in test_cpr.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on

PEAK = 0.1
SCHEDULE = optax.linear_schedule(PEAK, 0.01, transition_steps=6)


def _params():
  rng = np.random.default_rng(0)
  return {
    "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.ones(3)},
    "out": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
  }


def _grads(params):
  return jax.tree.map(lambda w: jnp.sin(3 * w) + 0.5, params)


@pytest.mark.standard_promotion  # optax's schedules
@pytest.mark.parametrize(
  "convention, cautious, lr_scale",
  [
    ("lr", False, None),
    ("independent", False, None),
    ("adamc", False, None),
    ("lr", True, None),
    ("independent", False, 0.5),
    ("adamc", True, 0.5),
  ],
)
def test_each_convention_from_a_rule_matches_numpy_steps(convention, cautious, lr_scale):
  settings = {"decoupled_decay": {"weight_decay": 0.4, "convention": convention}}
  if cautious:
    settings["decoupled_decay"]["cautious"] = True
  if lr_scale is not None:
    settings["lr_scale"] = lr_scale
  tx = on.regularize(
    optax.sgd(SCHEDULE),
    [("**/kernel", settings), ("**", None)],
    learning_rate=SCHEDULE,
    peak_learning_rate=PEAK,
  )
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  s = 1.0 if lr_scale is None else lr_scale
  for t in range(8):
    grads = _grads(params)
    updates, state = step(grads, state, params)
    new = optax.apply_updates(params, updates)
    lr_t = float(SCHEDULE(t))
    c = {"lr": s * lr_t, "independent": lr_t / PEAK, "adamc": s * lr_t * lr_t / PEAK}[convention]
    for path in ("dense/kernel", "out/kernel", "dense/bias"):
      module, leaf = path.split("/")
      w = np.asarray(params[module][leaf], np.float64)
      u = -s * lr_t * np.asarray(grads[module][leaf], np.float64)
      if path == "dense/bias":  # the rule ("**", None): plain SGD, unscaled
        u = -lr_t * np.asarray(grads[module][leaf], np.float64)
        expected = w + u
      else:
        decay = np.sign(u) * np.sign(w) <= 0 if cautious else np.ones(w.shape, bool)
        expected = w + np.where(decay, u - c * 0.4 * w, u)
      np.testing.assert_allclose(
        new[module][leaf], expected, rtol=2e-6, atol=2e-7, err_msg=f"step {t} {path}"
      )
    params = new


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_cpr_from_a_rule_is_per_layer_of_a_stacked_leaf_and_equals_the_transform():
  rng = np.random.default_rng(1)
  params = {
    "blocks": {"mlp": {"kernel": jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32)}},
    "head": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
  }
  axis = on.unit_axes(stacked="blocks/**")
  options = {"kappa_init_method": "dependent", "kappa_init_param": 0.5, "reg_by_lr": True}
  tx = on.regularize(
    optax.adam(0.1),
    [("blocks/**", {"cpr": options, "axis": axis}), ("**", {"cpr": options})],
    learning_rate=0.1,
  )
  direct = optax.chain(
    optax.adam(0.1),
    on.cpr(**options, learning_rate=0.1, stacked="blocks/**", mask="blocks/**"),
    on.cpr(**options, learning_rate=0.1, mask="head/**"),
  )
  ours, theirs = params, params
  s_ours, s_theirs = tx.init(params), direct.init(params)
  for _ in range(5):
    u, s_ours = tx.update(_grads(ours), s_ours, ours)
    ours = optax.apply_updates(ours, u)
    u, s_theirs = direct.update(_grads(theirs), s_theirs, theirs)
    theirs = optax.apply_updates(theirs, u)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)
  is_cpr = lambda x: isinstance(x, on.CprLeafState)  # noqa: E731
  kappas = [x.kappa for x in jax.tree.leaves(s_ours, is_leaf=is_cpr) if is_cpr(x)]
  assert sorted(k.shape for k in kappas) == [(), (2,)]
  # 0.5·Σw² of each layer at init, as a float64 reference.
  stacked = np.asarray(params["blocks"]["mlp"]["kernel"], np.float64)
  expected = 0.5 * np.sum(stacked**2, axis=(1, 2))
  got = next(k for k in kappas if k.shape == (2,))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize(
  "settings, kwargs, match",
  [
    (
      {"decoupled_decay": {"weight_decay": 0.1, "convention": "adamc"}},
      {"learning_rate": SCHEDULE},
      "`peak_learning_rate`",
    ),
    ({"decoupled_decay": {"convention": "adamc"}}, {"learning_rate": 0.1}, "'weight_decay'"),
    ({"decoupled_decay": {"weight_decay": 0.1, "wd": 1}}, {"learning_rate": 0.1}, "keys among"),
    (
      {"decoupled_decay": {"weight_decay": 0.1, "convention": "indep"}},
      {"learning_rate": 0.1},
      "`convention`",
    ),
    (
      {
        "decoupled_decay": {"weight_decay": 0.1, "convention": "independent"},
        "lr_scale": SCHEDULE,
      },
      {"learning_rate": 0.1, "peak_learning_rate": 0.1},
      "constant lr_scale",
    ),
    (
      {"cpr": {"kappa_init_method": "uniform", "kappa_init_param": 1.0}, "decoupled_decay": 0.1},
      {"learning_rate": 0.1},
      "replaces weight decay",
    ),
    ({"cpr": {"kappa_init_method": "uniform"}}, {}, "'kappa_init_param'"),
    (
      {"cpr": {"kappa_init_method": "uniform", "kappa_init_param": 1.0, "reg_by_lr": True}},
      {},
      "learning_rate=",
    ),
  ],
)
def test_bad_decay_settings_raise_naming_the_rule_and_the_fix(settings, kwargs, match):
  with pytest.raises(ValueError, match=match) as error:
    on.regularize(optax.sgd(0.1), [("**/kernel", settings), ("**", None)], **kwargs)
  assert "Rule 0 ('**/kernel')" in str(error.value)


def test_describe_rules_shows_the_decay_settings():
  rules = [
    ("**/kernel", {"decoupled_decay": {"weight_decay": 0.1, "convention": "adamc"}}),
    ("**/bias", {"cpr": {"kappa_init_method": "warm_start", "kappa_init_param": 100}}),
  ]
  table = on.describe_rules(rules, _params())
  kernel_line = next(line for line in table.splitlines() if line.startswith("dense/kernel"))
  assert "decoupled_decay=" in kernel_line and "adamc" in kernel_line
  bias_line = next(line for line in table.splitlines() if line.startswith("dense/bias"))
  assert "cpr=" in bias_line and "warm_start" in bias_line
