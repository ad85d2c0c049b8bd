"""Minimal reproduction (JAX + NumPy only) of the XLA:CPU behaviour behind the 2-process
``constrain_n_of_m`` mismatch: one HLO value compares greater than itself.

``rank[i] = #{j : a[j] > a[i]}`` with ``a = |w + g·c|`` computed in the same jitted function.
XLA fuses everything into one loop and recomputes ``a`` separately for each operand of the
comparison (the ``a[j]`` and the ``a[i]`` broadcasts). LLVM then contracts ``w + g·c`` into
a fused multiply-add (one rounding) in the ``a[j]`` copy, where the product has a single
use, but not in the ``a[i]`` copy, whose product ``u = g·c`` is shared with the output
``where(rank < 2, u, -w)`` (two roundings). Where the two differ by 1 ulp, ``a[i] > a[i]``
holds, ``i`` outranks itself and a block of 4 keeps 1 entry instead of 2. Not a multi-host
or gloo problem: one device suffices; the per-device shard shape (4, 16) of the 2x4 mesh
happened to compile into a loop that shows it, the (32, 16) reference did not.
``--xla_backend_optimization_level=0`` makes it go away; ``lax.optimization_barrier`` does
not (XLA:CPU removes barriers before fusion). Seen with jaxlib 0.10.2 (10 of 50 draws); jaxlib
0.5.1 (the oldest supported) gives 0 of 50. Related: openxla/xla#22116 (jax#26147).

Run ``python tests/xla_fma_repro.py``: prints how many of 50 draws rank wrongly and checks
that every wrong entry is explained by "FMA in the a[j] copy, plain in the a[i] copy".
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

C = np.float32(-0.1)


@jax.jit
def keep_two_of_four(w, g):
  u = g * C
  a = jnp.abs(w + u)  # [4, cols]: one block of 4 along axis 0.
  rank = jnp.sum(a[None, :, :] > a[:, None, :], axis=1, dtype=jnp.int32)  # #{j: a_j > a_i}
  return jnp.where(rank < 2, u, -w)


def main() -> None:
  rng = np.random.default_rng(0)
  wrong_draws = wrong = explained = 0
  for _ in range(50):
    w = rng.normal(size=(4, 8)).astype(np.float32)
    g = rng.normal(size=(4, 8)).astype(np.float32)
    kept = np.asarray(keep_two_of_four(w, g)) != -w
    plain = np.abs(w + g * C)  # Two roundings, as the HLO says.
    fused = np.abs((w.astype(np.float64) + g.astype(np.float64) * np.float64(C)).astype(np.float32))
    want = (plain[None] > plain[:, None]).sum(axis=1) < 2
    mixed = (fused[None] > plain[:, None]).sum(axis=1) < 2  # a[j] fused, a[i] plain.
    bad = np.argwhere(kept != want)
    wrong_draws += len(bad) > 0
    wrong += len(bad)
    explained += sum(bool(mixed[i, c] == kept[i, c]) for i, c in bad)
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}: {wrong_draws} of 50 draws keep the "
    f"wrong entries ({wrong} entries, {explained} explained by an FMA in one copy only)"
  )


if __name__ == "__main__":
  main()
