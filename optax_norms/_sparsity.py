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

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_norms._hyperparams import ScalarOrSchedule, is_schedule
from optax_norms._layout import Axis
from optax_norms._masks import Mask
from optax_norms._numerics import _is_int
from optax_norms._paths import format_path
from optax_norms._sharding import explicit_spec, reshard, shard_count
from optax_norms._transform import leafwise_transform

__all__ = ["budget_count", "constrain_n_of_m", "constrain_sparsity", "traced_budget_count"]


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
  return jnp.where(keep, u, -w)


def constrain_n_of_m(
  n: int | ScalarOrSchedule,
  m: int,
  *,
  block_axis: int | None = None,
  axis: Axis = None,
  mask: Mask = None,
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

  Args:
    n: entries kept per block, a whole number ``0 ≤ n ≤ m``, or a schedule.
    m: the block length, an int ``≥ 1``.
    block_axis: the axis the blocks run along, an int, or ``None`` for the input-feature
      axis of each leaf's layout.
    axis: the layout of each leaf (read when ``block_axis`` is ``None``): ``None`` reads
      roles, or ``unit_axes(stacked=...)`` for stacks; see ``clip_by_row_norm``.
    mask: the leaves to sparsify; ``None`` is every floating-point leaf.

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

  References:
    A. Mishra et al., "Accelerating sparse deep neural networks", arXiv:2104.08378, 2021
    (2:4 sparse tensor cores); torchao ``sparsity`` (semi-structured 2:4) and MaxText's
    N:M sparsity; A. Zhou et al., "Learning N:M fine-grained structured sparse neural
    networks from scratch", ICLR 2021.
  """
  if not _is_int(m) or int(m) < 1:
    raise ValueError(f"`m` must be an int >= 1 (the block length), got {m!r}.")
  m = int(m)
  _check_block_axis(block_axis)
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

  if block_axis is None:

    def rule(u, w, *, n, layout, leaf_dtype):
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
  fraction: ScalarOrSchedule, *, axis: Axis = None, mask: Mask = None
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

  Args:
    fraction: the fraction of entries to zero, ``0 ≤ fraction ≤ 1``: a number or a schedule.
    axis: the layout of each leaf; only its stack axes are read (one budget per layer).
      ``None`` reads roles and raises for an ambiguous leaf (a rank-3 kernel may be a stack);
      ``unit_axes(stacked=...)`` names the stacks.
    mask: the leaves to prune; ``None`` is every floating-point leaf.

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

  def rule(u, w, *, fraction, layout, leaf_dtype):
    if w.size == 0:
      return u
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
    keep = (above | ties_kept) & (keep_count > 0)
    return jnp.where(keep, u, -w)

  return leafwise_transform(
    "constrain_sparsity", rule, {"fraction": fraction}, mask=mask, needs_params=True, axis=axis
  )
