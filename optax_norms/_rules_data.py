"""Rule tables as plain data (JSON, YAML, ``ml_collections``): the conversions of one value.

A data rule is ``{"match": selector, **settings}``. Its values are what a config file holds:
numbers (numeric strings too, as PyYAML reads ``1e-4``), booleans, strings, lists and dicts.
``value_from_data`` turns a setting's data form into what the transforms take (schedules,
``unit_axes``, ``coupled_groups``, tuples); ``value_to_data`` goes back, and raises for a
value that has no data form (a Python function as a schedule, an ``axis`` callable). Both are
the identity on values already in the other form, so a Python table may use data forms too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optax

from optax_norms._coupled import CoupledGroups, coupled_groups
from optax_norms._layout import Layout
from optax_norms._masks import PathMask, path_mask
from optax_norms._sparsity import polynomial_sparsity_schedule
from optax_norms._units import UnitAxes, unit_axes

__all__ = [
  "SCHEDULES",
  "DataSchedule",
  "as_plain",
  "schedule_from_data",
  "selector_from_data",
  "selector_to_data",
  "value_from_data",
  "value_to_data",
]

# The schedule factories a data schedule may name: optax's (those this optax has) and ours.
_OPTAX_SCHEDULES = (
  "constant_schedule",
  "cosine_decay_schedule",
  "cosine_onecycle_schedule",
  "exponential_decay",
  "join_schedules",
  "linear_onecycle_schedule",
  "linear_schedule",
  "piecewise_constant_schedule",
  "piecewise_interpolate_schedule",
  "polynomial_schedule",
  "sgdr_schedule",
  "warmup_constant_schedule",
  "warmup_cosine_decay_schedule",
  "warmup_exponential_decay_schedule",
)
SCHEDULES: dict[str, Callable[..., Any]] = {
  **{name: getattr(optax, name) for name in _OPTAX_SCHEDULES if hasattr(optax, name)},
  "polynomial_sparsity_schedule": polynomial_sparsity_schedule,
}

# Inside a setting's dict: the keys whose values are text or flags (everything else is a
# number or a schedule).
_TEXT_KEYS = frozenset({"convention", "kappa_init_method", "reg_function", "mode"})
_FLAG_KEYS = frozenset({"cautious", "reg_by_lr"})


def as_plain(value: Any) -> Any:
  """`value` with config containers made plain: ``ml_collections.ConfigDict`` (anything with
  ``to_dict``) and other mappings become dicts, tuples stay, lists stay lists."""
  if hasattr(value, "to_dict") and callable(value.to_dict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: as_plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [as_plain(v) for v in value]
  return value


def _number(text: str) -> int | float | None:
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return None


class DataSchedule:
  """A schedule built from its data form ``{"schedule": name, **kwargs}``, which it keeps (so
  the rule table it is in converts back to data).

  Examples:
    >>> from optax_norms._rules_data import schedule_from_data
    >>> s = schedule_from_data({"schedule": "linear_schedule", "init_value": "1e-4",
    ...                         "end_value": 0.0, "transition_steps": 10})
    >>> round(float(s(5)), 9), s.data
    (5e-05, {'schedule': 'linear_schedule', 'init_value': 0.0001, 'end_value': 0.0, 'transition_steps': 10})
  """

  def __init__(self, name: str, kwargs: dict[str, Any], schedule: Callable[[Any], Any]):
    self.name = name
    self.kwargs = kwargs
    self._schedule = schedule

  @property
  def data(self) -> dict[str, Any]:
    return {"schedule": self.name, **_kwargs_to_data(self.kwargs)}

  def __call__(self, count: Any) -> Any:
    return self._schedule(count)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, DataSchedule) and self.data == other.data

  def __hash__(self) -> int:
    return hash(repr(self))

  def __repr__(self) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
    return f"{self.name}({args})"


def _kwarg_from_data(value: Any) -> Any:
  """A schedule argument: numeric strings as numbers (also as dict keys: the boundaries of
  ``piecewise_constant_schedule``), nested data schedules built (``join_schedules``)."""
  if isinstance(value, str):
    number = _number(value)
    return value if number is None else number
  if isinstance(value, Mapping) and "schedule" in value:
    return schedule_from_data(value)
  if isinstance(value, Mapping):
    return {
      (_number(k) if isinstance(k, str) and _number(k) is not None else k): _kwarg_from_data(v)
      for k, v in value.items()
    }
  if isinstance(value, (list, tuple)):
    return [_kwarg_from_data(v) for v in value]
  return value


def _kwargs_to_data(value: Any) -> Any:
  if isinstance(value, DataSchedule):
    return value.data
  if isinstance(value, Mapping):
    return {k: _kwargs_to_data(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_kwargs_to_data(v) for v in value]
  return value


def schedule_from_data(data: Mapping[str, Any]) -> DataSchedule:
  """``{"schedule": "<name>", **kwargs}`` as a schedule: ``SCHEDULES[name](**kwargs)``, only
  the schedule functions of optax (and ``polynomial_sparsity_schedule``)."""
  data = dict(data)
  name = data.pop("schedule")
  if name not in SCHEDULES:
    raise ValueError(
      f"unknown schedule {name!r}: a data schedule names one of {sorted(SCHEDULES)}."
    )
  factory = SCHEDULES[name]
  kwargs = {k: _kwarg_from_data(v) for k, v in data.items()}
  parameters = inspect.signature(factory).parameters
  for key in kwargs:
    if key not in parameters:
      raise ValueError(
        f"the schedule {name!r} has no argument {key!r}; its arguments are {list(parameters)}."
      )
  try:
    schedule = factory(**kwargs)
  except (TypeError, ValueError) as error:
    raise ValueError(f"the schedule {name!r} with {kwargs} failed: {error}") from None
  return DataSchedule(name, kwargs, schedule)


def _scalar_from_data(key: str, value: Any) -> Any:
  """A number (numeric strings included), a flag, a text option or a schedule, by key."""
  if isinstance(value, Mapping) and "schedule" in value:
    return schedule_from_data(value)
  if isinstance(value, Mapping):
    return {k: _scalar_from_data(k, v) for k, v in value.items()}
  if isinstance(value, str) and key not in _TEXT_KEYS:
    number = _number(value)
    if number is None:
      raise ValueError(
        f"{key!r} takes a number or a schedule {{'schedule': '<optax schedule name>', ...}}, "
        f"got the string {value!r}."
      )
    return number
  return value


def _axis_from_data(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(value)
  if isinstance(value, str):
    if value.startswith("stacked:"):
      return unit_axes(stacked=value[len("stacked:") :])
    if value in ("flax", "torch"):
      return unit_axes(value)
    raise ValueError(
      "`axis` as data is an int, a list of ints, a layout name ('flax' or 'torch'), "
      "'stacked:<glob>' (flax roles, that glob's leaves stacked), {'layout': ..., 'stacked': "
      f"[globs]}} or {{'stack': [...], 'reduce': [...]}}, got {value!r}."
    )
  if isinstance(value, Mapping):
    if set(value) <= {"layout", "stacked"}:
      return unit_axes(value.get("layout", "flax"), stacked=value.get("stacked"))
    if set(value) <= {"stack", "reduce", "block_axis"}:
      return Layout(
        tuple(value.get("stack", ())), tuple(value.get("reduce", ())), value.get("block_axis")
      )
    raise ValueError(
      "`axis` as a dict is {'layout': 'flax' or 'torch', 'stacked': [globs]} or "
      f"{{'stack': [...], 'reduce': [...], 'block_axis': int}}, got {value!r}."
    )
  return value


def _axis_to_data(value: Any) -> Any:
  if isinstance(value, UnitAxes):
    if not value.stacked:
      return value.layout_name
    if value.layout_name == "flax" and len(value.stacked) == 1:
      return f"stacked:{value.stacked[0]}"
    return {"layout": value.layout_name, "stacked": list(value.stacked)}
  if isinstance(value, Layout):
    return {
      "stack": list(value.stack),
      "reduce": list(value.reduce),
      "block_axis": value.block_axis,
    }
  if callable(value):
    raise ValueError(
      f"an `axis` callable ({value!r}) has no data form: use optax_norms.unit_axes(...), "
      "a Layout or axes."
    )
  return _plain_to_data(value)


def _group_from_data(value: Any) -> Any:
  if isinstance(value, CoupledGroups):
    return value
  if isinstance(value, Mapping) and {"anchor", "members"} <= set(value) <= {
    "anchor",
    "members",
    "stacked",
  }:
    return coupled_groups(value["anchor"], value["members"], stacked=value.get("stacked", False))
  raise ValueError(
    "`groups` as data is {'anchor': glob, 'members': {relative path: axis}, 'stacked': bool} "
    f"or a list of them, got {value!r}."
  )


def _group_to_data(group: CoupledGroups) -> dict[str, Any]:
  data: dict[str, Any] = {"anchor": group.anchor, "members": dict(group.members)}
  if group.stacked:
    data["stacked"] = True
  return data


def value_from_data(key: str, value: Any) -> Any:
  """A setting's value from its data form (the identity on Python values)."""
  value = as_plain(value)
  if key == "axis":
    return _axis_from_data(value)
  if key == "groups":
    if isinstance(value, list):
      return [_group_from_data(g) for g in value]
    return _group_from_data(value)
  if key == "n_of_m" and isinstance(value, list):
    return tuple(_scalar_from_data(key, v) for v in value)
  return _scalar_from_data(key, value)


