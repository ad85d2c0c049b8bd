"""The test suite's registry of every transform (tests import it as ``_registry``).

Each :class:`Entry` holds what every shared check needs: the public factory, test values
of its hyperparameters, an independent float64 NumPy oracle written from the textbook
formula (never from the library's code), where it goes in a chain, whether it is per unit
and reads the parameters, and the shared checks it skips. Adding a transform = its
definition, one ``__init__`` line, one entry here and one in the bench's table
(``optax_norms/tools/bench_table.py``: its hand-written ``jnp`` version and optax peer);
the battery, the reliability tests and the bench then cover it, and
``tests/test_public_api.py`` and ``tests/test_bench.py`` fail until both entries exist.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

import optax_norms as on

__all__ = ["Entry", "REGISTRY", "by_name", "default_axes"]


def default_axes(ndim: int) -> tuple[int, ...]:
  """The default reduced axes: all but the last for rank >= 2, the whole leaf otherwise."""
  return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))


def _unit_norm(x, axes):
  return np.sqrt(np.sum(np.square(x), axis=axes, keepdims=True))


def _soft(x, t):
  return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


def _project(v, c, axes):
  n = _unit_norm(v, axes)
  return np.where(n > c, v * c / np.where(n > 0, n, 1), v)


def _spectral_clip(v, c, axes):
  """Each matrix with its largest singular value clipped to ``c`` (the others kept), by SVD:
  one step of the rank-1 clip with converged vectors."""
  rows = list(axes)
  cols = [a for a in range(v.ndim) if a not in rows]
  m = np.transpose(v, rows + cols).reshape(int(np.prod([v.shape[a] for a in rows])), -1)
  if not m.size:
    return v
  left, sigma, right = np.linalg.svd(m, full_matrices=False)
  # The documented rounding margin: the clip aims at c − δ·σ, δ = (2(√m + √n) + 8)·2⁻²⁴.
  target = max(c - (2 * (np.sqrt(m.shape[0]) + np.sqrt(m.shape[1])) + 8) * 2.0**-24 * sigma[0], 0)
  if sigma[0] <= target:
    return v
  m = m - (sigma[0] - target) * np.outer(left[:, 0], right[0])
  shape = [v.shape[a] for a in rows + cols]
  return np.transpose(m.reshape(shape), np.argsort(rows + cols))


def _min_max_scale(n, hp):
  desired = hp["rate"] * np.clip(n, hp["min_norm"], hp["max_norm"]) + (1 - hp["rate"]) * n
  return np.where(n > 0, desired / np.where(n > 0, n, 1), 1)


def _keep_largest(v, count):
  """Mask keeping the `count` largest |v| of a 1-d array; ties keep the lower index."""
  order = np.argsort(-np.abs(v), kind="stable")
  keep = np.zeros(v.shape, bool)
  keep[order[:count]] = True
  return keep


def _n_of_m_oracle(u, w, hp, axes, m=4):
  del axes
  v = w + u
  ax = 0 if v.ndim == 1 else v.ndim - 2
  moved = np.moveaxis(v, ax, -1)
  blocks = moved.reshape(-1, m)
  keep = np.stack([_keep_largest(b, int(np.ceil(hp["n"]))) for b in blocks])
  keep = np.moveaxis(keep.reshape(moved.shape), -1, ax)
  return np.where(keep, u, -w)


def _sparsity_oracle(u, w, hp, axes):
  del axes
  v = (w + u).ravel()
  k = min(int(np.floor(hp["fraction"] * v.size)), v.size)
  keep = _keep_largest(v, v.size - k).reshape(w.shape)
  return np.where(keep, u, -w)


def _prox_adam_oracle(u, w, hp, axes, eps=1e-8):
  """The first prox_adam update from a fresh state (m̂ = g, v̂ = g²), by a float64 root
  finder (brentq) on the unit's scalar equation."""
  from scipy.optimize import brentq

  lr, l1, l2, group = hp["learning_rate"], hp["l1"], hp["l2"], hp["group"]
  d = np.abs(u) + eps
  v = w - lr * u / d
  z = _soft(d * v, lr * l1)
  a = d + 2 * lr * l2
  lam = lr * group
  if lam == 0:
    return z / a - w
  rows = int(np.prod([z.shape[i] for i in axes]))
  moved_z = np.moveaxis(z, axes, range(len(axes))).reshape(rows, -1)
  moved_a = np.moveaxis(a, axes, range(len(axes))).reshape(moved_z.shape)
  x = np.zeros_like(moved_z)
  for j in range(moved_z.shape[1]):
    zj, aj = moved_z[:, j], moved_a[:, j]
    if np.linalg.norm(zj) <= lam:
      continue
    h = lambda t, zj=zj, aj=aj: np.sum(zj**2 / (aj * t + lam) ** 2) - 1
    t = brentq(h, 0.0, np.linalg.norm(zj) / aj.min(), xtol=1e-300, rtol=1e-15, maxiter=500)
    x[:, j] = zj * t / (aj * t + lam)
  shape = [z.shape[i] for i in axes] + [z.shape[i] for i in range(z.ndim) if i not in axes]
  return np.moveaxis(x.reshape(shape), range(len(axes)), axes) - w


