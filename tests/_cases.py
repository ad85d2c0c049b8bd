"""The transform registry shared by the battery and the formula tests, with float64 numpy
oracles written from the textbook formulas (independent of the library's code)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

import optax_norms as on


def _unit_norm(x, axes):
  return np.sqrt(np.sum(np.square(x), axis=axes, keepdims=True))


def _soft(x, t):
  return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


def _project(v, c, axes):
  n = _unit_norm(v, axes)
  return np.where(n > c, v * c / np.where(n > 0, n, 1), v)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  factory: Callable
  hyperparams: dict  # keyword arguments of the factory (positional order kept)
  oracle: Callable  # (u, w, hp, axes) -> new u, float64 numpy
  per_unit: bool = False
  needs_params: bool = True

  def make(self, mask=None, axis=None, **overrides):
    hp = {**self.hyperparams, **overrides}
    extra = {"axis": axis} if self.per_unit else {}
    return self.factory(**hp, mask=mask, **extra)


CASES = [
    Case("add_l2_decay", on.add_l2_decay, {"alpha": 0.3}, lambda u, w, hp, a: u + 2 * hp["alpha"] * w),
    Case("add_l1_decay", on.add_l1_decay, {"alpha": 0.3}, lambda u, w, hp, a: u + hp["alpha"] * np.sign(w)),
    Case(
        "elastic", on.elastic, {"l1": 0.2, "l2": 0.3},
        lambda u, w, hp, a: u + hp["l1"] * np.sign(w) + 2 * hp["l2"] * w,
    ),
    Case(
        "add_max_norm_decay", on.add_max_norm_decay, {"max_norm": 1.0, "alpha": 0.5},
        lambda u, w, hp, a: u + 2 * hp["alpha"] * np.maximum(_unit_norm(w, a) - hp["max_norm"], 0)
        * w / np.where(_unit_norm(w, a) > 0, _unit_norm(w, a), 1),
        per_unit=True,
    ),
    Case(
        "prox_l1", on.prox_l1, {"alpha": 0.5, "learning_rate": 0.4},
        lambda u, w, hp, a: _soft(w + u, hp["learning_rate"] * hp["alpha"]) - w,
    ),
    Case(
        "prox_elastic", on.prox_elastic, {"l1": 0.5, "l2": 0.25, "learning_rate": 0.4},
        lambda u, w, hp, a: _soft(w + u, hp["learning_rate"] * hp["l1"])
        / (1 + 2 * hp["learning_rate"] * hp["l2"]) - w,
    ),
    Case(
        "prox_group_l2", on.prox_group_l2, {"alpha": 1.0, "learning_rate": 0.5},
        lambda u, w, hp, a: (w + u) * np.maximum(
            0, 1 - hp["learning_rate"] * hp["alpha"]
            / np.where(_unit_norm(w + u, a) > 0, _unit_norm(w + u, a), np.inf)) - w,
        per_unit=True,
    ),
    Case(
        "clip_by_max_abs", on.clip_by_max_abs, {"max_abs": 0.5},
        lambda u, w, hp, a: np.clip(u, -hp["max_abs"], hp["max_abs"]), needs_params=False,
    ),
    Case(
        "clip_by_row_norm", on.clip_by_row_norm, {"max_norm": 1.0},
        lambda u, w, hp, a: _project(u, hp["max_norm"], a), per_unit=True, needs_params=False,
    ),
    Case(
        "constrain_max_abs", on.constrain_max_abs, {"max_abs": 0.5},
        lambda u, w, hp, a: np.clip(w + u, -hp["max_abs"], hp["max_abs"]) - w,
    ),
    Case(
        "constrain_row_norm", on.constrain_row_norm, {"max_norm": 1.0},
        lambda u, w, hp, a: _project(w + u, hp["max_norm"], a) - w, per_unit=True,
    ),
]

CASE_IDS = [case.name for case in CASES]


def default_axes(ndim):
  return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))
