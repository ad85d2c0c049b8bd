"""What the sparsity budgets cost per step on this machine, against the step itself.

For each leaf size: the time of a jitted ``optax.adam`` step (update + apply) alone, with
``constrain_sparsity(0.5)`` / ``constrain_n_of_m(2, 4)`` chained last, and — for the budget — a
hand-written ``lax.top_k`` version (static k) and a full-sort version (what
``constrain_sparsity`` did first) of the same projection. Median of repeats of a
jitted loop of ``STEPS`` steps (``lax.fori_loop``), microseconds per step. Run
``python tests/sparsity_cost.py``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_norms as on

STEPS, REPEATS = 20, 5


def _top_k_budget(fraction):
  def update(updates, state, params):
    def leaf(u, w):
      v = jnp.abs(w + u).reshape(-1)
      keep_count = v.size - int(np.floor(fraction * v.size))
      _, idx = jax.lax.top_k(v, keep_count)
      keep = jnp.zeros(v.shape, bool).at[idx].set(True).reshape(w.shape)
      return jnp.where(keep, u, -w)

    return jax.tree.map(leaf, updates, params), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def _sort_budget(fraction):
  def update(updates, state, params):
    def leaf(u, w):
      v = jnp.abs(w + u).reshape(-1)
      k = int(np.floor(fraction * v.size))
      rank = (
        jnp.zeros(v.shape, jnp.int32)
        .at[jnp.argsort(v, stable=True)]
        .set(jnp.arange(v.size, dtype=jnp.int32))
      )
      return jnp.where((rank >= k).reshape(w.shape), u, -w)

    return jax.tree.map(leaf, updates, params), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def _time(tx, params):
  grads = jax.tree.map(lambda w: 0.01 * jnp.cos(w), params)

  @jax.jit
  def run(params, state):
    def body(_, carry):
      p, s = carry
      u, s = tx.update(grads, s, p)
      return optax.apply_updates(p, u), s

    return jax.lax.fori_loop(0, STEPS, body, (params, state))

  state = tx.init(params)
  jax.block_until_ready(run(params, state))
  times = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    jax.block_until_ready(run(params, state))
    times.append(time.perf_counter() - start)
  return 1e6 * float(np.median(times)) / STEPS


def main() -> None:
  print(f"device: {jax.devices()[0].device_kind}; us per step, median of {REPEATS}x{STEPS}")
  print(f"{'leaf':>12} {'adam':>9} {'+sparsity':>10} {'+top_k':>9} {'+sort':>9} {'+2:4':>9}")
  for n in (64, 256, 1024):
    params = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)}
    adam = optax.adam(1e-3)
    base = _time(adam, params)
    sort = _time(optax.chain(adam, on.constrain_sparsity(0.5)), params)  # Bisection.
    topk = _time(optax.chain(adam, _top_k_budget(0.5)), params)
    full = _time(optax.chain(adam, _sort_budget(0.5)), params)
    nm = _time(optax.chain(adam, on.constrain_n_of_m(2, 4)), params)
    print(
      f"{n:>5}x{n:<6} {base:9.1f} {sort:10.1f} {topk:9.1f} {full:9.1f} {nm:9.1f}   "
      f"(x{sort / base:.1f}, x{topk / base:.1f}, x{full / base:.1f}, x{nm / base:.1f})"
    )


if __name__ == "__main__":
  with jax.numpy_dtype_promotion("standard"):
    main()
