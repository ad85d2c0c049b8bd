"""Many hosts: every transform under multi-controller JAX (``jax.distributed``), on this
machine: 2 processes x 4 CPU devices on 127.0.0.1, gloo collectives, a 2x4 mesh whose
``x`` axis is the process axis (``tests/multihost_check.py`` does the work).

Phase ``run`` (2 fresh processes): the transforms x meshes table (equal to one local
device, shardings kept, only the norm-vector all-reduces), the diagnostics on arrays that
are not fully addressable, and an orbax checkpoint after 3 of 5 steps. Phase ``resume``
(2 new processes): restore, 2 more steps, bit-identical to the uninterrupted run.

One test function on purpose: under ``pytest -n 2`` the tests of a module may land on both
workers, and a module fixture would then start the 4 processes twice.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
from _registry import REGISTRY

SCRIPT = pathlib.Path(__file__).with_name("multihost_check.py")
# Two processes run every registry entry on both mesh flavours: 395-439 s on the 2-core box
# (480 s timed out once beside another test worker); a hang still ends here.
TIMEOUT_S = 900
MESHES = ("explicit", "auto")

# Explicit mesh axes (jax.set_mesh): every transform passes. (The magnitude budgets gather a
# block axis whose shards cut blocks and rank without cumsum or reshape of the leaf; the
# spectral constraint peels its first power-iteration round so the loop carry keeps its
# sharding.) A transform that fails there again goes here, with its reason; the test fails
# when one of them starts to pass.
KNOWN_EXPLICIT: set[str] = set()
# Transforms that read more than one unit at a time: they communicate more than norm vectors.
COMMUNICATES = {
  "constrain_sparsity",
  "constrain_n_of_m",
  "constrain_spectral_norm",
  "prox_adam",
  "cpr",  # one scalar all-reduce per matrix (its R)
  "regularize (3 groups)",
}
# Rank-based budgets are discontinuous in the input (a 1-ulp difference can flip a near-tie),
# but their magnitudes are element-wise (no reduction order) and ranked as materialized once:
# they must match one device exactly too. A transform listed here is checked for kept
# shardings only.
DISCONTINUOUS: set[str] = set()
# Cells that differ from one device with shardings kept, each with its reason; the test fails
# when one starts to match. (Was: constrain_n_of_m on auto axes, max rel. error 0.51 after 5
# momentum steps. Not a multi-host problem: XLA:CPU contracted w + (-lr)·g into an FMA in
# only some of the fused copies of |w + u|, so an entry outranked itself on the (4, 16)
# shards; tests/xla_fma_repro.py. Fixed by materializing the magnitudes once.)
KNOWN_MISMATCH: set[tuple[str, str]] = set()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _show(procs) -> str:
  parts = []
  for i, streams in enumerate(procs):
    out, err = ("\n".join(x for x in s.splitlines() if not x.startswith("[Gloo]")) for s in streams)
    parts.append(
      f"--- process {i} stdout ---\n{out[-6000:]}\n--- process {i} stderr ---\n{err[-6000:]}"
    )
  return "\n".join(parts)


def _launch(phase: str, workdir: pathlib.Path) -> list[tuple[int, str, str]]:
  """Start the 2 processes of `phase`; wait for both (a crashed one's peer, which would
  block in a collective, gets 20 s, then is killed). Returns (returncode, stdout, stderr)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  logs = [
    (open(workdir / f"{phase}.{i}.out", "w+"), open(workdir / f"{phase}.{i}.err", "w+"))
    for i in range(2)
  ]
  procs = [
    subprocess.Popen(
      [sys.executable, str(SCRIPT), phase, str(i), "2", str(port), str(workdir)],
      stdout=out,
      stderr=err,
      env=env,
      cwd=SCRIPT.parent,
    )
    for i, (out, err) in enumerate(logs)
  ]
  deadline = time.monotonic() + TIMEOUT_S
  failed_at = None
  while any(p.poll() is None for p in procs):
    now = time.monotonic()
    if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
      failed_at = now
    if now > deadline or (failed_at is not None and now > failed_at + 20):
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.2)
  results = []
  for p, (out, err) in zip(procs, logs):
    p.wait()
    out.seek(0)
    err.seek(0)
    results.append((p.returncode, out.read(), err.read()))
    out.close()
    err.close()
  return results


