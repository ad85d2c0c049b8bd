"""Diagnostics: per-leaf norms, largest unit norm and sparsity, cheap and jittable."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_norms._numerics import Axis, resolve_axes, unit_sq_norm
from optax_norms._paths import Mask, format_path
from optax_norms._transform import selected_leaves

__all__ = ["norm_report"]


def norm_report(params: Any, *, axis: Axis = None, mask: Mask = None) -> dict[str, dict[str, jax.Array]]:
  """Reports, per selected floating-point leaf, what a training loop logs.

  Args:
    params: the parameters (any pytree).
    axis: the reduced axes of a unit, as in :func:`clip_by_row_norm`.
    mask: the leaves to report; ``None`` is every floating-point leaf.

  Returns:
    ``{path: {"l1": Σ|w|, "l2": ‖w‖₂, "max_abs": max|w|, "max_unit_norm": largest unit
    norm, "zero_fraction": fraction of exact zeros, "dead_units": number of all-zero units,
    "units": number of units}}`` as float32 scalars, keyed by ``/``-joined path. Works
    under ``jax.jit`` (the keys are static).

  Example:
    >>> import jax.numpy as jnp, optax_norms
    >>> report = optax_norms.norm_report({"kernel": jnp.array([[0.0, 3.0], [0.0, 4.0]])})
    >>> float(report["kernel"]["max_unit_norm"]), float(report["kernel"]["zero_fraction"])
    (5.0, 0.5)
  """
  paths, leaves, _, active = selected_leaves(mask, params, check=True)
  report = {}
  for path, leaf, on in zip(paths, leaves, active):
    if not on:
      continue
    acc = jnp.promote_types(leaf.dtype, jnp.float32)
    w = leaf.astype(acc)
    unit_norms = jnp.sqrt(unit_sq_norm(leaf, resolve_axes(axis, path, leaf)))
    report[format_path(path)] = {
        "l1": jnp.sum(jnp.abs(w)).astype(jnp.float32),
        "l2": jnp.sqrt(jnp.sum(jnp.square(w))).astype(jnp.float32),
        "max_abs": (jnp.max(jnp.abs(w)) if w.size else jnp.zeros([], acc)).astype(jnp.float32),
        "max_unit_norm": (jnp.max(unit_norms) if unit_norms.size else jnp.zeros([], acc)).astype(jnp.float32),
        "zero_fraction": (jnp.mean(w == 0) if w.size else jnp.zeros([])).astype(jnp.float32),
        "dead_units": jnp.sum(unit_norms == 0).astype(jnp.float32),
        "units": jnp.asarray(unit_norms.size, jnp.float32),
    }
  return report