def _cpr_oracle(u, w, hp, axes):
  """CPR's first step from a fresh state, uniform bound 0.5, l2: λ = max(0, μ/n·(Σv² − 0.5)),
  then v − 2λv."""
  del axes
  v = w + u
  lagmul = max(0.0, hp["kappa_update"] / v.size * (float(np.sum(v * v)) - 0.5))
  return u - 2 * lagmul * v


def _n_of_4(n, *, mask=None):
  """``constrain_n_of_m(n, 4)``: the registry's shared checks vary the schedulable ``n``."""
  return on.constrain_n_of_m(n, 4, mask=mask)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One transform and what the shared checks need to test it.

  Attributes:
    name: the public factory's name.
    factory: the public factory.
    hyperparams: keyword arguments of the factory used by the tests (signature order).
    oracle: ``(u, w, hp, axes) -> new update`` in float64 NumPy (``w`` may be unused).
    placement: ``"before"`` the optimizer (penalties, clipping) or ``"after"`` it (prox
      steps, constraints), or ``"optimizer"``: the transform is itself the optimizer (used
      instead of ``optax.adam``); its oracle is the first update from a fresh state, which
      for Adam-type optimizers is also every update under a constant gradient.
    per_unit: whether the rule reduces over units (takes ``axis``).
    needs_params: whether ``update`` reads the parameters.
    stateful: whether the state holds per-leaf arrays beyond a schedule count
      (``LeafwiseState``), so its structure is not ``EmptyState``/``ScheduleState``.
    skip: the shared checks that cannot run this transform as they are written, each
      covered by the transform's own tests instead: ``"half_precision"``,
      ``"checkpoint"``, ``"chain_of_all"`` (their trees have axis lengths that are not
      multiples of a block size; the half-precision memory checks assume no sort and no
      optimizer state), ``"nonfinite"`` (the element/unit NaN policy; ranking transforms
      have a leaf/block policy), ``"multistep"`` (the oracle is the first update from a fresh
      state and the state accumulates, as CPR's multiplier: checks that run several updates
      from a carried state compare the first one only), ``"multihost"`` (left out of the
      two-process check's table).
  """

  name: str
  factory: Callable[..., Any]
  hyperparams: dict[str, float]
  oracle: Callable[..., np.ndarray]
  placement: str
  per_unit: bool = False
  needs_params: bool = True
  stateful: bool = False
  skip: frozenset[str] = frozenset()

  def make(self, mask=None, axis=None, **overrides):
    """The transform with the test hyperparameters (or `overrides`)."""
    hp = {**self.hyperparams, **overrides}
    extra = {"axis": axis} if self.per_unit else {}
    return self.factory(**hp, mask=mask, **extra)

  def make_scheduled(self, schedule: Callable[[float], Any], mask=None, axis=None, **overrides):
    """The transform with every hyperparameter given as ``schedule(value)``."""
    hp = {k: schedule(v) for k, v in {**self.hyperparams, **overrides}.items()}
    extra = {"axis": axis} if self.per_unit else {}
    return self.factory(**hp, mask=mask, **extra)


REGISTRY: tuple[Entry, ...] = (
  Entry(
    "add_l2_decay",
    on.add_l2_decay,
    {"alpha": 0.3},
    lambda u, w, hp, a: u + 2 * hp["alpha"] * w,
    "before",
  ),
  Entry(
    "add_l1_decay",
    on.add_l1_decay,
    {"alpha": 0.3},
    lambda u, w, hp, a: u + hp["alpha"] * np.sign(w),
    "before",
  ),
  Entry(
    "elastic",
    on.elastic,
    {"l1": 0.2, "l2": 0.3},
    lambda u, w, hp, a: u + hp["l1"] * np.sign(w) + 2 * hp["l2"] * w,
    "before",
  ),
  Entry(
    "add_max_norm_decay",
    on.add_max_norm_decay,
    {"max_norm": 1.0, "alpha": 0.5},
    lambda u, w, hp, a: (
      u
      + 2
      * hp["alpha"]
      * np.maximum(_unit_norm(w, a) - hp["max_norm"], 0)
      * w
      / np.where(_unit_norm(w, a) > 0, _unit_norm(w, a), 1)
    ),
    "before",
    per_unit=True,
  ),
  Entry(
    "prox_l1",
    on.prox_l1,
    {"alpha": 0.5, "learning_rate": 0.4},
    lambda u, w, hp, a: _soft(w + u, hp["learning_rate"] * hp["alpha"]) - w,
    "after",
  ),
  Entry(
    "prox_elastic",
    on.prox_elastic,
    {"l1": 0.5, "l2": 0.25, "learning_rate": 0.4},
    lambda u, w, hp, a: (
      _soft(w + u, hp["learning_rate"] * hp["l1"]) / (1 + 2 * hp["learning_rate"] * hp["l2"]) - w
    ),
    "after",
  ),
  Entry(
    "prox_group_l2",
    on.prox_group_l2,
    {"alpha": 1.0, "learning_rate": 0.5},
    lambda u, w, hp, a: (
      (w + u)
      * np.maximum(
        0,
        1
        - hp["learning_rate"]
        * hp["alpha"]
        / np.where(_unit_norm(w + u, a) > 0, _unit_norm(w + u, a), np.inf),
      )
      - w
    ),
    "after",
    per_unit=True,
  ),
  Entry(
    "clip_by_max_abs",
    on.clip_by_max_abs,
    {"max_abs": 0.5},
    lambda u, w, hp, a: np.clip(u, -hp["max_abs"], hp["max_abs"]),
    "before",
    needs_params=False,
  ),
  Entry(
    "clip_by_row_norm",
    on.clip_by_row_norm,
    {"max_norm": 1.0},
    lambda u, w, hp, a: _project(u, hp["max_norm"], a),
    "before",
    per_unit=True,
    needs_params=False,
  ),
  Entry(
    "constrain_max_abs",
    on.constrain_max_abs,
    {"max_abs": 0.5},
    lambda u, w, hp, a: np.clip(w + u, -hp["max_abs"], hp["max_abs"]) - w,
    "after",
  ),
  Entry(
    "constrain_row_norm",
    on.constrain_row_norm,
    {"max_norm": 1.0},
    lambda u, w, hp, a: _project(w + u, hp["max_norm"], a) - w,
    "after",
    per_unit=True,
  ),
  Entry(
    # 50 rounds from the initial vector: the singular pair then equals the SVD's to float32
    # precision on the battery's matrices, so the exact SVD clip, with the documented
    # margin, is the oracle.
    # The bench (optax_norms/tools/bench_table.py) times the default, one round per step.
    "constrain_spectral_norm",
    functools.partial(on.constrain_spectral_norm, n_iter=50),
    {"max_norm": 1.0},
    lambda u, w, hp, a: _spectral_clip(w + u, hp["max_norm"], a) - w,
    "after",
    per_unit=True,
    stateful=True,
  ),
  Entry(
    "constrain_unit_norm",
    on.constrain_unit_norm,
    {},
    lambda u, w, hp, a: np.where(
      _unit_norm(w + u, a) > 0,
      (w + u) / np.where(_unit_norm(w + u, a) > 0, _unit_norm(w + u, a), 1) - w,
      u,
    ),
    "after",
    per_unit=True,
  ),
  Entry(
    "constrain_min_max_norm",
    on.constrain_min_max_norm,
    {"min_norm": 2.0, "max_norm": 3.0, "rate": 0.8},
    lambda u, w, hp, a: (w + u) * _min_max_scale(_unit_norm(w + u, a), hp) - w,
    "after",
    per_unit=True,
  ),
  Entry(
    "constrain_non_negative",
    on.constrain_non_negative,
    {},
    lambda u, w, hp, a: np.maximum(w + u, 0) - w,
    "after",
  ),
  Entry(
    "prox_adam",
    on.prox_adam,
    {"learning_rate": 0.1, "l1": 0.5, "l2": 0.25, "group": 0.5},
    _prox_adam_oracle,
    "optimizer",
    per_unit=True,
    # State beyond a schedule count; its own tests (tests/test_prox_adam.py) cover NaN,
    # state and checkpoints.
    skip=frozenset({"nonfinite", "half_precision", "checkpoint"}),
  ),
  Entry(
    "add_decoupled_weight_decay",
    on.add_decoupled_weight_decay,
    {"weight_decay": 0.3, "learning_rate": 0.5},
    lambda u, w, hp, a: u - hp["learning_rate"] * hp["weight_decay"] * w,
    "after",
  ),
  Entry(
    "cpr",
    functools.partial(on.cpr, kappa_init_method="uniform", kappa_init_param=0.5),
    {"kappa_update": 2.0},
    _cpr_oracle,
    "after",
    stateful=True,
    # One multiplier per matrix: a NaN reaches the whole matrix (and its multiplier);
    # tests/test_cpr.py checks several steps against the reference. The two-process check
    # runs it with a warm-started bound (these values diverge over its 5 carried steps).
    skip=frozenset({"multistep", "nonfinite"}),
  ),
  Entry(
    "constrain_n_of_m",
    _n_of_4,
    {"n": 2.0},
    _n_of_m_oracle,
    "after",
    # Those checks use leaves with axis lengths 5 or 6 (not multiples of 4).
    skip=frozenset({"half_precision", "checkpoint", "chain_of_all", "nonfinite"}),
  ),
  Entry(
    "constrain_sparsity",
    on.constrain_sparsity,
    {"fraction": 0.4},
    _sparsity_oracle,
    "after",
    # half_precision: its memory checks assume element-wise work (a sort needs a copy).
    skip=frozenset({"nonfinite", "half_precision"}),
  ),
)

_BY_NAME = {entry.name: entry for entry in REGISTRY}


def by_name(name: str) -> Entry:
  """The registry entry of the transform `name`."""
  return _BY_NAME[name]
