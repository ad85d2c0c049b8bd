"""Smoke test of ``python -m optax_norms bench`` at ``--size tiny`` (no timing asserts)."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _registry import REGISTRY

import optax_norms as on
from optax_norms.tools import bench as _bench
from optax_norms.tools.bench_table import BENCH_TABLE, by_name

TRANSFORMS = [entry.name for entry in BENCH_TABLE]
# An optimizer entry (prox_adam) is timed against adam only.
_OPTIMIZERS = {
  entry.name: ["adam"] if entry.placement == "optimizer" else ["adam", "sgd"]
  for entry in BENCH_TABLE
}


def test_bench_table_covers_every_registered_transform_and_only_those():
  """The bench's own table (optax_norms/tools/bench_table.py) and the test registry
  (tests/_registry.py) name the same public factories, and agree on what the bench reads."""
  registered = [entry.name for entry in REGISTRY]
  benched = [entry.name for entry in BENCH_TABLE]
  assert len(set(benched)) == len(benched)
  assert sorted(benched) == sorted(registered), (
    f"missing from the bench table: {sorted(set(registered) - set(benched))}; "
    f"not in the test registry: {sorted(set(benched) - set(registered))}"
  )
  assert list(_bench.TRANSFORMS) == benched
  for entry in REGISTRY:
    bench_entry = by_name(entry.name)
    assert bench_entry.factory is getattr(on, entry.name), entry.name
    assert bench_entry.placement == entry.placement, entry.name
    assert bench_entry.per_unit == entry.per_unit, entry.name
    assert bench_entry.stateful == entry.stateful, entry.name
    # Keywords the tests also give (prox_adam's bench leaves out l2 and group); the bench's
    # learning_rate is the optimizer's.
    assert set(bench_entry.values(0.1)) <= set(entry.hyperparams), entry.name
    tx = bench_entry.factory(**bench_entry.values(0.1), **bench_entry.options, mask="**/kernel")
    assert isinstance(tx, optax.GradientTransformation), entry.name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "bench.json"
  argv = [
    "--size",
    "tiny",
    "--trees",
    "big,mlp,coupled",
    "--steps",
    "1",
    "--repeats",
    "1",
    "--no-progress",
    "--json",
    str(path),
  ]
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys; from optax_norms.tools.bench import main; sys.exit(main(sys.argv[1:]))",
      *argv,
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  return proc, json.loads(path.read_text()) if path.exists() else None


@pytest.mark.slow
def test_tiny_run_exits_zero_and_prints_every_transform(tiny_run):
  proc, _ = tiny_run
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = proc.stdout
  for name in TRANSFORMS:
    rows = re.findall(rf"^{name} +(sgd|adam) ", table, flags=re.MULTILINE)
    assert sorted(rows) == _OPTIMIZERS[name], name
  assert "## mlp" in table and "all_ours" in table
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_json_has_rows_for_every_transform_and_optimizer(tiny_run):
  _, results = tiny_run
  assert set(results) >= {"meta", "trees", "mlp", "state_bytes", "targets"}
  import jax

  assert results["meta"]["device_kind"] == jax.devices()[0].device_kind
  rows = results["trees"]["big"]["rows"]
  assert sorted((r["transform"], r["optimizer"]) for r in rows) == sorted(
    (t, o) for t in TRANSFORMS for o in _OPTIMIZERS[t]
  )
  for r in rows:
    hand = {"hand"} if by_name(r["transform"]).hand_rule is not None else set()
    assert set(r["us_per_step"]) >= {"base", "ours"} | hand
    assert all(v > 0 for v in r["us_per_step"].values())
    assert r["kernels"]["ours"] >= r["kernels"]["base"] > 0
  peers = {r["transform"] for r in rows if r["ratio_vs_peer"] is not None}
  assert peers == {entry.name for entry in BENCH_TABLE if entry.peer is not None}
  assert results["trees"]["big"]["copy"]["gb_per_s"] > 0


@pytest.mark.slow
def test_hand_written_baselines_compute_the_same_math(tiny_run):
  # The ratios only mean something if ours, the hand-written version and the same-math optax
  # peer end at the same parameters after the timed loop.
  _, results = tiny_run
  for r in results["trees"]["big"]["rows"]:
    if by_name(r["transform"]).stateful:  # Its hand version starts from another vector.
      continue
    if by_name(r["transform"]).hand_rule is None:  # prox_adam: timed against its peers.
      assert r["max_abs_diff_vs_hand"] is None
      continue
    assert r["max_abs_diff_vs_hand"] < 1e-5, (r["transform"], r["optimizer"])
    if r["peer_same_math"]:
      assert r["max_abs_diff_vs_peer"] < 1e-5, r["transform"]
  for group, diff in results["mlp"]["max_abs_diff_vs_hand"].items():
    assert diff < 1e-5, group
  # The coupled groups' hand-written versions (group prox, group budget) do the same math.
  for kind, diff in results["coupled"]["max_abs_diff_vs_hand"].items():
    assert diff < 1e-5, kind
  variants = {r["variant"] for r in results["coupled"]["rows"]}
  assert {"prox_ours", "budget_ours", "budget_every100", "prox_adam"} <= variants


@pytest.mark.slow
def test_state_bytes_are_zero_without_schedules_and_one_int32_count_with_one(tiny_run):
  _, results = tiny_run
  assert set(results["state_bytes"]) == set(TRANSFORMS)
  for name, sizes in results["state_bytes"].items():
    if by_name(name).stateful or by_name(name).placement == "optimizer":  # Vectors, moments.
      assert sizes["constant"] > np.dtype(np.int32).itemsize, name
      continue
    assert sizes["constant"] == 0, name
    assert sizes["scheduled"] == (
      np.dtype(np.int32).itemsize if by_name(name).values(0.1) else 0
    ), name
  for r in results["trees"]["big"]["rows"]:
    entry = by_name(r["transform"])
    assert r["state_bytes"] == 0 or entry.stateful or entry.placement == "optimizer", entry.name


_TEXT_FREE_OPS = {
  "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
  "call", "after-all", "opt-barrier", "partition-id", "replica-id", "iota",
}  # fmt: skip


def _kernels_from_text(hlo: str) -> int:
  """An independent count from the module's text: instructions outside fused and applied
  computations, whose opcode launches a kernel."""
  inner = set(re.findall(r"(?:calls|to_apply)=%?([\w.-]+)", hlo))
  count, skip = 0, True
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):  # A computation header.
      words = line.split()
      name = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
      skip = name in inner
      continue
    if skip or " = " not in line:
      continue
    rhs = line.split(" = ", 1)[1]
    match = re.match(r"(?:\([^=]*?\)|\S+)\s+([a-z][a-z0-9-]*)\(", rhs)
    count += match is not None and match.group(1) not in _TEXT_FREE_OPS
  return count


def _loop(fn):
  return lambda x: jax.lax.fori_loop(0, 3, lambda _, v: fn(v), x)


@pytest.mark.parametrize(
  "fn, at_least",
  [
    (lambda x: jnp.sin(x) * 2, 1),  # One fusion.
    (lambda x: x.sum() * x, 1),  # A reduce (its adder is no kernel) and a fusion, or one.
    (_loop(lambda v: jnp.sort(jnp.sin(v) * 2 + v.sum())), 3),  # Loop body: sort, fusions.
    (_loop(lambda v: jnp.cumsum(v, axis=0) / (1 + jnp.abs(v).max())), 2),
  ],
)
def test_kernel_count_from_xla_modules_matches_the_module_text(fn, at_least):
  compiled = jax.jit(fn).lower(jnp.ones((8, 8))).compile()
  count = _bench._kernel_count(compiled)
  assert count == _kernels_from_text(compiled.as_text()) >= at_least


def test_kernel_count_grows_with_an_unfusable_op():
  one = jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(64)).compile()
  two = jax.jit(lambda x: jnp.sort(jnp.sin(x)) * 2).lower(jnp.ones(64)).compile()
  assert _bench._kernel_count(two) > _bench._kernel_count(one) >= 1


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--bogus"], "unrecognized arguments"),
    (["--size", "huge"], "invalid choice"),
    (["--only", "add_l3_decay"], "add_l3_decay"),
    (["--steps", "0"], "positive integer"),
  ],
)
def test_invalid_flags_exit_nonzero_with_one_line_and_no_traceback(argv, message, capsys):
  assert _bench.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_invalid_flag_in_a_subprocess_has_no_traceback():
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys; from optax_norms.tools.bench import main; sys.exit(main(sys.argv[1:]))",
      "--repeats",
      "many",
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr and "--repeats" in proc.stderr
  assert proc.stdout == ""


def test_target_classes_follow_the_hand_written_math():
  """A rule is in the bench's element-wise class exactly when changing one entry of (g, w)
  leaves every other entry of its hand-written update unchanged: the budgets, CPR and the
  per-unit rules read other entries and are held to the per-unit target instead."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(8, 4)) * 0.5, jnp.float32)
  reads_others = {}
  for entry in BENCH_TABLE:
    if entry.hand_rule is None:
      continue
    rule = entry.hand_rule(entry.values(0.1), 0.1)
    base = np.asarray(rule(g, w))
    changed = False
    for i, j in [(0, 0), (3, 1), (5, 2), (7, 3)]:
      moved = np.asarray(rule(g.at[i, j].set(40.0), w.at[i, j].set(-30.0)))
      others = np.ones(base.shape, bool)
      others[i, j] = False
      changed |= bool(np.any(moved[others] != base[others]))
    reads_others[entry.name] = changed
  elementwise = {name for name, reads in reads_others.items() if not reads}
  assert elementwise == set(_bench.ELEMENTWISE) & set(reads_others)
  assert set(reads_others) - elementwise == set(_bench.PER_UNIT) & set(reads_others)


