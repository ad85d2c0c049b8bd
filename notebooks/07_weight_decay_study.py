"""The longer weight-decay study behind notebook 07 (not run in CI): writes docs/weight-decay-study.md.

A char-level pre-LayerNorm transformer LM on the source of the standard library's ``argparse``
(``inspect.getsource``), warmup + cosine to zero, Adam followed by decoupled decay under each
convention (``"lr"``, ``"independent"``, ``"adamc"``), cautious decay (``"lr"``), CPR
(warm start) and no decay. Every method gets a 3-value sweep. The runs go one after the other
(vmapping models over seeds or sweep values was slower on this CPU): one compile of the
gradient for all, one of the update per method (λ is traced; CPR's warm start is static). The decay strengths are set from the timescale rule
(Wang & Aitchison 2025): ``τ = fraction·steps`` iterations, ``λ = decay_from_timescale(τ, peak,
convention=...)``, so the same fractions transfer to the notebook's shorter run.

  PYTHONPATH=. python notebooks/07_weight_decay_study.py            # ~8 min on 2 shared CPU cores
  PYTHONPATH=. python notebooks/07_weight_decay_study.py --steps 60 --seeds 1 --out /tmp/smoke.md
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import optax_norms as on

CTX, D, HEADS, LAYERS, BATCH = 32, 32, 4, 2, 32
PEAK, WARMUP_FRACTION = 3e-3, 0.05
MASK = "**/kernel"  # Dense and attention kernels: not biases, LayerNorm, embeddings
TIMESCALE_FRACTIONS = (2.0, 0.5, 0.125)  # τ / steps, the decay sweep
CPR_WARM_START = (1, 2, 4)  # multiples of the warmup length, the CPR sweep
METHODS = ("none", "lr", "independent", "adamc", "cautious", "cpr")
ROOT = pathlib.Path(__file__).resolve().parent.parent

# Data: the source of argparse, characters as tokens; the last 10% is held out.
TEXT = inspect.getsource(argparse)
CHARS = sorted(set(TEXT))
VOCAB = len(CHARS)
_ids = np.array([CHARS.index(c) for c in TEXT], np.int32)
_split = int(0.9 * len(_ids))
TRAIN = jnp.asarray(_ids[:_split])
_val = _ids[_split:]
_n_val = (len(_val) - 1) // (CTX + 1)
VAL = jnp.asarray(_val[: _n_val * (CTX + 1)].reshape(_n_val, CTX + 1))  # disjoint windows


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    causal = nn.make_causal_mask(jnp.ones(x.shape[:-1]))
    attn = nn.MultiHeadDotProductAttention(num_heads=HEADS, deterministic=True, name="attn")
    x = x + attn(nn.LayerNorm(name="ln1")(x), mask=causal)
    h = nn.gelu(nn.Dense(4 * D, name="mlp_in")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(D, name="mlp_out")(h)


class LM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="tok")(tokens)
    x = x + nn.Embed(CTX, D, name="pos")(jnp.arange(tokens.shape[-1]))
    for i in range(LAYERS):
      x = Block(name=f"block{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


MODEL = LM()


def init_params(seed):
  return MODEL.init(jax.random.key(seed), jnp.zeros((1, CTX), jnp.int32))["params"]


def loss_fn(params, xy):
  logits = MODEL.apply({"params": params}, xy[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, xy[:, 1:]).mean()


def sample_batch(key):
  starts = jax.random.randint(key, (BATCH,), 0, TRAIN.shape[0] - CTX - 1)
  return jax.vmap(lambda s: jax.lax.dynamic_slice(TRAIN, (s,), (CTX + 1,)))(starts)


def kernels(tree):
  return [
    leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if path[-1].key == "kernel"
  ]


def schedule(steps):
  return optax.warmup_cosine_decay_schedule(0.0, PEAK, int(WARMUP_FRACTION * steps), steps, 0.0)


def strength(method, value, steps):
  """λ of a decay method from a timescale fraction; CPR's warm-start steps from a multiple."""
  if method == "cpr":
    return int(value * int(WARMUP_FRACTION * steps))
  convention = "independent" if method == "independent" else "lr"  # adamc: λ as for "lr"
  return on.decay_from_timescale(value * steps, PEAK, convention=convention)


