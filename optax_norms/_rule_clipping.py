"""Clipping over a group of leaves and freezing, as ``regularize`` places them per rule.

Three transforms that read a whole group at once (not one leaf at a time):

- ``clip_group_global_norm``: the global norm ``n = √Σ‖g_leaf‖²`` over the group, and
  ``g ← g·min(1, c/n)`` (``optax.clip_by_global_norm`` on the group only).
- ``clip_group_adaptive``: ZClip-style spike clipping of the group's global norm, against
  running statistics of the (clipped) norms.
- ``zero_updates``: the updates of the group set to zero (``freeze``).

The mask is applied with ``optax.masked``, so the norm never sees another group's leaves.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_norms._hyperparams import Hyperparams, ScalarOrSchedule
from optax_norms._numerics import compute_dtype, unit_norm

__all__ = [
  "ClipAdaptiveState",
  "check_adaptive",
  "clip_group_adaptive",
  "clip_group_global_norm",
  "zero_updates",
]


def _floating(leaf: Any) -> bool:
  return leaf is not None and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _global_norm(updates: Any) -> jax.Array:
  """``√Σ‖leaf‖²`` over the floating-point leaves, in ≥ float32, without overflow (a norm of
  each leaf, then the norm of those)."""
  leaves = [u for u in jax.tree.leaves(updates) if _floating(u)]
  if not leaves:
    return jnp.zeros([], jnp.float32)
  norms = [unit_norm(u, tuple(range(u.ndim))).reshape(()) for u in leaves]
  dtype = max((n.dtype for n in norms), key=lambda d: jnp.dtype(d).itemsize)
  stacked = jnp.stack([lax.convert_element_type(n, dtype) for n in norms])
  return unit_norm(stacked, (0,)).reshape(())


def _scaled(updates: Any, scale: jax.Array) -> Any:
  """Every floating-point leaf times `scale` (computed in ≥ float32, stored in its dtype)."""

  def one(u):
    if not _floating(u):
      return u
    wide = compute_dtype(u.dtype)
    return (lax.convert_element_type(u, wide) * lax.convert_element_type(scale, wide)).astype(
      u.dtype
    )

  return jax.tree.map(one, updates)


def clip_group_global_norm(
  max_norm: ScalarOrSchedule, *, mask: Any = None
) -> optax.GradientTransformation:
  """``g ← g·min(1, c/n)`` with ``n`` the global norm of the selected leaves.

  Exactly ``g`` (bit for bit) when ``n ≤ c``, for a zero and for a NaN norm; otherwise the
  group's norm becomes ``c`` (to rounding). Norms accumulate in ≥ float32.
  """
  hyper = Hyperparams({"clip_global_norm": max_norm})

  def init_fn(params: Any) -> optax.OptState:
    del params
    return hyper.init_state()

  def update_fn(updates: Any, state: optax.OptState, params: Any = None):
    del params
    norm = _global_norm(updates)
    bound = hyper.in_dtype(hyper.at(state), norm.dtype)["clip_global_norm"]
    outside = norm > bound
    one = lax.full_like(norm, 1)
    scale = lax.select(outside, bound, one) / lax.select(outside, norm, one)
    return _scaled(updates, scale), hyper.next_state(state)

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


class ClipAdaptiveState(NamedTuple):
  """The statistics of ``clip_group_adaptive``.

  Attributes:
    count: finite norms seen so far (int32); the first ``warmup`` are the warm-up.
    mean: ``μ``, the running mean of the clipped norm (during warm-up: the mean so far).
    var: ``σ²``, its running population variance (during warm-up: the sum of squared
      deviations so far, Welford's ``M₂``).
  """

  count: jax.Array  # type: ignore[assignment]  # int32: finite norms seen so far.
  mean: jax.Array
  var: jax.Array


def check_adaptive(z: Any, decay: Any, warmup: Any) -> None:
  """TypeError or ValueError naming the argument for a bad ``clip_adaptive`` setting."""
  for name, value, kinds in (
    ("z", z, (int, float)),
    ("decay", decay, (int, float)),
    ("warmup", warmup, int),
  ):
    if isinstance(value, bool) or not isinstance(value, kinds):
      wanted = "an int" if kinds is int else "a number"
      raise TypeError(f"`{name}` must be {wanted}, got {value!r}.")
  if not math.isfinite(z) or z < 0:
    raise ValueError(f"`z` (the spike threshold in standard deviations) must be >= 0, got {z!r}.")
  if not 0 <= decay <= 1:
    raise ValueError(f"`decay` (of the running statistics) must be in [0, 1], got {decay!r}.")
  if warmup < 1:
    raise ValueError(
      f"`warmup` (the steps whose norms give the starting mean and variance) must be >= 1, "
      f"got {warmup!r}."
    )


def clip_group_adaptive(
  z: float = 2.5, decay: float = 0.97, warmup: int = 25, *, mask: Any = None
) -> optax.GradientTransformation:
  r"""Spike clipping of the selected leaves' global norm ``n`` (ZClip, mean + z·σ).

  The first `warmup` finite norms are not clipped; their mean and population variance start
  ``μ`` and ``σ²``. After that, with ``t = μ + z·σ``: ``n' = min(n, t)``, the gradient is
  scaled by ``n'/n`` (exactly unchanged when ``n ≤ t``), then
  ``μ ← d·μ + (1−d)·n'`` and ``σ² ← d·σ² + (1−d)·(n' − μ)²`` with the new ``μ``: the clipped
  norm feeds the statistics, so a spike does not inflate them. A zero norm is a norm of 0
  (scale 1). A NaN or infinite norm leaves the gradient as it is and the statistics and count
  unchanged (the spike is left to ``optax.apply_if_finite`` or the loss-scaling logic). With
  ``σ = 0`` (a constant norm) the threshold is ``μ``: a norm equal to it is untouched.
  """
  check_adaptive(z, decay, warmup)

  def init_fn(params: Any) -> ClipAdaptiveState:
    del params
    zero = jnp.zeros([], jnp.float32)
    return ClipAdaptiveState(jnp.zeros([], jnp.int32), zero, zero)

  def update_fn(updates: Any, state: ClipAdaptiveState, params: Any = None):
    del params
    norm = lax.convert_element_type(_global_norm(updates), jnp.float32)
    finite = jnp.isfinite(norm)
    warming = state.count < warmup
    # Warm-up: Welford's running mean and M₂; at its last step M₂ becomes the variance.
    k = lax.convert_element_type(state.count + 1, jnp.float32)
    warm_mean = state.mean + (norm - state.mean) / k
    warm_m2 = state.var + (norm - state.mean) * (norm - warm_mean)
    warm_var = jnp.where(state.count + 1 == warmup, warm_m2 / k, warm_m2)
    # After it: clip at μ + z·σ, then the statistics of the clipped norm. Written as
    # μ + (1−d)(n' − μ) (the same value) so that a constant norm keeps μ exactly.
    threshold = state.mean + jnp.float32(z) * jnp.sqrt(state.var)
    outside = (norm > threshold) & ~warming & finite
    clipped = jnp.where(outside, threshold, norm)
    rate = jnp.float32(1 - decay)
    mean = state.mean + rate * (clipped - state.mean)
    var = state.var + rate * (jnp.square(clipped - mean) - state.var)
    new = ClipAdaptiveState(
      jnp.where(finite, optax.safe_increment(state.count), state.count),
      jnp.where(finite, jnp.where(warming, warm_mean, mean), state.mean),
      jnp.where(finite, jnp.where(warming, warm_var, var), state.var),
    )
    one = jnp.ones([], jnp.float32)
    scale = jnp.where(outside, threshold, one) / jnp.where(outside, norm, one)
    return _scaled(updates, scale), new

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def zero_updates(*, mask: Any) -> optax.GradientTransformation:
  """The selected leaves' updates set to ``-0.0``: ``w + (-0.0)`` is ``w`` bit for bit for
  every ``w`` (``+0.0`` would turn a stored ``-0.0`` into ``+0.0``)."""

  def update_fn(updates: Any, state: optax.OptState, params: Any = None):
    del params
    zeros = jax.tree.map(
      lambda u: jnp.full_like(u, -0.0) if _floating(u) else u,
      updates,
    )
    return zeros, state

  tx = optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
  return optax.masked(tx, mask)
