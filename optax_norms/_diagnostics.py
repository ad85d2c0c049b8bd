"""Diagnostics: per-leaf norms and sparsity (jittable), and whether a decay step survives
the rounding of the leaf dtype (eager).

Precision: a coupled L2 step ``w ← w − lr·2α·w`` (``add_l2_decay(α)`` before
``optax.sgd(lr)``) or a decoupled one (``optax.adamw(lr, weight_decay=wd)``: ``w ← w −
lr·wd·w``, i.e. ``α = wd/2``) changes a weight by the relative amount ``lr·2α``. When that
is below half the spacing of the weight's dtype, round-to-nearest gives back ``w``: the
decay silently does nothing. For bfloat16 (8 significant bits) this happens as soon as
``lr·2α < 2⁻⁹ ≈ 0.002``, which is the usual case (``lr = 1e-3``, ``wd = 0.1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_norms._hyperparams import ScalarOrSchedule, check_value, evaluate_schedule, is_schedule
from optax_norms._layout import Axis
from optax_norms._masks import Mask
from optax_norms._numerics import compute_dtype, unit_norm
from optax_norms._paths import format_path
from optax_norms._transform import selected_leaves
from optax_norms._units import UnitAxes, resolve_layout, unit_axes

__all__ = ["DecayResolution", "LeafDecayResolution", "decay_resolution_report", "norm_report"]


def norm_report(
  params: Any,
  *,
  axis: Axis = None,
  mask: Mask = None,
  stacked: str | Sequence[str] | None = None,
) -> dict[str, dict[str, jax.Array]]:
  """Reports, per selected floating-point leaf, the norms and sparsity a training loop logs.

  For each leaf ``w``: ``l1 = Σ|w|``, ``l2 = ‖w‖₂``, ``max_abs = max|w|``, the largest unit
  norm ``max_unit ‖w_unit‖₂`` (units as in ``clip_by_row_norm``), the fraction of exact zeros
  and the number of all-zero units. Norms accumulate in ≥ float32.

  Args:
    params: the parameters (any pytree).
    axis: the reduced axes of a unit, as in ``clip_by_row_norm``.
    mask: the leaves to report; ``None`` is every floating-point leaf.
    stacked: glob(s) of leaves with one leading layer axis (scanned or vmapped stacks);
      their statistics are per layer. A leaf is also stacked when `axis` is a
      ``unit_axes`` whose ``stacked=`` matches it. With ``axis=None``, `stacked` sets
      ``axis=unit_axes(stacked=stacked)``.

  Returns:
    ``{path: {"l1": Σ|w|, "l2": ‖w‖₂, "max_abs": max|w|, "max_unit_norm": largest unit
      norm, "zero_fraction": fraction of exact zeros, "dead_units": number of all-zero
      units, "units": number of units, "axes": the reduced axes (int32)}}``, keyed by
      ``/``-joined path. The statistics are float32 scalars, or ``(layers,)`` vectors for a
      stacked leaf (one entry per layer). Works under ``jax.jit`` (the keys are static).

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> report = optax_norms.norm_report({"kernel": jnp.array([[0.0, 3.0], [0.0, 4.0]])})
    >>> float(report["kernel"]["max_unit_norm"]), float(report["kernel"]["zero_fraction"])
    (5.0, 0.5)
    >>> stack = {"blocks": {"kernel": jnp.ones((3, 4, 2))}}
    >>> optax_norms.norm_report(stack, stacked="blocks/**")["blocks/kernel"]["units"]
    Array([2., 2., 2.], dtype=float32)
  """
  layers = unit_axes(stacked=stacked) if stacked is not None else None
  if axis is None and layers is not None:
    axis = layers
  paths, leaves, _, active = selected_leaves(mask, params, check=True)
  for found in {id(a): a for a in (axis, layers) if isinstance(a, UnitAxes)}.values():
    found.check([p for p, selected in zip(paths, active) if selected])
  shapes = {p: tuple(np.shape(leaf)) for p, leaf in zip(paths, leaves) if leaf is not None}
  report = {}
  for path, leaf, selected in zip(paths, leaves, active):
    if not selected:
      continue
    acc = compute_dtype(leaf.dtype)
    w = leaf.astype(acc)
    layout = resolve_layout(axis, path, leaf, shapes=shapes)
    if layers is not None and layers.is_stacked(path) and not layout.stack:
      if 0 in layout.reduce:
        raise ValueError(
          f"`axis` reduces the layer axis 0 of the stacked parameter {format_path(path)!r} "
          f"(shape {leaf.shape}): use axis=optax_norms.unit_axes(stacked=...)."
        )
      layout = layout._replace(stack=(0,))
    every = tuple(a for a in range(w.ndim) if a not in layout.stack)
    stack_shape = tuple(w.shape[a] for a in layout.stack)
    unit_norms = unit_norm(w, layout.reduce)
    units = layout.units(w.shape)
    empty = w.size == 0
    zero = jnp.zeros(stack_shape, acc)
    report[format_path(path)] = {
      "l1": jnp.sum(jnp.abs(w), axis=every).astype(jnp.float32),
      "l2": unit_norm(w, every).reshape(stack_shape).astype(jnp.float32),
      "max_abs": (zero if empty else jnp.max(jnp.abs(w), axis=every)).astype(jnp.float32),
      "max_unit_norm": (zero if units == 0 else jnp.max(unit_norms, axis=every)).astype(
        jnp.float32
      ),
      "zero_fraction": (zero if empty else jnp.mean(w == 0, axis=every)).astype(jnp.float32),
      "dead_units": jnp.sum(unit_norms == 0, axis=every).astype(jnp.float32),
      "units": jnp.full(stack_shape, units, jnp.float32),
      "axes": jnp.asarray(layout.reduce, jnp.int32),
    }
  return report


class LeafDecayResolution(NamedTuple):
  """How one leaf's weights fare under the decay step.

  Attributes:
    dtype: the leaf's dtype name (``"bfloat16"``).
    nonzero: the number of non-zero elements (a zero weight has no decay to lose).
    lost_fraction: the fraction of non-zero elements whose decay step ``lr·2α·|w|`` is
      below half the gap to the next representable value towards zero: ``w − step``
      rounds back to ``w``.
    rounds_away: ``lost_fraction > 0.5``: the decay does nothing for most weights.
  """

  dtype: str
  nonzero: int
  lost_fraction: float
  rounds_away: bool


class DecayResolution(NamedTuple):
  """The result of ``decay_resolution_report``.

  Attributes:
    relative_step: ``lr·2α``, the relative change the decay asks for.
    leaves: ``{path: LeafDecayResolution}`` for every selected floating-point leaf.
    rounds_away: the paths whose decay rounds away for most elements.
    summary: one human-readable paragraph, for a log line or a warning.
  """

  relative_step: float
  leaves: Mapping[str, LeafDecayResolution]
  rounds_away: tuple[str, ...]
  summary: str


def _value(name: str, value: ScalarOrSchedule, step: int) -> float:
  if is_schedule(value):
    value = evaluate_schedule(name, value, step)
  check_value(name, value)
  return float(np.asarray(value))


@jax.jit
def _lost_fraction(leaf: jax.Array, relative_step: jax.Array) -> tuple[jax.Array, jax.Array]:
  magnitude = jnp.abs(leaf)
  # Gap to the next value towards zero, in the leaf's dtype (exact, also at powers of 2).
  gap = (magnitude - jnp.nextafter(magnitude, jnp.zeros_like(magnitude))).astype(jnp.float32)
  step = relative_step * magnitude.astype(jnp.float32)
  nonzero = magnitude > 0
  lost = nonzero & (step < gap / 2)
  return jnp.sum(nonzero, dtype=jnp.int32), jnp.sum(lost, dtype=jnp.int32)


def decay_resolution_report(
  params: Any,
  alpha: ScalarOrSchedule,
  learning_rate: ScalarOrSchedule,
  *,
  mask: Mask = None,
  step: int = 0,
) -> DecayResolution:
  """Reports, per selected leaf, whether an L2 decay step is below the dtype's resolution.

  The decay step of ``add_l2_decay(alpha)`` followed by ``optax.sgd(learning_rate)`` moves
  each weight by ``lr·2α·|w|``. An element *loses* its decay when that step is below half
  the gap between ``|w|`` and the next representable value towards zero in the leaf's own
  dtype: round-to-nearest then gives back ``w`` exactly. This is the bfloat16 trap: with
  8 significant bits the decay vanishes for most weights whenever ``lr·2α ≲ 2⁻⁹``.

  For ``optax.adamw(lr, weight_decay=wd)`` or ``optax.add_decayed_weights(wd)``, pass
  ``alpha=wd/2`` (their step is ``lr·wd·w``). The gradient term of the same step is ignored:
  the report is about the decay alone. Remedies: keep float32 master weights (cast to bf16
  for the forward pass only), or accumulate the decay in a float32 buffer.

  Args:
    params: the parameters (any pytree); leaves are read, not changed. Not jittable: the
      result holds Python numbers (only two scalars per leaf leave the device).
    alpha: the L2 weight ``α`` of ``add_l2_decay``: a number, or a schedule evaluated at
      ``step``.
    learning_rate: the learning rate: a number, or a schedule evaluated at ``step``.
    mask: the leaves to check, as in ``add_l2_decay``; ``None`` is every floating-point
      leaf.
    step: the step at which schedules are evaluated.

  Returns:
    A ``DecayResolution`` with per-leaf results, the paths whose decay rounds away and
      a one-paragraph ``summary``.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> params = {"kernel": jnp.full((4, 4), 0.3, jnp.bfloat16)}
    >>> report = optax_norms.decay_resolution_report(params, alpha=0.05, learning_rate=1e-3)
    >>> report.rounds_away
    ('kernel',)
  """
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(params)):
    raise ValueError(
      "decay_resolution_report reads the parameters' values and returns Python numbers: "
      "call it outside `jax.jit` (on the concrete parameters, e.g. before training)."
    )
  alpha_value = _value("alpha", alpha, step)
  lr_value = _value("learning_rate", learning_rate, step)
  relative_step = lr_value * 2 * alpha_value
  paths, leaves, _, active = selected_leaves(mask, params, check=True)
  results: dict[str, LeafDecayResolution] = {}
  for path, leaf, selected in zip(paths, leaves, active):
    if not selected:
      continue
    nonzero, lost = _lost_fraction(leaf, jnp.asarray(relative_step, jnp.float32))
    nonzero, lost = int(nonzero), int(lost)
    fraction = lost / nonzero if nonzero else 0.0
    results[format_path(path)] = LeafDecayResolution(
      dtype=str(jnp.dtype(leaf.dtype)),
      nonzero=nonzero,
      lost_fraction=fraction,
      rounds_away=fraction > 0.5,
    )
  lost_paths = tuple(p for p, r in results.items() if r.rounds_away)
  if lost_paths:
    shown = ", ".join(
      f"{p!r} ({results[p].dtype}, {100 * results[p].lost_fraction:.0f}% of weights)"
      for p in lost_paths[:8]
    )
    more = f" and {len(lost_paths) - 8} more" if len(lost_paths) > 8 else ""
    summary = (
      f"The L2 decay step lr·2α = {relative_step:.3g} is below half an ulp for most "
      f"weights of {len(lost_paths)} of {len(results)} leaves: {shown}{more}. The decay "
      "rounds away and does nothing there. Keep float32 master weights, or raise lr·α."
    )
  else:
    summary = (
      f"The L2 decay step lr·2α = {relative_step:.3g} survives rounding for most weights "
      f"of all {len(results)} selected leaves."
    )
  return DecayResolution(relative_step, results, lost_paths, summary)
