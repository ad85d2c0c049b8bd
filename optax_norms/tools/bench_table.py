"""The bench's table: for every public transform, how ``python -m optax_norms bench`` builds
and times it.

Each :class:`BenchEntry` holds the public factory and the training-sized hyperparameters the
bench passes to it, where it goes in a chain, a hand-written ``jnp`` version of the same math
(the ``xhand`` baseline) and the optax peer where one exists. The test suite keeps its own
registry of every transform (``tests/_registry.py``: float64 oracles, test values, skip
flags); ``tests/test_bench.py`` checks that the two tables name the same transforms and agree
on placement, per-unit and state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax_norms as on

__all__ = ["BENCH_TABLE", "BenchEntry", "by_name"]


@dataclasses.dataclass(frozen=True)
class BenchEntry:
  """One transform as the bench times it.

  Attributes:
    name: the public factory's name.
    factory: the public factory.
    placement: ``"before"`` the optimizer (penalties, clipping), ``"after"`` it (prox steps,
      constraints) or ``"optimizer"`` (it replaces the optimizer: timed against adam only).
    hyperparams: keyword arguments of the factory for the bench: small enough that training
      stays sane, large enough that clips and projections are active for part of the units.
    learning_rate: whether the factory also takes the optimizer's ``learning_rate`` (prox
      steps), which the bench passes as the optimizer's own.
    options: non-hyperparameter keyword arguments (not given as schedules).
    per_unit: whether the rule reduces over units (an element-wise target does not apply).
    reduces_leaf: whether the rule reduces over whole leaves or N:M blocks without taking an
      ``axis`` (the budgets rank, CPR reads the leaf's norm): held, like a per-unit rule, to
      the per-unit target against the hand-written version, not to the element-wise ones.
    stateful: whether the state holds per-leaf arrays beyond a schedule count (its state
      bytes are measured but not held to the zero-state targets).
    hand_rule: ``(hp, lr) -> (g, w) -> new g``: the math in plain ``jnp``, on float32 leaves
      with the default axes, or ``None``.
    peer: ``(hp, mask) -> (optax transform, same math?)`` or ``None``.
  """

  name: str
  factory: Callable[..., Any]
  placement: str
  hyperparams: dict[str, float] = dataclasses.field(default_factory=dict)
  learning_rate: bool = False
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  per_unit: bool = False
  reduces_leaf: bool = False
  stateful: bool = False
  hand_rule: Callable[[dict[str, float], float], Callable[[Any, Any], Any]] | None = None
  peer: Callable[[dict[str, float], Any], tuple[Any, bool]] | None = None

  def values(self, lr: float) -> dict[str, float]:
    """The hyperparameters for the bench; ``learning_rate`` is the optimizer's `lr`."""
    values = dict(self.hyperparams)
    if self.learning_rate:
      values["learning_rate"] = lr
    return values


def _jnp():
  import jax.numpy as jnp

  return jnp


def _hand_norm(x):
  jnp = _jnp()
  return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(x.ndim - 1)), keepdims=True))


def _hand_soft(x, t):
  jnp = _jnp()
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0)


def _hand_max_norm_decay(hp, lr):
  del lr
  jnp = _jnp()

  def rule(g, w):
    n = _hand_norm(w)
    return g + (2 * hp["alpha"]) * jnp.maximum(n - hp["max_norm"], 0) / jnp.where(n > 0, n, 1) * w

  return rule


def _hand_group(hp, lr):
  jnp = _jnp()

  def rule(g, w):
    v = w + g
    n = _hand_norm(v)
    return v * jnp.maximum(1 - (lr * hp["alpha"]) / jnp.maximum(n, 1e-30), 0) - w

  return rule


def _hand_spectral(hp, lr):
  """One power-iteration round per step (as the bench's ``n_iter=1``) from a ones vector,
  stateless: the bench's jnp version for the cost; its numbers differ from ours (which
  carries its vectors across steps), so the bench's same-math check skips stateful entries."""
  del lr
  jnp = _jnp()

  def rule(g, w):
    v = w + g
    m = v.reshape(-1, v.shape[-1])
    x = m.T @ (m @ jnp.ones(v.shape[-1:], v.dtype))
    x = x / jnp.maximum(jnp.linalg.norm(x), 1e-30)
    sigma = jnp.linalg.norm(m @ x)
    return v * (hp["max_norm"] / jnp.maximum(sigma, hp["max_norm"])) - w

  return rule


