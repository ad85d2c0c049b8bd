"""Sparsity budgets as projections: N:M structured sparsity and magnitude pruning.

Place them **last** in the chain, like the weight constraints. Each keeps a fixed number of
the largest ``|w + u|`` and zeroes the rest: the update becomes ``u' = u`` on kept entries
(so ``optax.apply_updates`` stores exactly ``w + u`` there) and ``u' = −w`` on pruned ones
(so it stores exactly ``0``). Magnitudes are ranked on ``w + u`` as ``optax.apply_updates``
would store it (the addition in the leaf's dtype); equal magnitudes keep the lower index (in
row-major order), so the number of zeros is exact. A NaN ranks as the largest magnitude: it
is kept (never hidden behind a zero) and stays inside its block (N:M) or leaf (budget).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_norms._coupled import (
  CoupledGroups,
  as_group_list,
  group_sq_norms,
  member_selection,
  member_view,
  resolve_all,
)
from optax_norms._hyperparams import Hyperparams, ScalarOrSchedule, is_schedule
from optax_norms._layout import Axis
from optax_norms._masks import Mask, compile_mask
from optax_norms._messages import static_args_hint
from optax_norms._numerics import is_int
from optax_norms._paths import flatten, format_path
from optax_norms._sharding import explicit_spec, reshard, reshard_to, shard_count
from optax_norms._transform import Refresh, flatten_with_params, leafwise_transform, refreshed

__all__ = [
  "GroupSparsityState",
  "budget_count",
  "constrain_group_sparsity",
  "constrain_n_of_m",
  "constrain_sparsity",
  "polynomial_sparsity_schedule",
  "traced_budget_count",
]


class _Period(NamedTuple):
  """When masks are chosen: at steps ``start, start + every, …`` below ``end``."""

  every: int
  start: int
  end: int | None

  def is_update_step(self, count: jax.Array) -> jax.Array:
    """Whether the update that receives `count` chooses a new mask (a bool scalar)."""
    count = jnp.asarray(count, jnp.int32)
    chosen = (count >= self.start) & ((count - self.start) % self.every == 0)
    if self.end is not None:
      chosen = chosen & (count < self.end)
    return chosen


_STATIC_HINT = " " + static_args_hint("update_every", "update_start", "update_end")


def _step_number(name: str, value: Any, low: int) -> int:
  if not is_int(value):
    hint = _STATIC_HINT if isinstance(value, jax.core.Tracer) else ""
    raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.{hint}")
  if int(value) < low:
    raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
  return int(value)


def _period(update_every: Any, update_start: Any, update_end: Any) -> _Period:
  """The checked mask period (`update_every` ≥ 1, `update_start` ≥ 0, `update_end` None or
  above `update_start`). ``None`` defaults (1 and 0) keep them static under
  ``optax.inject_hyperparams``, which would inject an int default as a traced value."""
  every = 1 if update_every is None else _step_number("update_every", update_every, 1)
  start = 0 if update_start is None else _step_number("update_start", update_start, 0)
  end = None if update_end is None else _step_number("update_end", update_end, 0)
  if end is not None and end <= start:
    raise ValueError(
      f"`update_end` ({end}) must be greater than `update_start` ({start}): no mask would be "
      "chosen."
    )
  return _Period(every, start, end)


def _is_periodic(period: _Period) -> bool:
  return period != _Period(1, 0, None)


def _keep_all(path, leaf, layout):
  """The mask state before any mask is chosen: keep everything (shaped and sharded like the
  leaf)."""
  del path, layout
  return jnp.ones_like(leaf, dtype=jnp.bool_)


def _magnitude(w, u, leaf_dtype):
  """``|w + u|`` as ``apply_updates`` stores the sum, in the compute dtype; NaN -> +inf.

  Materialized once (`_materialized_magnitude`), never recomputed inside the comparisons
  that rank it. Fused, XLA would recompute ``w + u`` in each operand of a comparison, and
  when ``u`` comes from the same program (``u = -lr·g``) XLA:CPU contracts ``w + (-lr)·g``
  into a fused multiply-add in some copies and not in others: a value 1 ulp apart from
  itself compares greater than itself and a block or leaf keeps the wrong number of entries.
  """
  # In the leaf dtype (a half-precision leaf materializes half-precision arrays), cast
  # exactly afterwards. The magnitudes only rank (no derivative flows through a ranking), so
  # a differentiated step sees constants here.
  w, u, compute = (
    lax.stop_gradient(w.astype(leaf_dtype)),
    lax.stop_gradient(u.astype(leaf_dtype)),
    w.dtype,
  )
  return _materialized_magnitude(w, u).astype(compute)


def _finite_magnitude(w, u):
  return jnp.abs(w + u)


def _nan_to_inf_magnitude(w, u):
  size = jnp.abs(w + u)
  return jnp.where(jnp.isnan(size), jnp.full((), jnp.inf, size.dtype), size)


@jax.custom_batching.custom_vmap
def _materialized_magnitude(w, u):
  """``|w + u|`` (NaN -> +inf) as the result of a ``lax.cond`` (on whether a NaN is
  present), which XLA cannot fuse into the comparisons that consume it.
  (``lax.optimization_barrier`` does not do this: XLA removes barriers before fusion.)"""
  has_nan = jnp.any(jnp.isnan(_finite_magnitude(w, u)))
  return lax.cond(has_nan, _nan_to_inf_magnitude, _finite_magnitude, w, u)


@_materialized_magnitude.def_vmap
def _materialized_magnitude_vmap(axis_size, in_batched, w, u):
  # Under `jax.vmap` a batched predicate would turn the `lax.cond` into a `select`, which
  # XLA fuses (and the FMA mismatch comes back). The magnitude is element-wise: compute it
  # for the whole batch at once, behind one unbatched predicate.
  w, u = (
    x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
    for x, batched in zip((w, u), in_batched)
  )
  return _materialized_magnitude(w, u), True


def _order_bits(magnitude):
  """The bit patterns of non-negative floats, as signed ints of the same width: ordered as
  the values."""
  int_type = {4: jnp.int32, 8: jnp.int64}[magnitude.dtype.itemsize]
  return lax.bitcast_convert_type(magnitude, int_type)


def _count(mask, axes):
  """``#mask`` over `axes` (one count per layer), dims kept."""
  return jnp.sum(mask.astype(jnp.int32), axis=axes, keepdims=True)


