"""Every docstring example of ``optax_norms`` runs and prints what it shows.

Each module of the package (not ``optax_norms.tools``, which holds the demo and benchmark
scripts) is run through ``doctest``; every public function and class in
``optax_norms.__all__`` must carry at least one example. Examples print Python numbers,
lists, tuples and bools only, never array reprs, so they do not depend on JAX versions.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import jax
import pytest

# As tests/conftest.py: the examples must run under strict promotion too.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import optax_norms  # noqa: E402

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
MODULES = sorted(
  info.name
  for info in pkgutil.walk_packages(optax_norms.__path__, prefix="optax_norms.")
  if not info.name.startswith("optax_norms.tools") and info.name != "optax_norms.__main__"
)
# Public names whose docstrings describe a data structure: an example is optional.
NO_EXAMPLE_NEEDED = frozenset({"DecayResolution", "LeafDecayResolution"})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["optax_norms", *MODULES])
def test_module_doctests_pass(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=FLAGS, verbose=False, report=True)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
  defines_public = any(
    getattr(getattr(optax_norms, public), "__module__", None) == name
    for public in optax_norms.__all__
  )
  if defines_public:
    assert result.attempted > 0, f"{name} defines public names but has no examples"


@pytest.mark.parametrize("public", sorted(set(optax_norms.__all__) - NO_EXAMPLE_NEEDED))
def test_every_public_name_has_an_example(public):
  obj = getattr(optax_norms, public)
  assert inspect.isfunction(obj) or inspect.isclass(obj), public
  tests = doctest.DocTestFinder(recurse=False).find(obj, public)
  examples = sum(len(test.examples) for test in tests)
  assert examples > 0, f"optax_norms.{public} has no '>>>' example in its docstring"