def _hand_n_of_4(hp, lr):
  """2:4 by a stable double argsort inside each block of 4 along axis -2."""
  del lr
  jnp = _jnp()

  def rule(g, w):
    v = w + g
    blocks = jnp.moveaxis(v, -2, -1).reshape(*v.shape[:-2], v.shape[-1], -1, 4)
    rank = jnp.argsort(jnp.argsort(-jnp.abs(blocks), axis=-1, stable=True), axis=-1)
    keep = jnp.moveaxis((rank < int(hp["n"])).reshape(*v.shape[:-2], v.shape[-1], -1), -1, -2)
    return jnp.where(keep, g, -w)

  return rule


def _hand_sparsity(hp, lr):
  """Magnitude pruning by one stable sort of the leaf."""
  del lr
  jnp = _jnp()

  def rule(g, w):
    flat_g, flat_w = g.ravel(), w.ravel()
    count = int(hp["fraction"] * flat_w.size)
    pruned = jnp.argsort(jnp.abs(flat_w + flat_g), stable=True)[:count]
    return flat_g.at[pruned].set(-flat_w[pruned]).reshape(w.shape)

  return rule


def _hand_min_max(hp, lr):
  del lr
  jnp = _jnp()

  def rule(g, w):
    v = w + g
    n = _hand_norm(v)
    desired = hp["rate"] * jnp.clip(n, hp["min_norm"], hp["max_norm"]) + (1 - hp["rate"]) * n
    return v * (desired / jnp.where(n > 0, n, 1)) - w

  return rule


def _hand_cpr(hp, lr):
  """CPR's l2 step with a uniform bound 1.0, the multiplier recomputed from 0 each step
  (stateless: the cost of the reduction and the pull; its numbers differ from ours)."""
  del lr
  jnp = _jnp()

  def rule(g, w):
    v = w + g
    lagmul = jnp.maximum(hp["kappa_update"] / v.size * (jnp.sum(v * v) - 1.0), 0)
    return v - (2 * lagmul) * v - w

  return rule


def _optax_peer(build):
  def peer(hp, mask):
    import optax

    return build(optax, hp, mask)

  return peer


