"""``cpr`` against a NumPy port of the reference AdamCPR (automl/CPR, ``pytorch_cpr/adamcpr.py``).

The port below follows the reference's single-tensor path line by line (``_single_tensor_adamcpr``
with ``l2_update``, ``l1_update``, ``std_update``, ``huber_update`` and
``single_initilize_kappa``), in float64, one tensor at a time. ``optax.chain(optax.adam(lr),
cpr(...))`` is compared with it step by step: from each point our run stores, the reference takes
one step (Adam, then CPR) and the two results must agree to float32 rounding, as must the
multipliers and bounds in the states.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
STEPS = 30


@dataclasses.dataclass
class _RefState:
  """The reference's per-tensor state (``exp_avg``, ``exp_avg_sq``, ``lagmul``, ``kappa``...)."""

  exp_avg: np.ndarray
  exp_avg_sq: np.ndarray
  lagmul: float
  kappa: float
  kappa_update: float
  step: int = 0


def _ref_initialize_kappa(param, reg_function):
  """``single_initilize_kappa``."""
  if reg_function == "l2":
    return float(np.sum(np.square(param)))
  if reg_function == "std":
    return float(np.std(param, ddof=1))  # torch's std is the unbiased one
  if reg_function == "l1":
    return float(np.sum(np.abs(param)))
  size = np.abs(param)
  return float(np.sum(np.where(size < 1, 0.5 * np.square(param), size - 0.5)))


def _ref_init(param, method, init_param, reg_function, kappa_update):
  """``AdamCPR._init_group``'s state initialization."""
  if reg_function == "std":
    update = kappa_update
  else:
    update = kappa_update / param.size
  if method == "uniform":
    kappa = init_param
  elif method == "warm_start":
    kappa = 0.0
  else:  # dependent
    kappa = init_param * _ref_initialize_kappa(param, reg_function)
  return _RefState(np.zeros_like(param), np.zeros_like(param), 0.0, kappa, update)


def _ref_cpr_update(param, state, reg_function, reg_by_lr, lr):
  """``l2_update`` / ``l1_update`` / ``std_update`` / ``huber_update``."""
  if reg_function == "l2":
    constraint_value = np.sum(np.square(param)) - state.kappa
    state.lagmul = max(state.lagmul + state.kappa_update * constraint_value, 0.0)
    return param - (2 * lr if reg_by_lr else 2) * state.lagmul * param
  if reg_function == "l1":
    constraint_value = np.sum(np.abs(param)) - state.kappa
    state.lagmul = max(state.lagmul + state.kappa_update * constraint_value, 0.0)
    return param - (lr if reg_by_lr else 1) * state.lagmul * np.sign(param)
  if reg_function == "std":
    n = param.size
    std_dev = np.std(param, ddof=1)
    constraint_value = std_dev - state.kappa
    norm_param = param - np.mean(param)
    norm_param = norm_param * 2  # norm_param.mul_(2) runs before the .mean() below reads it
    grad_std_dev = (norm_param - 2 * np.mean(norm_param)) / (n - 1)
    grad_std_dev = grad_std_dev / (std_dev * 2)
    state.lagmul = max(state.lagmul + state.kappa_update * constraint_value, 0.0)
    return param - (lr if reg_by_lr else 1) * state.lagmul * grad_std_dev
  param_abs = np.abs(param)
  huber_idx = param_abs < 1
  huber_loss = np.where(huber_idx, 0.5 * np.square(param), param_abs - 0.5)
  constraint_value = np.sum(huber_loss) - state.kappa
  state.lagmul = max(state.lagmul + state.kappa_update * constraint_value, 0.0)
  grad_huber = np.where(huber_idx, param, np.sign(param))
  return param - (lr if reg_by_lr else 1) * state.lagmul * grad_huber


def _ref_step(param, grad, state, lr, method, warm_start, reg_function, reg_by_lr):
  """One step of ``_single_tensor_adamcpr`` (not capturable, no amsgrad, regularize=True)."""
  state.step += 1
  step = state.step
  state.exp_avg = state.exp_avg + (grad - state.exp_avg) * (1 - BETA1)  # lerp_
  state.exp_avg_sq = state.exp_avg_sq * BETA2 + (1 - BETA2) * grad * grad
  bias_correction1 = 1 - BETA1**step
  bias_correction2 = 1 - BETA2**step
  step_size = lr / bias_correction1
  denom = np.sqrt(state.exp_avg_sq) / bias_correction2**0.5 + EPS
  param = param - step_size * state.exp_avg / denom
  if step > warm_start:
    param = _ref_cpr_update(param, state, reg_function, reg_by_lr, lr)
  elif method == "warm_start" and step == warm_start:
    state.kappa = _ref_initialize_kappa(param, reg_function)
  return param


def _params_and_targets():
  rng = np.random.default_rng(1)
  params = {
    "dense": {"kernel": 0.5 * rng.normal(size=(8, 5)), "bias": rng.normal(size=(5,))},
    "out": {"kernel": 0.5 * rng.normal(size=(5, 3))},
  }
  # Targets far outside: R grows and the bounds become active.
  targets = jax.tree.map(lambda w: 3 * w + rng.normal(size=w.shape), params)
  return params, targets


