"""Sparsity under Adam on the digits MLP: prox_adam vs the adam -> prox_l1 heuristic vs
adam + add_l1_decay, at three strengths each, plus unregularized.

Same MLP, data, seeds, batches and number of steps as ``tests/test_digits_sparsity.py``
(which uses SGD); the optimizer here is Adam (lr 1e-3). Run ``python
tests/digits_adam_table.py`` to print the table (about a minute on 2 CPU cores);
``tests/test_digits_adam.py`` asserts what the numbers support.
"""

from __future__ import annotations

import functools
import os
import sys

import optax

sys.path.insert(0, os.path.dirname(__file__))
from test_digits_sparsity import accuracy, hidden_weights, train  # noqa: E402

import optax_norms  # noqa: E402

LR = 1e-3
KERNELS = "**/kernel"
# Strengths per method, weakest first; each method's penalty acts on a different scale
# (prox_adam's threshold is lr·l1/d, the heuristic's lr·alpha, the subgradient's alpha·sign).
STRENGTHS = {
  "prox_adam": (1e-4, 1e-3, 1e-2),
  "adam->prox_l1": (0.1, 0.3, 1.0),
  "adam+add_l1_decay": (1e-4, 1e-3, 1e-2),
}


def make(method: str, strength: float) -> optax.GradientTransformation:
  if method == "unregularized":
    return optax.adam(LR)
  if method == "prox_adam":
    return optax_norms.prox_adam(LR, l1=strength, mask=KERNELS)
  if method == "adam->prox_l1":
    return optax.chain(optax.adam(LR), optax_norms.prox_l1(strength, LR, mask=KERNELS))
  if method == "adam+add_l1_decay":
    return optax.chain(optax_norms.add_l1_decay(strength, mask=KERNELS), optax.adam(LR))
  raise ValueError(method)


def settings(strengths=STRENGTHS):
  yield "unregularized", 0.0
  for method, values in strengths.items():
    for value in values:
      yield method, value


@functools.cache
def run(method: str, strength: float, seed: int) -> dict[str, float]:
  params = train(make(method, strength), seed)
  w = hidden_weights(params)
  return {"accuracy": accuracy(params), "exact_zeros": float((w == 0).mean())}


def table(seeds=(0,), strengths=STRENGTHS) -> list[tuple[str, float, int, dict[str, float]]]:
  return [
    (method, value, seed, run(method, value, seed))
    for seed in seeds
    for method, value in settings(strengths)
  ]


def main(argv=None) -> None:
  seeds = tuple(int(s) for s in (argv or sys.argv[1:])) or (0, 1)
  print(
    f"MLP 64-128-128-10 on digits, adam lr={LR}, same steps/batches as "
    "test_digits_sparsity.py; exact zeros over the hidden kernels"
  )
  print(f"{'seed':>4} {'method':<18} {'strength':>8} {'test acc':>8} {'exact 0':>8}")
  for method, value, seed, row in table(seeds):
    print(f"{seed:>4} {method:<18} {value:8.0e} {row['accuracy']:8.4f} {row['exact_zeros']:8.4f}")


if __name__ == "__main__":
  main()
