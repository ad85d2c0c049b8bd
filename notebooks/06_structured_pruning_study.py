"""The structured-pruning study beside notebooks/06_structured_pruning.ipynb (not run in CI).

The notebook's character-level LM (2 layers, 4 heads of dimension 8, 128 MLP neurons per
layer, trained on the source of ``argparse``), trained longer on longer windows, 3 seeds
(the initialization and the batches), pruned to whole heads and neurons five ways:

- dense: plain Adam (the reference);
- magnitude after training: the dense model's heads and neurons ranked by their coupled norm
  (``group_report``), the smallest zeroed to a budget, evaluated without further training;
- (a) ``optax.adam`` → ``prox_group_l2(α, lr, groups=...)``, α on a grid around the rule of
  thumb ``α_T = (n/√p_g)/(lr·T)``;
- (b) ``prox_adam(lr, group=α, groups=...)``, α around its own ``α_T`` (Adam's metric);
- (c) ``optax.adam`` → ``constrain_group_sparsity`` with Zhu & Gupta's cubic ramp, two budgets.

Every run's dead groups are found with numpy on the weights and checked against
``group_report``; one run per method is sliced into a smaller model whose logits are checked
against the pruned model's. The table (parameters kept vs validation loss, mean ± standard
deviation over the seeds) is written as markdown to ``docs/structured-pruning-study.md``.

Run from the repository root:

    python notebooks/06_structured_pruning_study.py
"""

from __future__ import annotations

import argparse
import inspect
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_norms as on

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "structured-pruning-study.md"
COMMAND = "python notebooks/06_structured_pruning_study.py"

D, HEADS, DIM, NEURONS, LAYERS, CTX = 32, 4, 8, 128, 2, 64
BATCH, STEPS, LR = 16, 1000, 3e-3
SEEDS = (0, 1, 2)
RAMP_BEGIN, RAMP_END, EVERY = 100, 700, 10  # the budget: cubic ramp, mask frozen after 700
BUDGETS = ((0.5, 0.75), (0.75, 0.875))  # (heads, neurons) fractions pruned per layer
GRID_A = 2.0 ** np.arange(0, 1.6, 0.5)  # α / α_T for (a)
GRID_B = 2.0 ** np.arange(-0.5, 1.1, 0.5)  # α / α_T for (b)
LECUN = nnx.initializers.lecun_normal()

text = inspect.getsource(argparse)
chars = sorted(set(text))
VOCAB = len(chars)
data = np.array([chars.index(c) for c in text], np.int32)
split = int(0.9 * len(data))
train_data, val_data = data[:split], data[split:]
n_val = len(val_data) // (CTX + 1)
val_x = jnp.asarray(val_data[: n_val * (CTX + 1)].reshape(n_val, CTX + 1))


class Attention(nnx.Module):
  def __init__(self, heads, *, init, rngs):
    def proj(shape_in, shape_out, axis=-1):
      return nnx.LinearGeneral(
        shape_in, shape_out, axis=axis, use_bias=False, kernel_init=init, rngs=rngs
      )

    self.query, self.key, self.value = (proj(D, (heads, DIM)) for _ in range(3))
    self.out = proj((heads, DIM), D, axis=(-2, -1))

  def __call__(self, x):
    q, k, v = self.query(x), self.key(x), self.value(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(DIM)
    causal = jnp.tril(jnp.ones((x.shape[-2], x.shape[-2]), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v))


class MLP(nnx.Module):
  def __init__(self, neurons, *, init, rngs):
    self.mlp_in = nnx.Linear(D, neurons, kernel_init=init, rngs=rngs)
    self.mlp_out = nnx.Linear(neurons, D, kernel_init=init, rngs=rngs)

  def __call__(self, x):
    return self.mlp_out(nnx.gelu(self.mlp_in(x)))


class Block(nnx.Module):
  def __init__(self, heads, neurons, *, init, rngs):
    self.ln1, self.ln2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
    self.attn = Attention(heads, init=init, rngs=rngs)
    self.mlp = MLP(neurons, init=init, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class LM(nnx.Module):
  def __init__(self, heads, neurons, *, init=LECUN, rngs):
    self.tok = nnx.Embed(VOCAB, D, rngs=rngs)
    self.pos = nnx.Embed(CTX, D, rngs=rngs)
    self.blocks = nnx.List([Block(h, f, init=init, rngs=rngs) for h, f in zip(heads, neurons)])
    self.ln = nnx.LayerNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))


