"""regularize's global-norm clips (model-wide and per rule), clip_adaptive and freeze with the
leaves sharded over 8 CPU devices: the one-device result, the input shardings kept, frozen
leaves bit-identical, and only all-reduces of scalars or of a leaf's three scaled sums (a norm
is global, no leaf is gathered).

Runs ``tests/rule_clipping_sharding_check.py`` in its own process (8 host devices must be
requested before JAX initializes)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("rule_clipping_sharding_check.py")


@pytest.mark.slow
def test_clips_and_freeze_under_sharding_equal_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600
  )
  cells = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
  assert len(cells) == 3, proc.stderr[-3000:]
  assert all(c["ok"] for c in cells), json.dumps(cells, indent=1)
  assert all(c["collectives"] > 0 for c in cells)
  assert proc.returncode == 0 and "ALL_OK" in proc.stdout
