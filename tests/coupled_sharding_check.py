"""Coupled groups on 8 CPU devices: the head axis, or the MLP axis, sharded one group slice per
device. Run by tests/test_coupled_sharding.py in its own process (the devices must be requested
before JAX initializes). Prints one ``RESULT {json}`` line per (transform, sharded axis)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_norms as on  # noqa: E402

L, D, H, K, F = 2, 12, 8, 3, 16
HEADS = on.coupled_groups(
  "**/attn", {"query/kernel": 2, "key/kernel": 2, "value/kernel": 2, "out/kernel": 1}, stacked=True
)
NEURONS = on.coupled_groups(
  "**/mlp", {"mlp_in/kernel": -1, "mlp_in/bias": -1, "mlp_out/kernel": 1}, stacked=True
)
GROUPS = [HEADS, NEURONS]


def _trees():
  rng = np.random.default_rng(0)
  scale = np.linspace(0.05, 2.0, H).astype(np.float32)

  def normal(*shape):
    return rng.normal(size=shape).astype(np.float32)

  attn = {n: {"kernel": normal(L, D, H, K) * scale[:, None]} for n in ("query", "key", "value")}
  attn["out"] = {"kernel": normal(L, H, K, D) * scale[:, None, None]}
  mlp = {
    "mlp_in": {"kernel": normal(L, D, F) * np.linspace(0.05, 2, F), "bias": normal(L, F)},
    "mlp_out": {"kernel": normal(L, F, D)},
  }
  params = {"blocks": {"attn": attn, "mlp": mlp}}
  grads = jax.tree.map(lambda x: np.cos(3 * x).astype(np.float32), params)
  return params, grads


def _specs(which):
  """One group slice per device along the head axis (attention) or the MLP axis."""
  heads = which == "heads"
  attn_in = P(None, None, "m", None) if heads else P()
  attn_out = P(None, "m", None, None) if heads else P()
  mlp_in = P(None, None, "m") if not heads else P()
  return {
    "blocks": {
      "attn": {n: {"kernel": attn_in} for n in ("query", "key", "value")}
      | {"out": {"kernel": attn_out}},
      "mlp": {
        "mlp_in": {"kernel": mlp_in, "bias": P(None, "m") if not heads else P()},
        "mlp_out": {"kernel": P(None, "m", None) if not heads else P()},
      },
    }
  }


TRANSFORMS = {
  "prox_group_l2": lambda: optax.chain(optax.adam(0.1), on.prox_group_l2(3.0, 0.1, groups=GROUPS)),
  "constrain_group_sparsity": lambda: optax.chain(
    optax.adam(0.1), on.constrain_group_sparsity(0.5, groups=GROUPS)
  ),
  "constrain_group_sparsity_periodic": lambda: optax.chain(
    optax.adam(0.1), on.constrain_group_sparsity(0.5, groups=GROUPS, update_every=2)
  ),
  "prox_adam": lambda: on.prox_adam(0.1, group=3.0, groups=GROUPS),
}


def _run(tx, params, grads, steps=3):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def main() -> int:
  mesh = jax.make_mesh((8,), ("m",))
  params_np, grads_np = _trees()
  ok = True
  for which in ("heads", "mlp"):
    specs = _specs(which)
    shardings = jax.tree.map(
      lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )
    for name, make in TRANSFORMS.items():
      single = _run(
        make(), jax.tree.map(jnp.asarray, params_np), jax.tree.map(jnp.asarray, grads_np)
      )
      params = jax.tree.map(jax.device_put, params_np, shardings)
      grads = jax.tree.map(jax.device_put, grads_np, shardings)
      sharded = _run(make(), params, grads)
      errors = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), sharded[0], single[0]
      )
      zeros_equal = all(
        bool(np.array_equal(np.asarray(a) == 0, np.asarray(b) == 0))
        for a, b in zip(jax.tree.leaves(sharded[0]), jax.tree.leaves(single[0]))
      )
      kept = all(
        a.sharding.is_equivalent_to(s, a.ndim)
        for a, s in zip(jax.tree.leaves(sharded[0]), jax.tree.leaves(shardings))
      )
      report = on.group_report(sharded[0], GROUPS)
      report_single = on.group_report(single[0], GROUPS)
      zero_groups = {k: np.asarray(v["zero_groups"]).tolist() for k, v in report.items()}
      report_equal = zero_groups == {
        k: np.asarray(v["zero_groups"]).tolist() for k, v in report_single.items()
      }
      cell = {
        "transform": name,
        "sharded": which,
        "max_abs_err": max(jax.tree.leaves(errors)),
        "zeros_equal": zeros_equal,
        "shardings_kept": kept,
        "report_equal": report_equal,
        "zero_groups": zero_groups,
      }
      cell["ok"] = cell["max_abs_err"] <= 1e-5 and zeros_equal and kept and report_equal
      ok = ok and cell["ok"]
      print("RESULT " + json.dumps(cell), flush=True)
  print("ALL_OK" if ok else "FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
