"""Sharding check: every transform under ``jax.jit`` on 8 CPU devices (a 2x4 mesh).

Run in its own process (``tests/test_sharding.py`` does it): the flag
``--xla_force_host_platform_device_count=8`` must be set before JAX initializes.

For each mesh kind (``Explicit`` axes from ``jax.make_mesh``, ``Auto`` axes from
``jax.sharding.Mesh``), each layout of the parameters (rows, columns, both mesh axes,
replicated) and each of the 11 transforms, it checks that:

- the sharded result equals the unsharded one (single device) to 1e-5 relative;
- the output updates carry the input's sharding;
- element-wise transforms compile to a program with no collective at all;
- per-unit transforms compile to at most all-reduces whose result has exactly the size of
  the (per-device) norm vector of a leaf, never the leaf's size.

It prints one ``RESULT {json}`` line per cell and a human-readable matrix.
"""

from __future__ import annotations

import json
import os
import re
import sys

if "jax" in sys.modules:  # pragma: no cover - guards misuse
  raise RuntimeError("sharding_check must run in a fresh process (before jax is imported).")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _registry import REGISTRY  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

ROWS, COLS = 32, 16
RTOL = 1e-5

# name -> (factory, per_unit), from the registry of every transform.
TRANSFORMS = {entry.name: (entry.make, entry.per_unit) for entry in REGISTRY}
# Transforms whose maths reads more than one unit at a time communicate more than a norm
# vector when their axes are sharded: a magnitude budget ranks a whole leaf or block
# (all-gathers), power iteration and prox_adam's group solve reduce several vectors. For
# them the check is equality and kept shardings, not the collective pattern.
COMMUNICATES = {"constrain_sparsity", "constrain_n_of_m", "constrain_spectral_norm", "prox_adam"}
# One statistic per matrix (CPR's R): its only communication is the all-reduce of that scalar.
PER_MATRIX = {"cpr"}
# The per-unit norm reduces three scaled sums of squares (overflow- and underflow-free), all-reduced
# as one stacked vector where the unit axis is sharded.
NORM_SUMS = 3
# Known limitations on explicit mesh axes (jax.make_mesh): none at present. A transform that
# fails there goes here (its cells are then reported, not failed), with its reason.
KNOWN_EXPLICIT: set[str] = set()

# layout -> (kernel spec, bias spec); the mesh is ("x": 2, "y": 4).
LAYOUTS = {
  "rows": (P(("x", "y"), None), P()),
  "cols": (P(None, ("x", "y")), P(("x", "y"))),
  "both": (P("x", "y"), P("y")),
  "replicated": (P(), P()),
}

COLLECTIVE = re.compile(
  r"=\s*(?P<result>\([^)]*\)|\S+)\s+(?P<op>all-reduce|all-gather|collective-permute|"
  r"all-to-all|reduce-scatter)(?:-start)?\("
)
SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def _axis_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return int(np.prod([mesh.shape[n] for n in names]))


def _local_shape(mesh, shape, spec) -> tuple[int, ...]:
  entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  return tuple(d // _axis_size(mesh, e) for d, e in zip(shape, entries))


def _collectives(hlo: str) -> list[tuple[str, list[int]]]:
  """(op, element count of each result array) for every collective in the program."""
  found = []
  for match in COLLECTIVE.finditer(hlo):
    sizes = [
      int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      for dims in SHAPE.findall(match.group("result"))
    ]
    found.append((match.group("op"), sizes))
  return found


def _inputs():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(ROWS, COLS)).astype(np.float32)
  kernel[:, 3] = 0.0  # A zero unit.
  kernel[:, 5] *= 0.01  # A unit inside every ball.
  bias = rng.normal(size=(COLS,)).astype(np.float32)
  params = {"dense": {"kernel": kernel, "bias": bias}}
  grads = {
    "dense": {
      "kernel": rng.normal(size=(ROWS, COLS)).astype(np.float32),
      "bias": rng.normal(size=(COLS,)).astype(np.float32),
    }
  }
  return params, grads


def _mesh(kind: str):
  if kind == "explicit":
    return jax.make_mesh((2, 4), ("x", "y"))
  devices = np.array(jax.devices()[:8]).reshape(2, 4)
  return jax.sharding.Mesh(devices, ("x", "y"))


def _step_fn(tx, state):
  def step(grads, params):
    return tx.update(grads, state, params)[0]

  return jax.jit(step)


