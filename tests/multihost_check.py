"""Multi-controller check: every transform under ``jax.distributed`` on 2 processes x 4 CPU
devices (a 2x4 mesh whose ``x`` axis spans the two processes), with gloo collectives.

Run as ``python multihost_check.py PHASE PROCESS_ID NUM_PROCESSES PORT WORKDIR``, one
command per process (``tests/test_multihost.py`` starts them). Phases:

- ``run``: for each mesh kind (``Explicit`` axes from ``jax.make_mesh``, ``Auto`` axes from
  ``jax.sharding.Mesh``) and every transform of the registry (``REGISTRY``, so a new entry
  is covered without touching this file), chained around ``optax.sgd`` with momentum in its
  placement: ``init`` under ``jax.jit`` with ``out_shardings`` derived from the parameters'
  (``optax.tree_map_params``), 5 jitted steps on global arrays built with
  ``jax.make_array_from_callback``, the result gathered with ``process_allgather`` and
  compared with the same run on plain arrays on one local device; the parameters' and the
  state's shardings are checked after the 5 steps, and the collectives of the compiled step
  are listed. Then the diagnostics on arrays that are not fully addressable, and the first
  half of a checkpointed run: 3 steps, an orbax checkpoint written by both processes, and
  the uninterrupted 5-step result saved (process 0) for the second phase.
- ``resume``: fresh processes restore the checkpoint into the same shardings, run steps 4
  and 5 and compare bit for bit with an uninterrupted 5-step run (theirs, and the first
  phase's).

Each process prints ``RESULT {json}`` lines (one per cell), ``DIAG {json}``, ``CKPT {json}``
and, on process 0, a human-readable table; the last line is ``ALL_OK`` or ``SOME_FAILED``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import traceback
from typing import Any

if "jax" in sys.modules:  # pragma: no cover - guards misuse
  raise RuntimeError("multihost_check must run in a fresh process (before jax is imported).")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

LOCAL_DEVICES = 4
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from _registry import REGISTRY  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_norms as on  # noqa: E402

ROWS, COLS = 32, 16
STEPS, SAVE_AT = 5, 3
RTOL = 1e-5
LR = 0.1

# Every layout at once, as four sub-trees of one parameter tree; the mesh is ("x": 2, "y": 4)
# and "x" is the process axis, so anything sharded over "x" spans both processes.
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


def _collectives(hlo: str) -> list[tuple[str, list[int]]]:
  found = []
  for match in COLLECTIVE.finditer(hlo):
    sizes = [
      int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      for dims in SHAPE.findall(match.group("result"))
    ]
    found.append((match.group("op"), sizes))
  return found


def _specs():
  return {name: {"kernel": k, "bias": b} for name, (k, b) in LAYOUTS.items()}


def _params_np(seed=0):
  rng = np.random.default_rng(seed)
  params = {}
  for name in LAYOUTS:
    kernel = rng.normal(size=(ROWS, COLS)).astype(np.float32)
    kernel[:, 3] = 0.0  # A zero unit.
    kernel[:, 5] *= 0.01  # A unit inside every ball.
    params[name] = {"kernel": kernel, "bias": rng.normal(size=(COLS,)).astype(np.float32)}
  return params


def _grads_np(step):
  rng = np.random.default_rng(1000 + step)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), _params_np())


def _mesh(kind: str):
  if kind == "explicit":
    return jax.make_mesh((2, LOCAL_DEVICES), ("x", "y"))
  devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
  return jax.sharding.Mesh(devices.reshape(2, LOCAL_DEVICES), ("x", "y"))


def _global(tree_np, shardings):
  """Global arrays: each process fills only its addressable shards."""
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
    tree_np,
    shardings,
  )


def _local(tree_np):
  return jax.device_put(tree_np, jax.local_devices()[0])


def _gather(tree):
  """Numpy copies of global arrays (every process gets the whole value)."""
  return jax.tree.map(
    lambda x: (
      np.asarray(x)
      if x.is_fully_addressable or x.is_fully_replicated
      else np.asarray(multihost_utils.process_allgather(x, tiled=True))
    ),
    tree,
  )


def _state_shardings(tx, params_abstract, param_shardings, mesh):
  """The optimizer state's shardings, derived from the parameters': every params-shaped
  part of the state takes the params' shardings, everything else (counts) is replicated."""
  state_abstract = jax.eval_shape(tx.init, params_abstract)
  replicated = NamedSharding(mesh, P())

  def like_params(leaf, sharding, param):
    # Params-shaped state (moments) takes the params' sharding; state shaped like the
    # trailing (kept) axes of the parameter (the spectral constraint's power-iteration
    # vectors) takes the sharding of those axes.
    rank, param_rank = len(getattr(leaf, "shape", ())), len(param.shape)
    if rank == param_rank:
      return sharding
    spec = tuple(sharding.spec) + (None,) * (param_rank - len(sharding.spec))
    return NamedSharding(mesh, P(*spec[param_rank - rank :])) if rank else replicated

  return optax.tree_map_params(
    tx,
    like_params,
    state_abstract,
    param_shardings,
    params_abstract,
    transform_non_params=lambda _: replicated,
    # Per-leaf NamedTuple states (CPR's multiplier and bound, scalars per matrix) are one
    # replicated subtree each.
    is_leaf=lambda x: isinstance(x, on.CprLeafState),
  )


