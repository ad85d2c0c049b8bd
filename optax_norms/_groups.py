"""A whole model in one table: ``regularize(optimizer, rules)`` and ``describe_rules``.

A rule table is a sequence of ``(selector, settings)``; each floating-point leaf takes the
settings of the first rule whose selector matches its path. ``regularize`` turns the
table into one ``optax.chain``: for every setting of every rule, one single transform of
this library, masked to the leaves of that rule, placed at its stage. The optimizer is
applied once to the whole tree (one optimizer state, no per-group copy).

To make a new transform reachable from a rule, add a row to ``SETTINGS``: the setting's
name, its stage, and a builder ``(value, *, mask, axis, learning_rate) -> transform``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import optax

from optax_norms._clipping import clip_by_max_abs, clip_by_row_norm
from optax_norms._constraints import constrain_max_abs, constrain_row_norm
from optax_norms._coupled import as_group_list, resolve_all
from optax_norms._cpr import cpr
from optax_norms._hyperparams import ScalarOrSchedule, is_schedule
from optax_norms._keras_constraints import (
  constrain_min_max_norm,
  constrain_non_negative,
  constrain_unit_norm,
)
from optax_norms._layout import Layout, check_axis_spec
from optax_norms._masks import PathMask, selector_mask
from optax_norms._messages import missing_params
from optax_norms._paths import Path, check_unambiguous, flatten, format_path, shown_paths
from optax_norms._penalties import add_l1_decay, add_l2_decay
from optax_norms._prox import prox_group_l2, prox_l1
from optax_norms._rule_clipping import (
  check_adaptive,
  clip_group_adaptive,
  clip_group_global_norm,
  zero_updates,
)
from optax_norms._rules_data import (
  DataSchedule,
  as_plain,
  selector_from_data,
  selector_to_data,
  value_from_data,
  value_to_data,
)
from optax_norms._sparsity import (
  budget_count,
  constrain_group_sparsity,
  constrain_n_of_m,
  constrain_sparsity,
)
from optax_norms._spectral import constrain_spectral_norm
from optax_norms._transform import leaf_kind, leafwise_transform
from optax_norms._units import UnitAxes, resolve_layout
from optax_norms._weight_decay import add_decoupled_weight_decay

__all__ = ["SETTINGS", "describe_rules", "regularize", "rules_from_data", "rules_to_data"]

# The stages, in the order they run on each leaf; the optimizer runs between
# "coupled" and "scale". The model-wide clip_global_norm runs first in "clip".
STAGES = ("freeze", "clip", "coupled", "optimizer", "scale", "decoupled", "prox", "constraint")


def _scale_updates(lr_scale: ScalarOrSchedule, *, mask: Any) -> optax.GradientTransformation:
  """``u ← lr_scale·u`` on the selected leaves (the optimizer's step, scaled per group)."""

  def rule(u, w, *, lr_scale):
    del w
    return u * lr_scale

  return leafwise_transform(
    "regularize", rule, {"lr_scale": lr_scale}, mask=mask, needs_params=False
  )


class Setting(NamedTuple):
  """One row of the settings table.

  Attributes:
    stage: where it runs (one of ``STAGES``).
    build: ``(value, *, mask, axis, learning_rate, peak_learning_rate) ->
      GradientTransformation`` (a builder names the keywords it reads, ``**_`` the rest):
      ``learning_rate`` is the rule's step size ``learning_rate·lr_scale`` (``None`` without
      ``regularize(..., learning_rate=)``), ``peak_learning_rate`` its peak (or ``None``).
    needs_learning_rate: whether ``regularize(..., learning_rate=)`` is required.
    layout: whether it reads the rule's layout (``axis``): per-unit settings, the spectral
      matrix, the N:M block axis, the per-layer sparsity budget.
    pattern: a constraint that fixes a pattern (zeros, signs, a box); in a rule these run
      before the constraints that rescale, so that scaling keeps the pattern.
  """

  stage: str
  build: Callable[..., optax.GradientTransformation]
  needs_learning_rate: bool = False
  layout: bool = False
  pattern: bool = False


_DECAY_KEYS = ("weight_decay", "convention", "cautious")
_CPR_KEYS = (
  "kappa_init_method",
  "kappa_init_param",
  "kappa_update",
  "reg_function",
  "reg_by_lr",
)


def _decoupled_decay(
  value: Any, *, mask: Any, learning_rate: Any, peak_learning_rate: Any, lr_scale: Any, **_: Any
) -> optax.GradientTransformation:
  """``decoupled_decay``: a number or schedule (``"lr"``), or a dict of
  ``add_decoupled_weight_decay``'s ``weight_decay``, ``convention`` and ``cautious``."""
  options = _as_kwargs("decoupled_decay", value, _DECAY_KEYS) if isinstance(value, Mapping) else {}
  if options and "weight_decay" not in options:
    raise ValueError(f"`decoupled_decay` as a dict needs 'weight_decay', got {value!r}.")
  weight_decay = options.pop("weight_decay") if options else value
  peak = None
  if options.get("convention", "lr") != "lr" and peak_learning_rate is not None:
    if is_schedule(lr_scale):
      raise ValueError(
        f"convention={options['convention']!r} measures the decay against the peak of the "
        "rule's step size learning_rate·lr_scale, which a scheduled lr_scale leaves undefined: "
        "use a constant lr_scale in this rule."
      )
    peak = peak_learning_rate * (1.0 if lr_scale is None else lr_scale)
  return add_decoupled_weight_decay(
    weight_decay, learning_rate, peak_learning_rate=peak, mask=mask, **options
  )


def _cpr(value: Any, *, mask: Any, axis: Any, learning_rate: Any, **_: Any):
  """``cpr``: a dict of ``cpr``'s arguments; a stacked ``axis`` of the rule gives its layers."""
  options = _as_kwargs("cpr", value, _CPR_KEYS)
  if not {"kappa_init_method", "kappa_init_param"} <= set(options):
    raise ValueError(
      f"`cpr` takes a dict with 'kappa_init_method' and 'kappa_init_param' (and optionally "
      f"{_CPR_KEYS[2:]}), e.g. {{'kappa_init_method': 'warm_start', 'kappa_init_param': "
      f"1000}}, got {value!r}."
    )
  if options.get("reg_by_lr") and learning_rate is None:
    raise ValueError(
      "`cpr` with 'reg_by_lr' needs the optimizer's learning rate: pass "
      "regularize(optimizer, rules, learning_rate=...)."
    )
  stacked = list(axis.stacked) if isinstance(axis, UnitAxes) and axis.stacked else None
  return cpr(
    **options,
    learning_rate=learning_rate if options.get("reg_by_lr") else None,
    stacked=stacked,
    mask=mask,
  )


_PERIODIC_KEYS = ("update_every", "update_start", "update_end")


def _budget(name: str, value: Any) -> dict[str, Any]:
  """A budget setting: a fraction (number or schedule) or a dict with ``fraction`` and the
  periodic-mask keys."""
  if not isinstance(value, Mapping):
    return {"fraction": value}
  options = _as_kwargs(name, value, ("fraction", *_PERIODIC_KEYS))
  if "fraction" not in options:
    raise ValueError(f"`{name}` as a dict needs 'fraction', got {value!r}.")
  return options


_ADAPTIVE_DEFAULTS = {"z": 2.5, "decay": 0.97, "warmup": 25}


def _clip_adaptive(value: Any, *, mask: Any, **_: Any) -> optax.GradientTransformation:
  """``clip_adaptive``: ``True`` (the defaults) or a dict of ``z``, ``decay``, ``warmup``."""
  options = {} if value is True else _as_kwargs("clip_adaptive", value, tuple(_ADAPTIVE_DEFAULTS))
  options = {**_ADAPTIVE_DEFAULTS, **options}
  check_adaptive(**options)
  return clip_group_adaptive(**options, mask=mask)


def _freeze(value: Any, *, mask: Any, **_: Any) -> optax.GradientTransformation:
  return zero_updates(mask=mask) if value is True else _flag_error("freeze", value)


def _group_sparsity(value: Any, *, mask: Any, groups: Any, **_: Any):
  if groups is None:
    raise ValueError(
      "`group_sparsity` prunes coupled groups: give the rule a 'groups' setting "
      "(optax_norms.coupled_groups(...), or a list of them)."
    )
  return constrain_group_sparsity(**_budget("group_sparsity", value), groups=groups, mask=mask)


def _spectral(value: Any, axis: Any, mask: Any) -> optax.GradientTransformation:
  if isinstance(value, Mapping):
    options = _as_kwargs("spectral_norm", value, ("max_norm", "mode", "n_iter", "seed"))
    if "max_norm" not in options:
      raise ValueError(f"`spectral_norm` as a dict needs 'max_norm', got {value!r}.")
    return constrain_spectral_norm(axis=axis, mask=mask, **options)
  return constrain_spectral_norm(value, axis=axis, mask=mask)


def _n_of_m(value: Any, axis: Any, mask: Any) -> optax.GradientTransformation:
  if isinstance(value, Mapping):
    options = _as_kwargs("n_of_m", value, ("n", "m", "block_axis", *_PERIODIC_KEYS))
    if not {"n", "m"} <= set(options):
      raise ValueError(f"`n_of_m` as a dict needs 'n' and 'm', got {value!r}.")
    return constrain_n_of_m(axis=axis, mask=mask, **options)
  n, m = _as_pair("n_of_m", value)
  return constrain_n_of_m(n, m, axis=axis, mask=mask)


# Order inside a stage is the order of this table. In the constraint stage, the constraints
# that fix a pattern come first, then those that rescale (the ones that may scale a unit up,
# then the spectral projection, then the max-norm ball): each later one keeps what the
# earlier ones fixed, so all of a rule's constraints hold on the stored values at once.
SETTINGS: dict[str, Setting] = {
  "freeze": Setting("freeze", _freeze),
  "clip_adaptive": Setting("clip", _clip_adaptive),
  "clip_global_norm": Setting("clip", lambda v, *, mask, **_: clip_group_global_norm(v, mask=mask)),
  "clip_unit_norm": Setting(
    "clip",
    lambda v, *, mask, axis, **_: clip_by_row_norm(v, axis=axis, mask=mask),
    layout=True,
  ),
  "clip_max_abs": Setting("clip", lambda v, *, mask, **_: clip_by_max_abs(v, mask=mask)),
  "l2": Setting("coupled", lambda v, *, mask, **_: add_l2_decay(v, mask=mask)),
  "l1": Setting("coupled", lambda v, *, mask, **_: add_l1_decay(v, mask=mask)),
  "lr_scale": Setting("scale", lambda v, *, mask, **_: _scale_updates(v, mask=mask)),
  "decoupled_decay": Setting(
    "decoupled",
    _decoupled_decay,
    needs_learning_rate=True,
  ),
  "cpr": Setting("decoupled", _cpr),
  "prox_l1": Setting(
    "prox",
    lambda v, *, mask, learning_rate, **_: prox_l1(v, learning_rate, mask=mask),
    needs_learning_rate=True,
  ),
  "prox_group": Setting(
    "prox",
    lambda v, *, mask, axis, learning_rate, groups, **_: prox_group_l2(
      v, learning_rate, groups=groups, axis=axis, mask=mask
    ),
    needs_learning_rate=True,
    layout=True,
  ),
  "non_negative": Setting(
    "constraint",
    lambda v, *, mask, **_: (
      constrain_non_negative(mask=mask) if v is True else _flag_error("non_negative", v)
    ),
    pattern=True,
  ),
  "max_abs": Setting(
    "constraint",
    lambda v, *, mask, **_: constrain_max_abs(v, mask=mask),
    pattern=True,
  ),
  "n_of_m": Setting(
    "constraint",
    lambda v, *, mask, axis, **_: _n_of_m(v, axis, mask),
    layout=True,
    pattern=True,
  ),
  "sparsity": Setting(
    "constraint",
    lambda v, *, mask, axis, **_: constrain_sparsity(
      **_budget("sparsity", v), axis=axis, mask=mask
    ),
    layout=True,
    pattern=True,
  ),
  "group_sparsity": Setting("constraint", _group_sparsity, pattern=True),
  "unit_norm": Setting(
    "constraint",
    lambda v, *, mask, axis, **_: (
      constrain_unit_norm(axis=axis, mask=mask) if v is True else _flag_error("unit_norm", v)
    ),
    layout=True,
  ),
  "min_max_norm": Setting(
    "constraint",
    lambda v, *, mask, axis, **_: constrain_min_max_norm(
      **_as_kwargs("min_max_norm", v, ("min_norm", "max_norm", "rate")), axis=axis, mask=mask
    ),
    layout=True,
  ),
  "spectral_norm": Setting(
    "constraint",
    lambda v, *, mask, axis, **_: _spectral(v, axis, mask),
    layout=True,
  ),
  "max_norm": Setting(
    "constraint",
    lambda v, *, mask, axis, **_: constrain_row_norm(v, axis=axis, mask=mask),
    layout=True,
  ),
}


def _flag_error(name: str, value: Any):
  raise ValueError(f"`{name}` takes True (to apply it) or is left out, got {value!r}.")


def _as_kwargs(name: str, value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
  if not isinstance(value, Mapping) or not set(value) <= set(keys):
    raise (ValueError if isinstance(value, Mapping) else TypeError)(
      f"`{name}` takes a dict with keys among {keys}, got {value!r}."
    )
  return dict(value)


def _as_pair(name: str, value: Any) -> tuple[Any, Any]:
  if not isinstance(value, (tuple, list)) or len(value) != 2:
    raise (ValueError if isinstance(value, (tuple, list)) else TypeError)(
      f"`{name}` takes a pair (n, m), e.g. (2, 4), or a dict with 'n', 'm' and "
      f"'block_axis', got {value!r}."
    )
  return value[0], value[1]


def _number(value: Any) -> float | None:
  """A constant setting as a float; ``None`` for a schedule (or anything else)."""
  if is_schedule(value):
    return None
  try:
    return float(np.asarray(value, np.float64))
  except (TypeError, ValueError):
    return None


def _spectral_mode(value: Any) -> str:
  return value.get("mode", "clip") if isinstance(value, Mapping) else "clip"


def _refused_pairs(settings: Mapping[str, Any], optimizer: Any) -> str | None:
  """Why the constraints (and prox settings) of one rule cannot all hold, or ``None``.

  The pairs that compose are run in the order of ``SETTINGS``; these are the ones no order
  makes hold together on every value.
  """
  has = set(settings) - _MODIFIERS
  if "freeze" in has and len(has) > 1:
    return (
      f"a frozen rule's leaves get no update at all, so {sorted(has - {'freeze'})} would "
      "do nothing: leave them out (or the freeze)."
    )
  if "groups" in settings and not has & {"prox_group", "group_sparsity"}:
    return "'groups' is read by 'prox_group' and 'group_sparsity' only, and this rule has neither."
  patterns = sorted(k for k in has if SETTINGS[k].pattern)
  # Constraints that may scale a unit up break bounds that an earlier constraint set.
  for up in ("unit_norm", "min_max_norm"):
    for bound in ("max_abs", "spectral_norm"):
      if up in has and bound in has:
        return (
          f"{up!r} scales units up (to norm 1, or to its min_norm), which can break the "
          f"{bound!r} bound; leave one of them out."
        )
  bounds = settings.get("min_max_norm")
  low = _number(bounds.get("min_norm", 0.0)) if isinstance(bounds, Mapping) else None
  high = _number(bounds.get("max_norm", 1.0)) if isinstance(bounds, Mapping) else None
  if "unit_norm" in has:
    max_norm = _number(settings.get("max_norm"))
    if "max_norm" in has and max_norm is not None and max_norm < 1:
      return f"'unit_norm' sets every unit's norm to 1, above 'max_norm' = {max_norm:g}."
    if "min_max_norm" in has and (low is None or high is None or not low <= 1 <= high):
      return (
        "'unit_norm' fixes every unit's norm to 1, which 'min_max_norm' holds only when "
        "its (constant) min_norm <= 1 <= max_norm."
      )
  if "min_max_norm" in has:
    max_norm = _number(settings.get("max_norm"))
    if "max_norm" in has and (low is None or max_norm is None or low > max_norm):
      return (
        "'min_max_norm' asks for unit norms of at least its min_norm, which 'max_norm' "
        "caps lower (or cannot be checked: a schedule); make min_norm <= max_norm."
      )
  if "spectral_norm" in has and patterns and _spectral_mode(settings["spectral_norm"]) == "clip":
    return (
      f"'spectral_norm' in its default mode 'clip' (the projection) moves zeros and signs, "
      f"which breaks {patterns}; use {{'max_norm': c, 'mode': 'scale'}} (a rescaling, which "
      "keeps them) in this rule."
    )
  if "cpr" in has and "decoupled_decay" in has:
    return (
      "'cpr' replaces weight decay (its multiplier is the decay, adapted per matrix): "
      "leave 'decoupled_decay' out of this rule."
    )
  prox = sorted(k for k in has if SETTINGS[k].stage == "prox")
  if prox and getattr(getattr(optimizer, "update", None), "takes_prox", False):
    return (
      f"the optimizer is prox_adam, which already takes the proximal step of its penalty: "
      f"{prox} would apply a second prox. Pass the penalty to prox_adam only."
    )
  return None


def _step_size(learning_rate: ScalarOrSchedule, lr_scale: Any) -> ScalarOrSchedule:
  """The rule's step size ``learning_rate·lr_scale`` (a number, or a schedule)."""
  if lr_scale is None:
    return learning_rate
  if not is_schedule(learning_rate) and not is_schedule(lr_scale):
    return learning_rate * lr_scale

  def step_size(count):
    lr = learning_rate(count) if is_schedule(learning_rate) else learning_rate
    scale = lr_scale(count) if is_schedule(lr_scale) else lr_scale
    return lr * scale

  return step_size


# Keys that modify how a rule's settings read its leaves, not settings of their own.
_MODIFIERS = frozenset({"axis", "groups"})
_KEYS = tuple(sorted((*SETTINGS, *_MODIFIERS)))


# --- the rule table --------------------------------------------------------------------------


class _Rule(NamedTuple):
  selector: Any  # as the user gave it (for messages and describe_rules)
  mask: PathMask
  settings: dict[str, Any]  # without None values; may hold "axis"


def _selector_text(selector: Any) -> str:
  if isinstance(selector, str):
    return repr(selector)
  if isinstance(selector, (list, tuple)):
    return repr(list(selector))
  return repr(selector)


def _unknown_key(where: str, key: Any) -> ValueError:
  prefixes = sorted((k for k in _KEYS if str(key).startswith(k) or k.startswith(str(key))), key=len)
  close = prefixes[-1:] or difflib.get_close_matches(str(key), _KEYS, n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return ValueError(f"{where}: unknown setting {key!r}.{hint} Valid settings: {', '.join(_KEYS)}.")


def _as_pair_rule(i: int, rule: Any) -> tuple[Any, Any]:
  """A rule as ``(selector, settings)``: a pair as it is, a data rule ``{"match": s, **settings}``
  split (``{"match": s}`` alone is ``(s, None)``)."""
  rule = as_plain(rule)
  if isinstance(rule, Mapping):
    if "match" not in rule:
      raise ValueError(
        f"Rule {i}: a rule given as data needs 'match' (its selector), e.g. "
        f"{{'match': '**/kernel', 'l2': 1e-4}}; got the keys {sorted(map(str, rule))}."
      )
    settings = {k: v for k, v in rule.items() if k != "match"}
    return rule["match"], settings or None
  if not isinstance(rule, (tuple, list)) or len(rule) != 2:
    raise (ValueError if isinstance(rule, (tuple, list)) else TypeError)(
      f"Rule {i} must be a (selector, settings) pair or a dict {{'match': selector, "
      f"**settings}}, got {rule!r}."
    )
  return rule[0], as_plain(rule[1])


def _parse_rules(rules: Any) -> list[_Rule]:
  rules = as_plain(rules)
  if isinstance(rules, (str, Mapping)) or not isinstance(rules, Sequence) or not rules:
    wrong_type = isinstance(rules, (str, Mapping)) or not isinstance(rules, Sequence)
    raise (TypeError if wrong_type else ValueError)(
      "`rules` must be a non-empty list of (selector, settings) pairs or of data rules "
      "{'match': selector, **settings}, e.g. [('**/kernel', {'l2': 1e-4}), ('**', None)]."
    )
  parsed = []
  for i, rule in enumerate(rules):
    selector, settings = _as_pair_rule(i, rule)
    where = f"Rule {i} ({_selector_text(selector)})"
    try:
      selector = selector_from_data(selector)
    except (TypeError, ValueError) as error:
      raise type(error)(f"{where}: {error}") from None
    if isinstance(selector, PathMask):
      mask = selector
    elif isinstance(selector, str) or (
      isinstance(selector, (list, tuple)) and selector and all(isinstance(g, str) for g in selector)
    ):
      try:
        mask = selector_mask(selector)
      except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
    else:
      raise ValueError(
        f"{where}: the selector must be a glob, 're:<regex>', a list of them or a "
        f"path_mask(...), got {type(selector).__name__}."
      )
    if settings is None:
      settings = {}
    if not isinstance(settings, Mapping):
      raise TypeError(f"{where}: settings must be a dict or None, got {type(settings).__name__}.")
    converted = {}
    for key, value in settings.items():
      if key not in _KEYS:
        raise _unknown_key(where, key)
      if value is None:
        continue
      try:
        converted[key] = value_from_data(key, value)
      except (TypeError, ValueError) as error:
        raise type(error)(f"{where}, setting {key!r}: {error}") from None
    if "axis" in converted:
      try:
        check_axis_spec(converted["axis"])
      except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
    parsed.append(_Rule(selector, mask, converted))
  return parsed


def rules_from_data(data: Sequence[Any]) -> list[tuple[Any, dict[str, Any] | None]]:
  """A rule table given as data (a list of ``{"match": selector, **settings}``, e.g. read from
  YAML or JSON, or an ``ml_collections`` list) as ``regularize``'s ``(selector, settings)``
  pairs, with the data forms built: schedules ``{"schedule": name, **kwargs}``, ``axis``
  strings and dicts, ``groups`` dicts, numeric strings as numbers, lists as tuples where a
  setting takes a pair. Every check ``regularize`` makes at construction runs here too.

  ``regularize`` and ``describe_rules`` take data rules directly; this is for a table to be
  inspected or edited in Python first. ``rules_to_data`` is its inverse.

  Args:
    data: the rules as data (pairs are accepted too, and converted the same way).

  Returns:
    The table as ``[(selector, settings or None), ...]``.

  Examples:
    >>> import optax_norms as on
    >>> on.rules_from_data([{"match": "**/kernel", "l2": "1e-4", "n_of_m": [2, 4]},
    ...                     {"match": "**"}])
    [('**/kernel', {'l2': 0.0001, 'n_of_m': (2, 4)}), ('**', None)]
  """
  return [(rule.selector, rule.settings or None) for rule in _parse_rules(data)]


def rules_to_data(rules: Sequence[Any]) -> list[dict[str, Any]]:
  """A rule table as plain data: a list of ``{"match": selector, **settings}`` dicts that
  ``json.dumps`` and ``yaml.safe_dump`` write (lists, never tuples), and that
  ``rules_from_data`` and ``regularize`` read back to the same table.

  What has a data form: numbers, flags, text options, globs and ``"re:"`` selectors,
  ``path_mask(include, exclude=, regex=)``, ``unit_axes(...)``, ``Layout``, axes,
  ``coupled_groups(...)`` and schedules built from data. A Python function as a schedule or an
  ``axis``, and a ``path_mask`` with a ``where`` predicate, have none: ``ValueError`` names the
  rule and the key.

  Args:
    rules: the table (pairs, data rules, or both).

  Returns:
    The table as a list of dicts.

  Examples:
    >>> import optax_norms as on
    >>> on.rules_to_data([("blocks/**/kernel", {"max_norm": 2.0,
    ...                    "axis": on.unit_axes(stacked="blocks/**")}), ("**", None)])
    [{'match': 'blocks/**/kernel', 'max_norm': 2.0, 'axis': 'stacked:blocks/**'}, {'match': '**'}]
  """
  data = []
  for i, rule in enumerate(_parse_rules(rules)):
    where = f"Rule {i} ({_selector_text(rule.selector)})"
    try:
      entry = {"match": selector_to_data(rule.selector)}
    except (TypeError, ValueError) as error:
      raise type(error)(f"{where}, key 'match': {error}") from None
    for key, value in rule.settings.items():
      try:
        entry[key] = value_to_data(key, value)
      except (TypeError, ValueError) as error:
        raise type(error)(f"{where}, setting {key!r}: {error}") from None
    data.append(entry)
  return data


def _assign(
  rules: list[_Rule], tree: Any, paths: list[Path], leaves: list[Any]
) -> list[int | None]:
  """The index of the rule of every leaf (``None`` for ``None``, integer and bool leaves);
  raises for an uncovered floating-point leaf and for a rule that matches no leaf."""
  check_unambiguous(paths)
  floating = [
    leaf is not None and leaf_kind(path, leaf) == "float" for path, leaf in zip(paths, leaves)
  ]
  owner: list[int | None] = [None] * len(leaves)
  matched: list[list[int]] = []
  for i, rule in enumerate(rules):
    try:
      selection = rule.mask.select(tree, paths, leaves, check=True)
    except (TypeError, ValueError) as error:
      raise type(error)(f"Rule {i} ({_selector_text(rule.selector)}): {error}") from None
    hits = [k for k, (keep, fl) in enumerate(zip(selection, floating)) if keep and fl]
    matched.append(hits)
    for k in hits:
      if owner[k] is None:
        owner[k] = i
  uncovered = [paths[k] for k in range(len(leaves)) if floating[k] and owner[k] is None]
  if uncovered:
    table = ", ".join(f"{i}: {_selector_text(r.selector)}" for i, r in enumerate(rules))
    raise ValueError(
      f"No rule matches the floating-point parameter(s) {shown_paths(uncovered)}: every "
      "floating-point leaf must be matched by a rule (first match wins). Add a rule for "
      f"them, or end the table with ('**', None) to leave the rest alone. Rules: {table}."
    )
  if not any(floating):  # A tree without parameters (optax.tree_map_params' placeholders).
    return owner
  for i, rule in enumerate(rules):
    if any(owner[k] == i for k in matched[i]):
      continue
    where = f"Rule {i} ({_selector_text(rule.selector)})"
    if not matched[i]:
      raise ValueError(
        f"{where} matches no floating-point parameter, so it would do nothing. The "
        f"parameter paths are: {shown_paths([p for p, f in zip(paths, floating) if f])}."
      )
    earlier = sorted({j for j in (owner[k] for k in matched[i]) if j is not None})
    taken = ", ".join(f"{j} ({_selector_text(rules[j].selector)})" for j in earlier)
    raise ValueError(
      f"{where} matches no leaf: every parameter it selects ({shown_paths([paths[k] for k in matched[i]])}) "
      f"is taken by an earlier rule (first match wins): rule {taken}. Put the more specific "
      "rule first, or remove this one."
    )
  return owner


class _Table:
  """The parsed rules."""

  def __init__(self, rules: list[_Rule]):
    self.rules = rules

  def assign(self, tree: Any) -> tuple[list[Path], list[Any], Any, list[int | None]]:
    """Flattens `tree`; the rule of every leaf, with the table's checks (``_assign``)."""
    paths, leaves, treedef = flatten(tree)
    return paths, leaves, treedef, _assign(self.rules, tree, paths, leaves)

  def axis(self, index: int) -> Any:
    return self.rules[index].settings.get("axis")

  def mask(self, index: int) -> PathMask:
    """The leaves whose first matching rule is `index`."""
    return _FirstMatch([rule.mask for rule in self.rules[: index + 1]], self.rules[index])


class _FirstMatch(PathMask):
  """Selects what the last of `masks` selects and none of the earlier ones does: the leaves
  whose first matching rule is that one (a valid optax mask too). The table's checks (every
  leaf covered, no dead rule, globs that match) run once, at ``init``."""

  def __init__(self, masks: list[PathMask], rule: _Rule):
    super().__init__()
    self.masks = masks
    self.rule = rule

  def select(self, tree, paths, leaves, check=True):
    del check
    own, *earlier = (m.select(tree, paths, leaves, check=False) for m in reversed(self.masks))
    return [keep and not any(e[k] for e in earlier) for k, keep in enumerate(own)]

  def __repr__(self) -> str:
    return f"rule {len(self.masks) - 1} ({_selector_text(self.rule.selector)})"


class _NoneOf(PathMask):
  """Selects the leaves that none of `masks` selects (the trained leaves: not frozen)."""

  def __init__(self, masks: list[PathMask]):
    super().__init__()
    self.masks = masks

  def select(self, tree, paths, leaves, check=True):
    del check
    taken = [m.select(tree, paths, leaves, check=False) for m in self.masks]
    return [not any(t[k] for t in taken) for k in range(len(leaves))]

  def __repr__(self) -> str:
    return f"none of {self.masks!r}"


# --- regularize ------------------------------------------------------------------------------


def _rule_instances(rule: _Rule, paths: list[Path], leaves: list[Any]) -> tuple:
  """The coupled-group instances a rule's ``groups`` setting makes of the tree."""
  if "groups" not in rule.settings:
    return ()
  return resolve_all(as_group_list(rule.settings["groups"], "groups"), paths, leaves)


def _check_group_members(
  table: _Table, paths: list[Path], leaves: list[Any], owner: list[int | None]
) -> None:
  """Every member leaf of a rule's coupled groups is a leaf of that rule (first match)."""
  if all(o is None for o in owner):  # No parameters (optax.tree_map_params' placeholders).
    return
  for i, rule in enumerate(table.rules):
    where = f"Rule {i} ({_selector_text(rule.selector)})"
    try:
      instances = _rule_instances(rule, paths, leaves)
    except (TypeError, ValueError) as error:
      raise type(error)(f"{where}, setting 'groups': {error}") from None
    for instance in instances:
      for member in instance.members:
        taker = owner[member.position]
        if taker == i:
          continue
        taken = (
          "no rule"
          if taker is None
          else f"rule {taker} ({_selector_text(table.rules[taker].selector)})"
        )
        raise ValueError(
          f"{where}: the leaf {format_path(member.path)!r}, a member of its coupled group "
          f"{instance.anchor!r}, is taken by {taken} (first match wins). A group is pruned "
          "whole: make this rule's selector match every member leaf, before any other rule."
        )


def _check_stacked_globs(table: _Table, paths: list[Path]) -> None:
  for rule in table.rules:
    axis = rule.settings.get("axis")
    if isinstance(axis, UnitAxes):
      axis.check(paths)


def regularize(
  optimizer: optax.GradientTransformation,
  rules: Sequence[tuple[Any, Mapping[str, Any] | None] | Mapping[str, Any]],
  *,
  learning_rate: ScalarOrSchedule | None = None,
  peak_learning_rate: Any = None,
  clip_global_norm: ScalarOrSchedule | None = None,
) -> optax.GradientTransformation:
  r"""Wraps `optimizer` with the regularization of a whole model, written as one table.

  `rules` is a list of ``(selector, settings)``, or of data rules ``{"match": selector,
  **settings}`` (as read from YAML or JSON, see ``rules_from_data``). A selector is a glob,
  ``"re:<regex>"`` (a regular expression that must match the whole ``/``-joined path), a list
  of them, or a ``path_mask``; each floating-point leaf takes the settings of the **first**
  rule that matches it. Settings is a dict or ``None`` (leave these leaves alone); every key
  is optional, every value a number or a schedule: an optax schedule, or its data form
  ``{"schedule": "<optax schedule name>", **kwargs}`` (``None`` is "not set"):

  | setting | does | stage |
  |---|---|---|
  | ``freeze`` | ``True``: the leaves are not trained. Their gradients are zeroed before everything (no norm sees them), the optimizer gets no state for them (as ``optax.masked``) and their update is zero, so they stay bit-identical | 0, first |
  | ``clip_adaptive`` | ``True`` or ``{"z": 2.5, "decay": 0.97, "warmup": 25}``: spike clipping of the rule's global norm ``n`` at ``μ + z·σ`` of its running statistics (below) | 1, before the optimizer |
  | ``clip_global_norm`` | ``c``: ``g ← g·min(1, c/n)`` with ``n`` the global norm of the rule's leaves | 1 |
  | ``clip_unit_norm`` | ``clip_by_row_norm`` on the gradient | 1 |
  | ``clip_max_abs`` | ``clip_by_max_abs`` on the gradient | 1 |
  | ``l2``, ``l1`` | ``add_l2_decay``, ``add_l1_decay`` (coupled) | 2 |
  | — | `optimizer`, once on the whole tree (on the trained leaves when a rule freezes some) | 3 |
  | ``lr_scale`` | multiplies the optimizer's step | 4 |
  | ``decoupled_decay`` | ``add_decoupled_weight_decay``: ``λ`` (``w ← w − lr·λ·w``, as ``optax.adamw``) or ``{"weight_decay": λ, "convention": "lr" / "independent" / "adamc", "cautious": bool}`` | 5, after the optimizer |
  | ``cpr`` | ``cpr``: a dict of its arguments (``kappa_init_method``, ``kappa_init_param``, ``kappa_update``, ``reg_function``, ``reg_by_lr``); a stacked ``axis`` gives one bound per layer | 5 |
  | ``prox_l1``, ``prox_group`` | ``prox_l1``, ``prox_group_l2`` (per unit, or over the rule's ``groups``) | 6 |
  | ``non_negative``, ``max_abs``, ``n_of_m``, ``sparsity``, ``group_sparsity`` | the constraints that fix a pattern (``group_sparsity``: ``constrain_group_sparsity`` over the rule's ``groups``) | 7, last |
  | ``unit_norm``, ``min_max_norm``, ``spectral_norm``, ``max_norm`` | the constraints that rescale | 7 |
  | ``axis`` | the layout of this rule's leaves (as ``axis=`` of the transforms); as data ``"stacked:<glob>"``, ``"flax"``/``"torch"``, a list of ints or ``{"layout": ..., "stacked": [...]}`` | |
  | ``groups`` | the ``coupled_groups`` (or a list) that ``prox_group`` and ``group_sparsity`` read, as data ``{"anchor": ..., "members": {...}, "stacked": bool}``; every member leaf must be this rule's (first match) | |

  The order of the clips, one documented order: the model-wide ``clip_global_norm`` of
  ``regularize`` on the raw gradients of every trained leaf, then per rule ``clip_adaptive``,
  ``clip_global_norm``, ``clip_unit_norm``, ``clip_max_abs``, then the coupled penalties, so
  ``l2``'s ``2αw`` is never clipped (as ``optax.adamw``'s decay is not). Frozen leaves count in
  no norm. Put no ``optax.clip_by_global_norm`` in `optimizer` as well: it would see the
  coupled penalties' gradients.

  ``clip_adaptive`` (ZClip): the first ``warmup`` finite norms are not clipped and give the
  starting mean ``μ`` and population variance ``σ²``; after that ``n' = min(n, μ + z·σ)``, the
  gradient is scaled by ``n'/n`` (unchanged when ``n ≤ μ + z·σ``), then ``μ ← d·μ + (1−d)·n'``
  and ``σ² ← d·σ² + (1−d)·(n' − μ)²`` with the new ``μ``, ``d`` = ``decay``. A zero norm is
  not scaled; a NaN or infinite norm leaves the gradient and the statistics as they are.

  ``sparsity`` and ``group_sparsity`` take a fraction or a dict ``{"fraction": f,
  "update_every": k, "update_start": s, "update_end": e}`` (periodic masks); ``n_of_m`` takes
  ``(n, m)`` or a dict with ``n``, ``m``, ``block_axis`` and the same periodic keys.

  The settings that need the optimizer's learning rate (``decoupled_decay``, ``prox_l1``,
  ``prox_group``, ``cpr`` with ``reg_by_lr``) get the rule's step size
  ``learning_rate·lr_scale``. The ``"independent"`` and ``"adamc"`` decays are measured against
  `peak_learning_rate` (times a constant ``lr_scale``), which defaults to `learning_rate`
  when that is a number.

  ``prox_l1`` then ``prox_group`` on the same leaves is the exact proximal step of the
  sparse group lasso. With the default ``axis=None`` a leaf whose unit is ambiguous (a
  stacked kernel, a stacked attention kernel) raises at ``init``: pass
  ``axis=optax_norms.unit_axes(stacked=...)``.

  Errors, at construction: an unknown setting key (with the valid ones), a bad value, a
  setting that needs `learning_rate` without it. At ``init``: a floating-point leaf no rule
  matches (listed), a rule that matches no leaf (or only leaves an earlier rule took), a
  glob that matches nothing, an ambiguous unit. Each names the rule by index and selector.

  Args:
    optimizer: any ``optax.GradientTransformation`` that includes the learning rate
      (``optax.adam(lr)``, ``optax.sgd(schedule)``, an ``optax.chain``).
    rules: the table, ``[(selector, settings), ...]``; ``describe_rules`` prints what
      it does to each leaf.
    learning_rate: the optimizer's learning rate (the same number or schedule), needed by
      ``decoupled_decay``, ``prox_l1``, ``prox_group`` and ``cpr`` with ``reg_by_lr``.
    peak_learning_rate: the peak of a scheduled `learning_rate`, needed by the
      ``"independent"`` and ``"adamc"`` decay conventions.
    clip_global_norm: ``c`` (a number or a schedule): the gradients of every trained leaf
      clipped to global norm ``c`` first, as ``optax.clip_by_global_norm`` but leaving the
      frozen leaves out.

  Returns:
    One ``optax.GradientTransformation`` (an ``optax.chain``); its ``update`` needs
    ``params``. It works in ``nnx.Optimizer``, with Linen and Equinox trees, under
    ``jax.jit`` and sharding, and its state checkpoints with orbax.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms as on
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
    ...           "embed": {"embedding": jnp.ones((5, 3))}}
    >>> tx = on.regularize(optax.sgd(1e-3), [
    ...     ("**/kernel", {"l2": 1e-4, "max_norm": 3.0}),
    ...     ("**/embedding", {"decoupled_decay": 0.1}),
    ...     ("**", None),
    ... ], learning_rate=1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
  """
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise ValueError(
      f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer).__name__}."
    )
  table = _Table(_parse_rules(rules))
  for i, rule in enumerate(table.rules):
    refused = _refused_pairs(rule.settings, optimizer)
    if refused is not None:
      raise ValueError(
        f"Rule {i} ({_selector_text(rule.selector)}): these settings cannot hold together: "
        f"{refused}"
      )
  by_stage: dict[str, list[optax.GradientTransformation]] = {s: [] for s in STAGES}
  frozen = [table.mask(i) for i, rule in enumerate(table.rules) if "freeze" in rule.settings]
  trained = _NoneOf(frozen) if frozen else None
  # The optimizer sees the trained leaves only (no state for frozen ones), as optax.masked.
  by_stage["optimizer"].append(optimizer if trained is None else optax.masked(optimizer, trained))
  if clip_global_norm is not None:
    try:
      by_stage["clip"].append(
        clip_group_global_norm(value_from_data("", clip_global_norm), mask=trained)
      )
    except (TypeError, ValueError) as error:
      raise type(error)(f"regularize(..., clip_global_norm=...): {error}") from None
  for name, setting in SETTINGS.items():
    for i, rule in enumerate(table.rules):
      if name not in rule.settings:
        continue
      where = f"Rule {i} ({_selector_text(rule.selector)}), setting {name!r}"
      if setting.needs_learning_rate and learning_rate is None:
        raise ValueError(
          f"{where} needs the optimizer's learning rate: pass regularize(optimizer, rules, "
          "learning_rate=...) with the same number or schedule as the optimizer."
        )
      lr_scale = rule.settings.get("lr_scale")
      step_size = None if learning_rate is None else _step_size(learning_rate, lr_scale)
      try:
        transform = setting.build(
          rule.settings[name],
          mask=table.mask(i),
          axis=table.axis(i),
          learning_rate=step_size,
          peak_learning_rate=peak_learning_rate,
          lr_scale=lr_scale,
          groups=rule.settings.get("groups"),
        )
      except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
      by_stage[setting.stage].append(transform)
  chain = optax.chain(*(t for stage in STAGES for t in by_stage[stage]))

  def init_fn(params: Any) -> optax.OptState:
    paths, leaves, _, owner = table.assign(params)
    _check_stacked_globs(table, paths)
    _check_group_members(table, paths, leaves, owner)
    return chain.init(params)

  def update_fn(updates: Any, state: optax.OptState, params: Any = None, **extra_args: Any):
    if params is None:
      raise missing_params("regularize")
    return chain.update(updates, state, params, **extra_args)

  # describe_rules reads the table back from the transform (no registry of tables).
  init_fn.rule_table = table  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --- describe_rules --------------------------------------------------------------------------


def _layout_reads(settings: Mapping[str, Any], layout: Layout, shape: tuple[int, ...]) -> str:
  """What the layout-reading settings make of a leaf: the spectral matrix, the N:M blocks, the
  sparsity budget (all per layer)."""
  reads = []
  if "spectral_norm" in settings:
    rows, cols = layout.matrix(shape)
    reads.append(f"matrix {rows}×{cols}")
  if "n_of_m" in settings:
    value = settings["n_of_m"]
    n, m = (value["n"], value["m"]) if isinstance(value, Mapping) else tuple(value)
    block = value.get("block_axis") if isinstance(value, Mapping) else None
    block = 0 if len(shape) == 1 else (layout.block_axis if block is None else block % len(shape))
    reads.append(f"{_value_text(n)}:{m} along axis {block}")
  if "sparsity" in settings:
    size = int(np.prod([d for a, d in enumerate(shape) if a not in layout.stack], dtype=np.int64))
    fraction = _number(settings["sparsity"])
    count = "⌊fraction·n⌋" if fraction is None else str(budget_count(fraction, size))
    reads.append(f"zero {count} of {size}")
  return "; ".join(reads)


def _reads_layout(settings: Mapping[str, Any]) -> bool:
  """Whether a rule's settings read its leaves' layouts (``prox_group`` over coupled groups
  reads the groups instead)."""
  return any(
    SETTINGS[k].layout and not (k == "prox_group" and "groups" in settings)
    for k in settings
    if k not in _MODIFIERS
  )


def _group_cells(table: _Table, paths: list[Path], leaves: list[Any]) -> dict[Path, str]:
  """For each member leaf of a rule's coupled groups: its instance, group axis, ``G``, ``p_g``."""
  cells: dict[Path, str] = {}
  for rule in table.rules:
    for instance in _rule_instances(rule, paths, leaves):
      per_layer = f" per layer of {instance.layers}" if instance.layers is not None else ""
      for member in instance.members:
        cells[tuple(member.path)] = (
          f"group {instance.anchor!r} along axis {member.axis}: {instance.groups} groups of "
          f"{instance.size} entries{per_layer}"
        )
  return cells


def _value_text(value: Any) -> str:
  if isinstance(value, DataSchedule):
    return value.name
  if is_schedule(value):
    return "schedule"
  if isinstance(value, (UnitAxes, str, bool)):
    return repr(value)
  if isinstance(value, Mapping):
    return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
  if isinstance(value, (tuple, list)):
    return "(" + ", ".join(_value_text(v) for v in value) + ")"
  try:
    return f"{float(np.asarray(value)):g}"
  except (TypeError, ValueError):
    return repr(value)


def describe_rules(rules_or_tx: Any, params: Any, *, as_data: bool = False) -> Any:
  """A table of what a rule table does to each leaf of `params`: one line per leaf.

  Columns: the path, the shape, the rule (index and selector) that took the leaf, its
  settings (in the order they run), and for leaves with a setting that reads the layout
  exactly what the transforms read: the stack axes (one set of units, one matrix, one budget
  per layer), the reduced axes, the units per layer, and what the layout-reading settings
  make of the leaf (``reads``): the spectral matrix ``rows×cols``, the N:M blocks and their
  axis, the sparsity budget. It runs the same checks as ``init`` (uncovered leaves, rules
  that match nothing, ambiguous layouts), so it is also the quickest way to debug a table.

  With ``as_data=True`` it returns the same table as JSON-serializable data, what a training
  loop logs once at start: one dict per leaf with ``path``, ``shape`` (a list), ``rule`` (the
  index, ``None`` for a leaf that is not floating-point), ``match`` (the rule's selector),
  ``settings`` (its data form, as ``rules_to_data`` writes it; a value without one, such as a
  Python schedule, as its text) and ``axes``: ``{"stack", "reduce", "units", "reads"}`` where a
  setting reads the layout, else ``None``.

  Args:
    rules_or_tx: the rules, or the transform ``regularize`` returned.
    params: the parameters (any pytree, e.g. ``nnx.state(model, nnx.Param)``).
    as_data: return a list of dicts instead of the printed table.

  Returns:
    The table as a string (print it), or as a list of dicts.

  Examples:
    >>> import jax.numpy as jnp, optax_norms as on
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> print(on.describe_rules([("**/kernel", {"max_norm": 3.0}), ("**", None)], params))
    path          shape   rule           settings    stack  axes  units  reads
    dense/bias    (2,)    1 '**'         -
    dense/kernel  (3, 2)  0 '**/kernel'  max_norm=3         (0,)  2
    >>> on.describe_rules([{"match": "**/kernel", "max_norm": 3}, {"match": "**"}], params,
    ...                   as_data=True)[1]
    {'path': 'dense/kernel', 'shape': [3, 2], 'rule': 0, 'match': '**/kernel', 'settings': {'max_norm': 3}, 'axes': {'stack': [], 'reduce': [0], 'units': 2, 'reads': ''}}
  """
  if hasattr(rules_or_tx, "init") and hasattr(rules_or_tx, "update"):
    table = getattr(rules_or_tx.init, "rule_table", None)
    if table is None:
      raise ValueError(
        f"describe_rules takes the rules, or the transform that optax_norms.regularize "
        f"returned, not a {type(rules_or_tx).__name__} that wraps it (optax.chain, "
        "optax.MultiSteps, optax.inject_hyperparams, ...): pass the rules themselves."
      )
  else:
    table = _Table(_parse_rules(rules_or_tx))
  paths, leaves, _, owner = table.assign(params)
  _check_stacked_globs(table, paths)
  _check_group_members(table, paths, leaves, owner)
  group_cells = _group_cells(table, paths, leaves)
  shapes = {p: tuple(np.shape(leaf)) for p, leaf in zip(paths, leaves) if leaf is not None}
  records = []
  for path, leaf, index in zip(paths, leaves, owner):
    if leaf is None:
      continue
    shape = tuple(np.shape(leaf))
    layout, reads = None, ""
    if index is not None:
      rule = table.rules[index]
      if _reads_layout(rule.settings):
        layout = resolve_layout(rule.settings.get("axis"), path, leaf, shapes=shapes)
        reads = _layout_reads(rule.settings, layout, shape)
      reads = "; ".join(c for c in (reads, group_cells.get(tuple(path), "")) if c)
    records.append((path, shape, index, layout, reads))
  if as_data:
    return [_record_data(table, *record) for record in records]
  rows = [("path", "shape", "rule", "settings", "stack", "axes", "units", "reads")]
  for path, shape, index, layout, reads in records:
    if index is None:
      rows.append(
        (format_path(path), str(shape), "-", "(not floating-point: untouched)", "", "", "", "")
      )
      continue
    rule = table.rules[index]
    settings = " ".join(
      f"{k}={_value_text(rule.settings[k])}" for k in SETTINGS if k in rule.settings
    )
    cells = ("", "", "")
    if layout is not None:
      layers, units = layout.layers(shape), layout.units(shape)
      cells = (
        str(layout.stack) if layout.stack else "",
        str(layout.reduce),
        f"{layers} layers × {units}" if layout.stack else str(units),
      )
    rows.append(
      (
        format_path(path),
        str(shape),
        f"{index} {_selector_text(rule.selector)}",
        settings or "-",
        *cells,
        reads,
      )
    )
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  return "\n".join(
    "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows
  )


def _data_or_text(key: str, value: Any) -> Any:
  try:
    return value_to_data(key, value)
  except (TypeError, ValueError):
    return _value_text(value)


def _record_data(
  table: _Table, path: Path, shape: tuple[int, ...], index: int | None, layout: Any, reads: str
) -> dict[str, Any]:
  """One leaf of ``describe_rules(..., as_data=True)``."""
  if index is None:
    return {
      "path": format_path(path),
      "shape": list(shape),
      "rule": None,
      "match": None,
      "settings": {},
      "axes": None,
    }
  rule = table.rules[index]
  try:
    match = selector_to_data(rule.selector)
  except (TypeError, ValueError):
    match = repr(rule.selector)
  order = [*SETTINGS, *sorted(_MODIFIERS)]
  settings = {k: _data_or_text(k, rule.settings[k]) for k in order if k in rule.settings}
  axes = None
  if layout is not None:
    axes = {
      "stack": list(layout.stack),
      "reduce": list(layout.reduce),
      "units": layout.units(shape),
      "reads": reads,
    }
  elif reads:
    axes = {"stack": [], "reduce": [], "units": None, "reads": reads}
  return {
    "path": format_path(path),
    "shape": list(shape),
    "rule": index,
    "match": match,
    "settings": settings,
    "axes": axes,
  }