def _lines(stdout: str, tag: str) -> list:
  return [
    json.loads(line[len(tag) + 1 :]) for line in stdout.splitlines() if line.startswith(tag + " ")
  ]


@pytest.mark.slow
def test_transforms_diagnostics_and_checkpoint_on_two_processes(tmp_path):
  started = time.perf_counter()
  run = _launch("run", tmp_path)
  detail = _show([(o, e) for _, o, e in run])
  assert all(rc == 0 and "DONE" in out for rc, out, _ in run), (
    f"returncodes {[rc for rc, _, _ in run]} (timeout {TIMEOUT_S} s)\n{detail}"
  )
  resume = _launch("resume", tmp_path)
  detail_resume = _show([(o, e) for _, o, e in resume])
  assert all(rc == 0 and "DONE" in out for rc, out, _ in resume), (
    f"returncodes {[rc for rc, _, _ in resume]}\n{detail_resume}"
  )
  print(
    "\n".join(line for line in run[0][1].splitlines() if not line.startswith(("RESULT ", "[Gloo]")))
  )
  print(f"two phases, 2 processes each: {time.perf_counter() - started:.1f} s")

  # The table: every registry entry with a chain placement, on both meshes, in both processes.
  names = [
    e.name
    for e in REGISTRY
    if e.placement in ("before", "after", "optimizer") and "multihost" not in e.skip
  ]
  names.append("regularize (3 groups)")
  tables = [_lines(out, "RESULT") for _, out, _ in run]
  for cells in tables:
    assert sorted((c["mesh"], c["transform"]) for c in cells) == sorted(
      (m, n) for m in MESHES for n in names
    ), detail
  assert [(c["ok"], c["equal"], c["shardings_kept"]) for c in tables[0]] == [
    (c["ok"], c["equal"], c["shardings_kept"]) for c in tables[1]
  ], detail

  known = [c for c in tables[0] if c["mesh"] == "explicit" and c["transform"] in KNOWN_EXPLICIT]
  others = [c for c in tables[0] if c not in known]
  mismatched = [c for c in others if (c["mesh"], c["transform"]) in KNOWN_MISMATCH]
  assert all(not c["equal"] and c["shardings_kept"] for c in mismatched), (
    f"{mismatched} now match: remove them from KNOWN_MISMATCH"
  )
  failed = [
    c
    for c in others
    if (c["mesh"], c["transform"]) not in KNOWN_MISMATCH
    and not (c["ok"] and (c["equal"] or c["transform"] in DISCONTINUOUS) and c["shardings_kept"])
  ]
  assert not failed, json.dumps(failed, indent=1)
  fixed = [c["transform"] for c in known if c["ok"]]
  assert not fixed, f"{fixed} now pass on the explicit mesh: remove them from KNOWN_EXPLICIT"
  assert all("Sharding" in c["problems"][0] or "carry" in c["problems"][0] for c in known), (
    json.dumps(known, indent=1)
  )

  # What the library adds to the communication: nothing for element-wise transforms; for
  # per-unit ones, only all-reduces of norm vectors, the same few per leaf whose reduced axis
  # is sharded (the check verifies the vector lengths: units of those leaves).
  # (Power iteration and prox_adam's group solve reduce more: checked for equality only.)
  per_unit = {e.name for e in REGISTRY if e.per_unit} - COMMUNICATES
  for cell in others:
    if cell["transform"] in per_unit:
      assert all(c.startswith("all-reduce[") for c in cell["collectives"]), cell
      assert cell["vectors_per_leaf"] in (1, 2, 3), cell
    elif cell["transform"] not in COMMUNICATES:
      assert cell["collectives"] == [] and cell["vectors_per_leaf"] == 0, cell
  assert len({c["vectors_per_leaf"] for c in others if c["transform"] in per_unit}) == 1

  # Diagnostics on arrays that are not fully addressable.
  for _, out, _ in run:
    (diag,) = _lines(out, "DIAG")
    assert not any(diag["fully_addressable"]), diag
    for key in (
      "norm_report_jit",
      "norm_report_eager",
      "decay_resolution_report_float32",
      "decay_resolution_report_bfloat16",
    ):
      assert diag[key]["ok"], (key, diag[key])

  # Checkpoint: restored in new processes, resumed bit-identical; the control differs.
  for _, out, _ in resume:
    (ckpt,) = _lines(out, "CKPT")
    assert ckpt.pop("leaves") > 0
    assert all(ckpt.values()), ckpt
