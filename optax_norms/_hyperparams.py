"""Hyperparameters: validation when a transform is built, and a policy for run-time values.

Every scalar hyperparameter (``alpha``, ``l1``, ``l2``, ``max_abs``, ``max_norm``,
``learning_rate``) is a Python number, a JAX/NumPy scalar, or an optax schedule
``step -> value``.

- A concrete value is checked when the transform is built: a real scalar, finite, not
  negative, and representable in float32 (the narrowest compute dtype); else
  ``ValueError`` naming the argument.
- A schedule is called at step 0 when the transform is built, under
  ``jax.ensure_compile_time_eval``, so the same check runs inside ``jax.jit(tx.init)`` and
  ``jax.eval_shape(tx.init)``. Its shape and dtype are checked at every trace (they are
  static).
- A value known only at run time (a schedule at step ``k > 0``, a value traced by
  ``optax.inject_hyperparams`` under ``jit``) cannot raise. Policy: when it is negative,
  NaN or infinite, the updates of the leaves it governs become NaN for that step, so the
  error shows in the loss at that step instead of silently growing the weights. The check
  is a scalar comparison, fused: it costs nothing measurable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
  "Hyperparams",
  "Scalar",
  "ScalarOrSchedule",
  "ScheduleState",
  "check_value",
  "evaluate_schedule",
  "is_schedule",
]

Scalar = float | int | jax.Array | np.ndarray | np.floating
ScalarOrSchedule = Scalar | Callable[[jax.Array], Scalar]

_FLOAT32_MAX = float(np.finfo(np.float32).max)


class ScheduleState(NamedTuple):
  """State of a transform whose hyperparameters include a schedule.

  Attributes:
    count: an ``int32`` scalar, the number of updates applied so far; the update that
      receives it evaluates every schedule at ``count`` (step ``k`` uses ``schedule(k)``,
      as optax does).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> tx = optax_norms.add_l2_decay(optax.linear_schedule(1e-3, 0.0, 100))
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update(params, state, params)
    >>> int(state.count)
    1
  """

  count: jax.Array  # type: ignore[assignment]  # int32: updates applied so far.


def is_schedule(value: Any) -> bool:
  """Whether `value` is a schedule ``step -> value`` (a callable that is not an array)."""
  return callable(value) and not isinstance(value, (jax.Array, np.ndarray, np.generic))


def _check_static(name: str, value: Any, what: str) -> None:
  """The checks that hold for traced values too: a real scalar."""
  if isinstance(value, (bool, np.bool_, str)) or value is None:
    raise TypeError(
      f"`{name}` must be a non-negative real number or a schedule, got {value!r}{what}."
    )
  shape = np.shape(value) if not hasattr(value, "shape") else tuple(value.shape)
  if shape:
    raise ValueError(
      f"`{name}` must be a scalar, got an array of shape {shape}{what}. "
      "Use one transform per group of leaves (with `mask=`) for different values."
    )
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    try:
      dtype = np.asarray(value).dtype
    except Exception as error:
      raise TypeError(f"`{name}` must be a scalar, got {type(value).__name__}{what}.") from error
  if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    raise ValueError(f"`{name}` must be a real number, got dtype {dtype}{what}.")


def check_value(name: str, value: Any, what: str = "") -> None:
  """Raises ValueError unless `value` is a valid hyperparameter; traced values get the
  static checks only (shape and dtype)."""
  _check_static(name, value, what)
  if isinstance(value, jax.core.Tracer):
    return
  try:
    number = float(np.asarray(value, np.float64))
  except Exception as error:  # e.g. a sharded array that cannot be fetched.
    raise ValueError(f"`{name}` must be a scalar, got {type(value).__name__}{what}.") from error
  if math.isnan(number) or math.isinf(number):
    raise ValueError(f"`{name}` must be finite, got {number}{what}.")
  if number < 0:
    raise ValueError(f"`{name}` must be non-negative, got {number}{what}.")
  if number > _FLOAT32_MAX:
    raise ValueError(
      f"`{name}` = {number:g} overflows float32 (largest {_FLOAT32_MAX:.3g}), the dtype "
      f"the update is computed in{what}."
    )


def evaluate_schedule(name: str, schedule: Any, step: int | jax.Array) -> Any:
  """``schedule(step)``; a schedule that raises becomes a ValueError naming `name`."""
  try:
    return schedule(jnp.asarray(step, jnp.int32))
  except Exception as error:
    raise ValueError(
      f"`{name}` looks like a schedule but calling it at step {step} failed: "
      f"{type(error).__name__}: {error}"
    ) from error


def _as_constant(value: Any) -> Any:
  """A concrete value as a float64 NumPy scalar (a Python int like 2**31 then casts to
  float32 instead of overflowing int32); traced values are kept."""
  if isinstance(value, jax.core.Tracer):
    return value
  return np.float64(np.asarray(value, np.float64))


def round_down(value: np.floating, dtype: Any) -> Any:
  """The largest value of `dtype` that is ``<= value`` (for bounds: ``c`` in float32 never
  exceeds the ``c`` the user gave)."""
  cast = np.asarray(value).astype(dtype)
  if float(cast) > float(value):
    cast = np.nextafter(cast, np.asarray(-np.inf, dtype))
  return cast


class Hyperparams:
  """The validated scalar hyperparameters of one transform.

  Args:
    values: ``name -> number or schedule``, in the order of the factory's signature.
    bounds: the names that are upper bounds on stored values (``max_abs``/``max_norm`` of
      a constraint): cast to the compute dtype rounding towards zero, never up.
  """

  def __init__(self, values: Mapping[str, ScalarOrSchedule], bounds: tuple[str, ...] = ()):
    self.scheduled = tuple(name for name, value in values.items() if is_schedule(value))
    self.bounds = bounds
    self.values: dict[str, Any] = {}
    for name, value in values.items():
      if name in self.scheduled:
        with jax.ensure_compile_time_eval():
          first = evaluate_schedule(name, value, 0)
          check_value(name, first, " (the schedule's value at step 0)")
        self.values[name] = value
      else:
        check_value(name, value)
        self.values[name] = _as_constant(value)
    self.runtime_checked = tuple(
      name
      for name, value in self.values.items()
      if name in self.scheduled or isinstance(value, jax.core.Tracer)
    )

  def init_state(self) -> optax.OptState:
    if self.scheduled:
      return ScheduleState(count=jnp.zeros([], jnp.int32))
    return optax.EmptyState()

  def at(self, state: optax.OptState) -> dict[str, Any]:
    """The values used by the update that receives `state` (schedules evaluated)."""
    values = {}
    for name, value in self.values.items():
      if name in self.scheduled:
        value = evaluate_schedule(name, value, state.count)
        _check_static(name, value, " (the schedule's value)")
      values[name] = value
    return values

  def in_dtype(self, values: Mapping[str, Any], dtype: Any) -> dict[str, jax.Array]:
    """`values` cast to the compute `dtype` (bounds rounded towards zero)."""
    cast = {}
    for name, value in values.items():
      if isinstance(value, np.floating) and name in self.bounds:
        cast[name] = jnp.asarray(round_down(value, dtype))
      elif isinstance(value, np.floating):
        cast[name] = jnp.asarray(value.astype(dtype))
      else:
        cast[name] = jax.lax.convert_element_type(value, dtype)
    return cast

  def valid(self, values: Mapping[str, Any]) -> jax.Array | None:
    """A scalar bool: every run-time value is finite and non-negative (None: no such value)."""
    ok = None
    for name in self.runtime_checked:
      value = jnp.asarray(values[name])
      good = (value >= 0) & jnp.isfinite(value)
      ok = good if ok is None else ok & good
    return ok

  def next_state(self, state: optax.OptState) -> optax.OptState:
    if not self.scheduled:
      return state
    return ScheduleState(count=optax.safe_increment(state.count))