BENCH_TABLE: tuple[BenchEntry, ...] = (
  BenchEntry(
    "add_l2_decay",
    on.add_l2_decay,
    "before",
    {"alpha": 1e-4},
    hand_rule=lambda hp, lr: lambda g, w: g + (2 * hp["alpha"]) * w,
    peer=_optax_peer(lambda ox, hp, m: (ox.add_decayed_weights(2 * hp["alpha"], mask=m), True)),
  ),
  BenchEntry(
    "add_l1_decay",
    on.add_l1_decay,
    "before",
    {"alpha": 1e-4},
    hand_rule=lambda hp, lr: lambda g, w: g + hp["alpha"] * _jnp().sign(w),
  ),
  BenchEntry(
    "elastic",
    on.elastic,
    "before",
    {"l1": 1e-5, "l2": 1e-4},
    hand_rule=lambda hp, lr: lambda g, w: g + hp["l1"] * _jnp().sign(w) + (2 * hp["l2"]) * w,
  ),
  BenchEntry(
    "add_max_norm_decay",
    on.add_max_norm_decay,
    "before",
    {"max_norm": 1.0, "alpha": 1e-4},
    per_unit=True,
    hand_rule=_hand_max_norm_decay,
  ),
  BenchEntry(
    "prox_l1",
    on.prox_l1,
    "after",
    {"alpha": 1e-4},
    learning_rate=True,
    hand_rule=lambda hp, lr: lambda g, w: _hand_soft(w + g, lr * hp["alpha"]) - w,
  ),
  BenchEntry(
    "prox_elastic",
    on.prox_elastic,
    "after",
    {"l1": 1e-5, "l2": 1e-4},
    learning_rate=True,
    hand_rule=lambda hp, lr: (
      lambda g, w: _hand_soft(w + g, lr * hp["l1"]) / (1 + 2 * lr * hp["l2"]) - w
    ),
  ),
  BenchEntry(
    "prox_group_l2",
    on.prox_group_l2,
    "after",
    {"alpha": 1e-4},
    learning_rate=True,
    per_unit=True,
    hand_rule=_hand_group,
  ),
  BenchEntry(
    "clip_by_max_abs",
    on.clip_by_max_abs,
    "before",
    {"max_abs": 0.05},
    hand_rule=lambda hp, lr: lambda g, w: _jnp().clip(g, -hp["max_abs"], hp["max_abs"]),
    peer=_optax_peer(lambda ox, hp, m: (ox.masked(ox.clip(hp["max_abs"]), m), True)),
  ),
  BenchEntry(
    "clip_by_row_norm",
    on.clip_by_row_norm,
    "before",
    {"max_norm": 1.0},
    per_unit=True,
    hand_rule=lambda hp, lr: (
      lambda g, w: g * (hp["max_norm"] / _jnp().maximum(_hand_norm(g), hp["max_norm"]))
    ),
    # Relative (to ‖w‖) per-unit clip: the nearest peer, not the same math.
    peer=_optax_peer(lambda ox, hp, m: (ox.masked(ox.adaptive_grad_clip(0.05), m), False)),
  ),
  BenchEntry(
    "constrain_max_abs",
    on.constrain_max_abs,
    "after",
    {"max_abs": 0.05},
    hand_rule=lambda hp, lr: lambda g, w: _jnp().clip(w + g, -hp["max_abs"], hp["max_abs"]) - w,
  ),
  BenchEntry(
    "constrain_row_norm",
    on.constrain_row_norm,
    "after",
    {"max_norm": 1.0},
    per_unit=True,
    hand_rule=lambda hp, lr: (
      lambda g, w: (
        (w + g) * (hp["max_norm"] / _jnp().maximum(_hand_norm(w + g), hp["max_norm"])) - w
      )
    ),
  ),
  BenchEntry(
    # The default, one power-iteration round per step (the tests run 50).
    "constrain_spectral_norm",
    on.constrain_spectral_norm,
    "after",
    {"max_norm": 1.0},
    options={"n_iter": 1},
    per_unit=True,
    stateful=True,
    hand_rule=_hand_spectral,
  ),
  BenchEntry(
    "constrain_unit_norm",
    on.constrain_unit_norm,
    "after",
    per_unit=True,
    hand_rule=lambda hp, lr: (
      lambda g, w: (w + g) / _jnp().where(_hand_norm(w + g) > 0, _hand_norm(w + g), 1) - w
    ),
  ),
  BenchEntry(
    "constrain_min_max_norm",
    on.constrain_min_max_norm,
    "after",
    {"min_norm": 0.5, "max_norm": 1.0, "rate": 1.0},
    per_unit=True,
    hand_rule=_hand_min_max,
  ),
  BenchEntry(
    "constrain_non_negative",
    on.constrain_non_negative,
    "after",
    hand_rule=lambda hp, lr: lambda g, w: _jnp().maximum(w + g, 0) - w,
  ),
  BenchEntry(
    "prox_adam",
    on.prox_adam,
    "optimizer",
    {"l1": 1e-4},
    learning_rate=True,
    per_unit=True,
    # Timed against adam (its base) and the heuristic `adam → prox_l1` (the nearest peer,
    # not the same math), with the L1 penalty alone (closed form); no hand-written version.
    peer=_optax_peer(
      lambda ox, hp, m: (
        ox.chain(ox.adam(hp["learning_rate"]), on.prox_l1(hp["l1"], hp["learning_rate"], mask=m)),
        False,
      )
    ),
  ),
  BenchEntry(
    "add_decoupled_weight_decay",
    on.add_decoupled_weight_decay,
    "after",
    {"weight_decay": 1e-2},
    learning_rate=True,
    hand_rule=lambda hp, lr: lambda g, w: g - (lr * hp["weight_decay"]) * w,
    # optax's decay added after the optimizer's learning rate: the same math as ours.
    peer=_optax_peer(
      lambda ox, hp, m: (
        ox.add_decayed_weights(-hp["learning_rate"] * hp["weight_decay"], mask=m),
        True,
      )
    ),
  ),
  BenchEntry(
    "cpr",
    on.cpr,
    "after",
    {"kappa_update": 1.0},
    options={"kappa_init_method": "uniform", "kappa_init_param": 1.0},
    reduces_leaf=True,
    stateful=True,
    hand_rule=_hand_cpr,
  ),
  BenchEntry(
    "constrain_n_of_m",
    on.constrain_n_of_m,
    "after",
    {"n": 2.0},
    options={"m": 4},
    reduces_leaf=True,
    hand_rule=_hand_n_of_4,
  ),
  BenchEntry(
    "constrain_sparsity",
    on.constrain_sparsity,
    "after",
    {"fraction": 0.4},
    reduces_leaf=True,
    hand_rule=_hand_sparsity,
  ),
)

_BY_NAME = {entry.name: entry for entry in BENCH_TABLE}


def by_name(name: str) -> BenchEntry:
  """The bench entry of the transform `name`."""
  return _BY_NAME[name]
