"""Coupled groups with the head axis, or the MLP axis, sharded over 8 CPU devices (one group
slice per device): the group prox, the group budget (every step and periodic) and prox_adam
with groups give the one-device result, the same zero groups, and keep the shardings.

Runs ``tests/coupled_sharding_check.py`` in its own process (8 host devices must be requested
before JAX initializes)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("coupled_sharding_check.py")


@pytest.fixture(scope="module")
def cells():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600
  )
  found = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
  return proc, found


@pytest.mark.slow
def test_every_cell_equals_one_device_and_keeps_its_shardings(cells):
  proc, found = cells
  assert len(found) == 2 * 4, proc.stderr[-3000:]
  failed = [c for c in found if not c["ok"]]
  assert not failed, json.dumps(failed, indent=1)
  assert proc.returncode == 0 and "ALL_OK" in proc.stdout


@pytest.mark.slow
def test_the_budget_prunes_half_the_groups_of_every_module_and_layer(cells):
  _, found = cells
  for cell in found:
    if cell["transform"].startswith("constrain_group_sparsity"):
      assert cell["zero_groups"] == {"blocks/attn": [4, 4], "blocks/mlp": [8, 8]}, cell


@pytest.mark.slow
def test_the_prox_cells_prune_some_groups_so_the_comparison_is_not_vacuous(cells):
  _, found = cells
  for cell in found:
    if cell["transform"] in ("prox_group_l2", "prox_adam"):
      counts = [n for layers in cell["zero_groups"].values() for n in layers]
      assert 0 < sum(counts) < 2 * (8 + 16), cell
