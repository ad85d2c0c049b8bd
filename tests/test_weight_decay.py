"""Decoupled weight decay in its three conventions, cautious decay and the timescale rule.

References: ``optax.adamw`` for the ``"lr"`` convention, and a float64 NumPy Adam written
from the paper's formulas with each convention's coefficient ``c_t`` (``lr_t``,
``lr_t/peak``, ``lr_t²/peak``) and the cautious mask ``sign(u)·sign(w) ≤ 0``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_norms as on

STEPS = 20
PEAK = 0.05
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, PEAK, warmup_steps=5, decay_steps=STEPS)


def _problem():
  rng = np.random.default_rng(0)
  params = {
    "dense": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(4,))},
    "out": {"kernel": rng.normal(size=(4, 3))},
  }
  targets = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
  return params, targets


def _gradient(params, targets):
  """The gradient of ``Σ (w − t)³/3 + (w − t)²``: different signs and sizes across steps."""
  return jax.tree.map(lambda w, t: (w - t) ** 2 * np.sign(w - t) + 2 * (w - t), params, targets)


def _numpy_steps(trajectory, targets, weight_decay, lr, convention, cautious, decayed):
  """Float64 Adam (b1=0.9, b2=0.999, eps=1e-8) then the decoupled decay, step by step: from
  each stored point of `trajectory` (the run under test, so float32 rounding does not
  compound), the point the next step should store."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), trajectory[0])
  mu = jax.tree.map(np.zeros_like, params)
  nu = jax.tree.map(np.zeros_like, params)
  paths = on.tree_paths(params)
  expected = []
  for t, point in enumerate(trajectory[:-1]):
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), point)
    lr_t = float(lr(t)) if callable(lr) else lr
    c = {"lr": lr_t, "independent": lr_t / PEAK, "adamc": lr_t * lr_t / PEAK}[convention]
    grads = _gradient(params, targets)
    mu = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, mu, grads)
    nu = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, nu, grads)
    leaves = []
    for path, w, m, v in zip(
      paths, jax.tree.leaves(params), jax.tree.leaves(mu), jax.tree.leaves(nu)
    ):
      m_hat, v_hat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
      u = -lr_t * m_hat / (np.sqrt(v_hat) + 1e-8)
      if path in decayed:
        apply = np.sign(u) * np.sign(w) <= 0 if cautious else np.ones(w.shape, bool)
        u = np.where(apply, u - c * weight_decay * w, u)
      leaves.append(w + u)
    expected.append(jax.tree.unflatten(jax.tree.structure(params), leaves))
  return expected


