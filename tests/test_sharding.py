"""Sharded parameters (8 CPU devices, a 2x4 mesh): every transform gives the unsharded
result, keeps the input sharding and adds no collective beyond a norm-vector all-reduce.

The check runs in its own process (``tests/sharding_check.py``): the 8 host devices must
be requested before JAX initializes, which this pytest process has already done.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from _registry import REGISTRY

SCRIPT = pathlib.Path(__file__).with_name("sharding_check.py")
LAYOUTS = ("rows", "cols", "both", "replicated")
TRANSFORMS = len([e for e in REGISTRY if "sharding" not in getattr(e, "skip", ())])
PER_UNIT = {e.name for e in REGISTRY if e.per_unit}
# Transforms that read more than one unit at a time (magnitude budgets, power iteration,
# prox_adam's group solve): they communicate more than a norm vector.
LEAF_WIDE = {"constrain_sparsity", "constrain_n_of_m", "constrain_spectral_norm", "prox_adam"}
# One statistic per matrix (CPR's R): an all-reduce of one scalar per leaf, when sharded.
PER_MATRIX = {"cpr"}
# Per-unit rules whose only communication is the all-reduce of the unit norms (the spectral
# constraint's power iteration and the sparsity budgets communicate more: checked for equality
# and kept shardings only).
NORM_ONLY = PER_UNIT - LEAF_WIDE


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600
  )
  print("\n".join(x for x in proc.stdout.splitlines() if not x.startswith("RESULT ")))
  cells = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  controls = [
    json.loads(line[8:]) for line in proc.stdout.splitlines() if line.startswith("CONTROL ")
  ]
  return proc, cells, controls


@pytest.mark.slow
def test_sharding_matrix_is_complete(report):
  proc, cells, _ = report
  assert len(cells) == 2 * len(LAYOUTS) * TRANSFORMS, proc.stderr[-3000:]
  assert {c["layout"] for c in cells} == set(LAYOUTS)
  assert len({c["transform"] for c in cells}) == TRANSFORMS


@pytest.mark.slow
def test_every_cell_matches_unsharded_keeps_sharding_and_collectives(report):
  proc, cells, _ = report
  failed = [c for c in cells if not c["ok"]]
  assert not failed, json.dumps(failed, indent=1)
  assert proc.returncode == 0 and "ALL_OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_elementwise_transforms_have_no_collective(report):
  _, cells, _ = report
  for cell in cells:
    if cell["transform"] not in PER_UNIT | LEAF_WIDE | PER_MATRIX:
      assert cell["collectives"] == [], cell


@pytest.mark.slow
def test_per_matrix_transforms_all_reduce_one_scalar_per_matrix_at_most(report):
  _, cells, _ = report
  for cell in cells:
    if cell["transform"] in PER_MATRIX:
      assert all(
        c == "all-reduce[1]" or c.startswith("all-reduce[1, ") for c in cell["collectives"]
      ), cell
      if cell["layout"] == "replicated":
        assert cell["collectives"] == [], cell


@pytest.mark.slow
def test_per_unit_over_a_sharded_axis_all_reduces_only_the_norm_vector(report):
  _, cells, _ = report
  for cell in cells:
    if cell["transform"] in NORM_ONLY:
      assert all(c.startswith("all-reduce[") for c in cell["collectives"]), cell
      if cell["layout"] == "rows":
        # Units span the sharded rows: one all-reduce of the 16 column sums of squares, three
        # times (the scaled-up, scaled-down and tiny sums that keep the norm free of overflow
        # and underflow, stacked into one reduction: 48 values).
        assert cell["collectives"] == ["all-reduce[48]"], cell
      if cell["layout"] == "replicated":
        assert cell["collectives"] == [], cell


@pytest.mark.slow
def test_detector_sees_a_reshard(report):
  _, _, controls = report
  assert controls and any(c.startswith("all-gather[") for c in controls[0]), controls
