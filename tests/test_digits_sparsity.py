"""Exact zeros in a real network: a Flax MLP on scikit-learn's digits.

Three runs with the same seed, data order and optimizer (``optax.sgd``):

* unregularized;
* ``prox_l1(α, lr)`` after the optimizer (proximal SGD): most hidden weights become exactly
  zero, at (about) the same test accuracy;
* ``add_l1_decay(α)`` before the optimizer (the subgradient of the same penalty): the weights
  hover within ~``lr·α`` of zero but are (almost) never exactly zero.

Run ``python tests/test_digits_sparsity.py`` to print the table.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import optax_norms

pytestmark = pytest.mark.slow

LR = 0.1
ALPHA = 1e-3
STEPS = 2000
BATCH = 128
SEEDS = (0, 1)
HIDDEN = ("Dense_0", "Dense_1")  # 64x128 and 128x128: the hidden layers' kernels.


class MLP(nn.Module):
  """64 -> 128 -> 128 -> 10, ReLU."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128)(x))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


@functools.lru_cache(maxsize=1)
def digits():
  """Standardized digits (statistics of the training split), fixed stratified split."""
  x, y = load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
  mean, std = x_tr.mean(0), x_tr.std(0)
  std[std == 0] = 1.0  # Constant pixels.
  prep = lambda a: ((a - mean) / std).astype(np.float32)
  return prep(x_tr), y_tr, prep(x_te), y_te


def train(tx: optax.GradientTransformation, seed: int) -> dict:
  """Minibatch training with `tx`; returns the final params."""
  x_tr, y_tr, _, _ = digits()
  model = MLP()
  params = model.init(jax.random.PRNGKey(seed), x_tr[:1])["params"]
  x_tr, y_tr = jnp.asarray(x_tr), jnp.asarray(y_tr)
  batches = jax.random.randint(jax.random.PRNGKey(1000 + seed), (STEPS, BATCH), 0, len(y_tr))

  def loss(p, xb, yb):
    logits = model.apply({"params": p}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def run(params):
    def body(carry, idx):
      p, s = carry
      updates, s = tx.update(jax.grad(loss)(p, x_tr[idx], y_tr[idx]), s, p)
      return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(body, (params, tx.init(params)), batches)[0][0]

  return run(params)


def accuracy(params) -> float:
  _, _, x_te, y_te = digits()
  logits = MLP().apply({"params": params}, jnp.asarray(x_te))
  assert isinstance(logits, jax.Array)
  return float(np.mean(np.asarray(logits.argmax(-1)) == y_te))


def hidden_weights(params) -> np.ndarray:
  return np.concatenate([np.asarray(params[name]["kernel"]).ravel() for name in HIDDEN])


SETTINGS = {
  "unregularized": lambda: optax.sgd(LR),
  "prox_l1": lambda: optax.chain(optax.sgd(LR), optax_norms.prox_l1(ALPHA, LR, mask="**/kernel")),
  "add_l1_decay": lambda: optax.chain(
    optax_norms.add_l1_decay(ALPHA, mask="**/kernel"), optax.sgd(LR)
  ),
}


@functools.cache
def results(seed: int) -> dict[str, dict[str, float]]:
  table = {}
  for name, make in SETTINGS.items():
    params = train(make(), seed)
    w = hidden_weights(params)
    table[name] = {
      "accuracy": accuracy(params),
      "exact_zeros": float(np.mean(w == 0)),
      "below_1e-3": float(np.mean(np.abs(w) < 1e-3)),
    }
  return table


@pytest.mark.parametrize("seed", SEEDS)
def test_prox_l1_gives_exact_zeros_at_same_accuracy(seed):
  res = results(seed)
  assert res["unregularized"]["exact_zeros"] == 0.0
  assert res["unregularized"]["accuracy"] > 0.95  # The baseline itself learned the task.
  assert res["prox_l1"]["exact_zeros"] >= 0.5
  assert res["prox_l1"]["accuracy"] >= res["unregularized"]["accuracy"] - 0.02


@pytest.mark.parametrize("seed", SEEDS)
def test_add_l1_decay_gives_no_exact_zeros(seed):
  res = results(seed)
  assert res["add_l1_decay"]["exact_zeros"] < 0.01
  # The subgradient form does optimize the same penalty: many weights end up tiny, just not 0.
  assert res["add_l1_decay"]["below_1e-3"] > 0.5 * res["prox_l1"]["exact_zeros"]
  assert res["add_l1_decay"]["below_1e-3"] > 5 * res["unregularized"]["below_1e-3"]


def report() -> None:
  """Prints the table: setting, test accuracy, exact-zero and |w| < 1e-3 fractions."""
  print(f"MLP 64-128-128-10 on digits, sgd lr={LR}, alpha={ALPHA}, {STEPS} steps of {BATCH}")
  print(f"{'seed':>4} {'setting':<14} {'test acc':>8} {'exact 0':>8} {'|w|<1e-3':>9}")
  for seed in SEEDS:
    for name, row in results(seed).items():
      print(
        f"{seed:>4} {name:<14} {row['accuracy']:8.4f} {row['exact_zeros']:8.4f} "
        f"{row['below_1e-3']:9.4f}"
      )


if __name__ == "__main__":
  report()