def _gradient(params, targets):
  return jax.tree.map(lambda w, t: w - t, params, targets)


def _compare(tx_kwargs, lr, *, stacked_leaf=False):
  params, targets = _params_and_targets()
  if stacked_leaf:
    rng = np.random.default_rng(2)
    params["blocks"] = {"kernel": 0.5 * rng.normal(size=(3, 4, 6))}
    targets["blocks"] = {"kernel": 3 * params["blocks"]["kernel"] + rng.normal(size=(3, 4, 6))}
  method, init_param = tx_kwargs["kappa_init_method"], tx_kwargs["kappa_init_param"]
  reg_function = tx_kwargs.get("reg_function", "l2")
  reg_by_lr = tx_kwargs.get("reg_by_lr", False)
  kappa_update = tx_kwargs.get("kappa_update", 1.0)
  warm_start = init_param if method == "warm_start" else 0
  stacked = "blocks/**" if stacked_leaf else None
  tx = optax.chain(
    optax.adam(lr),
    on.cpr(
      **tx_kwargs,
      learning_rate=lr if reg_by_lr else None,
      stacked=stacked,
      mask="**/kernel",
    ),
  )
  ours = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  targets32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), targets)
  state = tx.init(ours)
  update = jax.jit(tx.update)
  # The reference's tensors: every kernel, each layer of a stacked leaf on its own.
  tensors = {}
  for path, leaf in zip(on.tree_paths(params), jax.tree.leaves(params)):
    if path.endswith("kernel"):
      layers = range(leaf.shape[0]) if path.startswith("blocks") else [None]
      for layer in layers:
        tensors[(path, layer)] = None
  ref_states = {}
  for key in tensors:
    w = _leaf(ours, key[0])
    w = np.asarray(w if key[1] is None else w[key[1]], np.float64)
    ref_states[key] = _ref_init(w, method, init_param, reg_function, kappa_update)
  active_steps = 0
  for t in range(STEPS):
    lr_t = float(lr(t)) if callable(lr) else lr
    grads = _gradient(ours, targets32)
    updates, state = update(grads, state, ours)
    stored = optax.apply_updates(ours, updates)
    for key, ref_state in ref_states.items():
      path, layer = key
      w, g, new = (np.asarray(_leaf(tree, path), np.float64) for tree in (ours, grads, stored))
      if layer is not None:
        w, g, new = w[layer], g[layer], new[layer]
      expected = _ref_step(w, g, ref_state, lr_t, method, warm_start, reg_function, reg_by_lr)
      # Float32 rounding: R is a float32 reduction over n entries, off by up to n·2⁻²⁴·R
      # (κ at warm start too), so one step's λ is off by up to μ·2n·2⁻²⁴·max(R, κ), and the
      # weights by that times |∇R| on top of their own rounding.
      v = w + (expected - w)
      scale = max(_ref_initialize_kappa(v, reg_function), abs(ref_state.kappa), 1e-30)
      lagmul_atol = ref_state.kappa_update * 2 * w.size * 2.0**-24 * scale
      gradient_scale = 2 * np.max(np.abs(v)) if reg_function == "l2" else 1.0
      np.testing.assert_allclose(
        new,
        expected,
        rtol=1e-5,
        atol=1e-6 + lagmul_atol * gradient_scale * (lr_t if reg_by_lr else 1),
        err_msg=f"step {t} {key}",
      )
      leaf_state = _leaf(state[1].leaves, path)
      lagmul, kappa = (np.asarray(x, np.float64) for x in (leaf_state.lagmul, leaf_state.kappa))
      if layer is not None:
        lagmul, kappa = lagmul[layer], kappa[layer]
      np.testing.assert_allclose(
        lagmul, ref_state.lagmul, rtol=1e-5, atol=lagmul_atol, err_msg=f"λ at step {t} {key}"
      )
      np.testing.assert_allclose(
        kappa, ref_state.kappa, rtol=1e-5, atol=w.size * 2.0**-24 * scale, err_msg=f"κ {t} {key}"
      )
      # Step by step: the next reference step starts from our multiplier and bound, as it
      # starts from our weights, so float32 rounding does not compound.
      ref_state.lagmul, ref_state.kappa = float(lagmul), float(kappa)
      active_steps += ref_state.lagmul > 0
    ours = stored
  # The comparison is not vacuous: the multiplier was active on some steps.
  assert active_steps > 0
  # Biases are not regularized (mask): plain Adam there.
  return state


