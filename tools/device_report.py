"""One call on a GPU/TPU (or any JAX device): exactness checks there, then the costs, as Markdown.

    python tools/device_report.py --out docs/device-report.md          # one GPU, < 10 min
    python tools/device_report.py --size tiny --out /tmp/report.md     # a smoke run on a CPU

Needs only ``jax`` and ``optax`` (no flax, no pytest): the machine that runs it may have nothing
else. It writes the file twice: after the exactness checks (so a run cut off during timing still
leaves them) and at the end.

1. **Exactness** (XLA:GPU fuses differently from XLA:CPU, so the guarantees are checked where
   they run): every constraint's bound on the stored values after ``optax.apply_updates``, in
   float32, bfloat16 and float16, eagerly and inside one fused ``jax.jit`` step (``jax.grad``,
   update, apply), on units a rounding away from the bound; the unit norm on float32 units whose
   plain sum of squares overflows or underflows (entries 1e-28 … 1e30); the exact counts of
   ``constrain_sparsity`` and ``constrain_n_of_m``; NaN containment (a NaN gradient entry makes
   its own unit NaN, no other). Each check compares float64 NumPy with the stored values.
2. **Costs**: ``python -m optax_norms bench`` on one big leaf (paired ratios against the bare
   optimizer, the hand-written ``jnp`` version and the optax peer, beside the bandwidth of a
   copy, as passes over the leaf), then a plain-JAX 8-layer MLP adam step against the published
   anchors (optax masked decay at the copy peak; a hand-written per-unit projection at 0.64 of
   it; MLP 8×2048: masked L2 1.00×, hand max-norm 1.10×, ``adaptive_grad_clip`` 1.14× the bare
   adam step; one H200, jax 0.11.2).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optax_norms as on  # noqa: E402
from optax_norms.tools import bench  # noqa: E402

C, MIN_NORM, MAX_ABS = 1.0, 0.5, 0.05  # MAX_ABS is not representable in bf16/f16.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CONSTRAINTS = {
  "constrain_row_norm": lambda: on.constrain_row_norm(C),
  "constrain_min_max_norm": lambda: on.constrain_min_max_norm(MIN_NORM, C),
  "constrain_unit_norm": lambda: on.constrain_unit_norm(),
  "constrain_max_abs": lambda: on.constrain_max_abs(MAX_ABS),
  "constrain_non_negative": lambda: on.constrain_non_negative(),
}
# The transforms whose costs the report times on the big leaf.
TIMED = (
  "add_l2_decay",
  "add_max_norm_decay",
  "clip_by_max_abs",
  "clip_by_row_norm",
  "constrain_max_abs",
  "constrain_row_norm",
  "constrain_unit_norm",
  "constrain_min_max_norm",
  "prox_group_l2",
  "constrain_n_of_m",
  "constrain_sparsity",
)
# size -> the MLP's width and batch, steps per timed call and repeats.
MLP = {
  "tiny": dict(width=32, batch=16, steps=2, repeats=2),
  "small": dict(width=256, batch=64, steps=10, repeats=5),
  "medium": dict(width=1024, batch=256, steps=20, repeats=7),
  "large": dict(width=2048, batch=512, steps=50, repeats=9),
}
ANCHORS = {"l2_ours": 1.00, "maxnorm_hand": 1.10, "agc": 1.14}


# ---------------------------------------------------------------------------------------------
# Exactness.


def _excess(name: str, stored, before) -> float:
  """How far the stored (in, out) kernel is outside the bound, in float64 (> 0: broken).

  The unit norm's documented band is ``1 − δ − 2ε·(‖w_unit‖ + 2) ≤ ‖w_unit‖_new ≤ 1`` with
  ``δ = (2·√n + 8)·2⁻²⁴`` and ``ε`` the leaf dtype's unit roundoff (``before`` is ``w``)."""
  k = np.asarray(stored, np.float64)
  if name == "constrain_max_abs":
    return float(np.abs(k).max() - MAX_ABS)
  if name == "constrain_non_negative":
    return float(-k.min())
  norms = np.sqrt(np.sum(k * k, axis=0))
  if name == "constrain_unit_norm":
    w = np.asarray(before, np.float64)
    delta = (2 * np.sqrt(k.shape[0]) + 8) * 2.0**-24
    roundoff = float(jnp.finfo(stored.dtype).eps) / 2
    lower = 1 - delta - 2 * roundoff * (np.sqrt(np.sum(w * w, axis=0)) + 2)
    return float(max(norms.max() - 1, (lower - norms).max()))
  if name == "constrain_min_max_norm":
    return float(max(norms.max() - C, MIN_NORM - norms.min()))
  return float(norms.max() - C)