def _step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


class _Groups:
  """``regularize`` with a 3-group table, checked like a registry entry."""

  name = "regularize (3 groups)"
  placement = "wraps"
  per_unit = True
  rules = [
    ("rows/*", {"l2": 1e-3, "max_norm": 1.0}),
    ("cols/kernel", {"clip_unit_norm": 1.0, "prox_l1": 1e-3}),
    ("**", {"l1": 1e-4, "max_abs": 2.0}),
  ]


GROUPS = _Groups()


# Hyperparameters for 5 carried steps where the registry's (chosen for a one-step oracle)
# diverge: CPR's bound 0.5 with kappa_update 2 multiplies the weights by |1 − 2λ| > 1 every step
# (inf on one device too by step 5); a warm-started bound keeps the run finite while it acts.
MULTISTEP = {"cpr": {"kappa_init_method": "warm_start", "kappa_init_param": 2, "kappa_update": 1.0}}


def _chain(entry):
  inner = optax.sgd(LR, momentum=0.9)
  if entry is GROUPS:
    return on.regularize(inner, entry.rules, learning_rate=LR)
  overrides = MULTISTEP.get(entry.name, {})
  if entry.placement == "optimizer":  # prox_adam: the transform is the optimizer.
    return entry.make(**overrides)
  tx = entry.make(**overrides)
  return optax.chain(tx, inner) if entry.placement == "before" else optax.chain(inner, tx)