def optimizer(method, lam, steps):
  lr = schedule(steps)
  adam = [optax.scale_by_adam(), optax.scale_by_learning_rate(lr)]
  if method == "none":
    return optax.chain(*adam)
  if method == "cpr":
    return optax.chain(
      *adam, on.cpr(kappa_init_method="warm_start", kappa_init_param=lam, mask=MASK)
    )
  convention = {"cautious": "lr"}.get(method, method)
  decay = on.add_decoupled_weight_decay(
    lam,
    lr,
    convention=convention,
    peak_learning_rate=PEAK,
    cautious=method == "cautious",
    mask=MASK,
  )
  return optax.chain(*adam, decay)


def _grad_and_stats(params, key):
  loss, grads = jax.value_and_grad(loss_fn)(params, sample_batch(key))
  g_w, w_w = optax.global_norm(kernels(grads)), optax.global_norm(kernels(params))
  return grads, (loss, optax.global_norm(grads), g_w / w_w, w_w)


# One compile of the gradient serves every model (vmapping models is slower on CPU here).
GRAD = jax.jit(_grad_and_stats)
VALIDATE = jax.jit(lambda params: loss_fn(params, VAL))


def _fixed_cpr(warm_start, steps):
  return lambda lam: optimizer("cpr", warm_start, steps)  # lam unused: the bound is static


def make_update(make_tx):
  """The jitted update of the optimizer ``make_tx(lam)``; ``lam`` is traced (one compile)."""

  @jax.jit
  def update(grads, state, params, lam):
    updates, state = make_tx(lam).update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return update


def train(make_tx, update, lam, seed, steps, log_every, snapshots=()):
  """One model: per-step logs, validation losses every `log_every` steps, final state."""
  params = init_params(seed)
  lam = jnp.float32(lam)
  state = make_tx(lam).init(params)
  keys = jax.random.split(jax.random.key(1000 + seed), steps)
  logs, vals, kept = [], [], {}
  for i in range(steps):
    grads, out = GRAD(params, keys[i])
    params, state = update(grads, state, params, lam)
    logs.append(out)
    if (i + 1) % log_every == 0:
      vals.append(VALIDATE(params))
    if i + 1 in snapshots:
      kept[i + 1] = jax.device_get(params)
  logs = [np.asarray(x) for x in zip(*jax.device_get(logs))]
  return {
    **dict(zip(("loss", "grad_norm", "ratio", "weight_norm"), logs)),
    "val": np.asarray(jax.device_get(vals)),
    "params": jax.device_get(params),
    "state": jax.device_get(state),
    "snapshots": kept,
  }


