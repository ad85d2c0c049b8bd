"""regularize's clip_global_norm (model-wide and per rule), clip_adaptive and freeze on 8 CPU
devices, the leaves sharded by rows, by columns or over both mesh axes: 5 steps give the
one-device result and keep every leaf's sharding, and the global norms communicate scalars
(or a leaf's three scaled sums) only: no leaf is gathered. Run by
tests/test_rule_clipping_sharding.py in its own process. Prints one ``RESULT {json}`` line per
layout."""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_norms as on  # noqa: E402

RULES: list[dict] = [
  {"match": "a/*", "clip_adaptive": {"z": 1.0, "decay": 0.9, "warmup": 2}, "clip_global_norm": 0.3},
  {"match": "frozen/*", "freeze": True},
  {"match": "**"},
]
LAYOUTS = {"rows": P(("x", "y"), None), "cols": P(None, ("x", "y")), "both": P("x", "y")}
# A leaf's norm is summed as three scaled sums of squares (overflow- and underflow-safe), which
# small leaves take as one stacked reduction: its all-reduce carries f32[3], never a leaf.
NORM_SUMS = 3
COLLECTIVE = re.compile(
  r"=\s*(\([^)]*\)|\S+)\s+(all-reduce|all-gather|all-to-all|collective-permute)"
)


def main() -> int:
  rng = np.random.default_rng(0)
  names = [("a", "w1"), ("a", "w2"), ("b", "w"), ("frozen", "w")]
  params: dict[str, dict[str, np.ndarray]] = {m: {} for m, _ in names}
  for m, leaf in names:
    params[m][leaf] = rng.normal(size=(16, 8)).astype(np.float32)
  grads = [
    jax.tree.map(
      lambda x, k=k: (np.cos(x * (k + 1)) * (10.0 if k == 3 else 1.0)).astype(np.float32), params
    )
    for k in range(5)
  ]
  tx = on.regularize(optax.adamw(1e-2, weight_decay=0.1), RULES, clip_global_norm=2.0)

  def run(params, grads, shardings=None):
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for g in grads:
      if shardings is not None:
        g = jax.device_put(g, shardings)
      updates, state = step(g, state, params)
      params = optax.apply_updates(params, updates)
    return params, step

  one = jax.devices()[0]
  reference, _ = run(jax.device_put(params, one), [jax.device_put(g, one) for g in grads])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
  all_ok = True
  for layout, spec in LAYOUTS.items():
    shardings = jax.tree.map(lambda _, spec=spec: NamedSharding(mesh, spec), params)
    sharded = jax.device_put(params, shardings)
    out, step = run(sharded, grads, shardings)
    problems = []
    for path, got, want, inp in zip(
      on.tree_paths(out), jax.tree.leaves(out), jax.tree.leaves(reference), jax.tree.leaves(sharded)
    ):
      err = float(
        np.max(
          np.abs(np.asarray(got) - np.asarray(want)) / np.maximum(np.abs(np.asarray(want)), 1e-3)
        )
      )
      if err > 1e-5:
        problems.append(f"{path}: relative error {err:.3g}")
      if not got.sharding.is_equivalent_to(inp.sharding, got.ndim):
        problems.append(f"{path}: sharding {got.sharding} != {inp.sharding}")
    np.testing.assert_array_equal(np.asarray(out["frozen"]["w"]), params["frozen"]["w"])
    hlo = (
      step.lower(jax.device_put(grads[0], shardings), tx.init(sharded), sharded).compile().as_text()
    )
    found = [m.group(0) for m in COLLECTIVE.finditer(hlo)]
    big = [
      m.group(0)
      for m in COLLECTIVE.finditer(hlo)
      if m.group(2) != "all-reduce"
      or any(dims not in ("", str(NORM_SUMS)) for dims in re.findall(r"\[([\d,]*)\]", m.group(1)))
    ]
    if big:
      problems.append(f"collectives beyond all-reduces of scalars or sum triples: {big[:3]}")
    if not found:
      problems.append("no all-reduce at all: the global norm is not global")
    cell = {"layout": layout, "ok": not problems, "collectives": len(found), "problems": problems}
    all_ok = all_ok and not problems
    print("RESULT " + json.dumps(cell), flush=True)
  print("ALL_OK" if all_ok else "SOME_FAILED")
  return 0 if all_ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