def _rel_err(got, want) -> float:
  """max |got − want| relative to the leaf's largest magnitude (float32 rounding is ~6e-8
  per operation; the per-unit sums of squares are added in another order on 8 devices)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if not np.isfinite(got).all():
    return float("inf")
  scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
  return float(np.max(np.abs(got - want), initial=0.0)) / scale


def _same(arrays, shardings) -> bool:
  """Every array has the sharding given for it; `shardings` may be a prefix of `arrays` (one
  sharding for a whole subtree, as for CPR's per-leaf states)."""
  try:
    kept = jax.tree.map(
      lambda s, sub: all(a.sharding.is_equivalent_to(s, a.ndim) for a in jax.tree.leaves(sub)),
      shardings,
      arrays,
    )
  except ValueError:  # The structures differ.
    return False
  return all(jax.tree.leaves(kept))


_REFERENCES: dict[str, dict] = {}


def _reference(entry) -> dict:
  """The same chain, jitted, 5 steps on plain arrays on one local device (numpy result)."""
  if entry.name not in _REFERENCES:
    tx = _chain(entry)
    params = _local(_params_np())
    state = tx.init(params)
    step = _step(tx)
    for i in range(STEPS):
      params, state = step(params, state, _local(_grads_np(i)))
    _REFERENCES[entry.name] = jax.tree.map(np.asarray, params)
  return _REFERENCES[entry.name]


# Per-unit transforms: the norm vectors all-reduced across devices. One unit per column:
# 16 for the row-sharded kernel, 16/4 for the P("x", "y") kernel (its columns are split over
# "y"), 1 for each of the two sharded biases (a rank-1 leaf is one unit). Column-sharded and
# replicated kernels: none. Each such leaf all-reduces the same small number of vectors (the
# scaled sums of squares that keep the norm free of overflow and underflow: 3 at the time of
# writing, stacked into one all-reduce), as separate all-reduces or as one of them stacked.
NORM_UNITS = [16, 4, 1, 1]


def _vectors_per_leaf(found) -> int | None:
  """k if the collectives are exactly k all-reduced vectors per leaf of NORM_UNITS (k <= 3):
  k all-reduces of one vector each, or one all-reduce of the k vectors stacked."""
  if any(op != "all-reduce" for op, _ in found):
    return None
  vectors = sorted(n for _, sizes in found for n in sizes)
  for k in (1, 2, 3):
    if vectors in (sorted(NORM_UNITS * k), sorted(k * n for n in NORM_UNITS)):
      return k
  return None


# Transforms that read more than one unit at a time (magnitude budgets, power iteration,
# prox_adam's group solve); DISCONTINUOUS: those checked for kept shardings only.
COMMUNICATES = {
  "constrain_sparsity",
  "constrain_n_of_m",
  "constrain_spectral_norm",
  "prox_adam",
  "cpr",  # one scalar all-reduce per matrix (its R)
  GROUPS.name,
}  # (regularize: several per-unit settings, several vectors per leaf)
DISCONTINUOUS: set[str] = set()


def check_cell(mesh, kind, entry) -> dict:
  want = _reference(entry)
  with _context(mesh, kind):
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), _specs())
    params = _global(_params_np(), param_shardings)
    tx = _chain(entry)
    state_shardings = _state_shardings(tx, params, param_shardings, mesh)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    init_kept = _same(state, state_shardings)
    grads = [_global(_grads_np(i), param_shardings) for i in range(STEPS)]
    # Compiled once, ahead of time: its HLO is inspected and it runs all 5 steps (it would
    # refuse inputs whose shardings drifted from the first step's).
    step = _step(tx).lower(params, state, grads[0]).compile()
    for g in grads:
      params, state = step(params, state, g)
    err = max(jax.tree.leaves(jax.tree.map(_rel_err, _gather(params), want)))
    params_kept = _same(params, param_shardings)
    state_kept = init_kept and _same(state, state_shardings)
    found = _collectives(step.as_text())
  # A transform in DISCONTINUOUS (none at present) is checked for kept shardings only. The
  # rank-based budgets used to be: a 1-ulp difference flipped a near-tie, which was XLA:CPU
  # contracting w + u into an FMA in only some fused copies of |w + u| (now materialized once).
  equal_required = entry.name not in DISCONTINUOUS
  problems = [] if err <= RTOL or not equal_required else [f"relative error {err:.3g} > {RTOL}"]
  if not params_kept:
    problems.append("parameter shardings changed")
  if not state_kept:
    problems.append("state shardings differ from those derived from the parameters")
  per_leaf = _vectors_per_leaf(found) if entry.per_unit else 0
  if entry.name in COMMUNICATES:
    pass  # Reads more than one unit at a time: more than a norm vector is communicated.
  elif (per_leaf is None) or (entry.per_unit and not per_leaf) or (not entry.per_unit and found):
    problems.append(f"unexpected collectives {found}")
  return {
    "mesh": kind,
    "transform": entry.name,
    "placement": entry.placement,
    "per_unit": entry.per_unit,
    "equal": err <= RTOL,
    "max_rel_err": err,
    "shardings_kept": params_kept and state_kept,
    "collectives": [f"{op}{sizes}" for op, sizes in found],
    "vectors_per_leaf": per_leaf,
    "ok": not problems,
    "problems": problems,
  }


def init_follows_params(mesh, kind) -> bool | str:
  """Whether a plain ``jax.jit(adam.init)`` (no out_shardings) gives the moments the
  parameters' shardings."""
  with _context(mesh, kind):
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), _specs())
    params = _global(_params_np(), param_shardings)
    tx = optax.adam(1e-3)
    try:
      return _same(jax.jit(tx.init)(params), _state_shardings(tx, params, param_shardings, mesh))
    except Exception as error:
      return f"{type(error).__name__}: {error}"[:300]


def diagnostics(mesh) -> dict:
  """norm_report (jitted and eager) and decay_resolution_report on global arrays that are
  not fully addressable, compared with the same calls on local arrays."""
  out: dict[str, Any] = {}
  param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), _specs())
  params_np = _params_np()
  params = _global(params_np, param_shardings)
  out["fully_addressable"] = [p.is_fully_addressable for p in jax.tree.leaves(params)]
  want = jax.tree.map(np.asarray, on.norm_report(_local(params_np)))
  for how, fn in (
    ("norm_report_jit", jax.jit(on.norm_report)),
    ("norm_report_eager", on.norm_report),
  ):
    try:
      got = _gather(fn(params))
      err = max(jax.tree.leaves(jax.tree.map(_rel_err, got, want)))
      out[how] = {"ok": err <= RTOL, "max_rel_err": err}
    except Exception as error:  # Report what a user would see.
      out[how] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
  for dtype in ("float32", "bfloat16"):
    cast = jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), params)
    local = _local(jax.tree.map(lambda x, dtype=dtype: np.asarray(x.astype(dtype)), params_np))
    try:
      got = on.decay_resolution_report(cast, alpha=0.05, learning_rate=1e-3)
      ref = on.decay_resolution_report(local, alpha=0.05, learning_rate=1e-3)
      out[f"decay_resolution_report_{dtype}"] = {
        "ok": got == ref,
        "rounds_away": list(got.rounds_away),
      }
    except Exception as error:
      out[f"decay_resolution_report_{dtype}"] = {
        "ok": False,
        "error": f"{type(error).__name__}: {error}"[:2000],
        "traceback": traceback.format_exc()[-3000:],
      }
  return out