def _plain_to_data(value: Any) -> Any:
  if isinstance(value, DataSchedule):
    return value.data
  if isinstance(value, (bool, str)) or value is None:
    return value
  if isinstance(value, (int, float)):
    return value
  if isinstance(value, Mapping):
    return {str(k): _plain_to_data(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain_to_data(v) for v in value]
  if callable(value):
    raise ValueError(
      f"{value!r} is a Python function, which has no data form: give a schedule as "
      "{'schedule': '<optax schedule name>', **its arguments}."
    )
  if np.ndim(value) == 0:
    item = np.asarray(value).item()
    if isinstance(item, (bool, int, float)):
      return item
  raise ValueError(f"{value!r} ({type(value).__name__}) has no data form.")


def value_to_data(key: str, value: Any) -> Any:
  """A setting's value in its data form (lists, never tuples); raises ``ValueError`` for a
  value that has none."""
  if key == "axis":
    return _axis_to_data(value)
  if key == "groups":
    if isinstance(value, CoupledGroups):
      return _group_to_data(value)
    return [_group_to_data(g) for g in value]
  return _plain_to_data(value)


def selector_from_data(selector: Any) -> Any:
  """A rule's selector from data: a glob or ``"re:<regex>"`` string, a list of them, or
  ``{"include": ..., "exclude": ..., "regex": ...}`` (a ``path_mask``)."""
  selector = as_plain(selector)
  if isinstance(selector, Mapping):
    if not set(selector) <= {"include", "exclude", "regex"}:
      raise ValueError(
        "a selector given as a dict takes 'include', 'exclude' and 'regex' (path_mask's "
        f"arguments), got {selector!r}."
      )
    return path_mask(
      selector.get("include", ()), exclude=selector.get("exclude", ()), regex=selector.get("regex")
    )
  return selector


def selector_to_data(selector: Any) -> Any:
  if isinstance(selector, str):
    return selector
  if isinstance(selector, (list, tuple)):
    return list(selector)
  if type(selector) is PathMask and selector.where is None:
    data: dict[str, Any] = {}
    if selector.include:
      data["include"] = list(selector.include)
    if selector.exclude:
      data["exclude"] = list(selector.exclude)
    if selector.regex is not None:
      data["regex"] = selector.regex.pattern
    return data
  raise ValueError(
    f"the selector {selector!r} has no data form (a predicate `where`, or a mask class of its "
    "own): use globs, 're:<regex>' or path_mask(include, exclude=, regex=)."
  )