def build(heads, neurons, init=LECUN, seed=0):
  graphdef, state = nnx.split(LM(heads, neurons, init=init, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def loss_of(params, seqs, graphdef):
  logits = nnx.merge(graphdef, params)(seqs[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:]).mean()


def count(params):
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


HEAD_GROUPS = on.coupled_groups(
  "**/attn", {"query/kernel": 1, "key/kernel": 1, "value/kernel": 1, "out/kernel": 0}
)
NEURON_GROUPS = on.coupled_groups(
  "**/mlp", {"mlp_in/kernel": -1, "mlp_in/bias": 0, "mlp_out/kernel": 0}
)
GROUPS = [HEAD_GROUPS, NEURON_GROUPS]
P_HEAD, P_NEURON = 4 * D * DIM, 2 * D + 1
ATTN = [f"blocks/{layer}/attn" for layer in range(LAYERS)]
MLPS = [f"blocks/{layer}/mlp" for layer in range(LAYERS)]
GRAPH, _ = build((HEADS,) * LAYERS, (NEURONS,) * LAYERS)
INITS = [build((HEADS,) * LAYERS, (NEURONS,) * LAYERS, seed=s)[1] for s in SEEDS]
TOTAL = count(INITS[0])
BATCHES = []
for s in SEEDS:
  starts = np.random.default_rng(s).integers(0, len(train_data) - CTX - 1, (STEPS, BATCH))
  BATCHES.append(train_data[starts[..., None] + np.arange(CTX + 1)])
val_loss = jax.jit(lambda p: loss_of(p, val_x, GRAPH))


def head_slices(block):
  a = block["attn"]
  return [
    np.concatenate(
      [a[n]["kernel"][:, g, :].ravel() for n in ("query", "key", "value")]
      + [a["out"]["kernel"][g].ravel()]
    )
    for g in range(a["out"]["kernel"].shape[0])
  ]


def neuron_slices(block):
  m = block["mlp"]
  return [
    np.concatenate(
      [m["mlp_in"]["kernel"][:, g], m["mlp_in"]["bias"][g : g + 1], m["mlp_out"]["kernel"][g]]
    )
    for g in range(m["mlp_in"]["bias"].shape[0])
  ]


def alive(params):
  p = jax.tree.map(np.asarray, jax.device_get(params))
  heads = [np.array([np.any(s != 0) for s in head_slices(p["blocks"][i])]) for i in range(LAYERS)]
  neurons = [
    np.array([np.any(s != 0) for s in neuron_slices(p["blocks"][i])]) for i in range(LAYERS)
  ]
  return heads, neurons


def train(make_tx, configs):
  """One run per ``(hyper, seed)`` in `configs`, vmapped; returns their results."""
  hypers = jnp.asarray([h for h, _ in configs], jnp.float32)
  inits = jax.tree.map(lambda *x: jnp.stack(x), *[INITS[SEEDS.index(s)] for _, s in configs])
  batches = jnp.asarray(np.stack([BATCHES[SEEDS.index(s)] for _, s in configs]))

  @jax.jit
  def run(hypers, inits, batches):
    def one(h, params0, batches):
      tx = make_tx(h)

      def step(carry, seqs):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_of)(params, seqs, GRAPH)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

      (params, state), losses = jax.lax.scan(step, (params0, tx.init(params0)), batches)
      return params, state, losses

    return jax.vmap(one)(hypers, inits, batches)

  t = time.perf_counter()
  params, state, losses = jax.block_until_ready(run(hypers, inits, batches))
  print(f"  {len(configs)} runs: {time.perf_counter() - t:.0f} s", flush=True)
  results = []
  for i, (h, s) in enumerate(configs):
    p = jax.tree.map(lambda x, i=i: x[i], params)
    heads, neurons = alive(p)
    report = jax.device_get(on.group_report(p, GROUPS))
    for layer in range(LAYERS):
      assert report[ATTN[layer]]["zero_groups"] == (~heads[layer]).sum()
      assert report[MLPS[layer]]["zero_groups"] == (~neurons[layer]).sum()
    dead = sum((~x).sum() for x in heads) * P_HEAD + sum((~x).sum() for x in neurons) * P_NEURON
    results.append(
      {
        "hyper": float(h),
        "seed": s,
        "params": p,
        "state": jax.tree.map(lambda x, i=i: x[i], state),
        "heads": [int(x.sum()) for x in heads],
        "neurons": [int(x.sum()) for x in neurons],
        "kept": TOTAL - int(dead),
        "val": float(val_loss(p)),
      }
    )
  return results


def check_sliced(run):
  """Slices the dead groups out into a smaller LM: equal logits, the kept parameter count."""
  heads, neurons = alive(run["params"])
  graphdef, small = build(
    [int(h.sum()) for h in heads],
    [int(n.sum()) for n in neurons],
    init=nnx.initializers.zeros_init(),
  )
  shapes = jax.tree.map(np.shape, small)
  big = jax.tree.map(np.asarray, jax.device_get(run["params"]))
  for name in ("tok", "pos", "ln", "head"):
    small[name] = big[name]
  for i in range(LAYERS):
    b, s = big["blocks"][i], small["blocks"][i]
    kh, kn = np.flatnonzero(heads[i]), np.flatnonzero(neurons[i])
    s["ln1"], s["ln2"] = b["ln1"], b["ln2"]
    for name in ("query", "key", "value"):
      s["attn"][name]["kernel"] = np.take(b["attn"][name]["kernel"], kh, axis=1)
    s["attn"]["out"]["kernel"] = np.take(b["attn"]["out"]["kernel"], kh, axis=0)
    s["mlp"]["mlp_in"]["kernel"] = np.take(b["mlp"]["mlp_in"]["kernel"], kn, axis=1)
    s["mlp"]["mlp_in"]["bias"] = np.take(b["mlp"]["mlp_in"]["bias"], kn, axis=0)
    s["mlp"]["mlp_out"]["kernel"] = np.take(b["mlp"]["mlp_out"]["kernel"], kn, axis=0)
    s["mlp"]["mlp_out"]["bias"] = b["mlp"]["mlp_out"]["bias"]
  assert jax.tree.map(np.shape, small) == shapes
  assert count(small) == run["kept"]
  x = val_x[:64, :-1]
  want = np.asarray(nnx.merge(GRAPH, run["params"])(x))
  got = np.asarray(nnx.merge(graphdef, small)(x))
  worst = float(np.max(np.abs(got - want)))
  assert worst <= 1e-5 * np.max(np.abs(want)), worst
  return worst


def magnitude_prune(params, head_fraction, neuron_fraction):
  report = jax.device_get(on.group_report(params, GROUPS))
  p = jax.tree.map(np.array, jax.device_get(params))
  for i in range(LAYERS):
    b = p["blocks"][i]
    for g in np.argsort(report[ATTN[i]]["norms"], kind="stable")[: int(head_fraction * HEADS)]:
      for name in ("query", "key", "value"):
        b["attn"][name]["kernel"][:, g, :] = 0
      b["attn"]["out"]["kernel"][g] = 0
    order = np.argsort(report[MLPS[i]]["norms"], kind="stable")
    for g in order[: int(neuron_fraction * NEURONS)]:
      b["mlp"]["mlp_in"]["kernel"][:, g] = 0
      b["mlp"]["mlp_in"]["bias"][g] = 0
      b["mlp"]["mlp_out"]["kernel"][g] = 0
  return p


def budget_tx(head_fraction, neuron_fraction):
  def budget(groups, final):
    schedule = on.polynomial_sparsity_schedule(final, begin_step=RAMP_BEGIN, end_step=RAMP_END)
    # update_end is the first step with no new mask: one past end_step, so that the mask of
    # step end_step (with the final budget) is the one frozen.
    return on.constrain_group_sparsity(
      schedule, groups=groups, update_every=EVERY, update_end=RAMP_END + 1
    )

  return lambda _: optax.chain(
    optax.adam(LR), budget(HEAD_GROUPS, head_fraction), budget(NEURON_GROUPS, neuron_fraction)
  )


def summary(label, alpha, runs):
  kept = np.array([r["kept"] for r in runs])
  val = np.array([r["val"] for r in runs])
  heads = " / ".join(",".join(map(str, r["heads"])) for r in runs)
  neurons = " / ".join(",".join(map(str, r["neurons"])) for r in runs)
  return (
    f"| {label} | {alpha} | {heads} | {neurons} | {kept.mean():.0f} ± {kept.std():.0f} "
    f"({100 * kept.mean() / TOTAL:.0f}%) | {val.mean():.4f} ± {val.std():.4f} |"
  )


def main():
  start = time.perf_counter()
  print(f"{len(text)} characters, vocabulary {VOCAB}; {TOTAL} parameters", flush=True)
  # α_T for (a): the root-mean-square entry n/√p_g of a group at initialization.
  report0 = [jax.device_get(on.group_report(p, GROUPS)) for p in INITS]
  rms_head = np.median([r[a]["norms"] for r in report0 for a in ATTN]) / np.sqrt(P_HEAD)
  rms_neuron = np.median([r[a]["norms"] for r in report0 for a in MLPS]) / np.sqrt(P_NEURON)
  alpha_t = (rms_head + rms_neuron) / 2 / (LR * STEPS)
  print("dense and (a): adam → prox_group_l2", flush=True)
  alphas_a = [0.0, *(alpha_t * GRID_A)]
  runs_a = train(
    lambda a: optax.chain(optax.adam(LR), on.prox_group_l2(a, LR, groups=GROUPS)),
    [(a, s) for a in alphas_a for s in SEEDS],
  )
  dense = [r for r in runs_a if r["hyper"] == 0.0]
  runs_a = [r for r in runs_a if r["hyper"] != 0.0]
  # α_T for (b): the same, weighted by Adam's d = √ν̂ + eps at the end of the dense runs.
  weighted = []
  for r in dense:
    nu = optax.tree_utils.tree_get(r["state"], "nu")
    d = jax.tree.map(lambda v: np.sqrt(np.asarray(v) / (1 - 0.999**STEPS)) + 1e-8, nu)
    init = INITS[SEEDS.index(r["seed"])]
    weighted.append(jax.tree.map(lambda dd, w: dd * np.asarray(w), d, init))
  rms_b = [
    np.median(
      [np.linalg.norm(s) for w in weighted for i in range(LAYERS) for s in fn(w["blocks"][i])]
    )
    / np.sqrt(p)
    for fn, p in ((head_slices, P_HEAD), (neuron_slices, P_NEURON))
  ]
  alpha_t_b = float(np.mean(rms_b)) / (LR * STEPS)
  print("(b): prox_adam", flush=True)
  runs_b = train(
    lambda a: on.prox_adam(LR, group=a, groups=GROUPS),
    [(a, s) for a in alpha_t_b * GRID_B for s in SEEDS],
  )
  print("(c): group budget", flush=True)
  runs_c = {
    fractions: train(budget_tx(*fractions), [(0.0, s) for s in SEEDS]) for fractions in BUDGETS
  }
  for fractions, runs in runs_c.items():
    for r in runs:
      assert r["heads"] == [HEADS - int(fractions[0] * HEADS)] * LAYERS, r["heads"]
      assert r["neurons"] == [NEURONS - int(fractions[1] * NEURONS)] * LAYERS, r["neurons"]
  magnitude = {}
  for fractions in BUDGETS:
    magnitude[fractions] = []
    for r in dense:
      p = magnitude_prune(r["params"], *fractions)
      heads, neurons = alive(p)
      dead = sum((~x).sum() for x in heads) * P_HEAD + sum((~x).sum() for x in neurons) * P_NEURON
      magnitude[fractions].append(
        {
          "params": p,
          "heads": [int(x.sum()) for x in heads],
          "neurons": [int(x.sum()) for x in neurons],
          "kept": TOTAL - int(dead),
          "val": float(val_loss(p)),
        }
      )
  worst = max(
    check_sliced(runs[0]) for runs in (dense, runs_a, runs_b, *runs_c.values(), *magnitude.values())
  )
  print(f"sliced models equal the pruned ones: largest |Δlogit| {worst:.1e}", flush=True)

  rows = [summary("dense (Adam)", "", dense)]
  for fractions in BUDGETS:
    label = f"magnitude after training, {fractions[0]:.0%} heads / {fractions[1]:.1%} neurons"
    rows.append(summary(label, "", magnitude[fractions]))
  for a in sorted({r["hyper"] for r in runs_a}):
    rows.append(
      summary("(a) adam → prox_group_l2", f"{a:.4f}", [r for r in runs_a if r["hyper"] == a])
    )
  for a in sorted({r["hyper"] for r in runs_b}):
    rows.append(summary("(b) prox_adam", f"{a:.2e}", [r for r in runs_b if r["hyper"] == a]))
  for fractions, runs in runs_c.items():
    label = f"(c) group budget, {fractions[0]:.0%} heads / {fractions[1]:.1%} neurons"
    rows.append(summary(label, "", runs))
  reading = []
  for fractions in BUDGETS:
    budget = runs_c[fractions]
    size = np.mean([r["kept"] for r in budget])

    def nearest(runs, size=size):
      by_alpha = {}
      for r in runs:
        by_alpha.setdefault(r["hyper"], []).append(r)
      candidates = list(by_alpha.values())
      gaps = [abs(np.mean([x["kept"] for x in c]) - size) for c in candidates]
      return candidates[int(np.argmin(gaps))]

    parts = [
      ("(c) the budget", budget),
      ("(b) prox_adam", nearest(runs_b)),
      ("(a) adam → prox_group_l2", nearest(runs_a)),
      ("magnitude after training", magnitude[fractions]),
    ]
    shown = "; ".join(
      f"{label} {np.mean([r['val'] for r in rs]):.3f} at "
      f"{100 * np.mean([r['kept'] for r in rs]) / TOTAL:.0f}%"
      for label, rs in parts
    )
    reading.append(
      f"- At the budget {fractions[0]:.0%} of the heads / {fractions[1]:.1%} of the neurons "
      f"pruned ({100 * size / TOTAL:.0f}% of the parameters kept), mean validation loss: "
      f"{shown} (dense: {np.mean([r['val'] for r in dense]):.3f})."
    )
  wall = time.perf_counter() - start
  cpu = platform.processor() or platform.machine()
  page = (
    f"""# Structured pruning: parameters kept vs validation loss

The study beside the notebook [Structured pruning: heads and neurons as coupled
groups](notebooks/06_structured_pruning.ipynb): the same character-level LM (2 layers, 4 heads
of dimension 8 and {NEURONS} MLP neurons per layer, {TOTAL} parameters; trained on the source
of the standard library's `argparse`, the last 10% held out), trained longer ({STEPS} Adam
steps of {BATCH}×{CTX} tokens, learning rate {LR}) with {len(SEEDS)} seeds (the
initialization and the batches), and pruned to whole heads and neurons
(`coupled_groups`) five ways:

- **dense**: plain Adam, the reference;
- **magnitude after training**: each layer's heads and neurons of the dense model ranked by
  their coupled norm (`group_report`), the smallest zeroed to the budget, evaluated without
  further training;
- **(a)** `optax.adam` → `prox_group_l2(α, lr, groups=[heads, neurons])`, α on a √2 grid from
  the rule of thumb `α_T = (n/√p_g)/(lr·T)` = {alpha_t:.4f} (`n/√p_g` the median
  root-mean-square entry of a group at initialization) to {GRID_A[-1]:.1f}·α_T;
- **(b)** `prox_adam(lr, group=α, groups=[heads, neurons])`, α on a √2 grid from
  {GRID_B[0]:.2f}·α_T to {GRID_B[-1]:.0f}·α_T with its own α_T = {alpha_t_b:.2e} (the same rule
  in Adam's metric: each entry weighted by `d = √v̂ + eps` as the dense runs end);
- **(c)** `optax.adam` → `constrain_group_sparsity` (one per group kind) with Zhu & Gupta's
  cubic ramp from step {RAMP_BEGIN} to {RAMP_END}, the mask chosen every {EVERY} steps and frozen
  from step {RAMP_END + 1} on (`update_end = end_step + 1`: at `update_end = end_step` the last
  mask would be chosen one period before the ramp's end, with a budget just below the final
  one).

Parameters kept are those of the sliced model (the dead heads and neurons removed: one run of
each method was sliced and its logits checked equal to the pruned model's, largest difference
{worst:.1e}); every run's zero groups were checked against numpy. Heads and neurons kept are
per layer, `layer 0,layer 1` for each seed in turn. Mean ± standard deviation over the seeds.

| method | α | heads kept per layer (per seed) | neurons kept per layer (per seed) | params kept | validation loss |
|---|---|---|---|---|---|
"""
    + "\n".join(rows)
    + """

Reading the table (the prox rows nearest each budget's size; the prox methods set a size
through α, so their heads and neurons per layer vary between seeds and layers, where the
budget's counts are exact):

"""
    + "\n".join(reading)
    + f"""

Command (from the repository root): `{COMMAND}`. Machine: {os.cpu_count()}-core {cpu} CPU
(shared with other jobs), Python {platform.python_version()}, jax {jax.__version__}, flax
{sys.modules["flax"].__version__}, optax {optax.__version__}.
Wall time: {wall / 60:.1f} minutes. The runs were kept small (a {TOTAL}-parameter model,
{STEPS} steps) so that the whole study fits in about 10 minutes on that machine.
"""
  )
  OUT.write_text(page)
  print("\n".join(rows))
  print(f"wrote {OUT} in {wall:.0f} s")


if __name__ == "__main__":
  main()