# --- checkpoint ------------------------------------------------------------------------------

# The checkpointed run (every transform) uses auto mesh axes (explicit axes are covered by the
# transforms table above).
CKPT_MESH = "auto"


def _ckpt_chain():
  """Every transform, every hyperparameter on a schedule (so the state holds step counts),
  around adam (whose moments are sharded like the parameters)."""
  from _cases import chain_of_all  # tests/ is this script's directory.

  lr = optax.warmup_cosine_decay_schedule(0.0, 0.05, 2, 10, 0.005)
  return chain_of_all(
    optax.adam(lr),
    lambda v: optax.linear_schedule(v / 10, v / 40, transition_steps=4),
    mask=None,
  )


def _ckpt_start(mesh):
  param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), _specs())
  params = _global(_params_np(), param_shardings)
  tx = _ckpt_chain()
  state_shardings = _state_shardings(tx, params, param_shardings, mesh)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  return tx, params, state, param_shardings, state_shardings


def _run(step, params, state, shardings, start, stop):
  for i in range(start, stop):
    params, state = step(params, state, _global(_grads_np(i), shardings))
  return params, state


def _flat(tree) -> dict[str, np.ndarray]:
  return {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(_gather(tree))
  }


def checkpoint_save(mesh, workdir) -> dict:
  """Steps 1-3, an orbax checkpoint written by every process, then steps 4-5 (saved by
  process 0 as the uninterrupted result)."""
  import orbax.checkpoint as ocp

  tx, params, state, param_shardings, _ = _ckpt_start(mesh)
  step = _step(tx)
  half = _run(step, params, state, param_shardings, 0, SAVE_AT)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(workdir, "ckpt"), {"params": half[0], "opt_state": half[1]})
  checkpointer.wait_until_finished()
  full = _run(step, half[0], half[1], param_shardings, SAVE_AT, STEPS)
  flat = _flat({"params": full[0], "opt_state": full[1]})
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "uninterrupted.npz"), **flat)  # type: ignore[arg-type]
  multihost_utils.sync_global_devices("uninterrupted result saved")
  return {"saved_after_step": SAVE_AT, "leaves": len(flat)}


def checkpoint_resume(mesh, workdir) -> dict:
  """Restore into the parameters' shardings, steps 4-5, compare bit for bit."""
  import orbax.checkpoint as ocp

  tx, params0, state0, param_shardings, state_shardings = _ckpt_start(mesh)
  # Each array of the fresh state already has its sharding (jit's out_shardings, which may be
  # a prefix: one sharding for a whole per-leaf state such as CPR's).
  target = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
    {"params": params0, "opt_state": state0},
  )
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "ckpt"), target)
  restored_kept = _same(restored, jax.tree.map(lambda t: t.sharding, target))
  counts = {
    int(x) for x in jax.tree.leaves(restored["opt_state"]) if x.ndim == 0 and x.dtype == np.int32
  }  # ScheduleState and adam counts.
  step = _step(tx)
  resumed = _run(step, restored["params"], restored["opt_state"], param_shardings, SAVE_AT, STEPS)
  full = _run(step, params0, state0, param_shardings, 0, STEPS)
  # Control: the same two steps from the restored parameters but a fresh state (counts 0,
  # zero moments) end elsewhere, so the comparison depends on the restored state.
  fresh = _run(step, restored["params"], state0, param_shardings, SAVE_AT, STEPS)
  got = _flat({"params": resumed[0], "opt_state": resumed[1]})
  want = _flat({"params": full[0], "opt_state": full[1]})
  first = dict(np.load(os.path.join(workdir, "uninterrupted.npz")))

  def identical(a, b):
    return a.keys() == b.keys() and all(
      a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )

  start = _params_np()
  return {
    "restored_counts_are_3": counts == {SAVE_AT},
    "restored_shardings_kept": restored_kept,
    "bit_identical_to_uninterrupted": identical(got, want),
    "bit_identical_to_first_processes": identical(got, first),
    "fresh_state_differs": not identical(_flat({"params": fresh[0]}), _flat({"params": full[0]})),
    "weights_moved": not np.array_equal(
      got["['params']['rows']['kernel']"], start["rows"]["kernel"]
    ),
    "leaves": len(got),
  }