def _kth_smallest(values, k, passes, axes):
  """The ``k``-th smallest (0-indexed) of `values` over `axes` (non-negative ints below
  ``2**passes``; one answer per layer, dims kept): the least ``t`` with
  ``#{values ≤ t} ≥ k + 1``, by bisection over ``[0, max]``, one counting pass over the leaf
  per halving. Counts are sums over the layer: on sharded leaves each pass all-reduces one
  scalar per layer."""

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = _count(values <= mid, axes) >= k + 1
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  hi = jnp.max(values, axis=axes, keepdims=True)
  return lax.fori_loop(0, passes, halve, (jnp.zeros_like(hi), hi))[1]


def _row_major_index(shape, axes):
  """The row-major index over `axes` (within a layer) of every entry of an array of `shape`,
  as int32, built from iotas (no reshape of the leaf, so any sharding of it is kept)."""
  index = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(axes):
    index = index + lax.broadcasted_iota(jnp.int32, shape, axis) * jnp.int32(stride)
    stride *= shape[axis]
  return index


_BUDGET_TOLERANCE = 1e-6


def budget_count(fraction: float, size: int) -> int:
  """``⌊fraction·size⌋`` of the fraction as written: a product just below an integer, within
  a relative 1e-6 of it (and within 1/4), counts as that integer (0.57 of 100 is 57, though
  ``0.57·100 = 56.99…`` in floating point)."""
  product = fraction * size
  nearest = round(product)
  snapped = nearest > product and nearest - product <= min(_BUDGET_TOLERANCE * product, 0.25)
  return min(max(nearest if snapped else math.floor(product), 0), size)


def traced_budget_count(fraction: jax.Array, size: int) -> jax.Array:
  """``budget_count`` of a run-time float32 `fraction` (a schedule), as int32, exact also for
  `size` beyond 2²⁴ (where float32 cannot hold the product).

  ``fraction·size`` is split into terms that float32 holds exactly: `fraction` into two
  parts of at most 12 significant bits (by masking its low mantissa bits, so no fused
  multiply-add can change the split) and `size` into base-2¹² digits, so every term is a
  product of two 12-bit numbers times a power of two. The integer parts of the terms are
  summed as int32, their fractional parts (and the tolerance) as float32.
  """
  f = jnp.clip(jnp.asarray(fraction, jnp.float32), 0, 1)
  bits = lax.bitcast_convert_type(f, jnp.uint32)
  high = lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
  low = f - high
  whole = jnp.zeros((), jnp.int32)
  rest = jnp.zeros((), jnp.float32)
  digit_scale, remaining = 1, size
  while remaining:
    digit = remaining % 4096
    remaining //= 4096
    for part in (high, low):
      term = part * jnp.float32(digit) * jnp.float32(digit_scale)
      floor = jnp.floor(term)
      whole = whole + floor.astype(jnp.int32)
      rest = rest + (term - floor)
    digit_scale *= 4096
  # product = whole + rest, 0 <= rest < 8: floor it, or snap it up to the nearest integer
  # when that is within the relative tolerance.
  up = jnp.round(rest)
  tolerance = jnp.minimum(jnp.float32(_BUDGET_TOLERANCE) * (f * jnp.float32(size)), 0.25)
  snapped = (up > rest) & (up - rest <= tolerance)
  count = whole + jnp.where(snapped, up, jnp.floor(rest)).astype(jnp.int32)
  return jnp.clip(count, 0, size)