def test_periodic_rows_are_amortized_over_a_simulated_period():
  """A period of `PERIOD` steps, one of them ranking (the every-step time) and the rest between
  rankings, summed step by step against the base: the ratio the bench reports."""
  period = _bench.PERIOD
  times = {"every1": [6.0, 5.0, 7.0], "between": [1.1, 1.3, 1.0], "base": [1.0, 1.1, 0.9]}
  per_repeat = []
  for rank, between, base in zip(times["every1"], times["between"], times["base"]):
    steps = [rank] + [between] * (period - 1)
    per_repeat.append(sum(steps) / (period * base))
  got, _ = _bench._ratio_over_period(times, "between", "base", 10, "every1")
  assert got == pytest.approx(sorted(per_repeat)[1], rel=1e-12)
  # A window of a whole period already holds its ranking: then it is the plain ratio.
  whole, _ = _bench._ratio_over_period(times, "between", "base", period, "every1")
  assert whole == pytest.approx(sorted(b / a for b, a in zip(times["between"], times["base"]))[1])


def test_periodic_rows_are_timed_from_after_the_first_ranking():
  """The periodic budget's timed window starts at count 1, so it holds no ranking."""
  params = {"w": jnp.arange(8.0).reshape(2, 4)}
  tx = optax.chain(optax.sgd(0.1), on.constrain_sparsity(0.5, update_every=_bench.PERIOD))
  run_one = _bench._tree_loop(tx, 1)
  target = jax.tree.map(jnp.zeros_like, params)
  new_params, state = _bench._after_first_step(run_one, params, tx.init(params), target)
  assert int(optax.tree_utils.tree_get(state, "count")) == 1
  assert int(jnp.sum(new_params["w"] == 0)) == 4  # The first step ranked: half are zero.
