"""Decoupled weight decay in the three conventions in use, cautious decay, and the timescale rule.

Place ``add_decoupled_weight_decay`` **after** the optimizer (its update ``u`` already holds
the learning rate): ``optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr),
add_decoupled_weight_decay(λ, lr))`` is ``optax.adamw(lr, weight_decay=λ)``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_norms._hyperparams import ScalarOrSchedule, is_schedule
from optax_norms._masks import Mask
from optax_norms._transform import leafwise_transform

__all__ = ["CONVENTIONS", "add_decoupled_weight_decay", "decay_from_timescale"]

CONVENTIONS = ("lr", "independent", "adamc")


def _is_python_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
    value, (bool, np.bool_)
  )


def _check_convention(convention: Any) -> None:
  if convention not in CONVENTIONS:
    raise ValueError(f"`convention` must be one of {CONVENTIONS}, got {convention!r}.")


def _peak(
  convention: str, learning_rate: ScalarOrSchedule, peak_learning_rate: Any
) -> ScalarOrSchedule | None:
  """The peak learning rate the decay is measured against (``None`` for ``"lr"``)."""
  if convention == "lr":
    return None
  if peak_learning_rate is None:
    if not _is_python_number(learning_rate):
      what = "a schedule" if is_schedule(learning_rate) else "an array"
      raise ValueError(
        f"convention={convention!r} measures the decay against the peak learning rate, and "
        f"`learning_rate` is {what}, not a number: pass `peak_learning_rate` (the schedule's "
        "largest value; under optax.inject_hyperparams pass it too)."
      )
    peak_learning_rate = learning_rate
  if is_schedule(peak_learning_rate):
    raise ValueError("`peak_learning_rate` must be a number, not a schedule.")
  if not isinstance(peak_learning_rate, jax.core.Tracer):
    try:
      peak = float(np.asarray(peak_learning_rate, np.float64))
    except (TypeError, ValueError):
      raise ValueError(
        f"`peak_learning_rate` must be a positive number, got {peak_learning_rate!r}."
      ) from None
    if not peak > 0 or math.isinf(peak):
      raise ValueError(f"`peak_learning_rate` must be positive and finite, got {peak}.")
  return peak_learning_rate


def add_decoupled_weight_decay(
  weight_decay: ScalarOrSchedule,
  learning_rate: ScalarOrSchedule,
  *,
  convention: str = "lr",
  peak_learning_rate: Any = None,
  cautious: bool = False,
  mask: Mask = None,
) -> optax.GradientTransformation:
  r"""Decoupled weight decay ``u ← u − c_t·λ·w``, placed after the optimizer.

  The three conventions differ in the coefficient ``c_t`` at step ``t``, with ``lr_t`` the
  learning rate (schedule) and ``peak`` its largest value:

  | ``convention`` | ``c_t`` | as in |
  |---|---|---|
  | ``"lr"`` | ``lr_t`` | ``optax.adamw``, PyTorch ``AdamW``: ``w ← w − lr_t·λ·w`` |
  | ``"independent"`` | ``lr_t / peak`` | Loshchilov & Hutter's schedule multiplier; big_vision, NeMo ``use_independent_wd``: ``λ`` is the per-step decay at the peak, whatever the peak |
  | ``"adamc"`` | ``lr_t² / peak`` | AdamC (Defazio 2025): the decay ``λ·lr_t/peak`` in AdamW's form, which stops the late rise of gradient norms under lr decay |

  At the peak all three decay a weight by the same factor when ``λ`` is converted: the
  ``"lr"`` and ``"adamc"`` decays are ``peak·λ`` per step there, the ``"independent"`` one
  ``λ``. The weight is read before the step (``w``, as ``optax.adamw``), so ``"lr"`` equals
  ``optax.adamw``'s decay to float32 rounding.

  With ``cautious=True`` (cautious weight decay, Chen et al. 2025) the decay is applied only
  where the optimizer's update already points towards zero, ``sign(u)·sign(w) ≤ 0``, and
  elsewhere ``u`` is left as it is: the decay never fights the optimizer.

  Args:
    weight_decay: ``λ ≥ 0``, a number or a schedule.
    learning_rate: the optimizer's learning rate, the same number or schedule.
    convention: ``"lr"``, ``"independent"`` or ``"adamc"``.
    peak_learning_rate: the peak of `learning_rate` for ``"independent"`` and ``"adamc"``.
      Defaults to `learning_rate` when that is a number; required when it is a schedule or
      an array (as ``optax.inject_hyperparams`` passes it).
    cautious: decay only where ``sign(u)·sign(w) ≤ 0``.
    mask: the leaves to decay (globs, a ``path_mask``, a bool pytree or a callable);
      ``None`` decays every floating-point leaf. Decay is usually not applied to biases and
      normalization scales: ``mask=optax_norms.weights_only()``.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Raises:
    ValueError: for a bad `convention`, a missing or non-positive `peak_learning_rate`,
      a negative `weight_decay` or `learning_rate`.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> params = {"kernel": jnp.array([1.0, -2.0])}
    >>> tx = optax_norms.add_decoupled_weight_decay(0.5, 0.1)  # c = lr = 0.1
    >>> updates, _ = tx.update({"kernel": jnp.zeros(2)}, tx.init(params), params)
    >>> [round(x, 6) for x in updates["kernel"].tolist()]
    [-0.05, 0.1]
    >>> tx = optax_norms.add_decoupled_weight_decay(0.5, 0.1, cautious=True)
    >>> u = {"kernel": jnp.array([0.01, 0.01])}  # moves the first weight away from zero
    >>> updates, _ = tx.update(u, tx.init(params), params)
    >>> [round(x, 6) for x in updates["kernel"].tolist()]
    [0.01, 0.11]

  References:
    I. Loshchilov and F. Hutter, "Decoupled Weight Decay Regularization", ICLR 2019;
    A. Defazio, "Why Gradients Rapidly Increase Near the End of Training", 2025 (AdamC);
    L. Chen et al., "Cautious Weight Decay", 2025.
  """
  _check_convention(convention)
  if not isinstance(cautious, (bool, np.bool_)):
    raise TypeError(f"`cautious` must be True or False, got {cautious!r}.")
  peak = _peak(convention, learning_rate, peak_learning_rate)
  hyperparams: dict[str, ScalarOrSchedule] = {
    "weight_decay": weight_decay,
    "learning_rate": learning_rate,
  }
  if peak is not None:
    hyperparams["peak_learning_rate"] = peak

  def coefficient(learning_rate, peak_learning_rate):
    if convention == "lr":
      return learning_rate
    if convention == "independent":
      return learning_rate / peak_learning_rate
    return learning_rate * (learning_rate / peak_learning_rate)

  def decayed(u, w, c):
    decay = u - c * w
    if not cautious:
      return decay
    # Signs, not the product u·w, which underflows to 0 for tiny values.
    return jnp.where(jnp.sign(u) * jnp.sign(w) <= 0, decay, u)

  if peak is None:

    def rule(u, w, *, weight_decay, learning_rate):
      return decayed(u, w, coefficient(learning_rate, None) * weight_decay)

  else:

    def rule(u, w, *, weight_decay, learning_rate, peak_learning_rate):  # type: ignore[misc]
      return decayed(u, w, coefficient(learning_rate, peak_learning_rate) * weight_decay)

  return leafwise_transform(
    "add_decoupled_weight_decay", rule, hyperparams, mask=mask, needs_params=True
  )


def decay_from_timescale(
  timescale: float,
  learning_rate: float,
  *,
  steps_per_epoch: int = 1,
  convention: str = "lr",
) -> float:
  r"""The decoupled weight decay ``λ`` whose averaging timescale is `timescale`.

  AdamW's weights are an exponential moving average of recent updates with timescale
  ``τ = 1/(lr·λ)`` iterations (Wang & Aitchison 2025). They find the best ``τ``, counted in
  epochs, stays the same as models and datasets grow, while the best ``λ`` does not: so set
  ``λ`` from ``τ``. With ``τ = timescale·steps_per_epoch`` iterations and ``lr`` the peak
  learning rate:

  - ``"lr"`` (``optax.adamw``) and ``"adamc"`` (both decay by ``lr·λ`` per step at the peak):
    ``λ = 1/(lr·τ)``;
  - ``"independent"`` (decay ``λ`` per step at the peak): ``λ = 1/τ``, whatever ``lr``.

  To convert a ``λ`` between conventions at the same peak: ``λ_independent = lr·λ_lr``,
  ``λ_adamc = λ_lr``.

  Args:
    timescale: ``τ > 0``, in epochs (or in iterations with ``steps_per_epoch=1``).
    learning_rate: the peak learning rate ``> 0`` (of a schedule: its largest value).
    steps_per_epoch: optimizer steps per epoch, a positive integer.
    convention: the convention of the decay the result is passed to.

  Returns:
    ``λ`` as a Python float.

  Examples:
    >>> import optax_norms
    >>> optax_norms.decay_from_timescale(10, 1e-3, steps_per_epoch=100)  # τ = 1000 steps
    1.0
    >>> optax_norms.decay_from_timescale(10, 1e-3, steps_per_epoch=100, convention="independent")
    0.001

  References:
    X. Wang and L. Aitchison, "How to set AdamW's weight decay as you scale model and
    dataset size", ICML 2025.
  """
  _check_convention(convention)
  for name, value in (("timescale", timescale), ("learning_rate", learning_rate)):
    if is_schedule(value):
      raise ValueError(f"`{name}` must be a number (for a schedule: its peak), not a schedule.")
    try:
      number = float(value)
    except (TypeError, ValueError):
      raise ValueError(f"`{name}` must be a positive number, got {value!r}.") from None
    if not number > 0 or math.isinf(number):
      raise ValueError(f"`{name}` must be positive and finite, got {value!r}.")
  if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, (int, np.integer)):
    raise TypeError(f"`steps_per_epoch` must be a positive integer, got {steps_per_epoch!r}.")
  if steps_per_epoch < 1:
    raise ValueError(f"`steps_per_epoch` must be a positive integer, got {steps_per_epoch!r}.")
  iterations = float(timescale) * int(steps_per_epoch)
  if convention == "independent":
    return 1.0 / iterations
  return 1.0 / (float(learning_rate) * iterations)