def check_cell(mesh, layout: str, name: str, params_np, grads_np) -> dict:
  factory, per_unit = TRANSFORMS[name]
  kernel_spec, bias_spec = LAYOUTS[layout]
  specs = {"dense": {"kernel": kernel_spec, "bias": bias_spec}}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  params = jax.tree.map(jax.device_put, params_np, shardings)
  grads = jax.tree.map(jax.device_put, grads_np, shardings)
  tx = factory()
  state = tx.init(params)
  step = _step_fn(tx, state)
  problems = []

  # Reference: the same jitted transform on one device, unsharded.
  one = jax.devices()[0]
  ref = _step_fn(tx, tx.init(params_np))(
    jax.device_put(grads_np, one), jax.device_put(params_np, one)
  )
  out = step(grads, params)
  for key in ("kernel", "bias"):
    got = np.asarray(out["dense"][key], np.float64)
    want = np.asarray(ref["dense"][key], np.float64)
    # Relative to the parameter's scale: update-form transforms (u' = q − w) may differ by
    # one ulp of |w| between a sharded and an unsharded reduction order.
    scale = np.maximum(np.maximum(np.abs(want), np.abs(np.asarray(params_np["dense"][key]))), 1e-6)
    err = np.max(np.abs(got - want) / scale)
    if not np.isfinite(got).all() or err > RTOL:
      problems.append(f"{key}: relative error {err:.3g}")
    sharding = out["dense"][key].sharding
    if not sharding.is_equivalent_to(params["dense"][key].sharding, got.ndim):
      problems.append(f"{key}: output sharding {sharding} != input {params['dense'][key].sharding}")

  hlo = step.lower(grads, params).compile().as_text()
  found = _collectives(hlo)
  if name in COMMUNICATES:
    pass
  elif name in PER_MATRIX:
    for op, sizes in found:
      if op != "all-reduce" or any(s != 1 for s in sizes):
        problems.append(f"unexpected {op} of sizes {sizes} (one scalar per matrix)")
  elif per_unit:
    units = {
      int(np.prod(_local_shape(mesh, (COLS,), kernel_spec[1:] if len(kernel_spec) > 1 else ()))),
      1,  # The bias is a single unit: its norm is a scalar.
    }
    # The norm vector, or the unit norm's three scaled sums of squares stacked into one.
    allowed = {k * n for n in units for k in (1, NORM_SUMS)}
    kernel_local = int(np.prod(_local_shape(mesh, (ROWS, COLS), kernel_spec)))
    for op, sizes in found:
      if op != "all-reduce" or any(s not in allowed or s >= kernel_local for s in sizes):
        problems.append(f"unexpected {op} of sizes {sizes} (norm vectors: {sorted(allowed)})")
  elif found:
    problems.append(f"element-wise transform has collectives {found}")
  return {
    "layout": layout,
    "transform": name,
    "per_unit": per_unit,
    "ok": not problems,
    "collectives": [f"{op}{sizes}" for op, sizes in found],
    "problems": problems,
  }


def control(mesh) -> list[tuple[str, list[int]]]:
  """A negative control: a step that reshards a row-sharded leaf to replicated must show
  an all-gather of the whole leaf, so the detector above can fail."""
  sharded = NamedSharding(mesh, P(("x", "y"), None))
  replicated = NamedSharding(mesh, P())
  u = jax.device_put(np.ones((ROWS, COLS), np.float32), sharded)
  step = jax.jit(lambda u: 2 * u, out_shardings=replicated)
  return _collectives(step.lower(u).compile().as_text() or "")


def main() -> int:
  assert jax.device_count() == 8, jax.devices()
  params_np, grads_np = _inputs()
  all_ok = True
  found = control(_mesh("auto"))
  print("CONTROL " + json.dumps([f"{op}{sizes}" for op, sizes in found]), flush=True)
  for kind in ("explicit", "auto"):
    mesh = _mesh(kind)
    rows = []
    for layout in LAYOUTS:
      for name in TRANSFORMS:
        try:
          cell = check_cell(mesh, layout, name, params_np, grads_np)
        except Exception as error:  # Report, do not hide, a crash in one cell.
          known = kind == "explicit" and name in KNOWN_EXPLICIT
          cell = {
            "layout": layout,
            "transform": name,
            "ok": known,
            "known_failure": known,
            "collectives": [],
            "problems": [f"{type(error).__name__}: {error}"[:300]],
          }
        cell["mesh"] = kind
        all_ok &= cell["ok"]
        rows.append(cell)
        print("RESULT " + json.dumps(cell), flush=True)
    print(f"\nMesh with {kind} axes, 2x4 ('x', 'y'); kernel {ROWS}x{COLS}, bias {COLS}:")
    width = max(len(n) for n in TRANSFORMS)
    print(" " * width + " | " + " | ".join(f"{lay:<32}" for lay in LAYOUTS))
    for name in TRANSFORMS:
      cells = []
      for layout in LAYOUTS:
        cell = next(r for r in rows if r["layout"] == layout and r["transform"] == name)
        text = ("ok " if cell["ok"] else "FAIL ") + (",".join(cell["collectives"]) or "none")
        cells.append(f"{text:<32}")
      print(f"{name:<{width}} | " + " | ".join(cells))
  print("ALL_OK" if all_ok else "SOME_FAILED")
  return 0 if all_ok else 1


if __name__ == "__main__":
  sys.exit(main())
