"""``python -m optax_norms demo``: end to end, in subprocesses (short runs)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import pytest

from optax_norms.tools.demo import _LR as LR
from optax_norms.tools.demo import _MAX_NORM as MAX_NORM
from optax_norms.tools.demo import _MOMENTUM as MOMENTUM
from optax_norms.tools.demo import SETTINGS

pytestmark = pytest.mark.slow

STEPS = 60
ALL = [s.name for s in SETTINGS]
COLUMNS = [
  "train acc",
  "test acc",
  "gap",
  "zero frac",
  "dead units",
  "max unit norm",
  "total L2",
  "max |Δw|",
  "max unit Δw",
]
FIGURES = ("weights_hist.png", "summary.png", "curves.png")


def _demo(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "optax_norms", "demo", *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
  )


def _table(stdout: str) -> dict[str, dict[str, float]]:
  """The printed table as {setting: {column: value}}, parsed from the header on."""
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("setting"))
  rows = {}
  for line in lines[start + 2 :]:
    if not line.strip():
      break
    name, *cells = line.split()
    assert len(cells) == len(COLUMNS), line
    assert lines[start].split("  ")[-1].strip() == COLUMNS[-1], lines[start]
    rows[name] = dict(zip(COLUMNS, map(float, cells), strict=True))
  return rows


def _check_png(path) -> None:
  """A PNG signature, a sane IHDR, chunks with correct CRCs, ending with IEND."""
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", path
  pos, kinds = 8, []
  while pos < len(data):
    (length,) = struct.unpack(">I", data[pos : pos + 4])
    kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
    (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
    assert zlib.crc32(kind + body) == crc, (path, kind)
    if kind == b"IHDR":
      width, height = struct.unpack(">II", body[:8])
      assert 100 <= width <= 4000 and 100 <= height <= 4000, (width, height)
    kinds.append(kind)
    pos += 12 + length
  assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds, kinds


def _check_effects(table: dict[str, dict[str, float]]) -> None:
  none = table["none"]
  # Proximal L1 makes exact zeros; plain SGD and the subgradient form do not.
  assert table["prox_l1"]["zero frac"] > none["zero frac"] + 0.05, table
  assert table["l1"]["zero frac"] == 0.0, table
  # prox_adam thresholds in Adam's metric: exact zeros too; 2:4 zeroes half of every block.
  assert table["prox_adam"]["zero frac"] > none["zero frac"] + 0.05, table
  assert table["2:4"]["zero frac"] >= 0.5, table
  # The max-norm constraint bounds every unit; the unconstrained run exceeds the bound.
  assert table["maxnorm"]["max unit norm"] <= MAX_NORM + 1e-3, table
  assert none["max unit norm"] > MAX_NORM, table
  # L2 decay and the group lasso shrink the total norm (whole units die only after some
  # hundred steps, longer than this test runs).
  assert table["l2"]["total L2"] < 0.95 * none["total L2"], table
  assert table["group"]["total L2"] < 0.95 * none["total L2"], table
  # Clipping bounds every step: with momentum β, |Δw| ≤ lr·c/(1−β) per weight (clip_abs, c =
  # 0.005) and per unit (clip_row, c = 0.05); the unclipped run exceeds both bounds.
  abs_bound, unit_bound = (LR * c / (1 - MOMENTUM) for c in (0.005, 0.05))
  assert table["clip_abs"]["max |Δw|"] <= abs_bound * (1 + 1e-3), table
  assert table["clip_row"]["max unit Δw"] <= unit_bound * (1 + 1e-3), table
  assert none["max |Δw|"] > abs_bound and none["max unit Δw"] > unit_bound, table


def test_demo_end_to_end(tmp_path):
  # One test, so that pytest-xdist does not run the full demo twice.
  result = _demo("--steps", str(STEPS), "--out", str(tmp_path / "a"), "--seed", "3")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  table = _table(result.stdout)
  assert list(table) == ALL
  for row in table.values():
    assert 0 <= row["test acc"] <= 1 and 0 <= row["zero frac"] <= 1, row
    assert row["gap"] == pytest.approx(row["train acc"] - row["test acc"], abs=2e-3), row
  for name in FIGURES:
    _check_png(tmp_path / "a" / name)
    assert f"wrote {tmp_path / 'a' / name}\n" in result.stdout, result.stdout
  assert "replaced" not in result.stdout
  _check_effects(table)

  # Same seed, same numbers; a subset keeps the rerun short. Into the same folder: the run
  # says which figures it wrote and that they replaced the earlier ones.
  subset = ["prox_l1", "none", "maxnorm"]
  again = _demo(
    "--steps",
    str(STEPS),
    "--out",
    str(tmp_path / "a"),
    "--seed",
    "3",
    "--settings",
    ",".join(subset),
  )
  assert again.returncode == 0, again.stderr[-2000:]
  second = _table(again.stdout)
  assert list(second) == subset
  for name in subset:
    assert second[name] == table[name], name
  for name in FIGURES:
    assert f"wrote {tmp_path / 'a' / name} (replaced the existing file)" in again.stdout


@pytest.mark.parametrize(
  "args, message",
  [
    (["--steps", "-5"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--settings", "none,l3"], "l3"),
    (["--settings", "l2,,l1"], "empty entry (entry 2 of 3)"),
    (["--settings", "l2,"], "empty entry (entry 2 of 2)"),
    (["--settings", ""], "(none given)"),
    (["--no-such-flag"], "--no-such-flag"),
  ],
)
def test_demo_rejects_bad_flags_in_one_line(args, message, tmp_path):
  result = _demo(*args, "--out", str(tmp_path), timeout=60)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr
  assert "Traceback" not in result.stderr
  assert not any(tmp_path.iterdir())


def test_help_shows_every_default():
  result = _demo("--help", timeout=60)
  assert result.returncode == 0, result.stderr
  text = " ".join(result.stdout.split())  # argparse wraps lines
  for default in (
    "(default: optax_norms_demo)",
    "(default: 600)",
    "(default: 0)",
    "(default: all)",
  ):
    assert default in text, result.stdout
  for setting in SETTINGS:
    assert setting.chain in result.stdout, setting.name


def test_import_does_not_load_demo_extras():
  code = (
    "import sys, optax_norms; "
    "print(sorted(m for m in ('flax', 'sklearn', 'matplotlib', 'tqdm') if m in sys.modules))"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


def test_missing_extra_gives_install_hint():
  code = (
    "import sys\n"
    "class Block:\n"
    "  def find_spec(self, name, path=None, target=None):\n"
    "    if name.split('.')[0] == 'sklearn':\n"
    "      raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, Block())\n"
    "from optax_norms.__main__ import main\n"
    "raise SystemExit(main(['demo', '--steps', '1']))\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "pip install -e '.[demo]'" in lines[0], result.stderr
