"""The test suite's view of its transform registry (``tests/_registry.py``)."""

from __future__ import annotations

from _registry import REGISTRY, Entry, by_name, default_axes

Case = Entry
CASES = list(REGISTRY)
CASE_IDS = [case.name for case in CASES]
PER_UNIT = [case.name for case in CASES if case.per_unit]
ELEMENTWISE = [case.name for case in CASES if not case.per_unit]

__all__ = [
  "CASES",
  "CASE_IDS",
  "Case",
  "ELEMENTWISE",
  "PER_UNIT",
  "by_name",
  "chain_of_all",
  "default_axes",
]


def chain_of_all(optimizer, schedule, mask="**/kernel"):
  """Every registered transform with every hyperparameter on ``schedule(value)``, in its
  place around `optimizer` (penalties and clips before, prox steps and constraints after)."""
  import optax

  cases = [e for e in CASES if "chain_of_all" not in e.skip]
  before = [e.make_scheduled(schedule, mask=mask) for e in cases if e.placement == "before"]
  after = [e.make_scheduled(schedule, mask=mask) for e in cases if e.placement == "after"]
  return optax.chain(*before, optimizer, *after)