def _run(tx, params, targets):
  """The stored parameters before the first step and after each of `STEPS` steps."""
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  targets = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), targets)
  state = tx.init(params)
  step = jax.jit(tx.update)
  history = [params]
  for _ in range(STEPS):
    updates, state = step(_gradient(params, targets), state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


def _assert_trajectories_close(ours, reference, rtol, atol):
  for step, (a, b) in enumerate(zip(ours, reference)):
    for path, x, y in zip(on.tree_paths(a), jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(
        np.asarray(x, np.float64), y, rtol=rtol, atol=atol, err_msg=f"step {step} {path}"
      )


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax's adam and its schedules
@pytest.mark.parametrize("lr", [PEAK, SCHEDULE], ids=["constant", "schedule"])
def test_lr_convention_equals_optax_adamw_to_float32_rounding(lr):
  params, targets = _problem()
  mask = {"dense": {"kernel": True, "bias": False}, "out": {"kernel": True}}
  ours = optax.chain(
    optax.scale_by_adam(),
    optax.scale_by_learning_rate(lr),
    on.add_decoupled_weight_decay(0.3, lr, mask="**/kernel"),
  )
  theirs = optax.adamw(lr, weight_decay=0.3, mask=mask)
  reference = [jax.tree.map(np.asarray, p) for p in _run(theirs, params, targets)]
  _assert_trajectories_close(_run(ours, params, targets), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.standard_promotion
@pytest.mark.parametrize("cautious", [False, True], ids=["plain", "cautious"])
@pytest.mark.parametrize("convention", on._weight_decay.CONVENTIONS)
@pytest.mark.parametrize("lr", [PEAK, SCHEDULE], ids=["constant", "schedule"])
def test_each_convention_matches_the_float64_adam_reference(lr, convention, cautious):
  params, targets = _problem()
  peak = None if not callable(lr) or convention == "lr" else PEAK
  tx = optax.chain(
    optax.scale_by_adam(),
    optax.scale_by_learning_rate(lr),
    on.add_decoupled_weight_decay(
      0.5,
      lr,
      convention=convention,
      peak_learning_rate=peak,
      cautious=cautious,
      mask="**/kernel",
    ),
  )
  ours = _run(tx, params, targets)
  reference = _numpy_steps(
    ours, targets, 0.5, lr, convention, cautious, {"dense/kernel", "out/kernel"}
  )
  _assert_trajectories_close(ours[1:], reference, rtol=1e-5, atol=1e-6)


@pytest.mark.standard_promotion
def test_conventions_differ_as_their_coefficients_under_a_schedule():
  """At step t the three decays are lr_t·λ·w, (lr_t/peak)·λ·w and (lr_t²/peak)·λ·w."""
  params = {"w": jnp.array([1.0, -2.0, 4.0])}
  zeros = {"w": jnp.zeros(3)}
  for t in (0, 3, 7, 19):
    lr_t = float(SCHEDULE(t))
    for convention, c in (
      ("lr", lr_t),
      ("independent", lr_t / PEAK),
      ("adamc", lr_t * lr_t / PEAK),
    ):
      peak = None if convention == "lr" else PEAK
      tx = on.add_decoupled_weight_decay(
        0.2, SCHEDULE, convention=convention, peak_learning_rate=peak
      )
      state = on.ScheduleState(count=jnp.asarray(t, jnp.int32))
      updates, _ = tx.update(zeros, state, params)
      np.testing.assert_allclose(
        updates["w"], -c * 0.2 * np.array([1.0, -2.0, 4.0]), rtol=1e-6, err_msg=convention
      )


@pytest.mark.slow
def test_cautious_decays_only_where_the_update_points_towards_zero():
  w = jnp.array([1.0, 1.0, -1.0, -1.0, 2.0, 0.0, 3.0])
  u = jnp.array([0.1, -0.1, 0.1, -0.1, 0.0, 0.5, 1e-30])
  tx = on.add_decoupled_weight_decay(0.5, 0.1, cautious=True)
  updates, _ = tx.update({"w": u}, tx.init({"w": w}), {"w": w})
  towards_zero = np.sign(np.asarray(u)) * np.sign(np.asarray(w)) <= 0
  expected = np.where(towards_zero, np.asarray(u) - 0.05 * np.asarray(w), np.asarray(u))
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)
  # The tiny positive u (1e-30) with w = 3 moves away from zero: no decay, even though
  # u·w would underflow in a product test only for smaller values.
  assert float(updates["w"][-1]) == pytest.approx(1e-30)


@pytest.mark.standard_promotion
@pytest.mark.parametrize("convention", ["independent", "adamc"])
def test_a_schedule_without_a_peak_raises_naming_peak_learning_rate(convention):
  with pytest.raises(ValueError, match="`peak_learning_rate`"):
    on.add_decoupled_weight_decay(0.1, SCHEDULE, convention=convention)
  # optax.inject_hyperparams passes the learning rate as an array.
  injected = optax.inject_hyperparams(on.add_decoupled_weight_decay, static_args=("convention",))
  with pytest.raises(ValueError, match="`peak_learning_rate`"):
    injected(0.1, 0.01, convention=convention).init({"w": jnp.ones(2)})
  state = injected(0.1, 0.01, convention=convention, peak_learning_rate=0.02).init(
    {"w": jnp.ones(2)}
  )
  assert float(state.hyperparams["peak_learning_rate"]) == pytest.approx(0.02)


def test_a_constant_learning_rate_is_its_own_peak():
  params = {"w": jnp.array([2.0])}
  tx = on.add_decoupled_weight_decay(0.25, 0.1, convention="independent")
  updates, _ = tx.update({"w": jnp.zeros(1)}, tx.init(params), params)
  assert float(updates["w"][0]) == pytest.approx(-0.5)  # (lr/peak)·λ·w = 1·0.25·2


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"convention": "adamw"}, "convention"),
    ({"convention": "independent", "peak_learning_rate": 0.0}, "peak_learning_rate"),
    ({"convention": "adamc", "peak_learning_rate": -1.0}, "peak_learning_rate"),
    ({"cautious": "yes"}, "cautious"),
  ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
  error = TypeError if name == "cautious" else ValueError  # A wrong type, not a wrong value.
  with pytest.raises(error, match=f"`{name}`"):
    on.add_decoupled_weight_decay(0.1, 0.01, **kwargs)


@pytest.mark.parametrize("convention", on._weight_decay.CONVENTIONS)
def test_decay_from_timescale_gives_an_e_fold_decay_after_tau_iterations(convention):
  """At a constant peak lr the decay alone shrinks w by (1 − c·λ) per step: after
  τ = timescale·steps_per_epoch steps, by e⁻¹ (to first order in 1/τ)."""
  lr, timescale, steps_per_epoch = 3e-3, 4.0, 250
  weight_decay = on.decay_from_timescale(
    timescale, lr, steps_per_epoch=steps_per_epoch, convention=convention
  )
  c = {"lr": lr, "independent": 1.0, "adamc": lr * lr / lr}[convention]
  tau = int(timescale * steps_per_epoch)
  np.testing.assert_allclose((1 - c * weight_decay) ** tau, np.exp(-1), rtol=1e-3)


@pytest.mark.parametrize(
  "args, kwargs, name",
  [
    ((0.0, 1e-3), {}, "timescale"),
    ((1.0, SCHEDULE), {}, "learning_rate"),
    ((1.0, 1e-3), {"steps_per_epoch": 0}, "steps_per_epoch"),
    ((1.0, 1e-3), {"convention": "wd"}, "convention"),
  ],
)
def test_decay_from_timescale_bad_arguments(args, kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    on.decay_from_timescale(*args, **kwargs)
