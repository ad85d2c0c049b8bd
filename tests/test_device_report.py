"""``tools/device_report.py``, the one-call GPU/TPU report, on this machine's CPU at ``--size tiny``.

The report is meant for a device machine that has only jax and optax; here it must run end to
end, pass its own exactness checks, and its checks must catch a transform that breaks a bound.
"""

import importlib.util
import pathlib

import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device_report():
  spec = importlib.util.spec_from_file_location(
    "device_report", ROOT / "tools" / "device_report.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax.adam itself is not strict-promotion clean.
def test_the_report_runs_end_to_end_and_its_checks_pass_on_the_cpu(device_report, tmp_path):
  out = tmp_path / "report.md"
  assert device_report.main(["--size", "tiny", "--repeats", "1", "--out", str(out)]) == 0
  text = out.read_text()
  assert "**FAIL**" not in text
  assert text.count("| PASS |") >= 30  # 5 constraints × 3 dtypes × eager/fused, and more.
  for name in device_report.TIMED:
    assert f"`{name}`" in text, name  # Every timed transform has its row.
  assert "MLP" in text and "anchor" in text.lower()


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax.adam itself is not strict-promotion clean.
def test_the_bound_checks_catch_a_transform_that_breaks_the_bound(device_report, monkeypatch):
  # An identity "constraint": one step moves near-bound units outside every bound.
  broken = {name: optax.identity for name in device_report.CONSTRAINTS}
  monkeypatch.setattr(device_report, "CONSTRAINTS", broken)
  rows = device_report._bound_checks(16)
  assert rows and not any(row["ok"] for row in rows), [r for r in rows if r["ok"]]
