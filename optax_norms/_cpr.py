"""Constrained Parameter Regularization (CPR): a bound per matrix, held by a Lagrange multiplier.

Place ``cpr`` **after** the optimizer, instead of weight decay: ``optax.chain(optax.adam(lr),
cpr(kappa_init_method="warm_start", kappa_init_param=1000, mask="**/kernel"))`` is AdamCPR.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_norms._hyperparams import ScalarOrSchedule, is_schedule
from optax_norms._layout import Layout
from optax_norms._masks import Mask
from optax_norms._paths import Path, flatten, format_path
from optax_norms._transform import leafwise_transform
from optax_norms._units import unit_axes

__all__ = ["CprLeafState", "cpr"]

_INIT_METHODS = ("uniform", "dependent", "warm_start")
_REG_FUNCTIONS = ("l2", "l1", "std", "huber")


class CprLeafState(NamedTuple):
  """The CPR state of one leaf (inside ``LeafwiseState.leaves``).

  Attributes:
    lagmul: float32, the Lagrange multiplier ``λ ≥ 0`` of each matrix: shape ``()``, or
      ``(layers,)`` for a stacked leaf.
    kappa: float32, the bound ``κ`` of each matrix, of the same shape.

  Examples:
    >>> import jax.numpy as jnp, optax_norms as on
    >>> tx = on.cpr(kappa_init_method="dependent", kappa_init_param=0.5, stacked="blocks/*")
    >>> state = tx.init({"blocks": {"kernel": jnp.ones((2, 3, 3))}})
    >>> leaf = state.leaves["blocks"]["kernel"]  # a CprLeafState, one entry per layer
    >>> leaf.kappa.tolist(), leaf.lagmul.tolist()  # κ = 0.5·Σw² per layer
    ([4.5, 4.5], [0.0, 0.0])
  """

  lagmul: jax.Array
  kappa: jax.Array


def _regularization(v: jax.Array, function: str, axes: tuple[int, ...]) -> jax.Array:
  """``R(v)`` per matrix (reduced over `axes`)."""
  if function == "l2":
    return jnp.sum(jnp.square(v), axis=axes)
  if function == "l1":
    return jnp.sum(jnp.abs(v), axis=axes)
  if function == "std":
    return jnp.std(v, axis=axes, ddof=1)
  size = jnp.abs(v)
  return jnp.sum(jnp.where(size < 1, 0.5 * jnp.square(v), size - 0.5), axis=axes)


def _regularization_gradient(
  v: jax.Array, function: str, axes: tuple[int, ...], std: jax.Array
) -> jax.Array:
  """``∇R(v)``, written as the reference writes it (`std`: ``R(v)`` for ``"std"``, with the
  reduced axes kept)."""
  if function == "l2":
    return 2 * v
  if function == "l1":
    return jnp.sign(v)
  if function == "std":
    count = int(np.prod([v.shape[a] for a in axes], dtype=np.int64))
    centred = v - jnp.mean(v, axis=axes, keepdims=True)
    gradient = (2 * centred - 2 * jnp.mean(centred, axis=axes, keepdims=True)) / (count - 1)
    return gradient / (2 * std)
  return jnp.where(jnp.abs(v) < 1, v, jnp.sign(v))


def _as_stacked(stacked: str | Iterable[str] | None):
  return None if stacked is None else unit_axes(stacked=stacked)


def cpr(
  *,
  kappa_init_method: str,
  kappa_init_param: float,
  kappa_update: ScalarOrSchedule = 1.0,
  reg_function: str = "l2",
  reg_by_lr: bool = False,
  learning_rate: ScalarOrSchedule | None = None,
  stacked: str | Iterable[str] | None = None,
  mask: Mask = None,
) -> optax.GradientTransformation:
  r"""Constrained Parameter Regularization: keeps ``R(W) ≤ κ`` per matrix with a multiplier.

  Instead of a fixed decay, each matrix ``W`` (each selected leaf; each layer of a stacked
  leaf) has a bound ``κ`` on a regularization function ``R`` and a Lagrange multiplier
  ``λ ≥ 0`` in the state. After the optimizer's update ``u``, with ``v = w + u`` (the weight
  the step would store):

  - ``λ ← max(0, λ + μ·(R(v) − κ))``, with ``μ = kappa_update / n`` (``n`` the matrix's entry
    count; ``μ = kappa_update`` for ``"std"``): ``λ`` grows while the bound is exceeded and
    falls back to 0 when it holds;
  - ``w ← v − λ·∇R(v)`` (times the learning rate with ``reg_by_lr``).

  ``R`` is ``"l2"`` (``Σv²``, ``∇R = 2v``), ``"l1"`` (``Σ|v|``), ``"std"`` (the sample
  standard deviation) or ``"huber"`` (``Σ`` of ``½v²`` for ``|v| < 1``, ``|v| − ½`` beyond).

  The bound ``κ`` is set by ``kappa_init_method``:

  - ``"uniform"``: ``κ = kappa_init_param`` for every matrix;
  - ``"dependent"``: ``κ = kappa_init_param·R(w₀)``, ``w₀`` the parameters given to ``init``;
  - ``"warm_start"``: no regularization for the first ``kappa_init_param`` steps; at step
    ``kappa_init_param`` (counting from 1), ``κ = R(v)``; CPR from the next step on. The
    paper's recommended default.

  The reference's fourth method, ``"inflection_point"``, is not offered: its single-tensor
  and multi-tensor code paths detect the inflection differently (one every step from an
  average that is never stored, the other every ``reg_step_size`` steps), so there is no one
  behaviour to match; use ``"warm_start"``.

  A NaN or infinity in a matrix makes its ``R``, its multiplier and its whole update
  non-finite (as in the reference), and no other matrix's; wrap the chain in
  ``optax.apply_if_finite`` to skip such steps, state included.

  The reference regularizes the weight matrices of linear layers only, not biases,
  normalization scales or embeddings: ``mask=["**/kernel"]`` for Flax trees (or
  ``optax_norms.weights_only()`` less embeddings). Do not combine with weight decay.

  Args:
    kappa_init_method: ``"uniform"``, ``"dependent"`` or ``"warm_start"``.
    kappa_init_param: the bound (``"uniform"``), its factor (``"dependent"``), or the
      number of warm-up steps (``"warm_start"``, a positive integer).
    kappa_update: ``kappa_update ≥ 0``, the multiplier's step size (before the division
      by ``n``); a number or a schedule.
    reg_function: ``"l2"``, ``"l1"``, ``"std"`` or ``"huber"``.
    reg_by_lr: scale the pull ``λ·∇R`` by `learning_rate`.
    learning_rate: the optimizer's learning rate (number or schedule); needed with
      `reg_by_lr`.
    stacked: glob(s) over paths of leaves with a leading layer axis: those get one bound
      and one multiplier per layer.
    mask: the leaves to regularize; ``None`` is every floating-point leaf.

  Returns:
    An ``optax.GradientTransformation`` whose state is a ``LeafwiseState`` with a
    ``CprLeafState`` per selected leaf (checkpointable); its ``update`` needs ``params``.
    To derive the state's shardings with ``optax.tree_map_params``, pass
    ``is_leaf=lambda x: isinstance(x, optax_norms.CprLeafState)`` (each is a pair of
    per-matrix scalars: replicate it).

  Raises:
    ValueError: for an unknown method or function, a bad `kappa_init_param`, `reg_by_lr`
      without `learning_rate`, a `stacked` glob that matches no leaf (at ``init``).

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> params = {"kernel": jnp.array([[3.0, 0.0], [0.0, 4.0]])}  # R = Σw² = 25
    >>> tx = optax_norms.cpr(kappa_init_method="uniform", kappa_init_param=5.0)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"kernel": jnp.zeros((2, 2))}, state, params)
    >>> float(state.leaves["kernel"].lagmul)  # 1/4·(25 − 5)
    5.0
    >>> (params["kernel"] + updates["kernel"]).tolist()  # w − 2λw = −9w
    [[-27.0, 0.0], [0.0, -36.0]]

  References:
    J. Franke, M. Hefenbrock, G. Köhler, F. Hutter, "Improving Deep Learning Optimization
    through Constrained Parameter Regularization", NeurIPS 2024; the reference code
    ``automl/CPR`` (``pytorch_cpr/adamcpr.py``).
  """
  if kappa_init_method not in _INIT_METHODS:
    hint = " (not offered: see the docstring; use 'warm_start')"
    raise ValueError(
      f"`kappa_init_method` must be one of {_INIT_METHODS}, got {kappa_init_method!r}"
      f"{hint if kappa_init_method == 'inflection_point' else ''}."
    )
  if reg_function not in _REG_FUNCTIONS:
    raise ValueError(f"`reg_function` must be one of {_REG_FUNCTIONS}, got {reg_function!r}.")
  if not isinstance(reg_by_lr, (bool, np.bool_)):
    raise TypeError(f"`reg_by_lr` must be True or False, got {reg_by_lr!r}.")
  if is_schedule(kappa_init_param):
    raise TypeError("`kappa_init_param` must be a number (it sets the bound once), not a schedule.")
  # Concrete values are checked here; optax.inject_hyperparams passes arrays (traced in
  # `update`, where only the warm-up length is read, by comparisons that take arrays).
  concrete = not isinstance(kappa_init_param, jax.core.Tracer)
  uses_warm_start = kappa_init_method == "warm_start"
  if concrete:
    try:
      number = float(np.asarray(kappa_init_param, np.float64))
    except (TypeError, ValueError):
      raise ValueError(f"`kappa_init_param` must be a number, got {kappa_init_param!r}.") from None
    if uses_warm_start and (
      isinstance(kappa_init_param, (bool, np.bool_)) or not number.is_integer() or number < 1
    ):
      raise ValueError(
        "`kappa_init_param` of 'warm_start' is the number of steps before the bound is set: "
        f"a positive integer, got {kappa_init_param!r}."
      )
    if not np.isfinite(number) or number < 0:
      raise ValueError(
        f"`kappa_init_param` must be finite and non-negative, got {kappa_init_param!r}."
      )
  init_param = kappa_init_param
  if reg_by_lr and learning_rate is None:
    raise ValueError("`reg_by_lr=True` scales the pull by `learning_rate`: pass it.")
  layers = _as_stacked(stacked)
  hyperparams: dict[str, ScalarOrSchedule] = {"kappa_update": kappa_update}
  if reg_by_lr:
    assert learning_rate is not None
    hyperparams["learning_rate"] = learning_rate

  def matrix_axes(path: Path, leaf: Any) -> tuple[int, ...]:
    if layers is not None and layers.is_stacked(path):
      if jnp.ndim(leaf) < 1:
        raise ValueError(
          f"The parameter {format_path(path)!r} matches `stacked` but is a scalar: it has no "
          "leading layer axis."
        )
      return tuple(range(1, jnp.ndim(leaf)))
    return tuple(range(jnp.ndim(leaf)))

  def init_leaf(path: Path, leaf: jax.Array, layout: Layout | None) -> CprLeafState:
    del layout
    axes = matrix_axes(path, leaf)
    if reg_function == "std" and int(np.prod([leaf.shape[a] for a in axes], dtype=np.int64)) < 2:
      raise ValueError(
        f"reg_function='std' needs at least 2 entries per matrix; {format_path(path)!r} has "
        f"shape {tuple(leaf.shape)}."
      )
    shape = tuple(leaf.shape[a] for a in range(jnp.ndim(leaf)) if a not in axes)
    if kappa_init_method == "uniform":
      kappa = jnp.full(shape, jnp.asarray(init_param, jnp.float32))
    elif kappa_init_method == "dependent":
      reg = _regularization(leaf.astype(jnp.float32), reg_function, axes)
      kappa = jnp.asarray(init_param, jnp.float32) * reg
    else:
      kappa = jnp.zeros(shape, jnp.float32)
    return CprLeafState(lagmul=jnp.zeros(shape, jnp.float32), kappa=kappa.astype(jnp.float32))

  def regularized(u, w, state, count, kappa_update, learning_rate):
    stacked_leaf = state.lagmul.ndim == 1
    axes = tuple(range(1 if stacked_leaf else 0, w.ndim))
    expand = (slice(None),) + (None,) * (w.ndim - 1) if stacked_leaf else ()
    v = w + u
    previous, kappa = state.lagmul.astype(v.dtype), state.kappa.astype(v.dtype)
    reg = _regularization(v, reg_function, axes)
    entries = int(np.prod([w.shape[a] for a in axes], dtype=np.int64))
    step_size = kappa_update if reg_function == "std" else kappa_update / entries
    lagmul = jnp.maximum(previous + step_size * (reg - kappa), 0)
    gradient = _regularization_gradient(v, reg_function, axes, reg[expand])
    pull = lagmul[expand] * gradient
    if learning_rate is not None:
      pull = learning_rate * pull
    # Written from v = w + u alone (not u − pull): u then has one reader and XLA fuses the
    # optimizer's step into v instead of writing both u and v out; `apply_updates` stores
    # w + ((v − pull) − w) = v − pull to float32 rounding.
    if not uses_warm_start:
      return (v - pull) - w, CprLeafState(lagmul.astype(jnp.float32), state.kappa)
    step = count + 1
    warm_up = jnp.asarray(init_param).astype(step.dtype)  # an injected float array too
    active = step > warm_up
    kappa = jnp.where(step == warm_up, reg, kappa)
    lagmul = jnp.where(active, lagmul, previous)
    return (
      jnp.where(active, v - pull, v) - w,
      CprLeafState(lagmul.astype(jnp.float32), kappa.astype(jnp.float32)),
    )

  if reg_by_lr:

    def rule(u, w, *, kappa_update, learning_rate, state, count):
      return regularized(u, w, state, count, kappa_update, learning_rate)

  else:

    def rule(u, w, *, kappa_update, state, count):  # type: ignore[misc]
      return regularized(u, w, state, count, kappa_update, None)

  transform = leafwise_transform(
    "cpr",
    rule,
    hyperparams,
    mask=mask,
    needs_params=True,
    init_leaf=init_leaf,
  )
  if layers is None:
    return transform

  def init_fn(params):
    paths, _, _ = flatten(params)
    layers.check(paths)
    return transform.init(params)

  return optax.GradientTransformation(init_fn, transform.update)
