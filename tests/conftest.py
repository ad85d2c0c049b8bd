"""Shared pytest configuration: Hypothesis profiles.

- ``ci`` (default): 200 examples per property, derandomized, no deadline (the first
  example of a shape pays for JAX's compilation).
- ``long``: 2000 examples per property. Select it with ``pytest --long`` or
  ``OPTAX_NORMS_LONG=1``.
"""

import os

try:
  from hypothesis import HealthCheck, settings
except ImportError:  # Hypothesis is a test extra; files that need it import it themselves.
  settings = None  # type: ignore[assignment,misc]

if settings is not None:
  _COMMON: dict = {
    "deadline": None,
    "suppress_health_check": (HealthCheck.too_slow, HealthCheck.data_too_large),
    "print_blob": True,
  }
  # CI is derandomized (the same 200 examples on every run: no flaky red); --long explores.
  settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
  settings.register_profile("long", max_examples=2000, derandomize=False, **_COMMON)
  settings.load_profile("long" if os.environ.get("OPTAX_NORMS_LONG") == "1" else "ci")


def pytest_addoption(parser):
  parser.addoption(
    "--long",
    action="store_true",
    default=False,
    help="run property-based tests with 2000 examples each (Hypothesis profile 'long').",
  )


def pytest_configure(config):
  config.addinivalue_line(
    "markers",
    "standard_promotion: run under standard dtype and rank promotion because optax itself (its "
    "schedules, inject_hyperparams' dtype inference, sgd/adam on integer leaves) is not "
    "strict-promotion clean; our own code is checked strictly elsewhere.",
  )
  if settings is not None and config.getoption("--long", default=False):
    settings.load_profile("long")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _promotion_mode(request):
  if request.node.get_closest_marker("standard_promotion"):
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
      yield
  else:
    yield


# Large codebases run JAX with strict dtype promotion and rank promotion as an error: the
# whole suite does too, so a transform that promotes implicitly fails here first.
import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