# --- main ------------------------------------------------------------------------------------


def _table(rows) -> str:
  width = max(len(r["transform"]) for r in rows)
  lines = [
    f"{'transform':<{width}}  {'mesh':<8}  {'place':<6}  equal  kept   rel err   "
    "collectives (element count of each all-reduced vector)"
  ]
  for r in rows:
    detail = ",".join(r["collectives"]) or "none"
    if not r["ok"]:
      detail += "  FAIL: " + "; ".join(r["problems"])[:100]
    lines.append(
      f"{r['transform']:<{width}}  {r['mesh']:<8}  {r['placement']:<6}  "
      f"{r['equal']!s:<5}  {r['shardings_kept']!s:<5}  {r['max_rel_err']:8.1e}  {detail}"
    )
  return "\n".join(lines)


_T0 = time.perf_counter()


def _log(what: str) -> None:
  print(
    f"[process {jax.process_index()}] {what} at {time.perf_counter() - _T0:.1f} s",
    file=sys.stderr,
    flush=True,
  )


def _context(mesh, kind):
  """``jax.set_mesh`` for explicit axes (JAX requires it, e.g. for ``jax.jit(adam.init)``);
  nothing for auto axes, whose shardings travel with the arrays."""
  return jax.set_mesh(mesh) if kind == "explicit" else contextlib.nullcontext()


def main(argv) -> int:
  phase, process_id, num_processes, port, workdir = argv
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=int(num_processes),
    process_id=int(process_id),
    initialization_timeout=120,
  )
  assert jax.process_count() == 2 and jax.device_count() == 2 * LOCAL_DEVICES, jax.devices()
  _log("initialized")
  if phase == "run":
    mesh = _mesh("explicit")
    print(
      "MESH "
      + json.dumps({"process_of_device": [[d.process_index for d in row] for row in mesh.devices]}),
      flush=True,
    )
    rows = []
    for kind in ("explicit", "auto"):
      mesh = _mesh(kind)
      entries: list[Any] = [e for e in REGISTRY if "multihost" not in e.skip] + [GROUPS]
      for entry in entries:
        if entry.placement not in ("before", "after", "wraps", "optimizer"):
          continue  # A transform with another placement needs its own chain.
        try:
          cell = check_cell(mesh, kind, entry)
        except Exception as error:  # Report, do not hide, a crash in one cell.
          cell = {
            "mesh": kind,
            "transform": entry.name,
            "placement": entry.placement,
            "per_unit": entry.per_unit,
            "equal": False,
            "max_rel_err": float("inf"),
            "shardings_kept": False,
            "collectives": [],
            "ok": False,
            "problems": [f"{type(error).__name__}: {error}"[:500]],
            "traceback": traceback.format_exc()[-3000:],
          }
        rows.append(cell)
        print("RESULT " + json.dumps(cell), flush=True)
      follows = init_follows_params(mesh, kind)
      print(
        "INIT " + json.dumps({"mesh": kind, "plain_jit_init_follows_params": follows}), flush=True
      )
    _log("matrix done")
    print("DIAG " + json.dumps(diagnostics(_mesh("explicit"))), flush=True)
    _log("diagnostics done")
    with _context(_mesh(CKPT_MESH), CKPT_MESH):
      print("CKPT " + json.dumps(checkpoint_save(_mesh(CKPT_MESH), workdir)), flush=True)
    _log("checkpoint saved")
    if jax.process_index() == 0:
      print(
        "\n2 processes x 4 CPU devices, mesh ('x': 2 = the processes, 'y': 4); every "
        "transform chained around sgd(0.1, momentum=0.9), 5 steps, vs one local device:"
      )
      print(_table(rows))
      print(f"{GROUPS.name}: {GROUPS.rules}")
  elif phase == "resume":
    with _context(_mesh(CKPT_MESH), CKPT_MESH):
      print("CKPT " + json.dumps(checkpoint_resume(_mesh(CKPT_MESH), workdir)), flush=True)
    _log("checkpoint resumed")
  else:
    raise SystemExit(f"unknown phase {phase!r}")
  print("DONE", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