def late_rise(curve, steps):
  """The late phase's rise: the mean over the last 10% of steps / the lowest 10%-window mean
  in the second half of the run (1.00: no rise while the lr decays to zero)."""
  window = max(1, steps // 10)
  smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
  return float(smooth[-1] / smooth[steps // 2 :].min())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "weight-decay-study.md")
  args = parser.parse_args()
  steps, seeds = args.steps, list(range(args.seeds))
  log_every = max(1, steps // 20)
  start = time.perf_counter()
  rows = []
  for method in METHODS:
    t = time.perf_counter()
    if method == "cpr":
      values = list(CPR_WARM_START)
      runs = []
      for v in values:
        make = _fixed_cpr(strength(method, v, steps), steps)
        update = make_update(make)
        runs.append([train(make, update, 0.0, s, steps, log_every) for s in seeds])
    else:
      values = [None] if method == "none" else list(TIMESCALE_FRACTIONS)
      make = lambda lam, method=method: optimizer(method, lam, steps)
      update = make_update(make)
      lams = [0.0] if method == "none" else [strength(method, v, steps) for v in values]
      runs = [[train(make, update, lam, s, steps, log_every) for s in seeds] for lam in lams]
    logs = {
      k: np.array([[r[k] for r in per] for per in runs]).swapaxes(0, 1)
      for k in ("val", "grad_norm", "ratio")
    }
    final = logs["val"][:, :, -1]  # (seed, value)
    best = int(np.argmin(final.mean(axis=0)))
    rises = [late_rise(logs["grad_norm"][s, best], steps) for s in range(len(seeds))]
    ratio_rises = [late_rise(logs["ratio"][s, best], steps) for s in range(len(seeds))]
    ratio_end = logs["ratio"][:, best, -max(1, steps // 20) :].mean(axis=1)
    every = {
      key: [
        np.mean([late_rise(logs[key][s, j], steps) for s in range(len(seeds))])
        for j in range(len(values))
      ]
      for key in ("grad_norm", "ratio")
    }
    rows.append(
      {
        "method": method,
        "every": every,
        "values": values,
        "best": values[best],
        "sweep": final.mean(axis=0),
        "val": final[:, best],
        "ratio": ratio_end,
        "rise": np.asarray(rises),
        "ratio_rise": np.asarray(ratio_rises),
        "curves": {k: v[:, best].mean(axis=0) for k, v in logs.items()},
      }
    )
    print(
      f"{method:>12}: sweep {np.round(final.mean(axis=0), 4)} best {values[best]} "
      f"val {final[:, best].mean():.4f} ± {final[:, best].std():.4f} rise {np.mean(rises):.3f} "
      f"({time.perf_counter() - t:.0f} s)",
      flush=True,
    )
  wall = time.perf_counter() - start
  figure(rows, steps, args.out.with_suffix(".png"))
  args.out.write_text(report(rows, steps, seeds, wall, args))
  print(f"wrote {args.out} ({wall:.0f} s)")


def figure(rows, steps, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  window = max(1, steps // 40)
  x = np.arange(window, steps + 1)
  for r in rows:
    ls = "--" if r["method"] == "independent" else "-"
    for ax, key in zip(axes[:2], ("ratio", "grad_norm")):
      ax.plot(
        x,
        np.convolve(r["curves"][key], np.ones(window) / window, "valid"),
        ls=ls,
        label=r["method"],
      )
    val = r["curves"]["val"]
    axes[2].plot(np.arange(1, len(val) + 1) * (steps // len(val)), val, ls=ls, label=r["method"])
  axes[0].set(title="‖g_W‖ / ‖W‖ (weight matrices)", xlabel="step", yscale="log")
  axes[1].set(title="‖g‖ (all parameters)", xlabel="step", yscale="log")
  axes[2].set(title="validation loss", xlabel="step", ylim=(None, 2.6))
  axes[0].legend(fontsize=7)
  fig.suptitle("mean over seeds, each method at its best strength", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def describe(method, value, steps):
  if method == "none":
    return "–"
  if method == "cpr":
    return f"warm start k = {strength(method, value, steps)} steps ({value}× warmup)"
  lam = strength(method, value, steps)
  return f"τ = {value:g}·T → λ = {lam:.3g}"


def report(rows, steps, seeds, wall, args):
  path_name = args.out.stem
  command = "PYTHONPATH=. python notebooks/07_weight_decay_study.py"
  if steps != 600 or len(seeds) != 3:
    command += f" --steps {steps} --seeds {len(seeds)}"
  lines = [
    "# Weight decay study: conventions, cautious decay, CPR",
    "",
    "The longer run behind [notebook 07](notebooks/07_weight_decay.ipynb) (not run in CI). A",
    f"char-level pre-LayerNorm transformer LM ({LAYERS} blocks, width {D}, {HEADS} heads, context",
    f"{CTX}, {sum(x.size for x in jax.tree_util.tree_leaves(init_params(0)))} parameters) on the",
    f"source of the standard library's `argparse` ({len(TEXT)} characters, {VOCAB} distinct; the",
    f"last 10% held out), batch {BATCH}, {steps} steps, Adam with a warmup ({int(WARMUP_FRACTION * steps)}",
    f"steps) + cosine schedule to zero from a peak of {PEAK}, followed by the decay, masked to the",
    "weight matrices (`**/kernel`: Dense and attention kernels, not biases, LayerNorm or",
    f"embeddings). {len(seeds)} seeds (initialization and batch order); every method gets a",
    "3-value sweep and is reported at the value with the lowest mean final validation loss.",
    "",
    "Decay strengths come from the timescale rule (Wang & Aitchison 2025): `τ = f·T` iterations",
    f"with `f` in {{{', '.join(f'{f:g}' for f in TIMESCALE_FRACTIONS)}}} and `λ =",
    'decay_from_timescale(τ, peak, convention=...)`: `1/(peak·τ)` for `"lr"`, `"adamc"` and',
    'cautious, `1/τ` for `"independent"`, so at the peak the three decay a weight by the same',
    "factor per step. CPR sweeps its warm start `k` (the bound is each matrix's `Σw²` at step",
    f"`k`) over {{{', '.join(str(m) for m in CPR_WARM_START)}}}× the warmup.",
    "",
    "- **validation loss**: cross-entropy (nats per character) on all disjoint held-out windows",
    "  after the last step, mean ± std over seeds;",
    "- **‖g_W‖/‖W‖**: the gradient norm over the weight matrices divided by their norm, mean",
    f"  over the last {max(1, steps // 20)} steps (and seeds);",
    "- **late rise**: the mean over the last 10% of steps divided by the lowest 10%-window mean",
    "  in the second half of the run (where the lr decays from half its peak to zero), of the",
    "  gradient norm (all parameters) and of ‖g_W‖/‖W‖; 1.00 means no late rise (mean over seeds).",
    "",
    "| method | best strength | swept: mean final val loss | final val loss | ‖g_W‖/‖W‖ | late rise ‖g‖ | late rise ‖g_W‖/‖W‖ |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    sweep = " / ".join(f"{v:.4f}" for v in r["sweep"])
    lines.append(
      f"| {r['method']} | {describe(r['method'], r['best'], steps)} | {sweep} | "
      f"{r['val'].mean():.4f} ± {r['val'].std():.4f} | {r['ratio'].mean():.4f} | "
      f"{r['rise'].mean():.2f} | {r['ratio_rise'].mean():.2f} |"
    )
  lines += [
    "",
    "The swept column lists the mean final validation loss for each sweep value in the order",
    f"given above (decays: `f` = {' / '.join(f'{f:g}' for f in TIMESCALE_FRACTIONS)}; CPR: `k` =",
    f"{' / '.join(str(m) for m in CPR_WARM_START)} × warmup).",
    "",
    "Late rise at every swept strength (mean over seeds; `‖g‖` then `‖g_W‖/‖W‖`), in the",
    "order of the sweep: AdamC's claim concerns decays whose timescale is short against the",
    "run (small `f`), where the weight norm can settle while the lr decays.",
    "",
    "| method | late rise ‖g‖ | late rise ‖g_W‖/‖W‖ |",
    "|---|---|---|",
    *(
      f"| {r['method']} | {' / '.join(f'{v:.2f}' for v in r['every']['grad_norm'])} | "
      f"{' / '.join(f'{v:.2f}' for v in r['every']['ratio'])} |"
      for r in rows
    ),
    "",
    f"![curves]({path_name}.png)",
    "",
    f"Command: `{command}`. Machine: a 2-core x86 CPU shared with other jobs",
    f"({platform.processor() or platform.machine()}), jax {jax.__version__}, optax",
    f"{optax.__version__}, Python {platform.python_version()}; wall time {wall / 60:.1f} min.",
    "",
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
