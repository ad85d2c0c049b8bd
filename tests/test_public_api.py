"""The public API: explicit, sorted, unique __all__; no heavy imports."""

import inspect
import subprocess
import sys

import optax
import pytest
from _registry import REGISTRY

import optax_norms


def test_all_is_sorted_unique_and_importable():
  names = optax_norms.__all__
  assert names == sorted(names) and len(set(names)) == len(names)
  for name in names:
    assert hasattr(optax_norms, name), name


COMBINATORS = {"regularize"}
# Cross-leaf transforms: their groups span several leaves, so the registry's per-leaf oracles
# and the battery's trees do not fit them; their own float64 references live in
# tests/test_group_sparsity.py (and tests/test_coupled_groups.py for prox_group_l2(groups=)).
CROSS_LEAF = {"constrain_group_sparsity"}


def test_every_transform_is_registered_and_public():
  """The test registry (tests/_registry.py, which the battery and the reliability tests read)
  holds every public factory that returns a GradientTransformation, and only public ones (the
  bench's table covers the same: tests/test_bench.py)."""
  registered = {entry.name for entry in REGISTRY}
  assert registered <= set(optax_norms.__all__)
  for entry in REGISTRY:
    assert isinstance(entry.make(), optax.GradientTransformation), entry.name
  unregistered = []
  for name in optax_norms.__all__:
    obj = getattr(optax_norms, name)
    # regularize combines an optimizer with a rule table: a combinator, not a transform.
    if (
      name in registered
      or name in COMBINATORS | CROSS_LEAF
      or not callable(obj)
      or isinstance(obj, type)
    ):
      continue
    params = inspect.signature(obj).parameters
    returns = inspect.signature(obj).return_annotation
    if "GradientTransformation" in str(returns) and "params" not in params:
      unregistered.append(name)
  assert not unregistered, f"public transforms missing from the registry: {unregistered}"


@pytest.mark.slow
def test_import_pulls_only_jax_and_optax():
  code = (
    "import sys, optax_norms; bad = [m for m in ('flax', 'equinox', 'sklearn', "
    "'matplotlib', 'tqdm', 'orbax') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
  )
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0