def _near_bound(dtype, seed: int, rows: int, cols: int):
  """A kernel whose units have norm ≈ C and a linear loss with a fixed small gradient: after
  one step many units are a rounding away from the bound."""
  rng = np.random.default_rng(seed)
  d = rng.normal(size=(rows, cols))
  d *= C / np.sqrt(np.sum(d * d, axis=0))
  d[:, : cols // 4] *= 1.5  # Some units far outside, to be projected.
  g = jnp.asarray(rng.normal(size=(rows, cols)) * 0.01, dtype)
  params = {"kernel": jnp.asarray(d, dtype)}

  def loss(p):
    return jnp.sum(p["kernel"].astype(jnp.float32) * g.astype(jnp.float32))

  return params, loss


def _step(tx, loss, fused: bool):
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step) if fused else step


def _bound_checks(side: int) -> list[dict]:
  rows = []
  for name, make in CONSTRAINTS.items():
    for dtype_name, dtype in DTYPES.items():
      for fused in (False, True):
        worst = -np.inf
        for opt in (optax.sgd(0.1), optax.adam(1e-3, eps=1e-3)):
          tx = optax.chain(opt, make())
          for seed in range(2):
            params, loss = _near_bound(dtype, seed, side, side // 2)
            step, state = _step(tx, loss, fused), tx.init(params)
            for _ in range(3):
              before = params["kernel"]
              params, state = step(params, state)
              assert params["kernel"].dtype == dtype
              worst = max(worst, _excess(name, params["kernel"], before))
        rows.append(
          {
            "check": f"`{name}` bound on stored values",
            "case": f"{dtype_name}, {'fused jit step' if fused else 'eager'}",
            "value": f"excess {worst:.1e}",
            "ok": bool(worst <= 0),
          }
        )
  return rows


def _magnitude_checks(side: int) -> list[dict]:
  """Units of float32 entries from 1e-28 to 1e30 (sums of squares that overflow or
  underflow; below ~5e-29 XLA:CPU's flushed subnormals make a unit count as zero): the unit norm
  is within its band, the max-norm bound holds, nothing is inf or NaN."""
  rng = np.random.default_rng(7)
  scales = np.logspace(-28, 30, side // 2)
  w = rng.normal(size=(side, side // 2)) * scales
  params = {"kernel": jnp.asarray(w, jnp.float32)}
  zeros = {"kernel": jnp.zeros_like(params["kernel"])}
  rows = []
  for name in ("constrain_unit_norm", "constrain_row_norm"):
    for fused in (False, True):
      tx = CONSTRAINTS[name]()

      def apply(p, tx=tx):
        u, _ = tx.update(zeros, tx.init(p), p)
        return optax.apply_updates(p, u)

      stored = (jax.jit(apply) if fused else apply)(params)["kernel"]
      finite = bool(np.isfinite(np.asarray(stored, np.float64)).all())
      excess = _excess(name, stored, params["kernel"])
      rows.append(
        {
          "check": f"`{name}` on units of 1e-28 … 1e30 (float32)",
          "case": "fused jit" if fused else "eager",
          "value": f"excess {excess:.1e}, finite {finite}",
          "ok": finite and excess <= 0,
        }
      )
  return rows


def _budget_checks(side: int) -> list[dict]:
  rng = np.random.default_rng(3)
  rows = []
  for dtype_name, dtype in DTYPES.items():
    w = jnp.asarray(rng.normal(size=(side, side // 2)), dtype)
    u = jnp.asarray(rng.normal(size=w.shape) * 0.1, dtype)
    for fused in (False, True):
      for label, tx, ok in (
        (
          "`constrain_sparsity(0.7)`: zeros",
          on.constrain_sparsity(0.7),
          lambda x: int((x == 0).sum()) == int(np.floor(0.7 * x.size + 1e-6)),
        ),
        (
          "`constrain_n_of_m(2, 4)`: nonzeros per block of 4",
          on.constrain_n_of_m(2, 4),
          lambda x: bool(((x.reshape(-1, 4, x.shape[1]) != 0).sum(axis=1) == 2).all()),
        ),
      ):

        def apply(p, tx=tx, u=u):
          upd, _ = tx.update({"kernel": u}, tx.init(p), p)
          return optax.apply_updates(p, upd)["kernel"]

        stored = np.asarray((jax.jit(apply) if fused else apply)({"kernel": w}), np.float64)
        rows.append(
          {
            "check": label,
            "case": f"{dtype_name}, {'fused jit' if fused else 'eager'}",
            "value": f"{int((stored == 0).sum())} zeros of {stored.size}",
            "ok": ok(stored),
          }
        )
  return rows


def _nan_checks(side: int) -> list[dict]:
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.normal(size=(side, side // 2)), jnp.float32)
  g = np.asarray(rng.normal(size=w.shape), np.float32)
  g[1, 2] = np.nan  # One NaN in unit (column) 2.
  rows = []
  for name, tx in (
    ("clip_by_row_norm", on.clip_by_row_norm(C)),
    ("constrain_row_norm", on.constrain_row_norm(C)),
    ("prox_group_l2", on.prox_group_l2(1e-2, 1e-2)),
  ):
    for fused in (False, True):

      def update(p, tx=tx):
        return tx.update({"kernel": jnp.asarray(g)}, tx.init(p), p)[0]["kernel"]

      out = np.asarray((jax.jit(update) if fused else update)({"kernel": w}))
      nan_units = sorted(set(np.nonzero(np.isnan(out))[1].tolist()))
      rows.append(
        {
          "check": f"`{name}`: NaN containment",
          "case": "fused jit" if fused else "eager",
          "value": f"NaN units {nan_units}",
          "ok": nan_units == [2],
        }
      )
  return rows


def exactness(side: int) -> list[dict]:
  """Every check as ``{"check", "case", "value", "ok"}``."""
  return _bound_checks(side) + _magnitude_checks(side) + _budget_checks(side) + _nan_checks(side)


# ---------------------------------------------------------------------------------------------
# Costs.


def _paired(fns: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each compiled function, alternated repeat after repeat."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  names = list(fns)
  for r in range(repeats):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      start = time.perf_counter()
      jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - start)
  return times


def _hand_max_norm(g, w):
  v = w + g
  norm = jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))
  return v * jnp.minimum(1.0, C / jnp.maximum(norm, 1e-7)) - w


def _hand(rule):
  def update(updates, state, params=None):
    new = {
      k: {"kernel": rule(u["kernel"], params[k]["kernel"]), "bias": u["bias"]}
      for k, u in updates.items()
    }
    return new, state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def mlp_step(size: str) -> dict:
  """A plain-JAX 8-layer ReLU MLP, adam, each variant against the bare step (paired)."""
  cfg = MLP[size]
  width, batch, steps = cfg["width"], cfg["batch"], cfg["steps"]
  keys = jax.random.split(jax.random.PRNGKey(0), 10)
  params = {
    f"layer{i}": {
      "kernel": jax.random.normal(keys[i], (width, width)) / np.sqrt(width),
      "bias": jnp.zeros(width),
    }
    for i in range(8)
  }
  x = jax.random.normal(keys[8], (batch, width))
  y = jax.random.normal(keys[9], (batch, width))

  def loss(p):
    h = x
    for i in range(8):
      h = h @ p[f"layer{i}"]["kernel"] + p[f"layer{i}"]["bias"]
      h = jax.nn.relu(h) if i < 7 else h
    return jnp.mean((h - y) ** 2)

  def kernels(p):
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", p)

  adam, mask = (lambda: optax.adam(1e-3)), "**/kernel"
  txs = {
    "base": adam(),
    "l2_ours": optax.chain(on.add_l2_decay(1e-4, mask=mask), adam()),
    "l2_optax": optax.chain(optax.add_decayed_weights(2e-4, mask=kernels), adam()),
    "maxnorm_ours": optax.chain(adam(), on.constrain_row_norm(C, mask=mask)),
    "maxnorm_hand": optax.chain(adam(), _hand(_hand_max_norm)),
    "clip_ours": optax.chain(on.clip_by_row_norm(C, mask=mask), adam()),
    "agc": optax.chain(optax.masked(optax.adaptive_grad_clip(0.05), kernels), adam()),
    "all_ours": optax.chain(
      on.clip_by_row_norm(C, mask=mask),
      on.add_l2_decay(1e-4, mask=mask),
      adam(),
      on.constrain_row_norm(C, mask=mask),
    ),
  }

  def compiled(tx):
    def run(p, s):
      def body(_, carry):
        p, s = carry
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

      return jax.lax.fori_loop(0, steps, body, (p, s))

    state = tx.init(params)
    start = time.perf_counter()
    fn = jax.jit(run).lower(params, state).compile()
    return (lambda: fn(params, state)), time.perf_counter() - start

  built = {k: compiled(tx) for k, tx in txs.items()}
  times = _paired({k: fn for k, (fn, _) in built.items()}, cfg["repeats"])
  rows = []
  for name in txs:
    ratio = statistics.median(a / b for a, b in zip(times[name], times["base"]))
    rows.append(
      {
        "variant": name,
        "us_per_step": 1e6 * statistics.median(times[name]) / steps,
        "x_base": ratio,
        "anchor": ANCHORS.get(name),
        "compile_s": built[name][1],
      }
    )
  return {"width": width, "batch": batch, "rows": rows}


def big_leaf(size: str, repeats: int | None, only: tuple[str, ...]) -> dict:
  """``python -m optax_norms bench`` on its one big leaf, read back from its JSON."""
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "bench.json"
    argv = ["--size", size, "--trees", "big", "--only", ",".join(only)]
    argv += ["--json", str(path), "--no-progress"]
    argv += ["--repeats", str(repeats)] if repeats else []
    status = bench.main(argv)
    if status:
      raise SystemExit(f"bench failed with status {status}")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Markdown.


def _f(x, spec=".2f") -> str:
  return "–" if x is None else format(x, spec)


def markdown(meta: dict, checks: list[dict], results: dict | None, mlp: dict | None) -> str:
  lines = [
    f"## Device report: {meta['device_kind']} ({meta['platform']})",
    "",
    f"jax {meta['jax']}, optax {meta['optax']}, optax_norms {meta['optax_norms']}, "
    f"size {meta['size']}; `python tools/device_report.py`, {meta['elapsed_s']:.0f} s.",
    "",
    f"### Exactness: {sum(c['ok'] for c in checks)} of {len(checks)} checks pass",
    "",
    "| check | case | measured (float64 on stored values) | |",
    "|---|---|---|---|",
  ]
  lines += [
    f"| {c['check']} | {c['case']} | {c['value']} | {'PASS' if c['ok'] else '**FAIL**'} |"
    for c in checks
  ]
  if results is not None:
    big = results["trees"]["big"]
    copy_s = big["copy"]["us_per_step"] * 1e-6
    lines += [
      "",
      f"### One leaf of {big['n_params']:,} float32 entries; a copy (read + write) takes "
      f"{big['copy']['us_per_step']:.0f} us = {big['copy']['gb_per_s']:.0f} GB/s",
      "",
      "Passes = time × copy bandwidth / leaf bytes (a copy is 2 passes; the bare sgd step "
      "reads w and t and writes w: 3).",
      "",
      "| transform | opt | × bare | × hand | × optax peer | passes ours / hand / peer | "
      "compile s ours / hand |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in big["rows"]:
      us = r["us_per_step"]
      passes = {k: 2 * (v * 1e-6) / copy_s for k, v in us.items()}
      comp = r["compile_s"]
      lines.append(
        f"| `{r['transform']}` | {r['optimizer']} | {_f(r['ratio_vs_base'])} | "
        f"{_f(r['ratio_vs_hand'])} | {_f(r['ratio_vs_peer'])} | "
        f"{_f(passes['ours'], '.1f')} / {_f(passes.get('hand'), '.1f')} / "
        f"{_f(passes.get('peer'), '.1f')} | {comp['ours']:.2f} / {_f(comp.get('hand'))} |"
      )
  if mlp is not None:
    lines += [
      "",
      f"### MLP step: 8 layers of {mlp['width']}×{mlp['width']}, batch {mlp['batch']}, adam "
      "(plain JAX)",
      "",
      "| variant | us/step | × bare adam | published anchor (H200) | compile s |",
      "|---|---|---|---|---|",
    ]
    lines += [
      f"| {r['variant']} | {r['us_per_step']:.0f} | {r['x_base']:.3f} | {_f(r['anchor'])} | "
      f"{r['compile_s']:.2f} |"
      for r in mlp["rows"]
    ]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python tools/device_report.py", description=__doc__)
  parser.add_argument("--size", choices=sorted(MLP), default="large")
  parser.add_argument("--out", default="device-report.md", help="the Markdown file to write")
  parser.add_argument("--repeats", type=int, help="timed calls per bench variant")
  parser.add_argument("--only", default=",".join(TIMED), help="transforms timed on the big leaf")
  parser.add_argument("--skip-timing", action="store_true", help="the exactness checks only")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  device = jax.devices()[0]
  meta = {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "jax": jax.__version__,
    "optax": optax.__version__,
    "optax_norms": on.__version__,
    "size": args.size,
  }
  out = pathlib.Path(args.out)

  def write(checks, results=None, mlp=None):
    meta["elapsed_s"] = time.perf_counter() - start
    out.write_text(markdown(meta, checks, results, mlp))

  side = 16 if args.size == "tiny" else 64
  checks = exactness(side)
  write(checks)
  failed = [c for c in checks if not c["ok"]]
  print(f"exactness: {len(checks) - len(failed)} of {len(checks)} pass; wrote {out}")
  for c in failed:
    print(f"FAIL {c['check']} ({c['case']}): {c['value']}")
  if not args.skip_timing:
    results = big_leaf(args.size, args.repeats, tuple(args.only.split(",")))
    mlp = mlp_step(args.size)
    write(checks, results, mlp)
    print(f"wrote {out} after {time.perf_counter() - start:.0f} s")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