def _whole_number(name: str, value: Any) -> float | None:
  """The value of a concrete whole number (int or integral float), None when traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (bool, np.bool_)) or np.shape(value) != ():
    raise ValueError(f"`{name}` must be a whole number, got {value!r}.")
  number = float(np.asarray(value, np.float64))
  if not math.isfinite(number) or number != math.floor(number):
    raise ValueError(f"`{name}` must be a whole number, got {value!r}.")
  return number


def _check_block_axis(block_axis: Any) -> None:
  if block_axis is None:
    return
  if not isinstance(block_axis, (int, np.integer)) or isinstance(block_axis, (bool, np.bool_)):
    raise TypeError(f"`block_axis` must be None or an int, got {block_axis!r}.")


def _n_of_m(u, w, n, m, ax, leaf_dtype):
  """The N:M projection of ``w + u`` with blocks of `m` along axis `ax`."""
  return jnp.where(_n_of_m_keep(u, w, n, m, ax, leaf_dtype), u, -w)


def _n_of_m_keep(u, w, n, m, ax, leaf_dtype):
  """Which entries the N:M projection of ``w + u`` keeps (bool, the leaf's shape)."""
  length = w.shape[ax]
  size = _magnitude(w, u, leaf_dtype)
  spec = explicit_spec(size)
  cut = spec is not None and (length // shard_count(size, spec[ax])) % m != 0
  if cut:
    # Explicit mesh axes whose shards cut blocks: gather the axis (as auto axes do) and
    # shard the mask back below (JAX cannot infer the sharding of such a reshape).
    size = reshard(size, spec[:ax] + (None,) + spec[ax + 1 :])
  blocks = size.reshape(w.shape[:ax] + (length // m, m) + w.shape[ax + 1 :])
  b = ax + 1  # The within-block axis.
  mine = jnp.expand_dims(blocks, b + 1)  # [..., i, 1, ...]
  other = jnp.expand_dims(blocks, b)  # [..., 1, j, ...]
  # earlier[i, j] = j < i, laid out on the (i, j) axes (b, b + 1) of the comparison.
  pair = (1,) * b + (m, m) + (1,) * (w.ndim - ax - 1)
  earlier = lax.broadcasted_iota(jnp.int32, pair, b + 1) < lax.broadcasted_iota(jnp.int32, pair, b)
  # rank_i = #{j : |v_j| > |v_i| or (|v_j| == |v_i| and j < i)}; keep rank < n.
  beats = (other > mine) | ((other == mine) & earlier)
  rank = jnp.sum(beats.astype(jnp.int32), axis=b + 1).astype(w.dtype)
  keep = (rank < n).reshape(w.shape)
  if cut:
    keep = reshard(keep, spec)
  return keep


def constrain_n_of_m(
  n: int | ScalarOrSchedule,
  m: int,
  *,
  block_axis: int | None = None,
  axis: Axis = None,
  mask: Mask = None,
  update_every: int | None = None,
  update_start: int | None = None,
  update_end: int | None = None,
) -> optax.GradientTransformation:
  """Keeps the ``n`` largest ``|w + u|`` of every block of ``m`` consecutive entries (N:M).

  Along the block axis, the leaf is cut into blocks of ``m`` consecutive entries; in each
  block the ``n`` entries with the largest ``|w + u|`` are kept and the other ``m − n`` become
  exactly zero: ``w + u' = (w + u)·keep``. ``constrain_n_of_m(2, 4)`` is the 2:4 pattern that
  sparse tensor cores accelerate. Equal magnitudes keep the lower index, so every block has
  exactly ``n`` kept entries (``m − n`` zeros, more if ``w + u`` has zeros of its own).

  The block axis is ``block_axis`` when given (an int indexing the leaf's full shape;
  negative counts from the end), else the input-feature axis of the leaf's layout (``axis``,
  as for the per-unit rules), the axis the matmul contracts, as the hardware wants: ``in``
  of a Flax Dense ``(in, out)`` and Conv ``(h, w, in, out)`` kernel, of an attention
  ``(in, heads, dim)`` kernel (``head_dim`` of the ``out`` kernel ``(heads, head_dim,
  out)``), of a torch ``(out, in)`` weight, and of each layer of a stacked kernel read with
  ``axis=unit_axes(stacked=...)``: never the layer axis, never the heads. A leaf whose
  layout is ambiguous raises at ``init`` (as the per-unit rules). A rank-1 leaf is cut along
  its only axis. A selected leaf whose block axis length is not a multiple of ``m`` raises
  at ``init``, naming its path and shape.

  ``n`` may be a schedule (a gradual ramp from ``m`` down to ``n``): a run-time value keeps
  the ``⌈n⌉`` largest of each block (all of them when ``n ≥ m``).

  **Periodic masks** (``update_every=k``, ``update_start``, ``update_end``): the mask is
  chosen at the transform's steps ``update_start, update_start + k, …`` below
  ``update_end``, from that step's ``w + u`` with that step's budget, kept in the state (a
  bool array shaped and sharded like each leaf, in a ``LeafwiseState``: plain arrays, so
  orbax checkpoints it) and applied at every step: between choices the pruned entries are
  stored exactly zero and the kept ones exactly ``w + u``, so the count of pruned entries is
  exactly the chosen one. Before ``update_start`` nothing is pruned; from ``update_end`` on
  the mask is frozen (as torch's pruning masks after ``prune.remove``; jaxpruner's
  ``update_start_step``/``update_end_step``). On other steps the ranking is skipped by one
  ``lax.cond`` for all leaves (for each 32 MiB of them), so it costs ``1/k`` per step; under
  ``jax.vmap`` with a batched step count the ``cond`` becomes a ``select`` and both branches
  run every step. With the defaults
  (``k = 1``, no start or end) there is no mask state, as before. The three are static
  (``None`` defaults): under ``optax.inject_hyperparams`` pass them in ``static_args``.

  Args:
    n: entries kept per block, a whole number ``0 ≤ n ≤ m``, or a schedule.
    m: the block length, an int ``≥ 1``.
    block_axis: the axis the blocks run along, an int, or ``None`` for the input-feature
      axis of each leaf's layout.
    axis: the layout of each leaf (read when ``block_axis`` is ``None``): ``None`` reads
      roles, or ``unit_axes(stacked=...)`` for stacks; see ``clip_by_row_norm``.
    mask: the leaves to sparsify; ``None`` is every floating-point leaf.
    update_every: choose the mask every ``k`` steps, an int ``≥ 1``; ``None`` (the default)
      is ``1``: at every step, without mask state, as before. Between choices the kept mask
      is applied (see "Periodic masks").
    update_start: the first step at which a mask is chosen, an int ``≥ 0`` (``None``: 0);
      before it nothing is pruned.
    update_end: ``None``, or the step from which the mask is frozen (no mask is chosen at
      steps ``≥ update_end``).

  Returns:
    An ``optax.GradientTransformation`` to place last in the chain; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> params = {"kernel": jnp.array([[0.5], [-2.0], [1.0], [0.25]])}  # (in=4, out=1)
    >>> tx = optax.chain(optax.sgd(1.0), optax_norms.constrain_n_of_m(2, 4))
    >>> updates, _ = tx.update({"kernel": jnp.zeros((4, 1))}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["kernel"][:, 0].tolist()
    [0.0, -2.0, 1.0, 0.0]

    A mask chosen every 10 steps holds in between, even where the magnitudes change:

    >>> tx = optax_norms.constrain_n_of_m(2, 4, update_every=10)
    >>> state = tx.init(params)
    >>> _, state = tx.update({"kernel": jnp.zeros((4, 1))}, state, params)
    >>> grow = {"kernel": jnp.array([[5.0], [0.0], [0.0], [0.0]])}  # entry 0 would win now
    >>> updates, state = tx.update(grow, state, params)
    >>> optax.apply_updates(params, updates)["kernel"][:, 0].tolist()
    [0.0, -2.0, 1.0, 0.0]

  References:
    A. Mishra et al., "Accelerating sparse deep neural networks", arXiv:2104.08378, 2021
    (2:4 sparse tensor cores); torchao ``sparsity`` (semi-structured 2:4) and MaxText's
    N:M sparsity; A. Zhou et al., "Learning N:M fine-grained structured sparse neural
    networks from scratch", ICLR 2021.
  """
  if not is_int(m) or int(m) < 1:
    raise ValueError(f"`m` must be an int >= 1 (the block length), got {m!r}.")
  m = int(m)
  _check_block_axis(block_axis)
  period = _period(update_every, update_start, update_end)
  if not is_schedule(n):
    number = _whole_number("n", n)
    if number is not None and not 0 <= number <= m:
      raise ValueError(f"`n` must satisfy 0 <= n <= m = {m}, got {n!r}.")

  def leaf_block_axis(path, shape, layout):
    if len(shape) == 0:
      raise ValueError(
        f"constrain_n_of_m: the parameter {format_path(path)!r} is a scalar (shape ()); "
        "leave it out of `mask`."
      )
    if len(shape) == 1:
      return 0
    if layout is not None:
      return layout.block_axis
    if not -len(shape) <= block_axis < len(shape):  # type: ignore[operator]
      raise ValueError(
        f"constrain_n_of_m: `block_axis` {block_axis} is out of range for the parameter "
        f"{format_path(path)!r} of shape {shape} (rank {len(shape)})."
      )
    return block_axis % len(shape)  # type: ignore[operator]

  def check_leaf(path, leaf, layout):
    shape = tuple(leaf.shape)
    ax = leaf_block_axis(path, shape, layout)
    if shape[ax] % m:
      raise ValueError(
        f"constrain_n_of_m: the parameter {format_path(path)!r} of shape {shape} has "
        f"length {shape[ax]} along its block axis {ax}, not a multiple of m = {m}. Leave "
        "it out of `mask` or pick another `block_axis`."
      )

  if _is_periodic(period):

    def periodic(u, w, n, ax, leaf_dtype, state):
      keep = yield Refresh(lambda u, w: _n_of_m_keep(u, w, n, m, ax, leaf_dtype), (u, w), state)
      return jnp.where(keep, u, -w), keep

    if block_axis is None:

      def rule(u, w, *, n, layout, leaf_dtype, state):
        ax = leaf_block_axis((), w.shape, layout)
        return periodic(u, w, n, ax, leaf_dtype, state)

    else:

      def rule(u, w, *, n, leaf_dtype, state):  # type: ignore[misc]
        ax = leaf_block_axis((), w.shape, None)
        return periodic(u, w, n, ax, leaf_dtype, state)

    return leafwise_transform(
      "constrain_n_of_m",
      rule,
      {"n": n},
      mask=mask,
      needs_params=True,
      axis=axis,
      check_leaf=check_leaf,
      init_leaf=_keep_all,
      refresh_when=period.is_update_step,
    )

  if block_axis is None:

    def rule(u, w, *, n, layout, leaf_dtype):  # type: ignore[misc]
      return _n_of_m(u, w, n, m, leaf_block_axis((), w.shape, layout), leaf_dtype)

  else:

    def rule(u, w, *, n, leaf_dtype):  # type: ignore[misc]
      return _n_of_m(u, w, n, m, leaf_block_axis((), w.shape, None), leaf_dtype)

  return leafwise_transform(
    "constrain_n_of_m",
    rule,
    {"n": n},
    mask=mask,
    needs_params=True,
    axis=axis,
    check_leaf=check_leaf,
  )


def constrain_sparsity(
  fraction: ScalarOrSchedule,
  *,
  axis: Axis = None,
  mask: Mask = None,
  update_every: int | None = None,
  update_start: int | None = None,
  update_end: int | None = None,
) -> optax.GradientTransformation:
  """Zeroes the ``fraction`` of each leaf's (each layer's) entries with the smallest ``|w + u|``.

  Magnitude pruning as a projection: in every selected leaf of ``size`` entries, exactly
  ``k = ⌊fraction·size⌋`` entries (the smallest ``|w + u|``; equal magnitudes keep the lower
  row-major index) become zero, the others stay ``w + u``. A stacked leaf (its layout's stack
  axes, from ``axis=unit_axes(stacked=...)``) has a budget per layer: ``⌊fraction·size⌋`` of
  each layer's ``size`` entries. ``k`` is the count of the fraction as written: a product
  within a relative 1e-6 of an integer counts as that integer (0.57 of 100 entries is 57,
  though ``0.57·100 = 56.99…`` in floating point), the same for a constant and for a
  schedule, and exact for layers beyond 2²⁴ entries. With ``fraction`` on a schedule that
  ramps from 0 to the target (Zhu & Gupta's cubic ramp, or ``optax.linear_schedule``) this
  is gradual magnitude pruning with the pruned weights free to grow back while the ramp runs.

  Cost: no sort. The ``k``-th smallest magnitude is found by bisection over its float bits,
  31 fused counting passes over the leaf (float32); when several entries equal it and some
  must go, a second bisection over their indices (``⌈log₂ size⌉`` passes) keeps the first
  ones. On CPU that is roughly 10–30× the time of an ``optax.adam`` step of the same leaf,
  where a sort or ``lax.top_k`` costs 100–200× (``python tests/sparsity_cost.py``); for large
  models, prune every few steps (``optax.masked`` or a step-gated schedule) rather than every
  step. On a sharded leaf each pass all-reduces one scalar per layer.

  **Periodic masks** (``update_every=k``, ``update_start``, ``update_end``): the mask is
  chosen at the transform's steps ``update_start, update_start + k, …`` below
  ``update_end``, from that step's ``w + u`` with that step's budget, kept in the state (a
  bool array shaped and sharded like each leaf, in a ``LeafwiseState``: plain arrays, so
  orbax checkpoints it) and applied at every step: between choices the pruned entries are
  stored exactly zero and the kept ones exactly ``w + u``, so the count of pruned entries is
  exactly the chosen one. Before ``update_start`` nothing is pruned; from ``update_end`` on
  the mask is frozen (as torch's pruning masks after ``prune.remove``; jaxpruner's
  ``update_start_step``/``update_end_step``). On other steps the ranking is skipped by one
  ``lax.cond`` for all leaves (for each 32 MiB of them), so it costs ``1/k`` per step; under
  ``jax.vmap`` with a batched step count the ``cond`` becomes a ``select`` and both branches
  run every step. With the defaults
  (``k = 1``, no start or end) there is no mask state, as before. The three are static
  (``None`` defaults): under ``optax.inject_hyperparams`` pass them in ``static_args``.

  Args:
    fraction: the fraction of entries to zero, ``0 ≤ fraction ≤ 1``: a number or a schedule.
    axis: the layout of each leaf; only its stack axes are read (one budget per layer).
      ``None`` reads roles and raises for an ambiguous leaf (a rank-3 kernel may be a stack);
      ``unit_axes(stacked=...)`` names the stacks.
    mask: the leaves to prune; ``None`` is every floating-point leaf.
    update_every: choose the mask every ``k`` steps, an int ``≥ 1``; ``None`` (the default)
      is ``1``: at every step, without mask state, as before. Between choices the kept mask
      is applied (see "Periodic masks").
    update_start: the first step at which a mask is chosen, an int ``≥ 0`` (``None``: 0);
      before it nothing is pruned.
    update_end: ``None``, or the step from which the mask is frozen (no mask is chosen at
      steps ``≥ update_end``).

  Returns:
    An ``optax.GradientTransformation`` to place last in the chain; its ``update`` needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> params = {"w": jnp.array([0.5, -2.0, 1.0, 0.25, 3.0])}
    >>> tx = optax.chain(optax.sgd(1.0), optax_norms.constrain_sparsity(0.5))  # 2 of 5
    >>> updates, _ = tx.update({"w": jnp.zeros(5)}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [0.0, -2.0, 1.0, 0.0, 3.0]

    With ``update_every=100`` the mask chosen at step 0 is kept until step 100:

    >>> tx = optax_norms.constrain_sparsity(0.5, update_every=100)
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.zeros(5)}, state, params)
    >>> grow = {"w": jnp.array([4.0, 0.0, 0.0, 0.0, 0.0])}  # entry 0 would be kept now
    >>> updates, state = tx.update(grow, state, params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [0.0, -2.0, 1.0, 0.0, 3.0]

  References:
    M. Zhu and S. Gupta, "To prune, or not to prune: exploring the efficacy of pruning for
    model compression", arXiv:1710.01878, 2017 (gradual magnitude pruning); S. Han et al.,
    "Learning both weights and connections for efficient neural networks", NeurIPS 2015.
  """
  constant = None
  if not is_schedule(fraction) and not isinstance(fraction, jax.core.Tracer):
    try:
      constant = float(np.asarray(fraction, np.float64))
    except (TypeError, ValueError):
      constant = None  # Hyperparams names the argument below.
    if constant is not None and np.shape(fraction) == () and constant > 1:  # type: ignore[arg-type]
      raise ValueError(f"`fraction` must be at most 1, got {fraction!r}.")
  period = _period(update_every, update_start, update_end)

  def keep_mask(u, w, fraction, layout, leaf_dtype):
    """Which entries the budget keeps (bool, the leaf's shape)."""
    axes = tuple(a for a in range(w.ndim) if a not in layout.stack)
    size = math.prod(w.shape[a] for a in axes)  # Entries per layer.
    if constant is not None:
      k = jnp.asarray(budget_count(constant, size), jnp.int32)
    else:
      k = traced_budget_count(fraction, size)
    keep_count = size - k
    # The threshold is the k-th smallest magnitude (0-indexed): found without a sort, by a
    # binary search over the bit patterns of the magnitudes (non-negative floats order like
    # their bits), one fused counting pass per bit. Keep what is above it and, of what
    # equals it, the `room` lowest row-major indices that complete the budget: when some tie
    # must go, the room-th smallest index of a tie is found by a second bisection (over
    # indices). No sort, no cumulative sum, no reshape: the leaf keeps its sharding and
    # each pass all-reduces a scalar (per layer).
    bits = _order_bits(_magnitude(w, u, leaf_dtype))
    threshold = _kth_smallest(bits, jnp.clip(k, 0, size - 1), 8 * bits.dtype.itemsize - 1, axes)
    above = bits > threshold
    tie = bits == threshold
    room = keep_count - _count(above, axes)  # 1 <= room <= #tie when k < size.

    def first_ties():
      index = _row_major_index(w.shape, axes)
      last = _kth_smallest(
        jnp.where(tie, index, size), jnp.maximum(room, 1) - 1, size.bit_length(), axes
      )
      return tie & (index <= last)

    ties_kept = lax.cond(jnp.any(_count(tie, axes) > room), first_ties, lambda: tie)
    return (above | ties_kept) & (keep_count > 0)

  if _is_periodic(period):

    def periodic_rule(u, w, *, fraction, layout, leaf_dtype, state):
      if w.size == 0:
        return u, state
      keep = yield Refresh(
        lambda u, w: keep_mask(u, w, fraction, layout, leaf_dtype), (u, w), state
      )
      return jnp.where(keep, u, -w), keep

    return leafwise_transform(
      "constrain_sparsity",
      periodic_rule,
      {"fraction": fraction},
      mask=mask,
      needs_params=True,
      axis=axis,
      init_leaf=_keep_all,
      refresh_when=period.is_update_step,
    )

  def rule(u, w, *, fraction, layout, leaf_dtype):
    if w.size == 0:
      return u
    return jnp.where(keep_mask(u, w, fraction, layout, leaf_dtype), u, -w)

  return leafwise_transform(
    "constrain_sparsity", rule, {"fraction": fraction}, mask=mask, needs_params=True, axis=axis
  )


class GroupSparsityState(NamedTuple):
  """State of ``constrain_group_sparsity``.

  Attributes:
    count: int32, the number of updates applied so far (schedules and the mask period read
      it).
    keep: one bool array per anchor instance (in the order of ``groups.resolve(params)``),
      shaped ``(G,)``, or ``(L, G)`` when stacked: the groups the current mask keeps. Plain
      arrays: orbax checkpoints them.

  Examples:
    >>> import jax.numpy as jnp, optax_norms as on
    >>> mlp = on.coupled_groups("mlp", {"w_in": 1, "w_out": 0})
    >>> tx = on.constrain_group_sparsity(0.5, groups=mlp)
    >>> state = tx.init({"mlp": {"w_in": jnp.ones((2, 4)), "w_out": jnp.ones((4, 2))}})
    >>> int(state.count), state.keep[0].tolist()
    (0, [True, True, True, True])
  """

  count: jax.Array  # type: ignore[assignment]
  keep: tuple[jax.Array, ...]


def _kept_groups(norms: jax.Array, k: jax.Array) -> jax.Array:
  """Which groups a budget of `k` zeros keeps (along the last axis): the ``G − k`` largest
  norms, equal norms keeping the lower index, a NaN norm ranking largest (kept)."""
  if explicit_spec(norms) is not None:  # A sort needs its axis whole: `norms` is small.
    norms = reshard(norms, (None,) * norms.ndim)
  size = jnp.where(jnp.isnan(norms), jnp.full((), jnp.inf, norms.dtype), norms)
  order = jnp.argsort(-size, axis=-1, stable=True)  # Largest first; ties: lower index first.
  rank = jnp.argsort(order, axis=-1, stable=True)  # The inverse permutation.
  return rank < norms.shape[-1] - k


def constrain_group_sparsity(
  fraction: ScalarOrSchedule,
  *,
  groups: CoupledGroups | Sequence[CoupledGroups],
  update_every: int | None = None,
  update_start: int | None = None,
  update_end: int | None = None,
  mask: Mask = None,
) -> optax.GradientTransformation:
  """Sets the ``⌊fraction·G⌋`` coupled groups of smallest norm to exactly zero, per module.

  Structured magnitude pruning of heads and neurons across leaves (``coupled_groups``). With
  ``v = w + u`` (the step as ``optax.apply_updates`` stores it), in every anchor instance
  (and layer, when stacked) the ``k = ⌊fraction·G⌋`` groups with the smallest ``‖v_g‖₂``
  (the norm of the union of the group's slices over all members) are zeroed: ``u' = −w`` on
  all their slices, so ``apply_updates`` stores exactly ``0``; the others keep exactly ``v``
  (``u' = u``). Equal norms keep the lower group index, so the number of zero groups is
  exact; a NaN norm ranks largest (kept, never hidden behind a zero). ``k`` is the count of
  the fraction as written (``budget_count``: 0.57 of 100 groups is 57). Leaves outside every
  group keep their update. Place it last in the chain. ``fraction`` may be a schedule
  (``polynomial_sparsity_schedule``): gradual structured pruning.

  **Periodic masks** (``update_every=k``, ``update_start``, ``update_end``): the mask is
  chosen at the transform's steps ``update_start, update_start + k, …`` below
  ``update_end``, from that step's ``w + u`` with that step's budget, kept in the state
  (``GroupSparsityState.keep``) and applied at every step, so between choices the zero
  groups stay exactly zero and their number exactly the chosen one. Before ``update_start``
  nothing is pruned; from ``update_end`` on the mask is frozen. On other steps the ranking is
  skipped by one ``lax.cond`` for all instances (for each 32 MiB of them); under ``jax.vmap``
  with a batched step count the ``cond`` becomes a ``select`` and both branches run every
  step. The three are static (``None`` defaults): under ``optax.inject_hyperparams`` pass them
  in ``static_args``.

  Args:
    fraction: the fraction of groups to zero per instance (and layer), ``0 ≤ fraction ≤ 1``:
      a number or a schedule.
    groups: a ``CoupledGroups`` (from ``coupled_groups``) or a list of them.
    update_every: choose the mask every ``k`` steps, an int ``≥ 1`` (``None``: 1, every
      step).
    update_start: the first step at which a mask is chosen (``None``: 0); before it nothing
      is pruned.
    update_end: ``None``, or the step from which the mask is frozen.
    mask: ``None``, or a mask that must select every member leaf (it selects nothing else).

  Returns:
    An ``optax.GradientTransformation`` (state ``GroupSparsityState``) to place last in the
    chain; its ``update`` needs ``params``. Its masks are per group instance, found from the
    leaves' shapes, so ``optax.tree_map_params`` (which calls ``init`` on shapeless
    placeholders) cannot derive their shardings: they are ``(L, G)`` bools, replicate them.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms as on
    >>> mlp = on.coupled_groups("mlp", {"w_in": 1, "w_out": 0})
    >>> params = {"mlp": {"w_in": jnp.array([[1.0, 3.0, 0.5, 2.0]]),
    ...                   "w_out": jnp.array([[1.0], [1.0], [1.0], [1.0]])}}
    >>> tx = on.constrain_group_sparsity(0.5, groups=mlp)  # 2 of the 4 neurons
    >>> zeros = {"mlp": {"w_in": jnp.zeros((1, 4)), "w_out": jnp.zeros((4, 1))}}
    >>> updates, _ = tx.update(zeros, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)["mlp"]
    >>> new["w_in"][0].tolist(), new["w_out"][:, 0].tolist()
    ([0.0, 3.0, 0.0, 2.0], [0.0, 1.0, 0.0, 1.0])

  References:
    M. Zhu and S. Gupta, "To prune, or not to prune", arXiv:1710.01878, 2017; P. Michel et
    al., "Are sixteen heads really better than one?", NeurIPS 2019; G. Fang et al.,
    "DepGraph: towards any structural pruning", CVPR 2023 (dependency groups).
  """
  group_list = as_group_list(groups, "constrain_group_sparsity")
  constant = None
  if not is_schedule(fraction) and not isinstance(fraction, jax.core.Tracer):
    try:
      constant = float(np.asarray(fraction, np.float64))
    except (TypeError, ValueError):
      constant = None  # Hyperparams names the argument below.
    if constant is not None and np.shape(fraction) == () and constant > 1:  # type: ignore[arg-type]
      raise ValueError(f"`fraction` must be at most 1, got {fraction!r}.")
  period = _period(update_every, update_start, update_end)
  hparams = Hyperparams({"fraction": fraction})
  selector = compile_mask(mask)

  def instances_of(params):
    paths, leaves, _ = flatten(params)
    return resolve_all(group_list, paths, leaves)

  def init_fn(params):
    instances = instances_of(params)
    member_selection("constrain_group_sparsity", selector, params, instances)
    keep = tuple(
      jnp.ones((inst.groups,) if inst.layers is None else (inst.layers, inst.groups), jnp.bool_)
      for inst in instances
    )
    return GroupSparsityState(count=jnp.zeros([], jnp.int32), keep=keep)

  def update_fn(updates, state, params=None):
    if updates is None:
      return None, state
    u_paths, u_leaves, treedef, p_leaves = flatten_with_params(
      "constrain_group_sparsity", updates, params
    )
    values = hparams.at(state)
    valid = hparams.valid(values)
    instances = instances_of(params)
    if len(instances) != len(state.keep):
      raise ValueError(
        f"`constrain_group_sparsity`: the state holds {len(state.keep)} group instances but "
        f"the parameters have {len(instances)}: init the state with these parameters."
      )
    groups = []  # Per instance: its members' updates and parameters.
    for inst in instances:
      us = [u_leaves[m.position] for m in inst.members]
      if any(u is None for u in us):
        raise ValueError(
          f"`constrain_group_sparsity`: the update of a member of {inst.anchor!r} is None; "
          "a coupled group needs the updates of all its members."
        )
      groups.append((us, [p_leaves[m.position] for m in inst.members]))

    def choose(inst, us, ws, old_keep):
      # Ranked on w + u as apply_updates stores it (the sum in the leaf dtype).
      vs = [lax.stop_gradient(w) + lax.stop_gradient(u.astype(w.dtype)) for u, w in zip(us, ws)]
      norms = group_sq_norms(inst, vs, inst.layers is not None)
      if constant is not None:
        k = jnp.asarray(budget_count(constant, inst.groups), jnp.int32)
      else:
        k = traced_budget_count(values["fraction"], inst.groups)
      # In the sharding of the state's mask, so that it is the same at every step.
      return reshard_to(_kept_groups(norms, k), old_keep)

    if _is_periodic(period):  # Instances share conditionals, as the leaves of a transform.
      new_keep = refreshed(
        period.is_update_step(state.count),
        [
          Refresh(functools.partial(choose, inst, old_keep=old), (us, ws), old)
          for inst, (us, ws), old in zip(instances, groups, state.keep)
        ],
      )
    else:
      new_keep = [
        choose(inst, us, ws, old) for inst, (us, ws), old in zip(instances, groups, state.keep)
      ]
    new_leaves = list(u_leaves)
    for inst, (us, ws), keep in zip(instances, groups, new_keep):
      stacked = inst.layers is not None
      for member, u, w in zip(inst.members, us, ws):
        where = jnp.expand_dims(keep, member_view(member.axis, u.ndim, stacked))
        if explicit_spec(u) is not None:  # A select takes its mask in the leaf's sharding.
          where = reshard_to(jnp.broadcast_to(where, u.shape), u)
        new = jnp.where(where, u, -w.astype(u.dtype))
        if valid is not None:
          new = jnp.where(valid, new, jnp.full((), jnp.nan, new.dtype))
        new_leaves[member.position] = new
    return jax.tree_util.tree_unflatten(treedef, new_leaves), GroupSparsityState(
      count=optax.safe_increment(state.count), keep=tuple(new_keep)
    )

  return optax.GradientTransformation(init_fn, update_fn)


def polynomial_sparsity_schedule(
  final: float,
  *,
  begin_step: int,
  end_step: int,
  initial: float = 0.0,
  power: float = 3,
) -> Callable[[jax.Array], jax.Array]:
  """Zhu & Gupta's gradual pruning ramp: the sparsity ``s_t`` at step ``t``.

  ``s_t = final + (initial − final)·(1 − clip((t − begin_step)/(end_step − begin_step), 0,
  1))^power``: ``initial`` until ``begin_step``, rising fast and then slowly (``power = 3``,
  the cubic ramp) to ``final`` at ``end_step``, constant after. As the ``fraction`` of
  ``constrain_sparsity`` or ``constrain_group_sparsity``. After ``end_step`` the budget is
  constant; to freeze the mask there too, with the final budget, pass
  ``update_end=end_step + 1`` (with ``update_every`` dividing ``end_step − update_start``):
  ``update_end`` is exclusive, so the last mask is then chosen at ``end_step`` itself, where
  the ramp reaches ``final`` (with ``update_end=end_step`` it is chosen one period earlier,
  with a budget below ``final``).

  Args:
    final: the target sparsity, in ``[0, 1]``.
    begin_step: the step at which the ramp starts.
    end_step: the step at which it reaches ``final`` (``> begin_step``).
    initial: the sparsity before ``begin_step``, in ``[0, 1]``.
    power: the exponent of the ramp, ``> 0`` (3: cubic).

  Returns:
    A schedule ``step -> float32 sparsity``.

  Examples:
    >>> import optax_norms as on
    >>> s = on.polynomial_sparsity_schedule(0.8, begin_step=0, end_step=100)
    >>> [round(float(s(t)), 4) for t in (0, 50, 100, 200)]
    [0.0, 0.7, 0.8, 0.8]

  References:
    M. Zhu and S. Gupta, "To prune, or not to prune: exploring the efficacy of pruning for
    model compression", arXiv:1710.01878, 2017 (their equation 1).
  """
  for name, value in (("final", final), ("initial", initial)):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
      raise TypeError(f"`{name}` must be a number in [0, 1], got {value!r}.")
    if not 0 <= float(value) <= 1:
      raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
  begin = _step_number("begin_step", begin_step, 0)
  end = _step_number("end_step", end_step, 0)
  if end <= begin:
    raise ValueError(f"`end_step` ({end}) must be greater than `begin_step` ({begin}).")
  if (
    isinstance(power, (bool, np.bool_))
    or not isinstance(power, (int, float, np.number))
    or not math.isfinite(float(power))
    or float(power) <= 0
  ):
    raise ValueError(f"`power` must be a finite number > 0, got {power!r}.")
  final_, initial_, power_ = float(final), float(initial), float(power)

  def schedule(step):
    t = jnp.asarray(step).astype(jnp.float32)
    progress = jnp.clip((t - begin) / (end - begin), 0.0, 1.0)
    return final_ + (initial_ - final_) * (1.0 - progress) ** power_

  return schedule
