"""optax_norms: norm penalties, proximal steps, max-norm constraints and clipping as optax
``GradientTransformation``s, masked by parameter path."""

from importlib.metadata import PackageNotFoundError, version

from optax_norms._clipping import clip_by_max_abs, clip_by_row_norm
from optax_norms._constraints import constrain_max_abs, constrain_row_norm
from optax_norms._coupled import CoupledGroups, coupled_groups, group_report
from optax_norms._cpr import CprLeafState, cpr
from optax_norms._diagnostics import (
  DecayResolution,
  LeafDecayResolution,
  decay_resolution_report,
  norm_report,
)
from optax_norms._groups import describe_rules, regularize, rules_from_data, rules_to_data
from optax_norms._hyperparams import ScheduleState
from optax_norms._keras_constraints import (
  constrain_min_max_norm,
  constrain_non_negative,
  constrain_unit_norm,
)
from optax_norms._layout import Layout
from optax_norms._losses import (
  elastic_penalty,
  group_l2_penalty,
  l1_penalty,
  l2_penalty,
  max_norm_penalty,
)
from optax_norms._masks import PathMask, path_labels, path_mask, weights_only
from optax_norms._paths import tree_paths
from optax_norms._penalties import add_l1_decay, add_l2_decay, add_max_norm_decay, elastic
from optax_norms._prox import prox_elastic, prox_group_l2, prox_l1
from optax_norms._prox_adam import ProxAdamState, prox_adam
from optax_norms._sparsity import (
  GroupSparsityState,
  constrain_group_sparsity,
  constrain_n_of_m,
  constrain_sparsity,
  polynomial_sparsity_schedule,
)
from optax_norms._spectral import constrain_spectral_norm, spectral_norm_report
from optax_norms._units import AmbiguousLayoutError, UnitAxes, unit_axes
from optax_norms._weight_decay import add_decoupled_weight_decay, decay_from_timescale

try:
  __version__ = version("optax-norms")
except PackageNotFoundError:  # Imported from a source tree that is not installed.
  __version__ = "0.0.0"

__all__ = [
  "AmbiguousLayoutError",
  "CoupledGroups",
  "CprLeafState",
  "DecayResolution",
  "GroupSparsityState",
  "Layout",
  "LeafDecayResolution",
  "PathMask",
  "ProxAdamState",
  "ScheduleState",
  "UnitAxes",
  "add_decoupled_weight_decay",
  "add_l1_decay",
  "add_l2_decay",
  "add_max_norm_decay",
  "clip_by_max_abs",
  "clip_by_row_norm",
  "constrain_group_sparsity",
  "constrain_max_abs",
  "constrain_min_max_norm",
  "constrain_n_of_m",
  "constrain_non_negative",
  "constrain_row_norm",
  "constrain_sparsity",
  "constrain_spectral_norm",
  "constrain_unit_norm",
  "coupled_groups",
  "cpr",
  "decay_from_timescale",
  "decay_resolution_report",
  "describe_rules",
  "elastic",
  "elastic_penalty",
  "group_l2_penalty",
  "group_report",
  "l1_penalty",
  "l2_penalty",
  "max_norm_penalty",
  "norm_report",
  "path_labels",
  "path_mask",
  "polynomial_sparsity_schedule",
  "prox_adam",
  "prox_elastic",
  "prox_group_l2",
  "prox_l1",
  "regularize",
  "rules_from_data",
  "rules_to_data",
  "spectral_norm_report",
  "tree_paths",
  "unit_axes",
  "weights_only",
]