def _leaf(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax's adam
@pytest.mark.parametrize("reg_function", ["l2", "l1", "std", "huber"])
@pytest.mark.parametrize(
  "method, init_param",
  [("warm_start", 10), ("uniform", 2.0), ("dependent", 1.1)],
  ids=["warm_start", "uniform", "dependent"],
)
def test_matches_the_reference_step_by_step(reg_function, method, init_param):
  if method == "uniform":  # a bound below the initial R of some kernels, above it of others
    init_param = {"l2": 4.0, "l1": 8.0, "std": 0.45, "huber": 2.0}[reg_function]
  _compare(
    {"kappa_init_method": method, "kappa_init_param": init_param, "reg_function": reg_function},
    0.05,
  )


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_reg_by_lr_with_a_schedule_and_a_kappa_update():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=4, decay_steps=STEPS)
  _compare(
    {
      "kappa_init_method": "warm_start",
      "kappa_init_param": 5,
      "kappa_update": 3.0,
      "reg_by_lr": True,
    },
    schedule,
  )


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize("reg_function", ["l2", "std"])
@pytest.mark.parametrize("method, init_param", [("warm_start", 8), ("dependent", 1.1)])
def test_a_stacked_leaf_has_one_bound_per_layer_as_separate_tensors(
  method, init_param, reg_function
):
  state = _compare(
    {"kappa_init_method": method, "kappa_init_param": init_param, "reg_function": reg_function},
    0.05,
    stacked_leaf=True,
  )
  assert state[1].leaves["blocks"]["kernel"].kappa.shape == (3,)
  assert state[1].leaves["dense"]["kernel"].kappa.shape == ()


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_the_bound_holds_after_training():
  """After warm start the multiplier keeps R near its bound although the loss pulls away."""
  params, targets = _params_and_targets()
  tx = optax.chain(
    optax.adam(0.05),
    on.cpr(kappa_init_method="warm_start", kappa_init_param=5, mask="**/kernel"),
  )
  plain = optax.adam(0.05)
  runs = {}
  for name, opt in (("cpr", tx), ("adam", plain)):
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    s = opt.init(p)
    for _ in range(300):
      u, s = opt.update(_gradient(p, targets), s, p)
      p = optax.apply_updates(p, u)
    runs[name] = (p, s)
  p, s = runs["cpr"]
  kappa = float(s[1].leaves["dense"]["kernel"].kappa)
  r_cpr = float(np.sum(np.square(np.asarray(p["dense"]["kernel"], np.float64))))
  r_adam = float(np.sum(np.square(np.asarray(runs["adam"][0]["dense"]["kernel"], np.float64))))
  assert r_adam > 2 * kappa  # unconstrained, the kernel grows far beyond the bound
  assert r_cpr < 1.05 * kappa


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"kappa_init_method": "inflection_point", "kappa_init_param": 1000}, "kappa_init_method"),
    (
      {"kappa_init_method": "uniform", "kappa_init_param": 1.0, "reg_function": "l3"},
      "reg_function",
    ),
    ({"kappa_init_method": "warm_start", "kappa_init_param": 0}, "kappa_init_param"),
    ({"kappa_init_method": "warm_start", "kappa_init_param": 2.5}, "kappa_init_param"),
    ({"kappa_init_method": "uniform", "kappa_init_param": -1.0}, "kappa_init_param"),
    ({"kappa_init_method": "uniform", "kappa_init_param": 1.0, "reg_by_lr": True}, "learning_rate"),
    (
      {"kappa_init_method": "uniform", "kappa_init_param": 1.0, "kappa_update": -1.0},
      "kappa_update",
    ),
  ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    on.cpr(**kwargs)


def test_a_stacked_glob_matching_nothing_raises_at_init():
  tx = on.cpr(kappa_init_method="uniform", kappa_init_param=1.0, stacked="blocks/**")
  with pytest.raises(ValueError, match="blocks/\\*\\*"):
    tx.init({"dense": {"kernel": jnp.ones((2, 2))}})


def test_state_checkpoints_as_plain_arrays_and_is_stable_under_jit():
  params = {"dense": {"kernel": jnp.ones((3, 2))}}
  tx = on.cpr(kappa_init_method="dependent", kappa_init_param=0.5)
  state = tx.init(params)
  new_state = jax.jit(tx.update)(params, state, params)[1]
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(new_state))
  np.testing.assert_allclose(float(state.leaves["dense"]["kernel"].kappa), 0.5 * 6.0)


@pytest.mark.slow
def test_a_nan_reaches_its_own_matrix_only():
  params = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((3, 2))}}
  updates = {
    "a": {"kernel": jnp.zeros((2, 3)).at[0, 0].set(jnp.nan)},
    "b": {"kernel": jnp.zeros((3, 2))},
  }
  tx = on.cpr(kappa_init_method="uniform", kappa_init_param=1.0)
  new, state = tx.update(updates, tx.init(params), params)
  assert np.all(np.isnan(np.asarray(new["a"]["kernel"])))
  assert np.isnan(float(state.leaves["a"]["kernel"].lagmul))
  # b: Σw² = 6 > 1, λ = (6 − 1)/6, w − 2λw, all finite.
  np.testing.assert_allclose(new["b"]["kernel"], -2 * (5 / 6) * np.ones((3, 2)), rtol=1e-6)
