"""Hyperparameters: validation at construction and resolution at each step.

Every scalar hyperparameter (``alpha``, ``l1``, ``l2``, ``max_abs``, ``max_norm``,
``learning_rate``) is a Python number, a JAX/NumPy scalar, or an optax schedule
``step -> value``. Concrete values are checked when the transform is built; values traced
by ``optax.inject_hyperparams`` are checked when they are concrete (at ``init``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["Hyperparams", "Scalar", "ScalarOrSchedule", "ScheduleState", "evaluate_schedule"]

Scalar = float | int | jax.Array | np.ndarray | np.floating
ScalarOrSchedule = Scalar | Callable[[jax.Array], Scalar]

# Steps at which a schedule is probed at construction: catches a schedule that goes
# negative, NaN or infinite later in training (a bad warmup/decay formula) before a job runs.
_SCHEDULE_PROBE_STEPS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


class ScheduleState(NamedTuple):
  """State of a transform whose hyperparameters include a schedule."""

  count: jax.Array  # int32, the number of updates applied so far.


def _is_schedule(value: Any) -> bool:
  return callable(value) and not isinstance(value, (jax.Array, np.ndarray, np.generic))


def _check_concrete(name: str, value: Any, what: str = "") -> None:
  """Raises ValueError unless `value` is a finite, non-negative real scalar."""
  if isinstance(value, jax.core.Tracer):
    return  # Traced (inject_hyperparams under jit): checked at init, where it is concrete.
  if isinstance(value, (bool, np.bool_)) or isinstance(value, str) or value is None:
    raise ValueError(
        f"`{name}` must be a non-negative real number or a schedule, got {value!r}{what}."
    )
  try:
    array = np.asarray(value)
  except Exception as error:  # e.g. a sharded array that cannot be fetched.
    raise ValueError(f"`{name}` must be a scalar, got {type(value).__name__}{what}.") from error
  if array.ndim != 0:
    raise ValueError(
        f"`{name}` must be a scalar, got an array of shape {array.shape}{what}. "
        "Use one transform per group of leaves (with `mask=`) for different values."
    )
  if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise ValueError(f"`{name}` must be a real number, got dtype {array.dtype}{what}.")
  number = float(array)
  if math.isnan(number) or math.isinf(number):
    raise ValueError(f"`{name}` must be finite, got {number}{what}.")
  if number < 0:
    raise ValueError(f"`{name}` must be non-negative, got {number}{what}.")


def evaluate_schedule(name: str, schedule: Callable[[jax.Array], Any], step: int) -> Any:
  """``schedule(step)``; a schedule that raises becomes a ValueError naming `name`."""
  try:
    return schedule(jnp.asarray(step, jnp.int32))
  except Exception as error:
    raise ValueError(
        f"`{name}` looks like a schedule but calling it at step {step} failed: "
        f"{type(error).__name__}: {error}"
    ) from error


class Hyperparams:
  """The validated scalar hyperparameters of one transform.

  Args:
    values: ``name -> number or schedule``, in the order of the factory's signature.
  """

  def __init__(self, values: Mapping[str, ScalarOrSchedule]):
    self.values = dict(values)
    self.scheduled = tuple(name for name, value in self.values.items() if _is_schedule(value))
    for name, value in self.values.items():
      if name not in self.scheduled:
        _check_concrete(name, value)

  def check_schedules(self) -> None:
    """Probes each schedule at a few steps; raises ValueError naming a bad one."""
    for name in self.scheduled:
      schedule = self.values[name]
      for step in _SCHEDULE_PROBE_STEPS:
        value = evaluate_schedule(name, schedule, step)
        _check_concrete(name, value, f" (the schedule's value at step {step})")

  def init_state(self) -> optax.OptState:
    self.check_schedules()  # Constant values were checked at construction.
    if self.scheduled:
      return ScheduleState(count=jnp.zeros([], jnp.int32))
    return optax.EmptyState()

  def at(self, state: optax.OptState) -> dict[str, Any]:
    """The values used by the update that receives `state`."""
    if not self.scheduled:
      return dict(self.values)
    return {
        name: value(state.count) if name in self.scheduled else value
        for name, value in self.values.items()
    }

  def next_state(self, state: optax.OptState) -> optax.OptState:
    if not self.scheduled:
      return state
    return ScheduleState(count=optax.safe_increment(state.count))
