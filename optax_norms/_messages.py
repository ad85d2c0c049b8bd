"""The messages several modules raise, each worded once.

This module imports nothing of the package: any module may use it.
"""

from __future__ import annotations

__all__ = ["missing_params", "static_args_hint"]


def missing_params(name: str) -> ValueError:
  """The error of a transform that reads the parameters but got ``params=None``.

  Examples:
    >>> print(missing_params("constrain_max_abs"))
    `constrain_max_abs` reads the current parameters, but `params` was not passed: call `tx.update(updates, state, params)`.
  """
  return ValueError(
    f"`{name}` reads the current parameters, but `params` was not passed: call "
    "`tx.update(updates, state, params)`."
  )


def static_args_hint(*names: str) -> str:
  """The hint for an argument that ``optax.inject_hyperparams`` turned into a schedule or a
  traced array: the ``static_args`` that keep `names` Python values.

  Examples:
    >>> print(static_args_hint("mask", "axis"))
    Under optax.inject_hyperparams every callable argument is called as a schedule and every number is traced: pass static_args=('mask', 'axis').
  """
  listed = ", ".join(repr(name) for name in names) + ("," if len(names) == 1 else "")
  return (
    "Under optax.inject_hyperparams every callable argument is called as a schedule and "
    f"every number is traced: pass static_args=({listed})."
  )
